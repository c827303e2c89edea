//! Synthetic `reaction-logs` input with its exact expected windows: used by
//! `bench aggregate` and by the integration tests that check the
//! aggregators against the real broker.
//!
//! Event times advance steadily with jitter smaller than half the grace, so
//! no valid event is late; on purpose some records are malformed or invalid
//! (to the DLQ with `malformed`/`invalid` reasons) and some are far in the
//! past once every partition has moved on (to the DLQ as `late`).

use crate::domain::reaction::Action;
use crate::domain::window::WindowKind;
use rand::{Rng, SeedableRng};
use rustc_hash::FxHashMap;

#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub events: u64,
    pub campaigns: u32,
    pub creatives: u32,
    pub users: u64,
    /// Event time of the first event, ms.
    pub base_ms: i64,
    /// Event time covered by all events, ms.
    pub span_ms: i64,
    /// The aggregators' grace (jitter stays below half of it).
    pub grace_ms: i64,
    /// One record in this many is malformed or invalid (0: none).
    pub bad_every: u64,
    /// One record in this many (after the first tenth) is late (0: none).
    pub late_every: u64,
    pub seed: u64,
}

impl SynthSpec {
    pub fn new(events: u64) -> Self {
        SynthSpec {
            events,
            campaigns: 50,
            creatives: 4,
            users: 200_000,
            base_ms: 1_700_000_000_000,
            span_ms: 30 * 60_000,
            grace_ms: 10_000,
            bad_every: 10_007,
            late_every: 9_973,
            seed: 1,
        }
    }
}

/// (campaign index, creative index, action, window kind, window start)
pub type WindowId = (u32, u32, Action, WindowKind, i64);

/// What the aggregation of the generated input must produce.
#[derive(Debug, Default)]
pub struct Expected {
    pub windows: FxHashMap<WindowId, u64>,
    pub valid: u64,
    pub bad: u64,
    pub late: u64,
}

impl Expected {
    /// The expected window of a final record, parsed from its names.
    pub fn window_id(
        campaign: &str,
        creative: &str,
        action: Action,
        kind: WindowKind,
        start: i64,
    ) -> Option<WindowId> {
        let c = campaign.strip_prefix('c')?.parse().ok()?;
        let a = creative.strip_prefix('a')?.parse().ok()?;
        Some((c, a, action, kind, start))
    }
}

const BAD: [&str; 6] = [
    "{not json",
    r#"{"event_id":"x","campaign_id":"c0","creative_id":"a0","user_id":"u","action":"buy","ts":1}"#,
    r#"{"event_id":"x","campaign_id":"c0","creative_id":"a0","user_id":"u","action":"click","ts":-5}"#,
    r#"{"event_id":"x","creative_id":"a0","user_id":"u","action":"click","ts":5}"#,
    r#"[1,2,3]"#,
    "",
];

/// Generate the records in order, calling `emit(key, value)` for each (a
/// `None` value is a null record); returns what must come out.
pub fn generate(spec: &SynthSpec, mut emit: impl FnMut(&str, Option<&[u8]>)) -> Expected {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed);
    let mut exp = Expected::default();
    let half = (spec.grace_ms / 2 - 1).max(0);
    let mut value = String::with_capacity(192);
    let mut key = String::with_capacity(16);
    for i in 0..spec.events {
        let user = rng.gen_range(0..spec.users.max(1));
        key.clear();
        use std::fmt::Write;
        let _ = write!(key, "u{user}");
        if spec.bad_every > 0 && i % spec.bad_every == spec.bad_every - 1 {
            let b = BAD[(i / spec.bad_every) as usize % BAD.len()];
            exp.bad += 1;
            emit(
                &key,
                if b.is_empty() {
                    None
                } else {
                    Some(b.as_bytes())
                },
            );
            continue;
        }
        let trend = spec.base_ms + (spec.span_ms as i128 * i as i128 / spec.events as i128) as i64;
        let late = spec.late_every > 0
            && i >= spec.events / 10
            && i >= 5_000
            && i % spec.late_every == spec.late_every - 1;
        let ts = if late {
            spec.base_ms - 600_000 - rng.gen_range(0..60_000)
        } else {
            trend + rng.gen_range(-half..=half)
        };
        let c = rng.gen_range(0..spec.campaigns.max(1));
        let a = rng.gen_range(0..spec.creatives.max(1));
        let action = match rng.gen_range(0..10) {
            0..=6 => Action::Send,
            7..=8 => Action::Impression,
            _ => Action::Click,
        };
        value.clear();
        let _ = write!(
            value,
            r#"{{"event_id":"e{i}","campaign_id":"c{c}","creative_id":"a{a}","user_id":"u{user}","action":"{}","ts":{ts}}}"#,
            action.as_str()
        );
        emit(&key, Some(value.as_bytes()));
        if late {
            exp.late += 1;
            continue;
        }
        exp.valid += 1;
        for kind in [WindowKind::Tumbling1m, WindowKind::Hopping5m1m] {
            for start in kind.starts_for(ts) {
                *exp.windows.entry((c, a, action, kind, start)).or_default() += 1;
            }
        }
    }
    exp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_what_it_expects() {
        let spec = SynthSpec::new(50_000);
        let mut n = 0;
        let exp = generate(&spec, |_, _| n += 1);
        assert_eq!(n, 50_000);
        assert_eq!(exp.valid + exp.bad + exp.late, 50_000);
        assert!(exp.bad >= 4 && exp.late >= 4);
        let tumbling: u64 = exp
            .windows
            .iter()
            .filter(|(k, _)| k.3 == WindowKind::Tumbling1m)
            .map(|(_, v)| v)
            .sum();
        assert_eq!(tumbling, exp.valid);
    }
}
