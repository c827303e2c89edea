//! Event-time windows over reactions: 1-minute tumbling and 5-minute hopping
//! (advancing 1 minute) counts per (campaign, creative, action), a grace
//! period, closing by stream time or by idleness, and the changelog encoding
//! of the state. Pure: the aggregator actor owns IO and transactions.

use crate::domain::reaction::{Action, Reaction};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};

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

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WindowKey {
    pub campaign_id: String,
    pub creative_id: String,
    pub action: Action,
    pub kind: WindowKind,
    pub start: i64,
}

impl WindowKey {
    pub fn end(&self) -> i64 {
        self.start + self.kind.size_ms()
    }
    /// Unambiguous byte encoding (a JSON array), used as sled and changelog key.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&(
            &self.campaign_id,
            &self.creative_id,
            self.action.as_str(),
            self.kind.as_str(),
            self.start,
        ))
        .expect("serialisable")
    }
    pub fn decode(b: &[u8]) -> Option<WindowKey> {
        let (campaign_id, creative_id, action, kind, start): (String, String, String, String, i64) =
            serde_json::from_slice(b).ok()?;
        Some(WindowKey {
            campaign_id,
            creative_id,
            action: Action::parse(&action)?,
            kind: WindowKind::parse(&kind)?,
            start,
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

/// One state change to persist: the count of an open window, or `None`
/// once it closed (a tombstone).
pub type StateChange = (WindowKey, Option<u64>);

/// Open windows of one input partition.
#[derive(Debug)]
pub struct WindowEngine {
    cfg: WindowConfig,
    partition: u32,
    counts: HashMap<WindowKey, u64>,
    by_end: BTreeMap<i64, HashSet<WindowKey>>,
    meta: WindowMeta,
    dirty: HashSet<WindowKey>,
    finals: Vec<FinalWindow>,
}

impl WindowEngine {
    pub fn new(cfg: WindowConfig, partition: u32) -> Self {
        WindowEngine {
            cfg,
            partition,
            counts: HashMap::new(),
            by_end: BTreeMap::new(),
            meta: WindowMeta {
                stream_time: -1,
                closed_until: i64::MIN,
            },
            dirty: HashSet::new(),
            finals: Vec::new(),
        }
    }

    pub fn meta(&self) -> WindowMeta {
        self.meta
    }

    pub fn open_windows(&self) -> usize {
        self.counts.len()
    }

    fn kinds(&self) -> &'static [WindowKind] {
        if self.cfg.hopping {
            &[WindowKind::Tumbling1m, WindowKind::Hopping5m1m]
        } else {
            &[WindowKind::Tumbling1m]
        }
    }

    /// Count one reaction. `Err` is the DLQ reason of a late event (its
    /// earliest window has already been emitted); nothing is counted then.
    pub fn ingest(&mut self, r: &Reaction) -> Result<(), String> {
        let tumbling_end = r.ts.div_euclid(MINUTE_MS) * MINUTE_MS + MINUTE_MS;
        if tumbling_end <= self.meta.closed_until {
            return Err(format!(
                "late: event time {} is past its window end {} + grace {} ms (stream time {})",
                r.ts, tumbling_end, self.cfg.grace_ms, self.meta.stream_time
            ));
        }
        for &kind in self.kinds() {
            for start in kind.starts_for(r.ts) {
                let key = WindowKey {
                    campaign_id: r.campaign_id.clone(),
                    creative_id: r.creative_id.clone(),
                    action: r.action,
                    kind,
                    start,
                };
                self.bump(key, 1);
            }
        }
        if r.ts > self.meta.stream_time {
            self.meta.stream_time = r.ts;
            self.close_until(r.ts - self.cfg.grace_ms);
        }
        Ok(())
    }

    fn bump(&mut self, key: WindowKey, by: u64) {
        match self.counts.get_mut(&key) {
            Some(c) => *c += by,
            None => {
                self.by_end
                    .entry(key.end())
                    .or_default()
                    .insert(key.clone());
                self.counts.insert(key.clone(), by);
            }
        }
        self.dirty.insert(key);
    }

    /// Close every window ending at or before `until`.
    fn close_until(&mut self, until: i64) {
        if until <= self.meta.closed_until {
            return;
        }
        self.meta.closed_until = until;
        let later = self.by_end.split_off(&(until + 1));
        let due = std::mem::replace(&mut self.by_end, later);
        for (_, keys) in due {
            for key in keys {
                if let Some(count) = self.counts.remove(&key) {
                    self.finals.push(FinalWindow {
                        campaign_id: key.campaign_id.clone(),
                        creative_id: key.creative_id.clone(),
                        action: key.action,
                        window: key.kind,
                        window_start: key.start,
                        window_end: key.end(),
                        partition: self.partition,
                        count,
                    });
                    self.dirty.insert(key);
                }
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
        !self.dirty.is_empty() || !self.finals.is_empty()
    }

    /// Take what changed since the last call: state changes (count or
    /// tombstone, sorted for determinism) and closed windows.
    pub fn take_changes(&mut self) -> (Vec<StateChange>, Vec<FinalWindow>) {
        let mut changes: Vec<StateChange> = self
            .dirty
            .drain()
            .map(|k| {
                let c = self.counts.get(&k).copied();
                (k, c)
            })
            .collect();
        changes.sort_by(|a, b| a.0.cmp(&b.0));
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

    /// Restore one open window (from local state or the changelog).
    pub fn restore(&mut self, key: WindowKey, count: Option<u64>) {
        if let Some(old) = self.counts.remove(&key) {
            let _ = old;
            if let Some(set) = self.by_end.get_mut(&key.end()) {
                set.remove(&key);
            }
        }
        if let Some(c) = count {
            self.by_end
                .entry(key.end())
                .or_default()
                .insert(key.clone());
            self.counts.insert(key, c);
        }
    }

    pub fn restore_meta(&mut self, meta: WindowMeta) {
        self.meta = meta;
    }

    /// All open windows (for persisting a full snapshot / tests).
    pub fn snapshot(&self) -> Vec<(WindowKey, u64)> {
        let mut v: Vec<_> = self.counts.iter().map(|(k, c)| (k.clone(), *c)).collect();
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
        assert!(changes.iter().any(|(k, c)| k.start == 0 && c.is_none()));
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
        assert_eq!(e.open_windows(), 0);
    }

    #[test]
    fn key_encoding_round_trips() {
        let k = WindowKey {
            campaign_id: "c\"[,".into(),
            creative_id: "é".into(),
            action: Action::Impression,
            kind: WindowKind::Hopping5m1m,
            start: 120_000,
        };
        assert_eq!(WindowKey::decode(&k.encode()), Some(k));
    }
}
