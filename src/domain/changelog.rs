//! The aggregator's changelog: one record per changed window bucket (count,
//! or a tombstone once no open window needs it) and, closing every
//! transaction, a marker with the input offsets the transaction covers and
//! its writer's epoch. Replaying it rebuilds the window state of the
//! committed input prefix.
//!
//! Kafka hides aborted transactions from `read_committed` readers; some
//! Kafka-protocol brokers do not (BROKERS.md), so the replay defends itself:
//! * a transaction whose input end lies beyond the committed input offset
//!   never committed and is dropped;
//! * a transaction that starts where the last applied one started, written
//!   by a newer writer epoch, is the redo of an aborted transaction (a
//!   crashed node's last one): the aborted one is undone first;
//! * a transaction of an older epoch than the last applied one is a fenced
//!   zombie's and is dropped.
//!
//! Markers removed by compaction leave gaps (`from` beyond the current
//! offset); the surviving records are applied with the next marker, which is
//! what compaction means.

use crate::domain::window::{BucketKey, StateChange, WindowEngine, WindowMeta};
use serde::{Deserialize, Serialize};

/// Key of the per-transaction marker.
pub const META_KEY: &[u8] = b"__meta";

/// The marker closing one changelog transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnMarker {
    pub stream_time: i64,
    pub closed_until: i64,
    /// Input offset the transaction starts at.
    #[serde(default)]
    pub from: u64,
    /// The next input offset once this transaction is committed.
    pub input_offset: u64,
    /// Writer epoch (grows with every incarnation of a partition's aggregator).
    #[serde(default)]
    pub epoch: u64,
}

impl TxnMarker {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serialisable")
    }
    pub fn window(&self) -> WindowMeta {
        WindowMeta {
            stream_time: self.stream_time,
            closed_until: self.closed_until,
        }
    }
}

/// A bucket count as a changelog value (`None`: tombstone).
pub fn encode_count(count: Option<u64>) -> Option<Vec<u8>> {
    count.map(|c| c.to_be_bytes().to_vec())
}

fn decode_count(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

/// The transaction applied last, kept so that its redo can undo it.
struct Applied {
    from: u64,
    epoch: u64,
    before: Vec<StateChange>,
    meta_before: WindowMeta,
    offset_before: u64,
}

/// What a replay found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayStats {
    pub records: u64,
    pub applied_txns: u64,
    /// Transactions beyond the committed offset or of fenced writers.
    pub dropped_txns: u64,
    /// Aborted transactions undone when their redo appeared.
    pub undone_txns: u64,
    pub unreadable: u64,
}

/// Replays changelog records into a `WindowEngine`.
pub struct Replayer<'e> {
    engine: &'e mut WindowEngine,
    committed: u64,
    input_offset: u64,
    epoch: u64,
    pending: Vec<StateChange>,
    last: Option<Applied>,
    touched: Option<rustc_hash::FxHashSet<BucketKey>>,
    pub stats: ReplayStats,
}

impl<'e> Replayer<'e> {
    /// `input_offset` / `epoch`: what the engine's state reflects already;
    /// `committed`: the group's committed input offset. With `track`, the
    /// keys changed are remembered (`changed`).
    pub fn new(
        engine: &'e mut WindowEngine,
        committed: u64,
        input_offset: u64,
        epoch: u64,
        track: bool,
    ) -> Self {
        Replayer {
            engine,
            committed,
            input_offset,
            epoch,
            pending: Vec::new(),
            last: None,
            touched: track.then(Default::default),
            stats: ReplayStats::default(),
        }
    }

    /// Feed the next changelog record.
    pub fn record(&mut self, key: Option<&[u8]>, value: Option<&[u8]>) {
        self.stats.records += 1;
        if key == Some(META_KEY) {
            match value.and_then(|v| serde_json::from_slice::<TxnMarker>(v).ok()) {
                Some(m) => self.marker(m),
                None => {
                    self.stats.unreadable += 1;
                    self.pending.clear();
                }
            }
            return;
        }
        let Some(k) = key.and_then(BucketKey::decode) else {
            self.stats.unreadable += 1;
            return;
        };
        match value {
            None => self.pending.push((k, None)),
            Some(v) => match decode_count(v) {
                Some(c) => self.pending.push((k, Some(c))),
                None => self.stats.unreadable += 1,
            },
        }
    }

    fn marker(&mut self, m: TxnMarker) {
        if m.input_offset > self.committed || m.epoch < self.epoch {
            self.stats.dropped_txns += 1;
            self.pending.clear();
            return;
        }
        if let Some(last) = &self.last {
            if m.from == last.from && m.from < self.input_offset && m.epoch > last.epoch {
                let last = self.last.take().expect("checked");
                for (k, c) in last.before.iter().rev() {
                    self.engine.restore(k, *c);
                }
                self.engine.restore_meta(last.meta_before);
                self.input_offset = last.offset_before;
                self.stats.undone_txns += 1;
            }
        }
        let pending = std::mem::take(&mut self.pending);
        let mut before = Vec::with_capacity(pending.len());
        for (k, c) in pending {
            before.push((k.clone(), self.engine.bucket(&k)));
            self.engine.restore(&k, c);
            if let Some(t) = &mut self.touched {
                t.insert(k);
            }
        }
        self.last = Some(Applied {
            from: m.from,
            epoch: m.epoch,
            before,
            meta_before: self.engine.meta(),
            offset_before: self.input_offset,
        });
        self.engine.restore_meta(m.window());
        self.input_offset = m.input_offset;
        self.epoch = m.epoch;
        self.stats.applied_txns += 1;
    }

    /// The input offset the replayed state reflects.
    pub fn input_offset(&self) -> u64 {
        self.input_offset
    }

    /// Epoch of the last transaction applied.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The buckets changed by the replay with their current counts (when
    /// tracking), in key order.
    pub fn changed(&self) -> Vec<StateChange> {
        let Some(t) = &self.touched else {
            return Vec::new();
        };
        let mut v: Vec<StateChange> = t
            .iter()
            .map(|k| (k.clone(), self.engine.bucket(k)))
            .collect();
        v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::reaction::Action;
    use crate::domain::window::WindowConfig;

    fn key(minute: i64) -> BucketKey {
        BucketKey {
            campaign_id: "c".into(),
            creative_id: "a".into(),
            action: Action::Click,
            minute,
        }
    }

    fn engine() -> WindowEngine {
        WindowEngine::new(
            WindowConfig {
                grace_ms: 0,
                hopping: false,
            },
            0,
        )
    }

    struct Log(Vec<(Vec<u8>, Option<Vec<u8>>)>);
    impl Log {
        fn txn(&mut self, changes: &[(i64, Option<u64>)], from: u64, to: u64, epoch: u64) {
            for (m, c) in changes {
                self.0.push((key(*m).encode(), encode_count(*c)));
            }
            let marker = TxnMarker {
                stream_time: to as i64,
                closed_until: 0,
                from,
                input_offset: to,
                epoch,
            };
            self.0.push((META_KEY.to_vec(), Some(marker.encode())));
        }
        fn replay(&self, committed: u64) -> (WindowEngine, u64, ReplayStats) {
            let mut e = engine();
            let mut r = Replayer::new(&mut e, committed, 0, 0, false);
            for (k, v) in &self.0 {
                r.record(Some(k), v.as_deref());
            }
            let (off, stats) = (r.input_offset(), r.stats.clone());
            (e, off, stats)
        }
    }

    #[test]
    fn drops_transactions_beyond_the_committed_offset() {
        let mut log = Log(Vec::new());
        log.txn(&[(0, Some(2))], 0, 10, 1);
        log.txn(&[(0, Some(5)), (60_000, Some(1))], 10, 20, 1);
        let (e, off, stats) = log.replay(10);
        assert_eq!(off, 10);
        assert_eq!(e.bucket(&key(0)), Some(2));
        assert_eq!(e.bucket(&key(60_000)), None);
        assert_eq!(stats.dropped_txns, 1);
    }

    #[test]
    fn an_aborted_transaction_shown_to_readers_is_undone_by_its_redo() {
        // Epoch 1 commits [0,10), then crashes in [10,20) after writing a
        // bucket the redo never writes (e.g. an idle close); epoch 2 redoes
        // [10,15) and [15,20): all committed is epoch 1's first and epoch 2's.
        let mut log = Log(Vec::new());
        log.txn(&[(0, Some(2)), (60_000, Some(1))], 0, 10, 1);
        log.txn(&[(0, None), (60_000, Some(3))], 10, 20, 1);
        log.txn(&[(60_000, Some(2))], 10, 15, 2);
        log.txn(&[(120_000, Some(1))], 15, 20, 2);
        let (e, off, stats) = log.replay(20);
        assert_eq!(off, 20);
        assert_eq!(
            e.bucket(&key(0)),
            Some(2),
            "the aborted tombstone is undone"
        );
        assert_eq!(e.bucket(&key(60_000)), Some(2));
        assert_eq!(e.bucket(&key(120_000)), Some(1));
        assert_eq!(stats.undone_txns, 1);
    }

    #[test]
    fn a_fenced_zombie_written_after_its_successor_is_ignored() {
        let mut log = Log(Vec::new());
        log.txn(&[(0, Some(2))], 0, 10, 1);
        log.txn(&[(0, Some(4))], 10, 20, 3);
        log.txn(&[(0, Some(3))], 10, 15, 2); // the old owner, fenced
        let (e, off, stats) = log.replay(20);
        assert_eq!((off, e.bucket(&key(0))), (20, Some(4)));
        assert_eq!(stats.dropped_txns, 1);
    }

    #[test]
    fn compaction_gaps_apply_the_surviving_records() {
        let mut log = Log(Vec::new());
        log.0.push((key(0).encode(), encode_count(Some(7))));
        log.txn(&[(60_000, Some(1))], 30, 40, 5);
        let (e, off, _) = log.replay(40);
        assert_eq!(off, 40);
        assert_eq!(e.bucket(&key(0)), Some(7));
        assert_eq!(e.bucket(&key(60_000)), Some(1));
    }
}
