//! Reaction records of `reaction-logs`: parsing and validation by the rules
//! of CONTRACT.md. Anything invalid yields a reason for the dead-letter topic.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Send,
    Impression,
    Click,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Send => "send",
            Action::Impression => "impression",
            Action::Click => "click",
        }
    }
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "send" => Some(Action::Send),
            "impression" => Some(Action::Impression),
            "click" => Some(Action::Click),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reaction {
    pub event_id: String,
    pub campaign_id: String,
    pub creative_id: String,
    pub user_id: String,
    pub action: Action,
    pub ts: i64,
}

/// A validated reaction borrowing its strings from the record where it can
/// (the aggregator's hot path allocates nothing per event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReactionView<'a> {
    pub event_id: Cow<'a, str>,
    pub campaign_id: Cow<'a, str>,
    pub creative_id: Cow<'a, str>,
    pub user_id: Cow<'a, str>,
    pub action: Action,
    pub ts: i64,
}

impl ReactionView<'_> {
    pub fn into_owned(self) -> Reaction {
        Reaction {
            event_id: self.event_id.into_owned(),
            campaign_id: self.campaign_id.into_owned(),
            creative_id: self.creative_id.into_owned(),
            user_id: self.user_id.into_owned(),
            action: self.action,
            ts: self.ts,
        }
    }
}

/// The common shape: unescaped strings, known action, integer `ts`. Only
/// ever accepts what the full validation accepts; anything else (escapes,
/// duplicates, wrong types) falls back to the full validation, which also
/// names the reason.
#[derive(Deserialize)]
struct Fast<'a> {
    event_id: &'a str,
    campaign_id: &'a str,
    creative_id: &'a str,
    user_id: &'a str,
    action: Action,
    ts: i64,
}

/// Parse and validate a reaction value; `Err` carries the DLQ reason.
pub fn parse_reaction_view(value: Option<&[u8]>) -> Result<ReactionView<'_>, String> {
    // UTF-8 is checked once for the whole value (std's fast path), not per
    // string as `from_slice` does.
    if let Some(Ok(text)) = value.map(std::str::from_utf8) {
        if let Ok(f) = serde_json::from_str::<Fast>(text) {
            let all_set = !(f.event_id.is_empty()
                || f.campaign_id.is_empty()
                || f.creative_id.is_empty()
                || f.user_id.is_empty());
            if all_set && f.ts >= 0 {
                return Ok(ReactionView {
                    event_id: Cow::Borrowed(f.event_id),
                    campaign_id: Cow::Borrowed(f.campaign_id),
                    creative_id: Cow::Borrowed(f.creative_id),
                    user_id: Cow::Borrowed(f.user_id),
                    action: f.action,
                    ts: f.ts,
                });
            }
        }
    }
    parse_reaction(value).map(|r| ReactionView {
        event_id: Cow::Owned(r.event_id),
        campaign_id: Cow::Owned(r.campaign_id),
        creative_id: Cow::Owned(r.creative_id),
        user_id: Cow::Owned(r.user_id),
        action: r.action,
        ts: r.ts,
    })
}

/// Parse a reaction value; `Err` carries the DLQ reason.
pub fn parse_reaction(value: Option<&[u8]>) -> Result<Reaction, String> {
    let bytes = match value {
        None => return Err("invalid: null value".into()),
        Some([]) => return Err("invalid: empty value".into()),
        Some(b) => b,
    };
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("malformed: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "invalid: value is not a JSON object".to_string())?;
    let s = |f: &str| -> Result<String, String> {
        match obj.get(f) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) => Err(format!("invalid: {f} is empty")),
            None | Some(Value::Null) => Err(format!("invalid: {f} is missing")),
            Some(_) => Err(format!("invalid: {f} is not a string")),
        }
    };
    let event_id = s("event_id")?;
    let campaign_id = s("campaign_id")?;
    let creative_id = s("creative_id")?;
    let user_id = s("user_id")?;
    let action_s = s("action")?;
    let action = Action::parse(&action_s)
        .ok_or_else(|| format!("invalid: action {action_s:?} is unknown"))?;
    let ts = match obj.get("ts") {
        Some(Value::Number(n)) => n
            .as_i64()
            .filter(|t| *t >= 0)
            .ok_or_else(|| "invalid: ts is not an integer >= 0".to_string())?,
        None | Some(Value::Null) => return Err("invalid: ts is missing".into()),
        Some(_) => return Err("invalid: ts is not an integer >= 0".into()),
    };
    Ok(Reaction {
        event_id,
        campaign_id,
        creative_id,
        user_id,
        action,
        ts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_invalid() {
        let ok = br#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"u","action":"click","ts":5,"x":1}"#;
        assert_eq!(parse_reaction(Some(ok)).unwrap().action, Action::Click);
        let bad: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"{", "malformed"),
            (b"[1]", "not a JSON object"),
            (br#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"u","action":"buy","ts":5}"#, "action"),
            (br#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"u","action":"send","ts":-1}"#, "ts"),
            (br#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"u","action":"send","ts":1.5}"#, "ts"),
            (br#"{"event_id":"","campaign_id":"c","creative_id":"a","user_id":"u","action":"send","ts":1}"#, "event_id"),
        ];
        for (b, want) in bad {
            let e = parse_reaction(Some(b)).unwrap_err();
            assert!(e.contains(want), "{e} should mention {want}");
        }
        assert!(parse_reaction(None).unwrap_err().contains("null"));
    }

    proptest::proptest! {
        /// The fast path never disagrees with the full validation.
        #[test]
        fn fast_path_agrees_with_full_validation(
            ev in "[a-z\\\\\"]{0,3}",
            c in "[a-z\\\\\"é]{0,3}",
            action in "(send|click|impression|buy)",
            ts in proptest::prop_oneof![proptest::strategy::Just("-1".to_string()), "[0-9]{1,3}", proptest::strategy::Just("1.5".to_string()), proptest::strategy::Just("null".to_string())],
            dup in proptest::bool::ANY,
        ) {
            let esc = |s: &str| serde_json::to_string(s).unwrap();
            let mut text = format!(
                r#"{{"event_id":{},"campaign_id":{},"creative_id":"a","user_id":"u","action":"{}","ts":{}"#,
                esc(&ev), esc(&c), action, ts
            );
            if dup {
                text.push_str(r#","campaign_id":"z""#);
            }
            text.push('}');
            let full = parse_reaction(Some(text.as_bytes()));
            let view = parse_reaction_view(Some(text.as_bytes())).map(|v| v.into_owned());
            proptest::prop_assert_eq!(full, view);
        }
    }
}
