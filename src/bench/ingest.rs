//! `smartmsg bench ingest`: the aggregator's own per-event cost, without a
//! broker — parsing and validating a `reaction-logs` value, then counting it
//! in the window engine (with a transaction's worth of changes taken every
//! `--batch` records, as the aggregator does). The records lie in one
//! buffer, as they do in a fetch response. In-process and repeatable: run it
//! under `valgrind --tool=callgrind` for instruction counts.

use super::synth::{generate, SynthSpec};
use crate::domain::reaction::parse_reaction_view;
use crate::domain::window::{WindowConfig, WindowEngine};
use serde_json::json;
use std::time::Instant;

#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// Number of input records.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Campaigns in the synthetic input (4 creatives each).
    #[arg(long, default_value_t = 50)]
    pub campaigns: u32,
    /// Records per transaction (the changes are taken this often).
    #[arg(long, default_value_t = 40_000)]
    pub batch: u64,
    /// Timed passes over the records; the fastest counts.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
}

/// What one pass counted: valid records, windows emitted, state changes.
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
struct Pass {
    parsed: u64,
    counted: u64,
    finals: u64,
    changes: u64,
}

pub fn run(a: IngestArgs) -> anyhow::Result<()> {
    let mut spec = SynthSpec::new(a.events);
    spec.campaigns = a.campaigns;
    // One buffer of values, as a fetch response holds them.
    let mut buf: Vec<u8> = Vec::new();
    let mut spans: Vec<Option<(usize, usize)>> = Vec::with_capacity(a.events as usize);
    let exp = generate(&spec, |_key, value| {
        spans.push(value.map(|v| {
            buf.extend_from_slice(v);
            (buf.len() - v.len(), buf.len())
        }))
    });
    let value = |s: &Option<(usize, usize)>| s.map(|(b, e)| &buf[b..e]);
    let batch = a.batch.max(1) as usize;
    let mut parse_ns = f64::MAX;
    let mut ingest_ns = f64::MAX;
    let mut last: Option<Pass> = None;
    for _ in 0..a.rounds.max(1) {
        let mut pass = Pass::default();
        let t = Instant::now();
        for s in &spans {
            pass.parsed += u64::from(parse_reaction_view(value(s)).is_ok());
        }
        parse_ns = parse_ns.min(t.elapsed().as_nanos() as f64 / a.events.max(1) as f64);

        let cfg = WindowConfig {
            grace_ms: spec.grace_ms,
            hopping: true,
        };
        let mut engine = WindowEngine::new(cfg, 0);
        let t = Instant::now();
        for (i, s) in spans.iter().enumerate() {
            if let Ok(ev) = parse_reaction_view(value(s)) {
                let counted =
                    engine.ingest_parts(&ev.campaign_id, &ev.creative_id, ev.action, ev.ts);
                pass.counted += u64::from(counted.is_ok());
            }
            if i % batch == batch - 1 || i + 1 == spans.len() {
                let (changes, finals) = engine.take_changes();
                pass.changes += changes.len() as u64;
                pass.finals += finals.len() as u64;
            }
        }
        ingest_ns = ingest_ns.min(t.elapsed().as_nanos() as f64 / a.events.max(1) as f64);
        if last.is_some_and(|l| l != pass) {
            anyhow::bail!("passes disagree: {last:?} then {pass:?}");
        }
        last = Some(pass);
    }
    let pass = last.expect("one pass at least");
    if pass.counted != exp.valid {
        anyhow::bail!("counted {} of {} valid records", pass.counted, exp.valid);
    }
    let round = |x: f64| (x * 10.0).round() / 10.0;
    println!(
        "{}",
        json!({
            "events": a.events,
            "campaigns": a.campaigns,
            "bytes_per_event": (buf.len() as f64 / a.events.max(1) as f64).round(),
            "parse_ns_per_event": round(parse_ns),
            "parse_and_count_ns_per_event": round(ingest_ns),
            "parse_and_count_events_per_s": (1e9 / ingest_ns).round(),
            "valid": pass.counted,
            "rejected": a.events - pass.counted,
            "windows_emitted": pass.finals,
            "state_changes": pass.changes,
        })
    );
    Ok(())
}
