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

/// Key of one part of a minute's window state, in the changelog and the
/// local store: `w/<minute>/<part>`.
///
/// The state of one input partition is a count per (campaign, creative,
/// action, event-time minute) — a tumbling window is one bucket, a
/// 5-minute hopping window the sum of five. A minute's buckets are
/// persisted as a few values ("parts", by a hash of the bucket's series and
/// action), not one record per bucket: a transaction writes each changed
/// part once, so the changelog carries a few records per minute and
/// transaction whatever the number of events. A minute starts with one
/// part and doubles its parts whenever it holds more than
/// `PART_ENTRIES` buckets per part, so a value stays far below the
/// broker's record size limit (ids are at most 128 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartKey {
    /// Start of the minute, ms.
    pub minute: i64,
    pub part: u32,
}

impl PartKey {
    pub fn encode(&self) -> Vec<u8> {
        format!("w/{}/{}", self.minute, self.part).into_bytes()
    }
    /// The key, if `b` is the canonical encoding of one.
    pub fn decode(b: &[u8]) -> Option<PartKey> {
        let (m, p) = std::str::from_utf8(b)
            .ok()?
            .strip_prefix("w/")?
            .split_once('/')?;
        let k = PartKey {
            minute: m.parse().ok()?,
            part: p.parse().ok()?,
        };
        (k.minute.rem_euclid(MINUTE_MS) == 0 && k.encode() == b).then_some(k)
    }
}

/// Buckets per part before a minute doubles its parts.
pub const PART_ENTRIES: usize = 1024;
const PART_FORMAT: u8 = 1;
const PART_HEADER: usize = 9;

/// One bucket in a part value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartEntry<'a> {
    pub campaign_id: &'a str,
    pub creative_id: &'a str,
    pub action: Action,
    pub count: u64,
}

fn action_code(a: Action) -> u8 {
    match a {
        Action::Send => 0,
        Action::Impression => 1,
        Action::Click => 2,
    }
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push(v as u8 | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn get_varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn get_str<'a>(b: &'a [u8], i: &mut usize) -> Option<&'a str> {
    let n = usize::try_from(get_varint(b, i)?).ok()?;
    let s = std::str::from_utf8(b.get(*i..i.checked_add(n)?)?).ok()?;
    *i += n;
    Some(s)
}

/// A part value: format byte, the minute's part count and the number of
/// entries (u32 LE each), then per entry campaign and creative (varint
/// length + UTF-8), action (one byte) and count (varint).
fn start_part(parts: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(256);
    v.push(PART_FORMAT);
    v.extend_from_slice(&parts.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

fn put_entry(buf: &mut Vec<u8>, e: PartEntry<'_>) {
    put_varint(buf, e.campaign_id.len() as u64);
    buf.extend_from_slice(e.campaign_id.as_bytes());
    put_varint(buf, e.creative_id.len() as u64);
    buf.extend_from_slice(e.creative_id.as_bytes());
    buf.push(action_code(e.action));
    put_varint(buf, e.count);
    let n = u32::from_le_bytes(buf[5..9].try_into().expect("header")) + 1;
    buf[5..9].copy_from_slice(&n.to_le_bytes());
}

/// Encode a part value (tests and tools; the engine builds them in place).
pub fn encode_part(parts: u32, entries: &[PartEntry<'_>]) -> Vec<u8> {
    let mut v = start_part(parts);
    for e in entries {
        put_entry(&mut v, *e);
    }
    v
}

/// Decode a part value: the minute's part count and the entries (`None`
/// if it is not one).
pub fn decode_part(b: &[u8]) -> Option<(u32, Vec<PartEntry<'_>>)> {
    if b.len() < PART_HEADER || b[0] != PART_FORMAT {
        return None;
    }
    let parts = u32::from_le_bytes(b[1..5].try_into().ok()?);
    let n = u32::from_le_bytes(b[5..9].try_into().ok()?) as usize;
    if parts == 0 || !parts.is_power_of_two() || n > b.len() {
        return None;
    }
    let mut i = PART_HEADER;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let campaign_id = get_str(b, &mut i)?;
        let creative_id = get_str(b, &mut i)?;
        let action = match *b.get(i)? {
            0 => Action::Send,
            1 => Action::Impression,
            2 => Action::Click,
            _ => return None,
        };
        i += 1;
        let count = get_varint(b, &mut i)?;
        out.push(PartEntry {
            campaign_id,
            creative_id,
            action,
            count,
        });
    }
    (i == b.len()).then_some((parts, out))
}

/// A stable 64-bit hash of a (campaign, creative) series (FNV-1a): part
/// layouts must not depend on the process or the library version.
fn series_hash(campaign: &str, creative: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in campaign
        .as_bytes()
        .iter()
        .chain(&[0xff])
        .chain(creative.as_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The part hash of a bucket's series and action (a splitmix64 finaliser,
/// so that the low bits are well mixed).
fn slot_hash(series: u64, action: Action) -> u64 {
    let mut z = series ^ (u64::from(action_code(action)) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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

/// A JSON string as serde_json writes it: as is when nothing needs
/// escaping (the common case), else through serde_json.
fn put_json_str(buf: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        serde_json::to_writer(&mut *buf, s).expect("a string serialises");
    }
}

fn put_int(buf: &mut Vec<u8>, v: impl itoa::Integer) {
    buf.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

impl FinalWindow {
    /// The record value: byte for byte what serde_json writes for it
    /// (property-tested), without its per-field machinery — one of these
    /// is written per key, window and partition.
    pub fn to_json(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(150 + self.campaign_id.len() + self.creative_id.len());
        b.extend_from_slice(b"{\"campaign_id\":");
        put_json_str(&mut b, &self.campaign_id);
        b.extend_from_slice(b",\"creative_id\":");
        put_json_str(&mut b, &self.creative_id);
        b.extend_from_slice(b",\"action\":\"");
        b.extend_from_slice(self.action.as_str().as_bytes());
        b.extend_from_slice(b"\",\"window\":\"");
        b.extend_from_slice(self.window.as_str().as_bytes());
        b.extend_from_slice(b"\",\"window_start\":");
        put_int(&mut b, self.window_start);
        b.extend_from_slice(b",\"window_end\":");
        put_int(&mut b, self.window_end);
        b.extend_from_slice(b",\"partition\":");
        put_int(&mut b, self.partition);
        b.extend_from_slice(b",\"count\":");
        put_int(&mut b, self.count);
        b.push(b'}');
        b
    }

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

/// One change to persist: a part's new value, or `None` once its minute is
/// no longer needed by any open window (a tombstone).
pub type PartChange = (PartKey, Option<Vec<u8>>);

/// A (campaign, creative) series id, local to one engine.
type SeriesId = u32;
type Slot = (SeriesId, Action);

/// Reference count of a free series id.
const FREED: u32 = u32::MAX;

/// A (campaign, creative) pair of names of at most 16 bytes each, packed
/// into words with their lengths: equal keys, equal names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ShortNames {
    campaign: [u64; 2],
    creative: [u64; 2],
    lens: u16,
}

impl ShortNames {
    fn of(campaign: &str, creative: &str) -> Option<ShortNames> {
        let (c, a) = (campaign.as_bytes(), creative.as_bytes());
        Some(ShortNames {
            campaign: pack16(c)?,
            creative: pack16(a)?,
            lens: (c.len() as u16) << 8 | a.len() as u16,
        })
    }
}

/// The bytes of a name of at most 16 bytes in two words, by overlapping
/// loads (the first and the last bytes): with the length, they determine
/// the name. `None` for longer names.
fn pack16(s: &[u8]) -> Option<[u64; 2]> {
    let n = s.len();
    let u32_at = |k: usize| u64::from(u32::from_le_bytes(s[k..k + 4].try_into().expect("4")));
    let u64_at = |k: usize| u64::from_le_bytes(s[k..k + 8].try_into().expect("8"));
    Some(match n {
        0 => [0, 0],
        1..=3 => [
            u64::from(s[0]) | u64::from(s[n / 2]) << 8 | u64::from(s[n - 1]) << 16,
            0,
        ],
        4..=7 => [u32_at(0) | u32_at(n - 4) << 32, 0],
        8..=16 => [u64_at(0), u64_at(n - 8)],
        _ => return None,
    })
}

/// Interned (campaign, creative) names with reference counts, so that the
/// hot path looks series up by borrowed strings and frees the names of
/// series without buckets.
#[derive(Debug, Default)]
struct Series {
    /// Series whose names are both at most 16 bytes (the common case), by
    /// their names packed into words: no string hashing or `memcmp`.
    short: FxHashMap<ShortNames, SeriesId>,
    /// The others, by name.
    ids: FxHashMap<Box<str>, FxHashMap<Box<str>, SeriesId>>,
    names: Vec<(Arc<str>, Arc<str>)>,
    hashes: Vec<u64>,
    refs: Vec<u32>,
    free: Vec<SeriesId>,
    unreferenced: usize,
}

impl Series {
    fn find(&self, campaign: &str, creative: &str) -> Option<SeriesId> {
        match ShortNames::of(campaign, creative) {
            Some(k) => self.short.get(&k).copied(),
            None => self.ids.get(campaign)?.get(creative).copied(),
        }
    }

    fn intern(&mut self, campaign: &str, creative: &str) -> SeriesId {
        if let Some(id) = self.find(campaign, creative) {
            return id;
        }
        let names = (Arc::<str>::from(campaign), Arc::<str>::from(creative));
        let hash = series_hash(campaign, creative);
        let id = match self.free.pop() {
            Some(id) => {
                self.names[id as usize] = names;
                self.hashes[id as usize] = hash;
                self.refs[id as usize] = 0;
                id
            }
            None => {
                self.names.push(names);
                self.hashes.push(hash);
                self.refs.push(0);
                (self.names.len() - 1) as SeriesId
            }
        };
        self.unreferenced += 1;
        match ShortNames::of(campaign, creative) {
            Some(k) => {
                self.short.insert(k, id);
            }
            None => {
                self.ids
                    .entry(campaign.into())
                    .or_default()
                    .insert(creative.into(), id);
            }
        }
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
            if let Some(k) = ShortNames::of(c, a) {
                if self.short.get(&k) == Some(&(id as SeriesId)) {
                    self.short.remove(&k);
                }
            } else if let Some(m) = self.ids.get_mut(&**c) {
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

    fn part(&self, (s, action): Slot, parts: u32) -> usize {
        if parts == 1 {
            return 0; // the common case: no hash per event
        }
        (slot_hash(self.hashes[s as usize], action) & u64::from(parts - 1)) as usize
    }
}

/// The buckets of one event-time minute and what of them awaits persisting.
#[derive(Debug)]
struct Minute {
    cells: FxHashMap<Slot, u64>,
    /// Parts of its persisted layout (a power of two).
    parts: u32,
    /// Parts changed since the last `take_changes`.
    dirty: Vec<bool>,
    /// Every part is to be written (the layout grew, or the minute was
    /// restored: a layout written by another version is replaced whole).
    rewrite: bool,
    /// Listed in the engine's changed minutes.
    listed: bool,
}

impl Minute {
    fn new() -> Self {
        Minute {
            cells: FxHashMap::default(),
            parts: 1,
            dirty: vec![false],
            rewrite: false,
            listed: false,
        }
    }
}

/// Open windows of one input partition.
#[derive(Debug)]
pub struct WindowEngine {
    cfg: WindowConfig,
    partition: u32,
    part_entries: usize,
    series: Series,
    minutes: BTreeMap<i64, Minute>,
    buckets: usize,
    meta: WindowMeta,
    /// Minutes changed since the last `take_changes`.
    changed: Vec<i64>,
    tombstones: Vec<PartKey>,
    finals: Vec<FinalWindow>,
}

impl WindowEngine {
    pub fn new(cfg: WindowConfig, partition: u32) -> Self {
        WindowEngine {
            cfg,
            partition,
            part_entries: PART_ENTRIES,
            series: Series::default(),
            minutes: BTreeMap::new(),
            buckets: 0,
            meta: WindowMeta {
                stream_time: -1,
                closed_until: i64::MIN,
            },
            changed: Vec::new(),
            tombstones: Vec::new(),
            finals: Vec::new(),
        }
    }

    /// Buckets per part before a minute doubles its parts (tests use small
    /// values to exercise the growth).
    pub fn with_part_entries(mut self, n: usize) -> Self {
        self.part_entries = n.max(1);
        self
    }

    /// The engine whose state is `parts` (a replayed changelog or the local
    /// store) at `meta`. Returns it and the number of unreadable values
    /// (skipped).
    pub fn from_parts<'a>(
        cfg: WindowConfig,
        partition: u32,
        meta: WindowMeta,
        parts: impl IntoIterator<Item = (&'a PartKey, &'a Vec<u8>)>,
    ) -> (Self, u64) {
        let mut e = WindowEngine::new(cfg, partition);
        e.meta = meta;
        let mut unreadable = 0;
        for (k, v) in parts {
            let Some((n, entries)) = decode_part(v) else {
                unreadable += 1;
                continue;
            };
            let m = e.minutes.entry(k.minute).or_insert_with(Minute::new);
            m.parts = m.parts.max(n);
            m.rewrite = true;
            for en in entries {
                let s = e.series.intern(en.campaign_id, en.creative_id);
                if m.cells.insert((s, en.action), en.count).is_none() {
                    e.series.retain(s);
                    e.buckets += 1;
                }
            }
        }
        for m in e.minutes.values_mut() {
            m.dirty = vec![false; m.parts as usize];
        }
        e.series.collect();
        (e, unreadable)
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
        let m = self.minutes.entry(minute).or_insert_with(Minute::new);
        match m.cells.get_mut(&slot) {
            Some(c) => *c += 1,
            None => {
                m.cells.insert(slot, 1);
                self.series.retain(s);
                self.buckets += 1;
                if m.cells.len() > m.parts as usize * self.part_entries {
                    m.parts *= 2;
                    m.dirty = vec![false; m.parts as usize];
                    m.rewrite = true;
                }
            }
        }
        if !m.rewrite {
            m.dirty[self.series.part(slot, m.parts)] = true;
        }
        if !m.listed {
            m.listed = true;
            self.changed.push(minute);
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
        for (&m, minute) in &self.minutes {
            let end = m + MINUTE_MS;
            if end > old && end <= until {
                out.extend(
                    minute
                        .cells
                        .iter()
                        .map(|(slot, c)| (WindowKind::Tumbling1m, m, *slot, *c)),
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
                for (_, minute) in self.minutes.range(s..s + size) {
                    for (slot, c) in &minute.cells {
                        *sums.entry(*slot).or_default() += *c;
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
        for (m, minute) in gone {
            self.tombstones
                .extend((0..minute.parts).map(|part| PartKey { minute: m, part }));
            for (slot, _) in minute.cells {
                self.series.release(slot.0);
                self.buckets -= 1;
            }
        }
    }

    /// The partition is idle (caught up, nothing fetched for the idle time):
    /// close the windows holding counts that the wall clock says are past
    /// end + grace, and no further than the last of them. A partition with
    /// nothing open (a fresh one waiting for its first records, say) takes
    /// old records as they come, by stream time; only a record of a window
    /// already emitted is late.
    pub fn idle_close(&mut self, wall_now: i64) {
        let Some((&last, _)) = self.minutes.last_key_value() else {
            return;
        };
        let span = if self.cfg.hopping {
            WindowKind::Hopping5m1m.size_ms()
        } else {
            MINUTE_MS
        };
        self.close_until((wall_now - self.cfg.grace_ms).min(last + span));
    }

    /// Final windows closed since the last `take_changes`.
    pub fn pending_finals(&self) -> usize {
        self.finals.len()
    }

    /// Whether anything awaits persisting.
    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty() || !self.tombstones.is_empty() || !self.finals.is_empty()
    }

    /// Take what changed since the last call: the changed parts' values and
    /// the tombstones of dropped minutes (sorted by key), and the closed
    /// windows (by window start and kind).
    pub fn take_changes(&mut self) -> (Vec<PartChange>, Vec<FinalWindow>) {
        let mut changes: Vec<PartChange> = Vec::new();
        for minute in std::mem::take(&mut self.changed) {
            let Some(m) = self.minutes.get_mut(&minute) else {
                continue; // dropped since: its tombstones follow
            };
            m.listed = false;
            let mut values: Vec<Option<Vec<u8>>> = (0..m.parts as usize)
                .map(|p| (m.rewrite || m.dirty[p]).then(|| start_part(m.parts)))
                .collect();
            for (slot, count) in &m.cells {
                if let Some(buf) = &mut values[self.series.part(*slot, m.parts)] {
                    let (c, a) = &self.series.names[slot.0 as usize];
                    put_entry(
                        buf,
                        PartEntry {
                            campaign_id: c,
                            creative_id: a,
                            action: slot.1,
                            count: *count,
                        },
                    );
                }
            }
            for (part, v) in values.into_iter().enumerate() {
                if let Some(v) = v {
                    let key = PartKey {
                        minute,
                        part: part as u32,
                    };
                    changes.push((key, Some(v)));
                }
            }
            m.dirty.iter_mut().for_each(|d| *d = false);
            m.rewrite = false;
        }
        changes.extend(self.tombstones.drain(..).map(|k| (k, None)));
        changes.sort_unstable_by_key(|c| c.0);
        self.series.collect();
        // In window order; within a window, as the buckets were met.
        // Readers key final records by their identity, not by their order,
        // and comparing names here cost ~1,200 instructions per window.
        let mut finals = std::mem::take(&mut self.finals);
        finals.sort_by_key(|f| (f.window_start, f.window));
        (changes, finals)
    }

    /// The current count of a bucket, if held.
    pub fn bucket(
        &self,
        campaign: &str,
        creative: &str,
        action: Action,
        minute: i64,
    ) -> Option<u64> {
        let s = self.series.find(campaign, creative)?;
        self.minutes.get(&minute)?.cells.get(&(s, action)).copied()
    }

    /// All buckets as (campaign, creative, action, minute, count), sorted.
    pub fn buckets(&self) -> Vec<(String, String, Action, i64, u64)> {
        let mut v = Vec::with_capacity(self.buckets);
        for (m, minute) in &self.minutes {
            for ((s, action), c) in &minute.cells {
                let (cp, cr) = &self.series.names[*s as usize];
                v.push((cp.to_string(), cr.to_string(), *action, *m, *c));
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
    fn an_idle_close_goes_no_further_than_the_open_windows() {
        let mut e = WindowEngine::new(
            WindowConfig {
                grace_ms: 1_000,
                hopping: false,
            },
            0,
        );
        // A fresh partition, idle long past its records' time: nothing is
        // open, so nothing becomes late.
        e.idle_close(100 * MINUTE_MS);
        e.ingest(&r(10, Action::Send)).unwrap();
        e.ingest(&r(3 * MINUTE_MS + 10, Action::Send)).unwrap();
        // Idle again: both minutes close, and no further.
        e.idle_close(100 * MINUTE_MS);
        assert_eq!(e.take_changes().1.len(), 2);
        assert_eq!(e.meta().closed_until, 4 * MINUTE_MS);
        let late = e.ingest(&r(3 * MINUTE_MS + 20, Action::Send)).unwrap_err();
        assert!(late.starts_with("late"), "{late}");
        let late = e.ingest(&r(MINUTE_MS, Action::Send)).unwrap_err();
        assert!(late.starts_with("late"), "{late}");
        e.ingest(&r(4 * MINUTE_MS, Action::Send)).unwrap();
    }

    #[test]
    fn short_and_long_names_are_kept_apart_and_forgotten() {
        let mut e = WindowEngine::new(
            WindowConfig {
                grace_ms: 1_000,
                hopping: false,
            },
            0,
        );
        // Names around the 16-byte packing limit, sharing their first and
        // last bytes.
        let names = [
            "c",
            "cc",
            "c-c",
            "c--c",
            "c-------c",
            "c--------------c",
            "c---------------c",
            "c-------x-------c",
            "c-------x--------c",
        ];
        for (i, c) in names.iter().enumerate() {
            for (j, a) in names.iter().enumerate() {
                for _ in 0..=(i * names.len() + j) {
                    e.ingest_parts(c, a, Action::Send, 10).unwrap();
                }
            }
        }
        assert_eq!(e.series(), names.len() * names.len());
        for (i, c) in names.iter().enumerate() {
            for (j, a) in names.iter().enumerate() {
                let want = (i * names.len() + j + 1) as u64;
                assert_eq!(e.bucket(c, a, Action::Send, 0), Some(want), "{c} {a}");
            }
        }
        e.idle_close(61_000);
        let (_, finals) = e.take_changes();
        assert_eq!(finals.len(), names.len() * names.len());
        assert_eq!(e.series(), 0, "series without buckets are forgotten");
        e.ingest_parts(names[8], names[0], Action::Click, 70_000)
            .unwrap();
        e.ingest_parts(names[0], names[8], Action::Click, 70_000)
            .unwrap();
        assert_eq!(e.series(), 2);
        assert_eq!(e.bucket(names[8], names[0], Action::Click, 60_000), Some(1));
        assert_eq!(e.bucket(names[0], names[0], Action::Click, 60_000), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2_000))]
        /// Packed short names identify the pair: equal keys exactly when
        /// the names are equal (the second pair is the first with one
        /// byte changed, or not); longer names are not packed.
        #[test]
        fn short_names_identify_the_pair(
            c1 in "[ab]{0,4}|[ab]{5,18}", a1 in "[ab]{0,4}|[ab]{5,18}",
            edit in 0usize..3, at in 0usize..18, to in "[abc]",
        ) {
            let change = |s: &str| -> String {
                let mut v = s.as_bytes().to_vec();
                if !v.is_empty() {
                    let n = v.len();
                    v[at % n] = to.as_bytes()[0];
                }
                String::from_utf8(v).unwrap()
            };
            let c2 = if edit == 1 { change(&c1) } else { c1.clone() };
            let a2 = if edit == 2 { change(&a1) } else { a1.clone() };
            let (k1, k2) = (ShortNames::of(&c1, &a1), ShortNames::of(&c2, &a2));
            proptest::prop_assert_eq!(k1.is_some(), c1.len() <= 16 && a1.len() <= 16);
            if let (Some(k1), Some(k2)) = (k1, k2) {
                proptest::prop_assert_eq!(k1 == k2, (&c1, &a1) == (&c2, &a2));
            }
            // Other lengths, same bytes where they overlap.
            let longer = format!("{c1}a");
            if let (Some(k1), Some(k3)) = (k1, ShortNames::of(&longer, &a1)) {
                proptest::prop_assert_ne!(k1, k3);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn final_json_is_what_serde_writes(
            campaign in "\\PC{0,12}|[a-z\"\\\\\u{0}-\u{1f}\u{7f}é]{0,8}",
            creative in "\\PC{0,12}|[a-z\"\\\\\u{0}-\u{1f}]{0,8}",
            start in proptest::num::i64::ANY,
            partition in proptest::num::u32::ANY,
            count in proptest::num::u64::ANY,
            kind in proptest::bool::ANY,
            action in 0u8..3,
        ) {
            let f = FinalWindow {
                campaign_id: campaign,
                creative_id: creative,
                action: [Action::Send, Action::Impression, Action::Click][action as usize],
                window: if kind { WindowKind::Tumbling1m } else { WindowKind::Hopping5m1m },
                window_start: start,
                window_end: start.wrapping_add(60_000),
                partition,
                count,
            };
            proptest::prop_assert_eq!(
                String::from_utf8(f.to_json()).unwrap(),
                serde_json::to_string(&f).unwrap()
            );
        }
    }

    #[test]
    fn part_keys_and_values_round_trip() {
        let k = PartKey {
            minute: 120_000,
            part: 3,
        };
        assert_eq!(k.encode(), b"w/120000/3");
        assert_eq!(PartKey::decode(&k.encode()), Some(k));
        for bad in [
            &b"w/120001/3"[..],
            b"w/0120000/3",
            b"w/120000/",
            b"x/0/0",
            b"w/0/-1",
        ] {
            assert_eq!(
                PartKey::decode(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let entries = [
            PartEntry {
                campaign_id: "c\"[,",
                creative_id: "é",
                action: Action::Impression,
                count: 300,
            },
            PartEntry {
                campaign_id: "c",
                creative_id: "a",
                action: Action::Click,
                count: u64::MAX,
            },
        ];
        let v = encode_part(4, &entries);
        assert_eq!(decode_part(&v), Some((4, entries.to_vec())));
        assert_eq!(decode_part(&v[..v.len() - 1]), None, "truncated");
        let mut longer = v.clone();
        longer.push(0);
        assert_eq!(decode_part(&longer), None, "trailing bytes");
        assert_eq!(
            decode_part(&encode_part(3, &entries)),
            None,
            "parts not a power of two"
        );
    }

    #[test]
    fn a_minute_splits_into_parts_as_it_grows_and_writes_only_changed_parts() {
        let mut e = WindowEngine::new(
            WindowConfig {
                grace_ms: 0,
                hopping: false,
            },
            0,
        )
        .with_part_entries(4);
        let ingest = |e: &mut WindowEngine, c: usize| {
            e.ingest_parts(&format!("c{c}"), "a", Action::Send, 10)
                .unwrap();
        };
        for c in 0..4 {
            ingest(&mut e, c);
        }
        let (changes, _) = e.take_changes();
        assert_eq!(changes.len(), 1, "one part while small");
        for c in 4..40 {
            ingest(&mut e, c);
        }
        let (changes, _) = e.take_changes();
        assert_eq!(
            changes.len(),
            16,
            "40 buckets, at most 4 per part on average: 16 parts, all written"
        );
        let total: usize = changes
            .iter()
            .map(|(k, v)| {
                let (n, entries) = decode_part(v.as_ref().unwrap()).unwrap();
                assert_eq!((k.minute, n), (0, 16));
                entries.len()
            })
            .sum();
        assert_eq!(total, 40);
        ingest(&mut e, 7);
        let (changes, _) = e.take_changes();
        assert_eq!(changes.len(), 1, "only the changed part");
        // Restored from its parts, the engine holds the same buckets and
        // rewrites every part of a minute on its next change.
        let mut all: BTreeMap<PartKey, Vec<u8>> = BTreeMap::new();
        let (c0, _) = {
            let mut e2 = WindowEngine::new(e.cfg, 0).with_part_entries(4);
            for c in 0..40 {
                ingest(&mut e2, c);
            }
            ingest(&mut e2, 7);
            e2.take_changes()
        };
        for (k, v) in c0 {
            all.insert(k, v.unwrap());
        }
        let (mut r, unreadable) = WindowEngine::from_parts(e.cfg, 0, e.meta(), &all);
        assert_eq!(unreadable, 0);
        assert_eq!(r.buckets(), e.buckets());
        assert_eq!(r.bucket("c7", "a", Action::Send, 0), Some(2));
        ingest(&mut r, 1);
        assert_eq!(r.take_changes().0.len(), 16);
        // Closing the minute tombstones every part.
        e.idle_close(MINUTE_MS);
        let (changes, finals) = e.take_changes();
        assert_eq!(finals.len(), 40);
        assert_eq!(changes.len(), 16);
        assert!(changes.iter().all(|(_, v)| v.is_none()));
    }
}
