//! Property tests of the window state machine and its changelog:
//! * the bucketed engine emits exactly what a naive per-window reference
//!   counter emits, and dead-letters the same events as late;
//! * any interleaving of partitions and any crash point (with the crashed
//!   transaction's records left visible, as brokers that do not hide
//!   aborted transactions do) give the same totals per window as the input;
//! * at every restart, the local checkpoint plus the changelog tail gives
//!   the same state as a replay of the whole changelog.

use proptest::prelude::*;
use smartmsg::domain::changelog::{Parts, Replayer, TxnMarker, META_KEY};
use smartmsg::domain::reaction::Action;
use smartmsg::domain::window::{
    FinalWindow, WindowConfig, WindowEngine, WindowKind, WindowMeta, MINUTE_MS,
};
use std::collections::{BTreeMap, HashMap};

type Key = (String, String, Action, WindowKind, i64);

/// The obvious implementation: a counter per window, closed by the same
/// rules (stream time - grace, or an idle close at a wall time, which
/// closes no further than the open windows reach).
struct Reference {
    grace: i64,
    stream: i64,
    closed_until: i64,
    open: BTreeMap<Key, u64>,
    out: Vec<(Key, u64)>,
}

impl Reference {
    fn new(grace: i64) -> Self {
        Reference {
            grace,
            stream: -1,
            closed_until: i64::MIN,
            open: BTreeMap::new(),
            out: Vec::new(),
        }
    }
    fn close(&mut self, until: i64) {
        if until <= self.closed_until {
            return;
        }
        self.closed_until = until;
        let due: Vec<Key> = self
            .open
            .keys()
            .filter(|k| k.4 + k.3.size_ms() <= until)
            .cloned()
            .collect();
        for k in due {
            let n = self.open.remove(&k).unwrap();
            self.out.push((k, n));
        }
    }
    /// An idle close at wall time `now`: the open windows past end +
    /// grace, and no further than the last open window's end.
    fn idle_close(&mut self, now: i64) {
        let Some(last_end) = self.open.keys().map(|k| k.4 + k.3.size_ms()).max() else {
            return;
        };
        self.close((now - self.grace).min(last_end));
    }
    fn ingest(&mut self, c: &str, a: &str, action: Action, ts: i64) -> bool {
        let end = ts.div_euclid(MINUTE_MS) * MINUTE_MS + MINUTE_MS;
        if end <= self.closed_until {
            return false;
        }
        for kind in [WindowKind::Tumbling1m, WindowKind::Hopping5m1m] {
            for s in kind.starts_for(ts) {
                *self
                    .open
                    .entry((c.into(), a.into(), action, kind, s))
                    .or_default() += 1;
            }
        }
        if ts > self.stream {
            self.stream = ts;
            self.close(ts - self.grace);
        }
        true
    }
}

fn key_of(f: &FinalWindow) -> Key {
    (
        f.campaign_id.clone(),
        f.creative_id.clone(),
        f.action,
        f.window,
        f.window_start,
    )
}

#[derive(Debug, Clone)]
enum Step {
    Event { c: u8, a: u8, action: u8, ts: i64 },
    Idle(i64),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            8 => (0u8..3, 0u8..2, 0u8..3, 0i64..(20 * MINUTE_MS))
                .prop_map(|(c, a, action, ts)| Step::Event { c, a, action, ts }),
            1 => (0i64..(30 * MINUTE_MS)).prop_map(Step::Idle),
        ],
        0..300,
    )
}

fn action(i: u8) -> Action {
    [Action::Send, Action::Impression, Action::Click][i as usize % 3]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn bucketed_engine_matches_the_reference(steps in steps(), grace in 0i64..120_000) {
        let mut e = WindowEngine::new(WindowConfig { grace_ms: grace, hopping: true }, 0)
            .with_part_entries(2);
        let mut r = Reference::new(grace);
        let mut got: Vec<(Key, u64)> = Vec::new();
        for s in &steps {
            match s {
                Step::Event { c, a, action: ac, ts } => {
                    let (c, a) = (format!("c{c}"), format!("a{a}"));
                    let accepted = e.ingest_parts(&c, &a, action(*ac), *ts).is_ok();
                    prop_assert_eq!(accepted, r.ingest(&c, &a, action(*ac), *ts));
                }
                Step::Idle(now) => {
                    e.idle_close(*now);
                    r.idle_close(*now);
                }
            }
            let (_, finals) = e.take_changes();
            got.extend(finals.iter().map(|f| (key_of(f), f.count)));
        }
        let mut want = r.out.clone();
        want.sort();
        got.sort();
        prop_assert_eq!(got, want);
    }
}

/// The changelog of one partition as a broker keeps it: committed and
/// (visible) aborted transactions alike.
#[derive(Default, Clone)]
struct Changelog(Vec<(Vec<u8>, Option<Vec<u8>>)>);

/// Outputs of one partition as readers see them (aborted ones included).
#[derive(Default)]
struct Sink {
    finals: Vec<FinalWindow>,
}

/// The local checkpoint of committed state, as the aggregator keeps it in
/// sled: parts, and the input offset, changelog position, epoch and window
/// progress they reflect.
struct Local {
    parts: Parts,
    meta: WindowMeta,
    input_offset: u64,
    position: usize,
    epoch: u64,
}

fn replay(log: &[(Vec<u8>, Option<Vec<u8>>)], mut r: Replayer) -> Replayer {
    for (k, v) in log {
        r.record(Some(k), v.as_deref());
    }
    r
}

/// Run one partition's aggregator over `input`, committing every `batch`
/// records, crashing at the given input positions (the transaction in
/// progress is written but never committed) and restarting from the
/// changelog and the committed offset. Every `checkpoint_every` commits the
/// committed changes go to the local checkpoint; each restart checks that
/// the checkpoint plus the changelog tail equals the whole replay. Ends
/// with an idle close.
fn run_partition(
    p: u32,
    input: &[(String, String, Action, i64)],
    batch: usize,
    crashes: &[usize],
    checkpoint_every: usize,
    log: &mut Changelog,
    sink: &mut Sink,
) {
    let cfg = WindowConfig {
        grace_ms: 30_000,
        hopping: true,
    };
    let initial = WindowEngine::new(cfg, p).meta();
    let mut local = Local {
        parts: Parts::new(),
        meta: initial,
        input_offset: 0,
        position: 0,
        epoch: 0,
    };
    let mut committed = 0u64;
    let mut epoch = 0u64;
    let mut crashes: Vec<usize> = crashes.to_vec();
    crashes.sort_unstable();
    crashes.dedup();
    let mut crashes = crashes.into_iter().peekable();
    'incarnation: loop {
        epoch += 1;
        let full = replay(
            &log.0,
            Replayer::new(Parts::new(), initial, committed, 0, 0, false),
        );
        assert_eq!(
            full.input_offset(),
            committed,
            "replay reaches the committed offset"
        );
        let tail = replay(
            &log.0[local.position..],
            Replayer::new(
                local.parts.clone(),
                local.meta,
                committed,
                local.input_offset,
                local.epoch,
                true,
            ),
        );
        assert_eq!(
            tail.input_offset(),
            committed,
            "checkpoint + tail reach it too"
        );
        assert_eq!(tail.meta(), full.meta());
        let epoch_floor = full.epoch();
        let meta = full.meta();
        let parts = full.into_parts();
        // The restore brings the checkpoint up to date with what the tail
        // changed (as the aggregator writes it to sled).
        for (k, v) in tail.changed() {
            match v {
                Some(v) => local.parts.insert(k, v),
                None => local.parts.remove(&k),
            };
        }
        assert_eq!(&local.parts, &parts, "checkpoint + tail = whole replay");
        local.meta = meta;
        local.input_offset = committed;
        local.position = log.0.len();
        local.epoch = epoch_floor;
        let (engine, unreadable) = WindowEngine::from_parts(cfg, p, meta, &parts);
        assert_eq!(unreadable, 0);
        // Tiny parts, so that minutes split and grow.
        let mut engine = engine.with_part_entries(2);
        epoch = epoch.max(epoch_floor + 1);
        // Each incarnation cuts its transactions differently.
        let batch = batch + epoch as usize % 3;
        let mut pos = committed as usize;
        let mut from = committed;
        let mut done = false;
        let mut commits = 0usize;
        let mut unsaved: BTreeMap<_, Option<Vec<u8>>> = BTreeMap::new();
        while !done {
            let end = (pos + batch).min(input.len());
            for (c, a, ac, ts) in &input[pos..end] {
                let _ = engine.ingest_parts(c, a, *ac, *ts);
            }
            pos = end;
            if pos == input.len() {
                engine.idle_close(i64::MAX / 2);
                done = true;
            }
            let crash = crashes.peek().is_some_and(|c| *c <= pos);
            if crash {
                // The crashing transaction also idle-closed by the wall
                // clock, which its redo will not do: its tombstones and
                // finals are what the replay must undo / readers override.
                let now = engine.meta().stream_time + 120_000;
                engine.idle_close(now);
            }
            let (changes, finals) = engine.take_changes();
            for (k, v) in &changes {
                log.0.push((k.encode(), v.clone()));
            }
            let meta = engine.meta();
            let marker = TxnMarker {
                stream_time: meta.stream_time,
                closed_until: meta.closed_until,
                from,
                input_offset: pos as u64,
                epoch,
            };
            log.0.push((META_KEY.to_vec(), Some(marker.encode())));
            sink.finals.extend(finals);
            if crash {
                crashes.next();
                continue 'incarnation; // crashed before the commit
            }
            committed = pos as u64;
            from = committed;
            unsaved.extend(changes);
            commits += 1;
            if commits.is_multiple_of(checkpoint_every) {
                for (k, v) in std::mem::take(&mut unsaved) {
                    match v {
                        Some(v) => local.parts.insert(k, v),
                        None => local.parts.remove(&k),
                    };
                }
                local.meta = meta;
                local.input_offset = committed;
                local.position = log.0.len();
                local.epoch = epoch;
            }
        }
        return;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_interleaving_and_crash_point_gives_the_input_totals(
        events in prop::collection::vec((0u8..3, 0u8..2, 0u8..3, 0i64..(8 * MINUTE_MS), 0u32..3), 1..400),
        batch in 1usize..50,
        crashes in prop::collection::vec(0usize..150, 0..6),
        checkpoint_every in 1usize..4,
    ) {
        // Event times grow with jitter smaller than half the grace, so none is late.
        let input: Vec<(String, String, Action, i64, u32)> = events
            .iter()
            .enumerate()
            .map(|(i, (c, a, ac, jitter, p))| {
                let ts = i as i64 * 1_000 + jitter % 14_000;
                (format!("c{c}"), format!("a{a}"), action(*ac), ts, *p)
            })
            .collect();
        let mut expected: HashMap<Key, u64> = HashMap::new();
        for (c, a, ac, ts, _) in &input {
            for kind in [WindowKind::Tumbling1m, WindowKind::Hopping5m1m] {
                for s in kind.starts_for(*ts) {
                    *expected.entry((c.clone(), a.clone(), *ac, kind, s)).or_default() += 1;
                }
            }
        }
        let mut last: HashMap<(Key, u32), u64> = HashMap::new();
        for p in 0..3u32 {
            let part: Vec<(String, String, Action, i64)> = input
                .iter()
                .filter(|e| e.4 == p)
                .map(|e| (e.0.clone(), e.1.clone(), e.2, e.3))
                .collect();
            let mut log = Changelog::default();
            let mut sink = Sink::default();
            run_partition(p, &part, batch, &crashes, checkpoint_every, &mut log, &mut sink);
            // Readers apply final windows by identity, last record winning.
            for f in sink.finals {
                last.insert((key_of(&f), f.partition), f.count);
            }
        }
        let mut sums: HashMap<Key, u64> = HashMap::new();
        for ((k, _), n) in last {
            *sums.entry(k).or_default() += n;
        }
        prop_assert_eq!(sums, expected);
    }
}
