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

/// Ids are non-empty UTF-8 strings of at most this many bytes (CONTRACT.md).
pub const MAX_ID_BYTES: usize = 128;

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
#[derive(Debug, PartialEq, Eq, Deserialize)]
struct Fast<'a> {
    event_id: &'a str,
    campaign_id: &'a str,
    creative_id: &'a str,
    user_id: &'a str,
    action: Action,
    ts: i64,
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while matches!(b.get(*i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        *i += 1;
    }
}

fn expect(b: &[u8], i: &mut usize, c: u8) -> Option<()> {
    (b.get(*i) == Some(&c)).then(|| *i += 1)
}

/// `b` in every byte of a word.
const fn splat(b: u8) -> u64 {
    0x0101_0101_0101_0101 * b as u64
}

/// The high bit set in the first byte of `w` that is below `n` (n <= 128);
/// bits above that first byte may be set spuriously (borrows), so only the
/// lowest set bit is meaningful.
const fn bytes_below(w: u64, n: u8) -> u64 {
    w.wrapping_sub(splat(n)) & !w & splat(0x80)
}

/// A JSON string without escapes or control characters at `i`: the byte
/// range of its contents. Eight bytes at a time up to the first quote,
/// backslash or control character, then byte by byte.
fn plain_str(b: &[u8], i: &mut usize) -> Option<(usize, usize)> {
    expect(b, i, b'"')?;
    let start = *i;
    let mut j = start;
    while let Some(chunk) = b.get(j..j + 8) {
        let w = u64::from_le_bytes(chunk.try_into().ok()?);
        let special = bytes_below(w ^ splat(b'"'), 1)
            | bytes_below(w ^ splat(b'\\'), 1)
            | bytes_below(w, 0x20);
        if special != 0 {
            // The lowest flagged byte is the first special one.
            j += (special.trailing_zeros() / 8) as usize;
            break;
        }
        j += 8;
    }
    while let Some(&c) = b.get(j) {
        match c {
            b'"' => {
                *i = j + 1;
                return Some((start, j));
            }
            b'\\' | 0..=0x1f => return None,
            _ => j += 1,
        }
    }
    None
}

/// Whether all eight bytes of `w` are ASCII digits.
const fn all_digits(w: u64) -> bool {
    w & splat(0xf0) == splat(0x30) && w.wrapping_add(splat(0x06)) & splat(0xf0) == splat(0x30)
}

/// The value of eight ASCII digits (the first in the lowest byte).
const fn eight_digits(w: u64) -> u64 {
    let v = w - splat(b'0');
    let v = (v * 10 + (v >> 8)) & 0x00ff_00ff_00ff_00ff;
    let v = (v * 100 + (v >> 16)) & 0x0000_ffff_0000_ffff;
    (v * 10_000 + (v >> 32)) & 0xffff_ffff
}

/// Bytes of `w` that are not ASCII digits: the lowest set bit marks the
/// first (a borrow or carry only leaves a byte that is flagged itself).
const fn non_digits(w: u64) -> u64 {
    (w.wrapping_sub(splat(b'0')) | w.wrapping_add(splat(0x46)) | w) & splat(0x80)
}

/// Eight bytes at `j`, zero-padded past the end (zero is not a digit).
fn word_at(b: &[u8], j: usize) -> u64 {
    let load = |k: usize| u64::from_le_bytes(b[k..k + 8].try_into().expect("eight bytes"));
    if j + 8 <= b.len() {
        load(j)
    } else if b.len() >= 8 && j < b.len() {
        // The last eight bytes, shifted down past the end.
        load(b.len() - 8) >> (8 * (j + 8 - b.len()))
    } else {
        let mut buf = [0u8; 8];
        let rest = b.get(j..).unwrap_or_default();
        buf[..rest.len()].copy_from_slice(rest);
        u64::from_le_bytes(buf)
    }
}

/// The value of the first `n` (1..=8) digits of `w`: left-padded with '0's
/// to eight.
const fn leading_digits(w: u64, n: u32) -> u64 {
    if n == 8 {
        return eight_digits(w);
    }
    eight_digits((w << (8 * (8 - n))) | (splat(b'0') >> (8 * n)))
}

const POW10: [u64; 8] = [1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000];

/// A JSON integer (no fraction, no exponent, no leading zero) fitting i64.
/// Up to 15 digits (a millisecond timestamp has 13): the digits of two
/// words found and read at once; longer ones by `long_digits`.
fn integer(b: &[u8], i: &mut usize) -> Option<i64> {
    let neg = b.get(*i) == Some(&b'-');
    if neg {
        *i += 1;
    }
    let start = *i;
    let w1 = word_at(b, start);
    let m1 = non_digits(w1);
    let (digits, v) = if m1 != 0 {
        let n = m1.trailing_zeros() / 8;
        (n as usize, if n == 0 { 0 } else { leading_digits(w1, n) })
    } else {
        let w2 = word_at(b, start + 8);
        let m2 = non_digits(w2);
        if m2 == 0 {
            long_digits(b, start)?
        } else {
            let n = m2.trailing_zeros() / 8;
            let low = if n == 0 { 0 } else { leading_digits(w2, n) };
            (8 + n as usize, eight_digits(w1) * POW10[n as usize] + low)
        }
    };
    let end = start + digits;
    if digits == 0
        || (digits > 1 && b[start] == b'0')
        // serde_json reads `-0` as a float
        || (neg && v == 0)
        || matches!(b.get(end), Some(b'.' | b'e' | b'E'))
    {
        return None;
    }
    *i = end;
    let v = i64::try_from(v).ok()?;
    Some(if neg { -v } else { v })
}

/// The digits at `start` when there are 16 or more, and their value:
/// eight at a time with overflow checks, then one by one. `None` past u64.
fn long_digits(b: &[u8], start: usize) -> Option<(usize, u64)> {
    let mut j = start;
    let mut v: u64 = 0;
    while let Some(w) = b
        .get(j..j + 8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("eight bytes")))
        .filter(|w| all_digits(*w))
    {
        v = v.checked_mul(100_000_000)?.checked_add(eight_digits(w))?;
        j += 8;
    }
    while let Some(c) = b.get(j).filter(|c| c.is_ascii_digit()) {
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        j += 1;
    }
    Some((j - start, v))
}

/// Skip a simple value of a field we do not use.
fn skip_value(b: &[u8], i: &mut usize) -> Option<()> {
    match b.get(*i)? {
        b'"' => plain_str(b, i).map(|_| ()),
        b'-' | b'0'..=b'9' => integer(b, i).map(|_| ()),
        _ => {
            let lit: &[u8] = [&b"true"[..], b"false", b"null"]
                .into_iter()
                .find(|l| b[*i..].starts_with(l))?;
            *i += lit.len();
            Some(())
        }
    }
}

/// The hot path: a byte scanner for the common shape (a flat object,
/// strings without escapes, an integer `ts`, simple extra fields). `None`
/// whenever anything is unusual, and the caller falls back to serde_json —
/// so it only ever accepts what serde_json accepts, with the same values
/// (property test below), at a fraction of the cost.
fn scan(text: &str) -> Option<Fast<'_>> {
    let b = text.as_bytes();
    let mut i = 0;
    let (mut ev, mut cp, mut cr, mut us, mut action, mut ts) = (None, None, None, None, None, None);
    skip_ws(b, &mut i);
    expect(b, &mut i, b'{')?;
    loop {
        skip_ws(b, &mut i);
        let (ks, ke) = plain_str(b, &mut i)?;
        skip_ws(b, &mut i);
        expect(b, &mut i, b':')?;
        skip_ws(b, &mut i);
        let slot = match &b[ks..ke] {
            b"event_id" => Some(&mut ev),
            b"campaign_id" => Some(&mut cp),
            b"creative_id" => Some(&mut cr),
            b"user_id" => Some(&mut us),
            b"action" => {
                let (s, e) = plain_str(b, &mut i)?;
                if action.replace(Action::parse(&text[s..e])?).is_some() {
                    return None;
                }
                None
            }
            b"ts" => {
                if ts.replace(integer(b, &mut i)?).is_some() {
                    return None;
                }
                None
            }
            _ => {
                skip_value(b, &mut i)?;
                None
            }
        };
        if let Some(slot) = slot {
            let (s, e) = plain_str(b, &mut i)?;
            if slot.replace(&text[s..e]).is_some() {
                return None; // a duplicate: serde_json decides
            }
        }
        skip_ws(b, &mut i);
        match b.get(i)? {
            b',' => i += 1,
            b'}' => {
                i += 1;
                break;
            }
            _ => return None,
        }
    }
    skip_ws(b, &mut i);
    if i != b.len() {
        return None;
    }
    Some(Fast {
        event_id: ev?,
        campaign_id: cp?,
        creative_id: cr?,
        user_id: us?,
        action: action?,
        ts: ts?,
    })
}

/// The contract's own shape, as every producer of ours writes it: the six
/// fields in CONTRACT.md's order, compact, nothing else. Literal keys are
/// compared whole instead of dispatched one by one; `None` for anything
/// else, and the general scanner takes over (property test below: only
/// what serde_json accepts, with the same values).
fn canonical(text: &str) -> Option<Fast<'_>> {
    let b = text.as_bytes();
    let mut i = 0;
    let event_id = field(text, &mut i, br#"{"event_id":"#)?;
    let campaign_id = field(text, &mut i, br#","campaign_id":"#)?;
    let creative_id = field(text, &mut i, br#","creative_id":"#)?;
    let user_id = field(text, &mut i, br#","user_id":"#)?;
    literal(b, &mut i, br#","action":""#)?;
    let action = match b.get(i)? {
        b's' => literal(b, &mut i, b"send\"").map(|_| Action::Send),
        b'i' => literal(b, &mut i, b"impression\"").map(|_| Action::Impression),
        _ => literal(b, &mut i, b"click\"").map(|_| Action::Click),
    }?;
    literal(b, &mut i, br#","ts":"#)?;
    let ts = integer(b, &mut i)?;
    (i + 1 == b.len() && b[i] == b'}').then_some(Fast {
        event_id,
        campaign_id,
        creative_id,
        user_id,
        action,
        ts,
    })
}

/// The literal `l` at `i` (a fixed length: compared as a few words).
#[inline(always)]
fn literal<const N: usize>(b: &[u8], i: &mut usize, l: &[u8; N]) -> Option<()> {
    let got: &[u8; N] = b.get(*i..*i + N)?.try_into().ok()?;
    (got == l).then(|| *i += N)
}

/// The key `key` (with its opening quote and colon) at `i`, then a plain
/// string value.
#[inline(always)]
fn field<'a, const N: usize>(text: &'a str, i: &mut usize, key: &[u8; N]) -> Option<&'a str> {
    literal(text.as_bytes(), i, key)?;
    let (s, e) = plain_str(text.as_bytes(), i)?;
    text.get(s..e)
}

/// Parse and validate a reaction value; `Err` carries the DLQ reason.
pub fn parse_reaction_view(value: Option<&[u8]>) -> Result<ReactionView<'_>, String> {
    // UTF-8 is checked once for the whole value (SIMD), not per string as
    // `from_slice` does.
    if let Some(Ok(text)) = value.map(simdutf8::basic::from_utf8) {
        if let Some(f) = canonical(text)
            .or_else(|| scan(text))
            .or_else(|| serde_json::from_str::<Fast>(text).ok())
        {
            let id_ok = |s: &str| !s.is_empty() && s.len() <= MAX_ID_BYTES;
            let all_set = id_ok(f.event_id)
                && id_ok(f.campaign_id)
                && id_ok(f.creative_id)
                && id_ok(f.user_id);
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
            Some(Value::String(s)) if s.len() > MAX_ID_BYTES => {
                Err(format!("invalid: {f} is longer than {MAX_ID_BYTES} bytes"))
            }
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
    fn scanner_takes_the_common_shape() {
        let text = " {\"ts\": 17 , \"event_id\":\"e\",\"campaign_id\":\"c\",\"creative_id\":\"é\",\n\"user_id\":\"u\",\"action\":\"send\",\"v\":-3,\"ok\":true,\"s\":\"x\"}\t";
        let f = scan(text).expect("the common shape is scanned");
        assert_eq!(
            (f.campaign_id, f.creative_id, f.action, f.ts),
            ("c", "é", Action::Send, 17)
        );
        for odd in [
            r#"{"event_id":"e","campaign_id":"c\u0031","creative_id":"a","user_id":"u","action":"send","ts":1}"#,
            r#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"u","action":"send","ts":1.0}"#,
            r#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"u","action":"send","ts":1,"x":[1]}"#,
            r#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"u","action":"send","ts":1}x"#,
        ] {
            assert!(scan(odd).is_none(), "{odd} goes to serde_json");
        }
    }

    #[test]
    fn canonical_shape_is_the_contracts_compact_form() {
        for action in [Action::Send, Action::Impression, Action::Click] {
            let r = Reaction {
                event_id: "e1".into(),
                campaign_id: "c7".into(),
                creative_id: "é".into(),
                user_id: "u42".into(),
                action,
                ts: 1_700_000_000_123,
            };
            let text = serde_json::to_string(&r).expect("serialisable");
            let f = canonical(&text).expect("what serde_json writes is the canonical shape");
            assert_eq!(f, serde_json::from_str::<Fast>(&text).expect("valid"));
        }
        // Not UTF-8 inside a string of the canonical shape: malformed.
        let mut bad = br#"{"event_id":"e","campaign_id":"c","creative_id":"a?","user_id":"u","action":"send","ts":1}"#.to_vec();
        let at = bad.iter().position(|c| *c == b'?').unwrap();
        bad[at] = 0xff;
        let e = parse_reaction_view(Some(&bad)).unwrap_err();
        assert!(e.starts_with("malformed"), "{e}");
        // Overlong, surrogate, truncated and stray bytes, in a string value
        // before and after the first 64 bytes (the SIMD check's block).
        let good = br#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"????????????????????????????????????????????","action":"send","ts":1}"#;
        for seq in [
            &[0xc0, 0x80][..],
            &[0xed, 0xa0, 0x80],
            &[0xe2, 0x82],
            &[0x80],
            &[0xf5, 0x80, 0x80, 0x80],
        ] {
            for at in [63, 80, 100] {
                let mut bad = good.to_vec();
                bad[at..at + seq.len()].copy_from_slice(seq);
                assert!(std::str::from_utf8(&bad).is_err());
                let e = parse_reaction_view(Some(&bad)).unwrap_err();
                assert!(e.starts_with("malformed"), "{seq:?} at {at}: {e}");
            }
        }
        assert!(parse_reaction_view(Some(good)).is_ok());
        for odd in [
            r#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"u","action":"send","ts":1} "#,
            r#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"u","action":"sent","ts":1}"#,
            r#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"u","action":"clicks","ts":1}"#,
            r#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"u","action":"click","ts":1.5}"#,
            r#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"u","action":"click","ts":1,"x":1}"#,
            r#"{"campaign_id":"c","event_id":"e","creative_id":"a","user_id":"u","action":"click","ts":1}"#,
            r#"{"event_id":"e","campaign_id":"c\"","creative_id":"a","user_id":"u","action":"click","ts":1}"#,
            r#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"u","action":"click","ts":01}"#,
            r#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"u","action":"click","ts":1"#,
            r#"{"event_id":"e","campaign_id":"c","creative_id":"a","user_id":"u","action":"cl"#,
        ] {
            assert!(canonical(odd).is_none(), "{odd} is not the canonical shape");
        }
    }

    #[test]
    fn integers_eight_digits_at_a_time() {
        let int = |t: &str| integer(t.as_bytes(), &mut 0);
        for (t, want) in [
            ("7", Some(7)),
            ("12345678", Some(12_345_678)),
            ("1700000000123,", Some(1_700_000_000_123)),
            ("1234567812345678", Some(1_234_567_812_345_678)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775807", Some(-i64::MAX)),
            ("9223372036854775808", None),
            ("-9223372036854775808", None),
            ("123456789012345678901234", None),
            ("01234567", None),
            ("12345678.5", None),
            ("1234567e8", None),
            ("-0", None),
            ("-", None),
            ("0", Some(0)),
            ("0}", Some(0)),
            ("10", Some(10)),
            ("1234567", Some(1_234_567)),
            ("123456789", Some(123_456_789)),
            ("123456789012345", Some(123_456_789_012_345)),
            ("-123456789012345}", Some(-123_456_789_012_345)),
            ("999999999999999 ", Some(999_999_999_999_999)),
            ("1000000000000000", Some(1_000_000_000_000_000)),
            ("12é", Some(12)),
            ("00", None),
            ("-01", None),
            ("1.", None),
            ("17000000001E2", None),
            ("x1", None),
        ] {
            assert_eq!(int(t), want, "{t}");
        }
    }

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
            (format!(r#"{{"event_id":"e","campaign_id":"{}","creative_id":"a","user_id":"u","action":"send","ts":1}}"#, "c".repeat(129)).leak().as_bytes(), "campaign_id is longer than 128 bytes"),
        ];
        for (b, want) in bad {
            let e = parse_reaction(Some(b)).unwrap_err();
            assert!(e.contains(want), "{e} should mention {want}");
        }
        assert!(parse_reaction(None).unwrap_err().contains("null"));
        let with_id = |n: usize| {
            format!(
                r#"{{"event_id":"e","campaign_id":"c","creative_id":"{}","user_id":"u","action":"send","ts":1}}"#,
                "é".repeat(n)
            )
        };
        assert!(
            parse_reaction_view(Some(with_id(64).as_bytes())).is_ok(),
            "128 bytes"
        );
        let e = parse_reaction_view(Some(with_id(65).as_bytes())).unwrap_err();
        assert!(e.contains("creative_id is longer than 128 bytes"), "{e}");
    }

    /// JSON-ish pieces for the scanner's property test: keys of the
    /// schema and others, values of every kind, odd whitespace.
    fn piece() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just(r#""event_id":"e1""#.to_string()),
            Just(r#""campaign_id":"c1""#.to_string()),
            Just(r#""creative_id":"a1""#.to_string()),
            Just(r#""user_id":"u1""#.to_string()),
            "(send|click|impression|buy|Click)".prop_map(|a| format!(r#""action":"{a}""#)),
            "(-?[0-9]{1,20}|0[0-9]|1\\.5|1e3|-0|null|\"7\"|true)"
                .prop_map(|t| format!(r#""ts":{t}"#)),
            "[a-z_]{1,6}".prop_map(|k| format!(r#""{k}":1"#)),
            Just(r#""x":"a\"b""#.to_string()),
            // Long strings (eight bytes at a time), with an escape or a raw
            // control character at any position.
            "[a-zé]{0,20}".prop_map(|v| format!(r#""x":"{v}""#)),
            (
                "[a-z]{0,12}",
                "(\\\\\"|\\\\n|\u{1}|\t|\u{7f})",
                "[a-z]{0,12}"
            )
                .prop_map(|(a, m, b)| format!(r#""x":"{a}{m}{b}""#)),
            "[a-zé]{0,20}".prop_map(|v| format!(r#""event_id":"{v}""#)),
            Just(r#""x":{"y":1}"#.to_string()),
            Just(r#""x":[1]"#.to_string()),
            Just(r#""x":null"#.to_string()),
            Just(r#""x":false"#.to_string()),
            Just(r#""x":-1.25e2"#.to_string()),
            Just(r#""x":01"#.to_string()),
            Just(r#""campaign_id":"c\u0031""#.to_string()),
            Just("\"user_id\":\"u\u{1}\"".to_string()),
            Just(r#""creative_id":"é""#.to_string()),
            Just(r#""event_\u0069d":"e2""#.to_string()),
        ]
    }

    use proptest::strategy::Strategy as _;

    /// What a fast path took from `text` is what serde_json reads (and it
    /// took nothing serde_json rejects); the whole validation agrees with
    /// the full one.
    fn agrees_with_serde(
        text: &str,
        fast: Option<Fast<'_>>,
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        if let Some(fast) = fast {
            let serde: Fast =
                serde_json::from_str(text).expect("a fast path accepted what serde rejects");
            proptest::prop_assert_eq!(fast, serde);
        }
        let full = parse_reaction(Some(text.as_bytes()));
        let view = parse_reaction_view(Some(text.as_bytes())).map(|v| v.into_owned());
        proptest::prop_assert_eq!(full, view);
        Ok(())
    }

    proptest::proptest! {
        /// The scanner accepts only what serde_json accepts, with the same
        /// values; and the whole fast path agrees with the full validation.
        #[test]
        fn scanner_agrees_with_serde(
            pieces in (
                proptest::strategy::Strategy::prop_shuffle(proptest::strategy::Just(vec![
                    r#""event_id":"e1""#.to_string(),
                    r#""campaign_id":"c1""#.to_string(),
                    r#""creative_id":"a1""#.to_string(),
                    r#""user_id":"u1""#.to_string(),
                    r#""action":"click""#.to_string(),
                    r#""ts":42"#.to_string(),
                ])),
                proptest::collection::vec(piece(), 0..4),
                0usize..7,
                proptest::bool::weighted(0.2),
            ).prop_map(|(mut base, extra, at, drop_one): (Vec<String>, Vec<String>, usize, bool)| {
                if drop_one {
                    base.remove(at % base.len());
                }
                for (k, e) in extra.into_iter().enumerate() {
                    base.insert((at + k) % (base.len() + 1), e);
                }
                base
            }),
            ws in proptest::collection::vec("[ \t\n\r]{0,2}", 8),
            tail in "( |x|,|)",
        ) {
            let sep = format!("{},{}", ws[0], ws[1]);
            let text = format!("{}{{{}{}{}}}{}{}", ws[2], ws[3], pieces.join(&sep), ws[4], ws[5], tail);
            agrees_with_serde(&text, scan(&text))?;
        }

        /// The canonical shape accepts only what serde_json accepts, with
        /// the same values, whatever the strings, action and `ts` hold.
        #[test]
        fn canonical_agrees_with_serde(
            ids in proptest::collection::vec("([a-z0-9é\"\\\\\u{1}\t]|\\\\u0041){0,10}", 4),
            action in "(send|click|impression|buy|sen|clickk|Send|)",
            ts in "(-?[0-9]{1,20}|0[0-9]|1\\.5|1e3|-0|null|\"7\")",
            tail in "(}|} |}}|,|)",
        ) {
            let text = format!(
                r#"{{"event_id":"{}","campaign_id":"{}","creative_id":"{}","user_id":"{}","action":"{}","ts":{}{}"#,
                ids[0], ids[1], ids[2], ids[3], action, ts, tail
            );
            agrees_with_serde(&text, canonical(&text))?;
        }

        /// The fast path never disagrees with the full validation.
        #[test]
        fn fast_path_agrees_with_full_validation(
            ev in "[a-z\\\\\"]{0,12}",
            c in "[a-z\\\\\"é]{0,12}",
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
