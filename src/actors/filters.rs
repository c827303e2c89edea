//! The content filters every node serves: the internal, compacted `filters`
//! topic (key `filter_id`, value the filter, null to delete) projected by a
//! `MaterializerActor` into a [`FilterRegistry`] in memory — the filters
//! by id and the index built from them, swapped whole (`ArcSwap`) so a
//! classification never waits on a change. The topic is read from its start
//! whenever the projection starts (filters are few and small).

use crate::actors::materializer::Projection;
use crate::actors::SharedCtx;
use crate::domain::filter::{Filter, FilterIndex};
use crate::io::{EventLog, IoError, Record};
use arc_swap::ArcSwap;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The filters as of the records applied so far.
pub struct FilterRegistry {
    state: Mutex<Applied>,
    index: ArcSwap<FilterIndex>,
    /// Bumped after each applied batch; waiters re-check their offset.
    changes: tokio::sync::watch::Sender<u64>,
    /// The topic's ends as read lately (when), shared by the percolator
    /// partitions that start together: one read, not one each.
    ends: tokio::sync::Mutex<Option<(Instant, Vec<u64>)>>,
}

/// How long a read of the topic's ends serves later starters.
const ENDS_REUSE: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Applied {
    by_id: BTreeMap<String, Filter>,
    /// Next offset to apply, per partition.
    next: HashMap<u32, u64>,
}

impl Default for FilterRegistry {
    fn default() -> Self {
        FilterRegistry {
            state: Mutex::default(),
            index: ArcSwap::from_pointee(FilterIndex::default()),
            changes: tokio::sync::watch::channel(0).0,
            ends: tokio::sync::Mutex::new(None),
        }
    }
}

impl FilterRegistry {
    /// The current index (a snapshot).
    pub fn index(&self) -> Arc<FilterIndex> {
        self.index.load_full()
    }

    /// Apply a partition's records, then swap in a new index once.
    pub fn apply(&self, partition: u32, records: &[Record], next: u64) {
        let mut st = self.state.lock().expect("filters lock");
        for r in records {
            let id = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
            match r.value.as_deref() {
                None => {
                    st.by_id.remove(&id);
                }
                Some(bytes) => match serde_json::from_slice(bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|v| Filter::parse(&v).map_err(|e| e.to_string()))
                {
                    Ok(f) if f.filter_id == id => {
                        st.by_id.insert(id, f);
                    }
                    other => {
                        let reason = match other {
                            Err(e) => e,
                            Ok(f) => format!("key {id:?} is not its filter_id {:?}", f.filter_id),
                        };
                        tracing::error!(partition, offset = r.offset, %reason, "skipping unreadable filter");
                        metrics::counter!("smartmsg_unreadable_records_total", "topic" => "filters")
                            .increment(1);
                    }
                },
            }
        }
        let slot = st.next.entry(partition).or_default();
        *slot = (*slot).max(next);
        self.index.store(Arc::new(FilterIndex::new(
            st.by_id.values().cloned().collect(),
        )));
        metrics::gauge!("smartmsg_filters").set(st.by_id.len() as f64);
        drop(st);
        self.changes.send_modify(|n| *n += 1);
    }

    fn applied(&self, partition: u32, offset: u64) -> bool {
        let st = self.state.lock().expect("filters lock");
        st.next.get(&partition).is_some_and(|n| *n > offset)
    }

    /// Wait until the record at `offset` of `partition` is applied (a
    /// writer reads its own write); false on timeout.
    pub async fn wait_applied(&self, partition: u32, offset: u64, timeout: Duration) -> bool {
        let mut rx = self.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.applied(partition, offset) {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return self.applied(partition, offset);
            }
        }
    }
}

impl FilterRegistry {
    /// Wait until every filter written before this call (up to a second
    /// before, when another partition read the ends just now) is applied;
    /// false on timeout.
    pub async fn wait_current(
        &self,
        log: &dyn EventLog,
        topic: &str,
        partitions: u32,
        timeout: Duration,
    ) -> Result<bool, IoError> {
        let ends = {
            let mut cached = self.ends.lock().await;
            match &*cached {
                Some((at, ends)) if at.elapsed() < ENDS_REUSE => ends.clone(),
                _ => {
                    let ends = topic_ends(log, topic, partitions).await?;
                    *cached = Some((Instant::now(), ends.clone()));
                    ends
                }
            }
        };
        for (p, end) in ends.into_iter().enumerate() {
            if end > 0 && !self.wait_applied(p as u32, end - 1, timeout).await {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Where each partition of `topic` ends now: read to its end (a high
/// watermark can be under-reported, BROKERS.md).
async fn topic_ends(log: &dyn EventLog, topic: &str, partitions: u32) -> Result<Vec<u64>, IoError> {
    let mut ends = Vec::new();
    for p in 0..partitions {
        let mut r = log.reader(topic, p, 0);
        while !r.at_end() {
            if r.next_batch(5000, Duration::from_millis(200))
                .await?
                .is_empty()
                && r.at_end()
            {
                break;
            }
        }
        ends.push(r.position());
    }
    Ok(ends)
}

/// `filters` -> the node's [`FilterRegistry`].
pub struct FiltersProjection(pub SharedCtx);

impl Projection for FiltersProjection {
    fn kind(&self) -> &'static str {
        "filters"
    }
    fn topic(&self) -> String {
        self.0.topics.filters.clone()
    }
    fn start_offset(&self, _partition: u32) -> Result<u64, IoError> {
        Ok(0)
    }
    fn apply(&self, partition: u32, records: &[Record], next: u64) -> Result<(), IoError> {
        self.0.filters.apply(partition, records, next);
        Ok(())
    }
}
