//! Event-time windows over reactions: 1-minute tumbling and 5-minute hopping
//! (advancing 1 minute) counts per (campaign, creative, action), a grace
//! period, closing by stream time or by idleness, and the changelog encoding
//! of the state. Pure: the aggregator actor owns IO and transactions.

use crate::domain::reaction::{Action, Reaction};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const MINUTE_MS: i64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum WindowKind {
    #[serde(rename = "tumbling_1m")]
    Tumbling1m,
    #[serde(rename = "hopping_5m_1m")]
    Hopping5m1m,
}

impl WindowKind {
    pub fn size_ms(self) -> i64 {
        match self {
            WindowKind::Tumbling1m => MINUTE_MS,
            WindowKind::Hopping5m1m => 5 * MINUTE_MS,
        }
    }
    pub fn advance_ms(self) -> i64 {
        MINUTE_MS
    }
    pub fn as_str(self) -> &'static str {
        match self {
            WindowKind::Tumbling1m => "tumbling_1m",
            WindowKind::Hopping5m1m => "hopping_5m_1m",
        }
    }
    pub fn parse(s: &str) -> Option<WindowKind> {
        match s {
            "tumbling_1m" => Some(WindowKind::Tumbling1m),
            "hopping_5m_1m" => Some(WindowKind::Hopping5m1m),
            _ => None,
        }
    }
    /// Start times of the windows of this kind that contain `ts`.
    pub fn starts_for(self, ts: i64) -> impl Iterator<Item = i64> {
        let adv = self.advance_ms();
        let size = self.size_ms();
        let last = ts.div_euclid(adv) * adv;
        let first = last - size + adv;
        (0..)
            .map(move |i| first + i * adv)
            .take_while(move |s| *s <= last)
            .filter(|s| *s >= 0)
    }
}

/// The unit of window state: the count of one (campaign, creative, action)
/// in one event-time minute of one input partition. A tumbling window is
/// one bucket; a hopping window is the sum of the five buckets it spans, so
/// an event updates one counter and one changelog record whatever the
/// number of windows it falls into.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    pub campaign_id: Arc<str>,
    pub creative_id: Arc<str>,
    pub action: Action,
    /// Start of the minute, ms.
    pub minute: i64,
}

impl BucketKey {
    /// Unambiguous byte encoding (a JSON array), used as sled and changelog key.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&(
            &*self.campaign_id,
            &*self.creative_id,
            self.action.as_str(),
            self.minute,
        ))
        .expect("serialisable")
    }
    pub fn decode(b: &[u8]) -> Option<BucketKey> {
        let (campaign_id, creative_id, action, minute): (String, String, String, i64) =
            serde_json::from_slice(b).ok()?;
        if minute.rem_euclid(MINUTE_MS) != 0 {
            return None;
        }
        Some(BucketKey {
            campaign_id: campaign_id.into(),
            creative_id: creative_id.into(),
            action: Action::parse(&action)?,
            minute,
        })
    }
}

/// A closed window's final count for one input partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalWindow {
    pub campaign_id: String,
    pub creative_id: String,
    pub action: Action,
    pub window: WindowKind,
    pub window_start: i64,
    pub window_end: i64,
    pub partition: u32,
    pub count: u64,
}

impl FinalWindow {
    /// Deterministic identity (key, window kind, start, input partition).
    pub fn identity(&self) -> String {
        serde_json::to_string(&(
            &self.campaign_id,
            &self.creative_id,
            self.action.as_str(),
            self.window.as_str(),
            self.window_start,
            self.partition,
        ))
        .expect("serialisable")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    pub grace_ms: i64,
    pub hopping: bool,
}

/// Progress markers stored beside the counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowMeta {
    /// Highest event time seen.
    pub stream_time: i64,
    /// Every window ending at or before this is closed.
    pub closed_until: i64,
}

/// One state change to persist: the count of a bucket, or `None` once it
/// is no longer needed by any open window (a tombstone).
pub type StateChange = (BucketKey, Option<u64>);

/// A (campaign, creative) series id, local to one engine.
type SeriesId = u32;
type Slot = (SeriesId, Action);

#[derive(Debug, Clone, Copy)]
struct Cell {
    count: u64,
    dirty: bool,
}

/// Reference count of a free series id.
const FREED: u32 = u32::MAX;

/// Interned (campaign, creative) names with reference counts, so that the
/// hot path looks series up by borrowed strings and frees the names of
/// series without buckets.
#[derive(Debug, Default)]
struct Series {
    ids: FxHashMap<Box<str>, FxHashMap<Box<str>, SeriesId>>,
    names: Vec<(Arc<str>, Arc<str>)>,
    refs: Vec<u32>,
    free: Vec<SeriesId>,
    unreferenced: usize,
}

impl Series {
    fn intern(&mut self, campaign: &str, creative: &str) -> SeriesId {
        if let Some(id) = self.ids.get(campaign).and_then(|m| m.get(creative)) {
            return *id;
        }
        let names = (Arc::<str>::from(campaign), Arc::<str>::from(creative));
        let id = match self.free.pop() {
            Some(id) => {
                self.names[id as usize] = names;
                self.refs[id as usize] = 0;
                id
            }
            None => {
                self.names.push(names);
                self.refs.push(0);
                (self.names.len() - 1) as SeriesId
            }
        };
        self.unreferenced += 1;
        self.ids
            .entry(campaign.into())
            .or_default()
            .insert(creative.into(), id);
        id
    }

    fn retain(&mut self, id: SeriesId) {
        let r = &mut self.refs[id as usize];
        if *r == 0 {
            self.unreferenced -= 1;
        }
        *r += 1;
    }

    fn release(&mut self, id: SeriesId) {
        let r = &mut self.refs[id as usize];
        *r -= 1;
        if *r == 0 {
            self.unreferenced += 1;
        }
    }

    /// Forget series no bucket refers to any more.
    fn collect(&mut self) {
        if self.unreferenced == 0 {
            return;
        }
        for id in 0..self.names.len() {
            if self.refs[id] != 0 {
                continue; // in use, or already free (FREED)
            }
            self.refs[id] = FREED;
            let (c, a) = &self.names[id];
            if let Some(m) = self.ids.get_mut(&**c) {
                if m.get(&**a) == Some(&(id as SeriesId)) {
                    m.remove(&**a);
                    if m.is_empty() {
                        self.ids.remove(&**c);
                    }
                }
            }
            self.free.push(id as SeriesId);
        }
        self.unreferenced = 0;
    }

    fn len(&self) -> usize {
        self.names.len() - self.free.len()
    }
}

/// Open windows of one input partition.
#[derive(Debug)]
pub struct WindowEngine {
    cfg: WindowConfig,
    partition: u32,
    series: Series,
    /// Minute start -> counts of that minute.
    minutes: BTreeMap<i64, FxHashMap<Slot, Cell>>,
    buckets: usize,
    meta: WindowMeta,
    dirty: Vec<(i64, Slot)>,
    tombstones: Vec<BucketKey>,
    finals: Vec<FinalWindow>,
}

impl WindowEngine {
    pub fn new(cfg: WindowConfig, partition: u32) -> Self {
        WindowEngine {
            cfg,
            partition,
            series: Series::default(),
            minutes: BTreeMap::new(),
            buckets: 0,
            meta: WindowMeta {
                stream_time: -1,
                closed_until: i64::MIN,
            },
            dirty: Vec::new(),
            tombstones: Vec::new(),
            finals: Vec::new(),
        }
    }

    pub fn meta(&self) -> WindowMeta {
        self.meta
    }

    /// Number of buckets held (the state size).
    pub fn open_buckets(&self) -> usize {
        self.buckets
    }

    /// Number of interned (campaign, creative) series.
    pub fn series(&self) -> usize {
        self.series.len()
    }

    /// How long a bucket is needed after its minute starts.
    fn span(&self) -> i64 {
        if self.cfg.hopping {
            WindowKind::Hopping5m1m.size_ms()
        } else {
            WindowKind::Tumbling1m.size_ms()
        }
    }

    fn key(&self, minute: i64, (s, action): Slot) -> BucketKey {
        let (c, a) = &self.series.names[s as usize];
        BucketKey {
            campaign_id: c.clone(),
            creative_id: a.clone(),
            action,
            minute,
        }
    }

    /// Count one reaction. `Err` is the DLQ reason of a late event (its
    /// earliest window has already been emitted); nothing is counted then.
    pub fn ingest(&mut self, r: &Reaction) -> Result<(), String> {
        self.ingest_parts(&r.campaign_id, &r.creative_id, r.action, r.ts)
    }

    /// `ingest` on borrowed parts.
    pub fn ingest_parts(
        &mut self,
        campaign: &str,
        creative: &str,
        action: Action,
        ts: i64,
    ) -> Result<(), String> {
        let minute = ts.div_euclid(MINUTE_MS) * MINUTE_MS;
        let tumbling_end = minute + MINUTE_MS;
        if tumbling_end <= self.meta.closed_until {
            return Err(format!(
                "late: event time {} is past its window end {} + grace {} ms (stream time {})",
                ts, tumbling_end, self.cfg.grace_ms, self.meta.stream_time
            ));
        }
        let s = self.series.intern(campaign, creative);
        let slot = (s, action);
        let cells = self.minutes.entry(minute).or_default();
        match cells.get_mut(&slot) {
            Some(c) => {
                c.count += 1;
                if !c.dirty {
                    c.dirty = true;
                    self.dirty.push((minute, slot));
                }
            }
            None => {
                cells.insert(
                    slot,
                    Cell {
                        count: 1,
                        dirty: true,
                    },
                );
                self.series.retain(s);
                self.buckets += 1;
                self.dirty.push((minute, slot));
            }
        }
        if ts > self.meta.stream_time {
            self.meta.stream_time = ts;
            self.close_until(ts - self.cfg.grace_ms);
        }
        Ok(())
    }

    fn emit(&mut self, kind: WindowKind, start: i64, (s, action): Slot, count: u64) {
        let (c, a) = &self.series.names[s as usize];
        self.finals.push(FinalWindow {
            campaign_id: c.to_string(),
            creative_id: a.to_string(),
            action,
            window: kind,
            window_start: start,
            window_end: start + kind.size_ms(),
            partition: self.partition,
            count,
        });
    }

    /// Close every window ending at or before `until`: emit it once, and
    /// drop the buckets no open window needs any more.
    fn close_until(&mut self, until: i64) {
        let old = self.meta.closed_until;
        if until <= old {
            return;
        }
        self.meta.closed_until = until;
        // Windows end on minute boundaries: nothing to do unless one is crossed.
        if until.div_euclid(MINUTE_MS) == old.div_euclid(MINUTE_MS) {
            return;
        }
        let mut out: Vec<(WindowKind, i64, Slot, u64)> = Vec::new();
        for (&m, cells) in &self.minutes {
            let end = m + MINUTE_MS;
            if end > old && end <= until {
                out.extend(
                    cells
                        .iter()
                        .map(|(slot, c)| (WindowKind::Tumbling1m, m, *slot, c.count)),
                );
            }
        }
        if self.cfg.hopping {
            let size = WindowKind::Hopping5m1m.size_ms();
            let mut starts: Vec<i64> = Vec::new();
            for &m in self.minutes.keys() {
                for i in 0..(size / MINUTE_MS) {
                    let s = m - i * MINUTE_MS;
                    if s >= 0 && s + size > old && s + size <= until {
                        starts.push(s);
                    }
                }
            }
            starts.sort_unstable();
            starts.dedup();
            let mut sums: FxHashMap<Slot, u64> = FxHashMap::default();
            for s in starts {
                sums.clear();
                for (_, cells) in self.minutes.range(s..s + size) {
                    for (slot, c) in cells {
                        *sums.entry(*slot).or_default() += c.count;
                    }
                }
                out.extend(
                    sums.iter()
                        .map(|(slot, n)| (WindowKind::Hopping5m1m, s, *slot, *n)),
                );
            }
        }
        for (kind, start, slot, count) in out {
            self.emit(kind, start, slot, count);
        }
        // A bucket is needed while a window containing it is open.
        let keep_from = until - self.span() + 1;
        let rest = self.minutes.split_off(&keep_from);
        let gone = std::mem::replace(&mut self.minutes, rest);
        for (m, cells) in gone {
            for (slot, _) in cells {
                let key = self.key(m, slot);
                self.tombstones.push(key);
                self.series.release(slot.0);
                self.buckets -= 1;
            }
        }
    }

    /// The partition is idle (caught up, nothing fetched for the idle time):
    /// close what the wall clock says is past end + grace.
    pub fn idle_close(&mut self, wall_now: i64) {
        self.close_until(wall_now - self.cfg.grace_ms);
    }

    /// Whether anything awaits persisting.
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty() || !self.tombstones.is_empty() || !self.finals.is_empty()
    }

    /// Take what changed since the last call: state changes (count or
    /// tombstone, sorted for determinism) and closed windows (sorted).
    pub fn take_changes(&mut self) -> (Vec<StateChange>, Vec<FinalWindow>) {
        let mut changes: Vec<StateChange> =
            Vec::with_capacity(self.dirty.len() + self.tombstones.len());
        let dirty = std::mem::take(&mut self.dirty);
        for (m, slot) in &dirty {
            let Some(cell) = self.minutes.get_mut(m).and_then(|c| c.get_mut(slot)) else {
                continue; // dropped since: its tombstone follows
            };
            cell.dirty = false;
            let count = cell.count;
            changes.push((self.key(*m, *slot), Some(count)));
        }
        self.dirty = dirty;
        self.dirty.clear();
        changes.extend(self.tombstones.drain(..).map(|k| (k, None)));
        changes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        self.series.collect();
        let mut finals = std::mem::take(&mut self.finals);
        finals.sort_by(|a, b| {
            (
                a.window_start,
                a.window,
                &a.campaign_id,
                &a.creative_id,
                a.action,
            )
                .cmp(&(
                    b.window_start,
                    b.window,
                    &b.campaign_id,
                    &b.creative_id,
                    b.action,
                ))
        });
        (changes, finals)
    }

    /// Set one bucket (from local state or the changelog); `None` drops it.
    pub fn restore(&mut self, key: &BucketKey, count: Option<u64>) {
        let s = self.series.intern(&key.campaign_id, &key.creative_id);
        let slot = (s, key.action);
        let cells = self.minutes.entry(key.minute).or_default();
        let had = match count {
            Some(c) => cells
                .insert(
                    slot,
                    Cell {
                        count: c,
                        dirty: false,
                    },
                )
                .is_some(),
            None => cells.remove(&slot).is_some(),
        };
        let empty = cells.is_empty();
        if empty {
            self.minutes.remove(&key.minute);
        }
        match (had, count.is_some()) {
            (false, true) => {
                self.series.retain(s);
                self.buckets += 1;
            }
            (true, false) => {
                self.series.release(s);
                self.buckets -= 1;
            }
            _ => {}
        }
    }

    /// The current count of a bucket, if held.
    pub fn bucket(&self, key: &BucketKey) -> Option<u64> {
        let s = self
            .series
            .ids
            .get(&*key.campaign_id)
            .and_then(|m| m.get(&*key.creative_id))?;
        self.minutes
            .get(&key.minute)?
            .get(&(*s, key.action))
            .map(|c| c.count)
    }

    pub fn restore_meta(&mut self, meta: WindowMeta) {
        self.meta = meta;
    }

    /// All buckets (for persisting a full snapshot / tests), sorted.
    pub fn snapshot(&self) -> Vec<(BucketKey, u64)> {
        let mut v = Vec::with_capacity(self.buckets);
        for (m, cells) in &self.minutes {
            for (slot, c) in cells {
                v.push((self.key(*m, *slot), c.count));
            }
        }
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(ts: i64, action: Action) -> Reaction {
        Reaction {
            event_id: format!("e{ts}"),
            campaign_id: "c".into(),
            creative_id: "a".into(),
            user_id: "u".into(),
            action,
            ts,
        }
    }

    #[test]
    fn hopping_starts() {
        let v: Vec<i64> = WindowKind::Hopping5m1m
            .starts_for(5 * MINUTE_MS + 5)
            .collect();
        assert_eq!(
            v,
            vec![
                MINUTE_MS,
                2 * MINUTE_MS,
                3 * MINUTE_MS,
                4 * MINUTE_MS,
                5 * MINUTE_MS
            ]
        );
        let v: Vec<i64> = WindowKind::Hopping5m1m.starts_for(5).collect();
        assert_eq!(v, vec![0]);
        let v: Vec<i64> = WindowKind::Tumbling1m.starts_for(MINUTE_MS).collect();
        assert_eq!(v, vec![MINUTE_MS]);
    }

    #[test]
    fn closes_on_stream_time_with_grace_and_routes_late() {
        let mut e = WindowEngine::new(
            WindowConfig {
                grace_ms: 10_000,
                hopping: false,
            },
            3,
        );
        e.ingest(&r(1_000, Action::Click)).unwrap();
        e.ingest(&r(59_999, Action::Click)).unwrap();
        e.ingest(&r(65_000, Action::Click)).unwrap(); // window 0 not yet closed (grace)
        let (_, finals) = e.take_changes();
        assert!(finals.is_empty());
        e.ingest(&r(55_000, Action::Click)).unwrap(); // late but within grace
        e.ingest(&r(70_000, Action::Click)).unwrap(); // stream time 70s: closes [0,60s)
        let (changes, finals) = e.take_changes();
        assert_eq!(finals.len(), 1);
        assert_eq!(finals[0].count, 3);
        assert_eq!(finals[0].partition, 3);
        assert!(changes.iter().any(|(k, c)| k.minute == 0 && c.is_none()));
        let late = e.ingest(&r(30_000, Action::Click)).unwrap_err();
        assert!(late.starts_with("late"));
    }

    #[test]
    fn idle_close_uses_wall_clock() {
        let mut e = WindowEngine::new(
            WindowConfig {
                grace_ms: 1_000,
                hopping: true,
            },
            0,
        );
        e.ingest(&r(10, Action::Send)).unwrap();
        e.idle_close(30_000);
        assert!(e.take_changes().1.is_empty());
        e.idle_close(61_000);
        let (_, finals) = e.take_changes();
        assert_eq!(finals.len(), 1);
        assert_eq!(finals[0].window, WindowKind::Tumbling1m);
        e.idle_close(5 * MINUTE_MS + 1_000);
        let (_, finals) = e.take_changes();
        assert_eq!(finals.len(), 1);
        assert_eq!(finals[0].window, WindowKind::Hopping5m1m);
        assert_eq!(e.open_buckets(), 0);
        assert_eq!(e.series(), 0, "series without buckets are forgotten");
        e.ingest(&r(10 * MINUTE_MS, Action::Send)).unwrap();
        assert_eq!(e.series(), 1, "a freed series id is reused");
    }

    #[test]
    fn key_encoding_round_trips() {
        let k = BucketKey {
            campaign_id: "c\"[,".into(),
            creative_id: "é".into(),
            action: Action::Impression,
            minute: 120_000,
        };
        assert_eq!(BucketKey::decode(&k.encode()), Some(k));
    }
}
