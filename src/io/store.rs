//! Typed sled stores: the campaign read model, the subscriber table, the
//! report (final windows), the trainer's evidence and the aggregators' local
//! window state. Each store writes its consumed offsets in the same sled
//! batch as the state they produced, so a restart resumes exactly there.

use crate::domain::campaign::{CampaignState, Event, EventBody};
use crate::domain::changelog::Parts;
use crate::domain::linear::Population;
use crate::domain::model::Arm;
use crate::domain::window::{FinalWindow, PartChange, PartKey, WindowMeta};
use crate::io::IoError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Whether opening sled failed only because its directory lock is held.
pub fn is_lock_held(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock
        || io.to_string().contains("could not acquire lock"))
}

/// Open a sled database, waiting up to `patience` for its directory lock.
///
/// Dropping a `sled::Db` does not release the lock at once: sled 0.34's
/// flusher thread holds it until that thread exits (spacejam/sled#1289),
/// so reopening a database this process has just closed can find it held
/// for a moment, longer on a loaded machine. Only that error is retried;
/// any other fails at once, and a lock still held after `patience` (another
/// process using the directory) is returned as it is.
pub fn open_sled(config: &sled::Config, patience: std::time::Duration) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + patience;
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        match config.open() {
            Err(e) if is_lock_held(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// Tests: reopen a database this process has just closed.
#[cfg(test)]
pub(crate) fn reopen(path: &std::path::Path) -> sled::Db {
    open_sled(
        &sled::Config::new().path(path),
        std::time::Duration::from_secs(10),
    )
    .expect("reopen sled")
}

fn offset_key(topic: &str, partition: u32) -> Vec<u8> {
    let mut k = b"o/".to_vec();
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn read_offset(tree: &sled::Tree, topic: &str, partition: u32) -> Result<u64, IoError> {
    Ok(tree
        .get(offset_key(topic, partition))?
        .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])))
        .unwrap_or(0))
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serialisable")
}

fn from_json<T: for<'de> Deserialize<'de>>(b: &[u8], what: &str) -> Result<T, IoError> {
    serde_json::from_slice(b).map_err(|e| IoError::Fatal(format!("corrupt {what}: {e}")))
}

/// A command's outcome as served by `GET /v1/commands/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandView {
    pub command_id: String,
    pub campaign_id: String,
    pub status: String,
    pub reason: Option<String>,
}

/// The query side of campaigns: a projection of `campaign-events`.
#[derive(Clone)]
pub struct ReadModelStore {
    tree: sled::Tree,
}

fn campaign_key(id: &str) -> Vec<u8> {
    let mut k = b"c/".to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

fn event_prefix(id: &str) -> Vec<u8> {
    let mut k = b"e/".to_vec();
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k
}

fn command_key(id: &str) -> Vec<u8> {
    let mut k = b"k/".to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

impl ReadModelStore {
    pub fn open(db: &sled::Db) -> Result<Self, IoError> {
        Ok(ReadModelStore {
            tree: db.open_tree("read_model")?,
        })
    }

    pub fn offset(&self, topic: &str, partition: u32) -> Result<u64, IoError> {
        read_offset(&self.tree, topic, partition)
    }

    /// Apply events read from `topic`/`partition`, idempotently by
    /// (campaign_id, seq): a record seen again replaces the stored one (last
    /// write wins) and the projection is refolded from the stored events.
    pub fn apply_events(
        &self,
        topic: &str,
        partition: u32,
        events: &[Event],
        next_offset: u64,
    ) -> Result<(), IoError> {
        let mut batch = sled::Batch::default();
        let mut states: BTreeMap<String, CampaignState> = BTreeMap::new();
        let mut stored: BTreeMap<(String, u64), Event> = BTreeMap::new();
        let mut refold: std::collections::BTreeSet<String> = Default::default();
        for e in events {
            if !states.contains_key(&e.campaign_id) {
                let s = self
                    .campaign(&e.campaign_id)?
                    .unwrap_or_else(|| CampaignState::new(&e.campaign_id, false));
                states.insert(e.campaign_id.clone(), s);
            }
            let state = states.get_mut(&e.campaign_id).expect("inserted");
            if e.seq <= state.seq {
                refold.insert(e.campaign_id.clone());
            } else {
                state.apply(e);
            }
            stored.insert((e.campaign_id.clone(), e.seq), e.clone());
            let mut ek = event_prefix(&e.campaign_id);
            ek.extend_from_slice(&e.seq.to_be_bytes());
            batch.insert(ek, json(e));
            let (status, reason) = match &e.body {
                EventBody::CommandRejected { reason, .. } => ("rejected", Some(reason.clone())),
                _ => ("applied", None),
            };
            batch.insert(
                command_key(&e.command_id),
                json(&CommandView {
                    command_id: e.command_id.clone(),
                    campaign_id: e.campaign_id.clone(),
                    status: status.into(),
                    reason,
                }),
            );
        }
        for id in refold {
            let mut all: BTreeMap<u64, Event> = BTreeMap::new();
            for item in self.tree.scan_prefix(event_prefix(&id)) {
                let (_, v) = item?;
                let e: Event = from_json(&v, "event")?;
                all.insert(e.seq, e);
            }
            for ((cid, seq), e) in &stored {
                if *cid == id {
                    all.insert(*seq, e.clone());
                }
            }
            let mut s = CampaignState::new(&id, false);
            for e in all.values() {
                s.apply(e);
            }
            states.insert(id, s);
        }
        for (id, s) in &states {
            batch.insert(campaign_key(id), json(s));
        }
        batch.insert(offset_key(topic, partition), &next_offset.to_be_bytes()[..]);
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    pub fn campaign(&self, id: &str) -> Result<Option<CampaignState>, IoError> {
        match self.tree.get(campaign_key(id))? {
            None => Ok(None),
            Some(v) => {
                let mut s: CampaignState = from_json(&v, "campaign")?;
                s.campaign_id = id.to_string();
                Ok(Some(s))
            }
        }
    }

    pub fn campaigns(&self) -> Result<Vec<CampaignState>, IoError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(b"c/") {
            let (_, v) = item?;
            out.push(from_json(&v, "campaign")?);
        }
        Ok(out)
    }

    pub fn command(&self, id: &str) -> Result<Option<CommandView>, IoError> {
        match self.tree.get(command_key(id))? {
            None => Ok(None),
            Some(v) => Ok(Some(from_json(&v, "command")?)),
        }
    }

    /// Remember an accepted command as pending (unless already known).
    pub fn put_pending(&self, command_id: &str, campaign_id: &str) -> Result<(), IoError> {
        let view = CommandView {
            command_id: command_id.into(),
            campaign_id: campaign_id.into(),
            status: "pending".into(),
            reason: None,
        };
        let _ = self.tree.compare_and_swap(
            command_key(command_id),
            None as Option<&[u8]>,
            Some(json(&view)),
        )?;
        Ok(())
    }
}

/// The global subscriber table, materialised from the compacted topic.
#[derive(Clone)]
pub struct SubscriberStore {
    tree: sled::Tree,
    /// Counts the changes applied to each channel (by any handle of this
    /// store): a copy of a channel's population taken at generation g is
    /// current while the channel's generation is still g.
    generations: std::sync::Arc<std::sync::Mutex<HashMap<String, u64>>>,
}

/// A subscriber and its numeric features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscriber {
    pub channel_id: String,
    pub user_id: String,
    #[serde(default)]
    pub features: BTreeMap<String, f64>,
}

fn sub_key(channel: &str, user: &str) -> Vec<u8> {
    let mut k = b"s/".to_vec();
    k.extend_from_slice(channel.as_bytes());
    k.push(0);
    k.extend_from_slice(user.as_bytes());
    k
}

/// The tag that opens a stored feature map in the binary form. JSON (the
/// form written before it) opens with `{`, so both are told apart.
const FEATURES_BINARY: u8 = 0xF1;

/// A subscriber's features as stored: the tag, then for each feature its
/// name's length (LEB128), the name and the value (f64, little endian).
/// About two thirds of the JSON's size, and read without parsing numbers.
fn encode_features(features: &BTreeMap<String, f64>) -> Vec<u8> {
    let size: usize = features.keys().map(|n| n.len() + 10).sum();
    let mut out = Vec::with_capacity(1 + size);
    out.push(FEATURES_BINARY);
    for (name, x) in features {
        let mut len = name.len();
        while len >= 0x80 {
            out.push((len as u8 & 0x7F) | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// The stored feature map `v` (either form), each feature given to `each`
/// with the byte range of its name in `v` (empty for JSON); false, and
/// nothing given, if `v` is neither form.
fn decode_features(v: &[u8], mut each: impl FnMut(&str, std::ops::Range<usize>, f64)) -> bool {
    if v.first() != Some(&FEATURES_BINARY) {
        let Ok(map) = serde_json::from_slice::<HashMap<std::borrow::Cow<'_, str>, f64>>(v) else {
            return false;
        };
        for (name, x) in map {
            each(&name, 0..0, x);
        }
        return true;
    }
    walk_binary(v, |_, _, _| {}) && walk_binary(v, each)
}

/// The features of a binary feature map, in order, until the first that
/// does not read (false then).
fn walk_binary(v: &[u8], mut each: impl FnMut(&str, std::ops::Range<usize>, f64)) -> bool {
    let mut at = 1;
    while at < v.len() {
        let (mut len, mut shift) = (0usize, 0u32);
        loop {
            let Some(&b) = v.get(at) else { return false };
            at += 1;
            if shift > 28 {
                return false;
            }
            len |= ((b & 0x7F) as usize) << shift;
            shift += 7;
            if b < 0x80 {
                break;
            }
        }
        let name = at..at + len;
        let Some(value) = v.get(name.end..name.end + 8) else {
            return false;
        };
        let Ok(text) = std::str::from_utf8(&v[name.clone()]) else {
            return false;
        };
        let x = f64::from_le_bytes(value.try_into().expect("8 bytes"));
        each(text, name.clone(), x);
        at = name.end + 8;
    }
    true
}

impl SubscriberStore {
    pub fn open(db: &sled::Db) -> Result<Self, IoError> {
        Ok(SubscriberStore {
            tree: db.open_tree("subscribers")?,
            generations: Default::default(),
        })
    }

    pub fn offset(&self, topic: &str, partition: u32) -> Result<u64, IoError> {
        read_offset(&self.tree, topic, partition)
    }

    /// Apply upserts (`Some`) and removals (`None`) keyed `channel/user`.
    pub fn apply(
        &self,
        topic: &str,
        partition: u32,
        changes: &[(String, String, Option<Subscriber>)],
        next_offset: u64,
    ) -> Result<(), IoError> {
        let mut batch = sled::Batch::default();
        for (channel, user, sub) in changes {
            match sub {
                Some(s) => batch.insert(sub_key(channel, user), encode_features(&s.features)),
                None => batch.remove(sub_key(channel, user)),
            }
        }
        batch.insert(offset_key(topic, partition), &next_offset.to_be_bytes()[..]);
        self.tree.apply_batch(batch)?;
        if !changes.is_empty() {
            let mut generations = self.generations.lock().expect("generations lock");
            for (channel, _, _) in changes {
                match generations.get_mut(channel.as_str()) {
                    Some(g) => *g += 1,
                    None => {
                        generations.insert(channel.clone(), 1);
                    }
                }
            }
        }
        Ok(())
    }

    /// The channel's generation (see `generations`): read it before
    /// reading the channel's table.
    pub fn generation(&self, channel: &str) -> u64 {
        let generations = self.generations.lock().expect("generations lock");
        generations.get(channel).copied().unwrap_or(0)
    }

    /// Users of a channel, sorted.
    pub fn users(&self, channel: &str) -> Result<Vec<String>, IoError> {
        let prefix = sub_key(channel, "");
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(&prefix) {
            let (k, _) = item?;
            out.push(String::from_utf8_lossy(&k[prefix.len()..]).to_string());
        }
        Ok(out)
    }

    /// Users of a channel with their features, as a dense table (ids
    /// sorted). A stored value that does not parse counts as no features.
    /// One pass, no map kept per subscriber: the features go to flat
    /// (column, value) lists first, then to the table once every column
    /// is known.
    pub fn population(&self, channel: &str) -> Result<Population, IoError> {
        let prefix = sub_key(channel, "");
        let mut ids = Vec::new();
        let mut columns: HashMap<String, u32> = HashMap::new();
        let (mut cols, mut vals, mut ends): (Vec<u32>, Vec<f32>, Vec<usize>) =
            (Vec::new(), Vec::new(), Vec::new());
        // Subscribers of a channel mostly have the same features in the
        // same (name) order: the previous row's names, by position, are
        // checked before the map.
        let mut prev = sled::IVec::default();
        let (mut prev_names, mut names_now): (Vec<(std::ops::Range<usize>, u32)>, Vec<_>) =
            (Vec::new(), Vec::new());
        for item in self.tree.scan_prefix(&prefix) {
            let (k, v) = item?;
            ids.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
            names_now.clear();
            // A value that does not read counts as no features.
            decode_features(&v, |name, range, x| {
                let i = names_now.len();
                let c = match prev_names.get(i) {
                    Some((r, c)) if !range.is_empty() && prev[r.clone()] == v[range.clone()] => *c,
                    _ => {
                        let next = columns.len() as u32;
                        match columns.get(name) {
                            Some(c) => *c,
                            None => *columns.entry(name.to_string()).or_insert(next),
                        }
                    }
                };
                names_now.push((range, c));
                cols.push(c);
                vals.push(x as f32);
            });
            ends.push(cols.len());
            std::mem::swap(&mut prev_names, &mut names_now);
            prev = v;
        }
        // Columns in name order.
        let mut names: Vec<(String, u32)> = columns.into_iter().collect();
        names.sort_unstable();
        let mut to_sorted = vec![0usize; names.len()];
        for (i, (_, c)) in names.iter().enumerate() {
            to_sorted[*c as usize] = i;
        }
        let w = names.len();
        let mut x = vec![0f32; ids.len() * w];
        let mut start = 0;
        for (row, end) in ends.into_iter().enumerate() {
            for i in start..end {
                x[row * w + to_sorted[cols[i] as usize]] = vals[i];
            }
            start = end;
        }
        Ok(Population {
            ids,
            names: names.into_iter().map(|(n, _)| n).collect(),
            x,
        })
    }

    /// One subscriber's features, if it is known.
    pub fn features(
        &self,
        channel: &str,
        user: &str,
    ) -> Result<Option<BTreeMap<String, f64>>, IoError> {
        match self.tree.get(sub_key(channel, user))? {
            None => Ok(None),
            Some(v) => {
                // A value that does not read counts as no features.
                let mut features = BTreeMap::new();
                decode_features(&v, |name, _, x| {
                    features.insert(name.to_string(), x);
                });
                Ok(Some(features))
            }
        }
    }

    pub fn count(&self, channel: &str) -> usize {
        self.tree.scan_prefix(sub_key(channel, "")).count()
    }
}

/// Final windows materialised from `reaction-aggregates`, per campaign.
#[derive(Clone)]
pub struct ReportStore {
    tree: sled::Tree,
}

impl ReportStore {
    pub fn open(db: &sled::Db) -> Result<Self, IoError> {
        Ok(ReportStore {
            tree: db.open_tree("reports")?,
        })
    }

    pub fn offset(&self, topic: &str, partition: u32) -> Result<u64, IoError> {
        read_offset(&self.tree, topic, partition)
    }

    /// Store final windows idempotently by their identity.
    pub fn apply(
        &self,
        topic: &str,
        partition: u32,
        finals: &[FinalWindow],
        next_offset: u64,
    ) -> Result<(), IoError> {
        let mut batch = sled::Batch::default();
        for f in finals {
            let mut k = b"w/".to_vec();
            k.extend_from_slice(f.campaign_id.as_bytes());
            k.push(0);
            k.extend_from_slice(f.identity().as_bytes());
            batch.insert(k, json(f));
        }
        batch.insert(offset_key(topic, partition), &next_offset.to_be_bytes()[..]);
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    pub fn windows(&self, campaign: &str) -> Result<Vec<FinalWindow>, IoError> {
        let mut k = b"w/".to_vec();
        k.extend_from_slice(campaign.as_bytes());
        k.push(0);
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(k) {
            let (_, v) = item?;
            out.push(from_json(&v, "window")?);
        }
        Ok(out)
    }
}

/// A send the trainer has seen, waiting for clicks within the attribution window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendRecord {
    pub creative_id: String,
    pub ts: i64,
    pub clicked: bool,
    /// Counted in the creative's linear statistics (its subscriber's
    /// features were known): so is a click on it then.
    #[serde(default)]
    pub featured: bool,
}

/// The trainer's evidence: sends per (campaign, user) and arms per creative.
#[derive(Clone)]
pub struct TrainerStore {
    tree: sled::Tree,
}

fn pair_key(tag: &[u8], a: &str, b: &str) -> Vec<u8> {
    let mut k = tag.to_vec();
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

impl TrainerStore {
    pub fn open(db: &sled::Db) -> Result<Self, IoError> {
        Ok(TrainerStore {
            tree: db.open_tree("trainer")?,
        })
    }

    pub fn offset(&self, topic: &str, partition: u32) -> Result<u64, IoError> {
        read_offset(&self.tree, topic, partition)
    }

    pub fn send(&self, campaign: &str, user: &str) -> Result<Option<SendRecord>, IoError> {
        match self.tree.get(pair_key(b"s/", campaign, user))? {
            None => Ok(None),
            Some(v) => Ok(Some(from_json(&v, "send")?)),
        }
    }

    pub fn arms(&self) -> Result<BTreeMap<String, BTreeMap<String, Arm>>, IoError> {
        let mut out: BTreeMap<String, BTreeMap<String, Arm>> = BTreeMap::new();
        for item in self.tree.scan_prefix(b"a/") {
            let (k, v) = item?;
            let rest = &k[2..];
            let sep = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            let campaign = String::from_utf8_lossy(&rest[..sep]).to_string();
            let creative =
                String::from_utf8_lossy(rest.get(sep + 1..).unwrap_or_default()).to_string();
            out.entry(campaign)
                .or_default()
                .insert(creative, from_json(&v, "arm")?);
        }
        Ok(out)
    }

    /// Persist updated sends and arms with the consumed offset.
    pub fn apply(
        &self,
        topic: &str,
        partition: u32,
        sends: &BTreeMap<(String, String), SendRecord>,
        arms: &BTreeMap<(String, String), Arm>,
        next_offset: u64,
    ) -> Result<(), IoError> {
        let mut batch = sled::Batch::default();
        for ((c, u), s) in sends {
            batch.insert(pair_key(b"s/", c, u), json(s));
        }
        for ((c, cr), a) in arms {
            batch.insert(pair_key(b"a/", c, cr), json(a));
        }
        batch.insert(offset_key(topic, partition), &next_offset.to_be_bytes()[..]);
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    pub fn arm(&self, campaign: &str, creative: &str) -> Result<Arm, IoError> {
        match self.tree.get(pair_key(b"a/", campaign, creative))? {
            None => Ok(Arm::default()),
            Some(v) => from_json(&v, "arm"),
        }
    }
}

/// What an aggregator's local state reflects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AggProgress {
    pub window: WindowMeta,
    /// Next input offset to process.
    pub input_offset: u64,
    /// Next changelog offset not yet reflected in this state.
    pub changelog_offset: u64,
    /// Writer epoch of the last changelog transaction reflected.
    #[serde(default)]
    pub epoch: u64,
}

/// Window-state parts, and the progress they reflect.
pub type AggSnapshot = (Parts, AggProgress);

/// An aggregator's local window state for one input partition: the same
/// part values as its changelog (`w/<minute>/<part>` keys), and under `m`
/// the progress they reflect, written together in one sled batch.
#[derive(Clone)]
pub struct AggStateStore {
    tree: sled::Tree,
}

impl AggStateStore {
    pub fn open(db: &sled::Db, partition: u32) -> Result<Self, IoError> {
        Ok(AggStateStore {
            tree: db.open_tree(format!("aggregator/{partition}"))?,
        })
    }

    /// The stored parts and progress, if any state exists. An error if a
    /// key is not a part's (e.g. the layout of an older version).
    pub fn load(&self) -> Result<Option<AggSnapshot>, IoError> {
        let Some(meta) = self.tree.get(b"m")? else {
            return Ok(None);
        };
        let progress: AggProgress = from_json(&meta, "aggregator progress")?;
        let mut parts = Parts::new();
        for item in self.tree.scan_prefix(b"w") {
            let (k, v) = item?;
            let key = PartKey::decode(&k)
                .ok_or_else(|| IoError::Fatal("window state key of an unknown layout".into()))?;
            parts.insert(key, v.to_vec());
        }
        Ok(Some((parts, progress)))
    }

    /// Apply part changes and the progress they bring in one sled batch.
    pub fn apply(&self, changes: &[PartChange], progress: &AggProgress) -> Result<(), IoError> {
        let mut batch = sled::Batch::default();
        for (k, v) in changes {
            match v {
                Some(v) => batch.insert(k.encode(), v.as_slice()),
                None => batch.remove(k.encode()),
            }
        }
        batch.insert(&b"m"[..], json(progress));
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Drop all local state (before a full rebuild).
    pub fn clear(&self) -> Result<(), IoError> {
        self.tree.clear()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::campaign::{Creative, EventBody};
    use std::time::Duration;

    #[test]
    fn a_channels_population_is_a_dense_table_and_its_changes_bump_its_generation() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let s = SubscriberStore::open(&db).unwrap();
        let handle = s.clone();
        let sub = |ch: &str, u: &str, f: &[(&str, f64)]| {
            let features = f.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            let s = Subscriber {
                channel_id: ch.into(),
                user_id: u.into(),
                features,
            };
            (ch.to_string(), u.to_string(), Some(s))
        };
        let (g0, other0) = (s.generation("c"), s.generation("other"));
        s.apply(
            "t",
            0,
            &[
                sub("c", "u2", &[("b", 2.0)]),
                sub("c", "u1", &[("z", 1.0), ("a", 3.0)]),
                sub("other", "u9", &[("q", 1.0)]),
            ],
            1,
        )
        .unwrap();
        // Any handle sees a change.
        assert!(handle.generation("c") > g0);
        assert!(handle.generation("other") > other0);
        // An unreadable value counts as no features.
        s.tree.insert(sub_key("c", "u3"), &b"not json"[..]).unwrap();
        let p = handle.population("c").unwrap();
        assert_eq!(p.ids, vec!["u1", "u2", "u3"]);
        assert_eq!(p.names, vec!["a", "b", "z"]);
        assert_eq!(p.x, vec![3.0, 0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]);
        let (g1, other1) = (s.generation("c"), s.generation("other"));
        s.apply("t", 0, &[], 2).unwrap();
        assert_eq!(s.generation("c"), g1, "no change, same generation");
        s.apply("t", 0, &[("c".into(), "u1".into(), None)], 3)
            .unwrap();
        assert!(s.generation("c") > g1);
        assert_eq!(s.generation("other"), other1, "another channel's change");
        assert_eq!(s.population("c").unwrap().ids, vec!["u2", "u3"]);
    }

    #[test]
    fn feature_maps_round_trip_the_binary_form_and_bad_bytes_are_refused() {
        let long = "n".repeat(300); // a two-byte length
        let f: BTreeMap<String, f64> = [("a", 1.5), ("é", -0.0), (long.as_str(), 1e300)]
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        let bytes = encode_features(&f);
        assert_eq!(bytes[0], FEATURES_BINARY);
        let mut back = BTreeMap::new();
        assert!(decode_features(&bytes, |n, r, x| {
            assert_eq!(&bytes[r], n.as_bytes());
            back.insert(n.to_string(), x);
        }));
        assert_eq!(back, f);
        assert!(decode_features(&[FEATURES_BINARY], |_, _, _| panic!(
            "no feature"
        )));
        // Cut anywhere: whole only where a feature ends.
        let ends: Vec<usize> = (1..f.len())
            .map(|k| encode_features(&f.clone().into_iter().take(k).collect()).len())
            .collect();
        for cut in 2..bytes.len() {
            let whole = decode_features(&bytes[..cut], |_, _, _| {});
            assert_eq!(whole, ends.contains(&cut), "a cut at {cut}");
        }
        // A name that is not UTF-8, a length that never ends.
        assert!(!decode_features(
            &[FEATURES_BINARY, 1, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0],
            |_, _, _| {}
        ));
        assert!(!decode_features(
            &[FEATURES_BINARY, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
            |_, _, _| {}
        ));
        assert!(!decode_features(b"[1]", |_, _, _| {}));
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(200))]
        /// Whatever features the subscribers have, in whichever stored form
        /// (JSON as written before the binary form, binary, or unreadable),
        /// the channel's table is the one built from the maps themselves.
        #[test]
        fn a_population_is_its_subscribers_whatever_their_stored_form(
            rows in proptest::collection::btree_map(
                "[a-z]{1,3}",
                (
                    proptest::collection::btree_map("[a-e]{1,2}", -1e6f64..1e6, 0..6),
                    0u8..3,
                ),
                0..40,
            )
        ) {
            let db = sled::Config::new().temporary(true).open().unwrap();
            let s = SubscriberStore::open(&db).unwrap();
            let mut expected = Vec::new();
            for (user, (features, form)) in &rows {
                let value = match form {
                    0 => encode_features(features),
                    1 => serde_json::to_vec(features).unwrap(),
                    // Whole features, then one cut short.
                    _ => [encode_features(features), b"\x05ab".to_vec()].concat(),
                };
                let kept: BTreeMap<String, f64> = match form {
                    0 => features.clone(),
                    // What serde_json reads back (its float parsing is not
                    // always exact to the last bit).
                    1 => serde_json::from_slice(&value).unwrap(),
                    _ => BTreeMap::new(),
                };
                s.tree.insert(sub_key("c", user), value).unwrap();
                expected.push((user.clone(), kept.clone()));
                proptest::prop_assert_eq!(s.features("c", user).unwrap(), Some(kept));
            }
            s.tree.insert(sub_key("other", "zz"), encode_features(&[("q".to_string(), 1.0)].into())).unwrap();
            let want = Population::from_rows(expected);
            let got = s.population("c").unwrap();
            proptest::prop_assert_eq!(got.ids, want.ids);
            proptest::prop_assert_eq!(got.names, want.names);
            proptest::prop_assert_eq!(got.x, want.x);
        }
    }

    #[test]
    fn aggregator_state_round_trips_its_parts() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let s = AggStateStore::open(&db, 3).unwrap();
        assert!(s.load().unwrap().is_none());
        let k = |minute, part| PartKey { minute, part };
        let p1 = AggProgress {
            input_offset: 10,
            changelog_offset: 4,
            epoch: 7,
            ..Default::default()
        };
        s.apply(
            &[
                (k(0, 0), Some(b"a".to_vec())),
                (k(0, 1), Some(b"b".to_vec())),
                (k(60_000, 0), Some(b"c".to_vec())),
            ],
            &p1,
        )
        .unwrap();
        let p2 = AggProgress {
            input_offset: 20,
            ..p1
        };
        s.apply(&[(k(0, 0), Some(b"d".to_vec())), (k(60_000, 0), None)], &p2)
            .unwrap();
        let (parts, progress) = s.load().unwrap().unwrap();
        assert_eq!(progress, p2);
        let want: Parts = [(k(0, 0), b"d".to_vec()), (k(0, 1), b"b".to_vec())].into();
        assert_eq!(parts, want);
        // A key of another layout makes the state unreadable (rebuilt).
        s.tree.insert(b"w\x00\x00", &b"x"[..]).unwrap();
        assert!(s.load().is_err());
        s.clear().unwrap();
        assert!(s.load().unwrap().is_none());
    }

    fn ev(seq: u64, body: EventBody) -> Event {
        Event {
            campaign_id: "c".into(),
            seq,
            command_id: format!("cmd{seq}"),
            ts: 0,
            command_offset: None,
            body,
        }
    }

    #[test]
    fn open_sled_waits_for_a_released_lock_and_reports_a_held_one() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = sled::Config::new().path(dir.path());
        let first = cfg.open().unwrap();
        first.insert(b"k", b"v").unwrap();
        let held = open_sled(&cfg, Duration::from_millis(50)).unwrap_err();
        assert!(is_lock_held(&held), "{held}");
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
        });
        let db = open_sled(&cfg, Duration::from_secs(30)).unwrap();
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        closer.join().unwrap();
        let missing = sled::Config::new().path(dir.path().join("f"));
        std::fs::write(dir.path().join("f"), b"not a directory").unwrap();
        let err = open_sled(&missing, Duration::from_secs(30)).unwrap_err();
        assert!(!is_lock_held(&err), "{err}");
    }

    #[test]
    fn subscriber_tombstones_remove() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let st = SubscriberStore::open(&db).unwrap();
        let sub = |u: &str| Subscriber {
            channel_id: "ch".into(),
            user_id: u.into(),
            features: BTreeMap::new(),
        };
        st.apply(
            "t",
            0,
            &[
                ("ch".into(), "u1".into(), Some(sub("u1"))),
                ("ch".into(), "u2".into(), Some(sub("u2"))),
                ("other".into(), "u3".into(), Some(sub("u3"))),
            ],
            3,
        )
        .unwrap();
        assert_eq!(st.users("ch").unwrap(), vec!["u1", "u2"]);
        st.apply("t", 0, &[("ch".into(), "u1".into(), None)], 4)
            .unwrap();
        assert_eq!(st.users("ch").unwrap(), vec!["u2"]);
        assert_eq!(st.offset("t", 0).unwrap(), 4);
    }

    #[test]
    fn read_model_is_idempotent_by_identity() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let rm = ReadModelStore::open(&db).unwrap();
        let created = ev(
            1,
            EventBody::Created {
                channel_id: "ch".into(),
                creatives: vec![Creative {
                    creative_id: "a".into(),
                    text: "t".into(),
                }],
                budget: 10,
                start_at: 0,
                end_at: 1000,
                batch_interval_secs: 1,
                batches_total: 1,
            },
        );
        let mut assignments = BTreeMap::new();
        assignments.insert("a".to_string(), vec!["u1".to_string(), "u2".to_string()]);
        let exec = ev(
            2,
            EventBody::BatchExecuted {
                batch: 0,
                due_at: 0,
                size: 2,
                model_version: 0,
                assignments,
            },
        );
        rm.apply_events("t", 0, &[created.clone(), exec.clone()], 2)
            .unwrap();
        // The same records again (an aborted transaction replayed) change nothing.
        rm.apply_events("t", 0, &[created, exec], 4).unwrap();
        let s = rm.campaign("c").unwrap().unwrap();
        assert_eq!(s.messages_sent, 2);
        assert_eq!(s.sends_per_creative["a"], 2);
        assert_eq!(rm.offset("t", 0).unwrap(), 4);
        assert_eq!(rm.command("cmd2").unwrap().unwrap().status, "applied");
        rm.put_pending("cmd2", "c").unwrap();
        assert_eq!(rm.command("cmd2").unwrap().unwrap().status, "applied");
    }
}
