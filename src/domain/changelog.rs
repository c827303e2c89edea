//! The aggregator's changelog: the values of the window-state parts a
//! transaction changed (`PartKey` → part value, or a tombstone once the
//! minute is no longer needed) and, closing every transaction, a marker with
//! the input offsets the transaction covers and its writer's epoch.
//! Replaying it rebuilds the parts of the committed input prefix; the local
//! store keeps the same parts, so a restore replays only the tail.
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

use crate::domain::window::{PartChange, PartKey, WindowMeta};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Key of the per-transaction marker.
pub const META_KEY: &[u8] = b"__meta";

/// Window state as persisted: part values by key.
pub type Parts = BTreeMap<PartKey, Vec<u8>>;

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

/// The transaction applied last, kept so that its redo can undo it.
struct Applied {
    from: u64,
    epoch: u64,
    /// The values it replaced.
    before: Vec<PartChange>,
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

/// Replays changelog records onto window-state parts.
pub struct Replayer {
    parts: Parts,
    meta: WindowMeta,
    committed: u64,
    input_offset: u64,
    epoch: u64,
    pending: Vec<PartChange>,
    last: Option<Applied>,
    touched: Option<rustc_hash::FxHashSet<PartKey>>,
    pub stats: ReplayStats,
}

impl Replayer {
    /// `parts`, `meta`, `input_offset`, `epoch`: the state replayed onto
    /// (empty for a rebuild) and what it reflects; `committed`: the group's
    /// committed input offset. With `track`, the keys changed are
    /// remembered (`changed`).
    pub fn new(
        parts: Parts,
        meta: WindowMeta,
        committed: u64,
        input_offset: u64,
        epoch: u64,
        track: bool,
    ) -> Self {
        Replayer {
            parts,
            meta,
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
        match key.and_then(PartKey::decode) {
            Some(k) => self.pending.push((k, value.map(<[u8]>::to_vec))),
            None => self.stats.unreadable += 1,
        }
    }

    fn set(&mut self, k: PartKey, v: Option<Vec<u8>>) -> Option<Vec<u8>> {
        match v {
            Some(v) => self.parts.insert(k, v),
            None => self.parts.remove(&k),
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
                for (k, v) in last.before.into_iter().rev() {
                    self.set(k, v);
                }
                self.meta = last.meta_before;
                self.input_offset = last.offset_before;
                self.stats.undone_txns += 1;
            }
        }
        let pending = std::mem::take(&mut self.pending);
        let mut before = Vec::with_capacity(pending.len());
        for (k, v) in pending {
            let old = self.set(k, v);
            before.push((k, old));
            if let Some(t) = &mut self.touched {
                t.insert(k);
            }
        }
        self.last = Some(Applied {
            from: m.from,
            epoch: m.epoch,
            before,
            meta_before: self.meta,
            offset_before: self.input_offset,
        });
        self.meta = m.window();
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

    /// Stream time and closed windows of the replayed state.
    pub fn meta(&self) -> WindowMeta {
        self.meta
    }

    /// The parts changed by the replay with their current values (when
    /// tracking), in key order.
    pub fn changed(&self) -> Vec<PartChange> {
        let Some(t) = &self.touched else {
            return Vec::new();
        };
        let mut v: Vec<PartChange> = t.iter().map(|k| (*k, self.parts.get(k).cloned())).collect();
        v.sort_unstable_by_key(|c| c.0);
        v
    }

    /// The replayed parts.
    pub fn into_parts(self) -> Parts {
        self.parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::reaction::Action;
    use crate::domain::window::{decode_part, encode_part, PartEntry};

    fn key(minute: i64) -> PartKey {
        PartKey { minute, part: 0 }
    }

    /// A part holding one bucket ("c", "a", click) with `count`.
    fn value(count: u64) -> Vec<u8> {
        encode_part(
            1,
            &[PartEntry {
                campaign_id: "c",
                creative_id: "a",
                action: Action::Click,
                count,
            }],
        )
    }

    fn count(parts: &Parts, minute: i64) -> Option<u64> {
        let v = parts.get(&key(minute))?;
        Some(decode_part(v).unwrap().1[0].count)
    }

    struct Log(Vec<(Vec<u8>, Option<Vec<u8>>)>);
    impl Log {
        fn txn(&mut self, changes: &[(i64, Option<u64>)], from: u64, to: u64, epoch: u64) {
            for (m, c) in changes {
                self.0.push((key(*m).encode(), c.map(value)));
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
        fn replay(&self, committed: u64) -> (Parts, u64, ReplayStats) {
            let mut r = Replayer::new(Parts::new(), WindowMeta::default(), committed, 0, 0, false);
            for (k, v) in &self.0 {
                r.record(Some(k), v.as_deref());
            }
            let (off, stats) = (r.input_offset(), r.stats.clone());
            (r.into_parts(), off, stats)
        }
    }

    #[test]
    fn drops_transactions_beyond_the_committed_offset() {
        let mut log = Log(Vec::new());
        log.txn(&[(0, Some(2))], 0, 10, 1);
        log.txn(&[(0, Some(5)), (60_000, Some(1))], 10, 20, 1);
        let (parts, off, stats) = log.replay(10);
        assert_eq!(off, 10);
        assert_eq!(count(&parts, 0), Some(2));
        assert_eq!(count(&parts, 60_000), None);
        assert_eq!(stats.dropped_txns, 1);
    }

    #[test]
    fn an_aborted_transaction_shown_to_readers_is_undone_by_its_redo() {
        // Epoch 1 commits [0,10), then crashes in [10,20) after writing a
        // part the redo never writes (e.g. an idle close); epoch 2 redoes
        // [10,15) and [15,20): all committed is epoch 1's first and epoch 2's.
        let mut log = Log(Vec::new());
        log.txn(&[(0, Some(2)), (60_000, Some(1))], 0, 10, 1);
        log.txn(&[(0, None), (60_000, Some(3))], 10, 20, 1);
        log.txn(&[(60_000, Some(2))], 10, 15, 2);
        log.txn(&[(120_000, Some(1))], 15, 20, 2);
        let (parts, off, stats) = log.replay(20);
        assert_eq!(off, 20);
        assert_eq!(count(&parts, 0), Some(2), "the aborted tombstone is undone");
        assert_eq!(count(&parts, 60_000), Some(2));
        assert_eq!(count(&parts, 120_000), Some(1));
        assert_eq!(stats.undone_txns, 1);
    }

    #[test]
    fn a_fenced_zombie_written_after_its_successor_is_ignored() {
        let mut log = Log(Vec::new());
        log.txn(&[(0, Some(2))], 0, 10, 1);
        log.txn(&[(0, Some(4))], 10, 20, 3);
        log.txn(&[(0, Some(3))], 10, 15, 2); // the old owner, fenced
        let (parts, off, stats) = log.replay(20);
        assert_eq!((off, count(&parts, 0)), (20, Some(4)));
        assert_eq!(stats.dropped_txns, 1);
    }

    #[test]
    fn compaction_gaps_apply_the_surviving_records() {
        let mut log = Log(Vec::new());
        log.0.push((key(0).encode(), Some(value(7))));
        log.txn(&[(60_000, Some(1))], 30, 40, 5);
        let (parts, off, _) = log.replay(40);
        assert_eq!(off, 40);
        assert_eq!(count(&parts, 0), Some(7));
        assert_eq!(count(&parts, 60_000), Some(1));
    }

    #[test]
    fn a_tail_replay_reports_what_it_changed() {
        let mut log = Log(Vec::new());
        log.txn(&[(0, Some(2))], 0, 10, 1);
        let (parts, _, _) = log.replay(10);
        let mut tail = Log(Vec::new());
        tail.txn(&[(0, None), (60_000, Some(4))], 10, 20, 1);
        let mut r = Replayer::new(parts, WindowMeta::default(), 20, 10, 1, true);
        for (k, v) in &tail.0 {
            r.record(Some(k), v.as_deref());
        }
        assert_eq!(r.input_offset(), 20);
        assert_eq!(
            r.changed(),
            vec![(key(0), None), (key(60_000), Some(value(4)))]
        );
        r.record(Some(b"junk"), Some(b"x"));
        assert_eq!(r.stats.unreadable, 1);
    }
}
