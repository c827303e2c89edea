//! The embedded event log: Kafka-like topics, partitions, offsets, consumer
//! group offsets and atomic multi-topic transactions, on one sled tree.
//! Records and committed offsets share the tree so one `apply_batch` makes a
//! transaction atomic; every write is flushed before it is acknowledged.

use crate::clock::system_now_ms;
use crate::domain::partition::partition_for;
use crate::io::{
    EventLog, GroupMember, IoError, OffsetCommit, OutRecord, PartitionEvent, PartitionReader,
    Record, TopicReader, TopicSpec, Txn, TxnWriter, Written,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TopicMeta {
    id: u32,
    partitions: u32,
    compacted: bool,
}

#[derive(Default)]
struct LogState {
    topics: HashMap<String, TopicMeta>,
    next: HashMap<(u32, u32), u64>,
    writers: HashMap<String, u64>,
    round_robin: u32,
}

struct Inner {
    db: sled::Db,
    tree: sled::Tree,
    state: Mutex<LogState>,
    version: watch::Sender<u64>,
}

/// Event log on sled. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

fn record_key(topic: u32, partition: u32, offset: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = b'R';
    k[1..5].copy_from_slice(&topic.to_be_bytes());
    k[5..9].copy_from_slice(&partition.to_be_bytes());
    k[9..17].copy_from_slice(&offset.to_be_bytes());
    k
}

fn offset_key(group: &str, topic: &str, partition: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + topic.len() + 7);
    k.push(b'O');
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn put_opt(buf: &mut Vec<u8>, b: &Option<Vec<u8>>) {
    match b {
        None => buf.push(0),
        Some(v) => {
            buf.push(1);
            buf.extend_from_slice(&(v.len() as u32).to_be_bytes());
            buf.extend_from_slice(v);
        }
    }
}

fn get_opt(b: &[u8], pos: &mut usize) -> Option<Option<Vec<u8>>> {
    let flag = *b.get(*pos)?;
    *pos += 1;
    if flag == 0 {
        return Some(None);
    }
    let len = u32::from_be_bytes(b.get(*pos..*pos + 4)?.try_into().ok()?) as usize;
    *pos += 4;
    let v = b.get(*pos..*pos + len)?.to_vec();
    *pos += len;
    Some(Some(v))
}

fn encode(r: &OutRecord, ts: i64) -> Vec<u8> {
    let mut buf = Vec::with_capacity(
        17 + r.key.as_ref().map_or(0, |k| k.len()) + r.value.as_ref().map_or(0, |v| v.len()),
    );
    buf.extend_from_slice(&ts.to_be_bytes());
    put_opt(&mut buf, &r.key);
    put_opt(&mut buf, &r.value);
    buf
}

fn decode(partition: u32, offset: u64, b: &[u8]) -> Result<Record, IoError> {
    let bad = || IoError::Fatal(format!("corrupt log record at {partition}/{offset}"));
    let ts = i64::from_be_bytes(b.get(0..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
    let mut pos = 8;
    let key = get_opt(b, &mut pos).ok_or_else(bad)?;
    let value = get_opt(b, &mut pos).ok_or_else(bad)?;
    Ok(Record {
        partition,
        offset,
        key,
        value,
        timestamp: ts,
    })
}

impl EmbeddedLog {
    /// Open (or create) the log in a sled database shared with other stores.
    pub fn open(db: &sled::Db) -> Result<Self, IoError> {
        let tree = db.open_tree("event_log")?;
        let mut state = LogState::default();
        for item in tree.scan_prefix(b"T") {
            let (k, v) = item?;
            let name = String::from_utf8_lossy(&k[1..]).to_string();
            let meta: TopicMeta = serde_json::from_slice(&v)
                .map_err(|e| IoError::Fatal(format!("corrupt topic meta {name}: {e}")))?;
            for p in 0..meta.partitions {
                let mut prefix = vec![b'R'];
                prefix.extend_from_slice(&meta.id.to_be_bytes());
                prefix.extend_from_slice(&p.to_be_bytes());
                let next = match tree.scan_prefix(&prefix).next_back() {
                    Some(last) => {
                        let (k, _) = last?;
                        u64::from_be_bytes(k[9..17].try_into().expect("8 bytes")) + 1
                    }
                    None => 0,
                };
                state.next.insert((meta.id, p), next);
            }
            state.topics.insert(name, meta);
        }
        let (version, _) = watch::channel(0);
        Ok(EmbeddedLog {
            inner: Arc::new(Inner {
                db: db.clone(),
                tree,
                state: Mutex::new(state),
                version,
            }),
        })
    }

    fn write(
        &self,
        records: &[OutRecord],
        offsets: &[OffsetCommit],
        fence: Option<(&str, u64)>,
    ) -> Result<Vec<Written>, IoError> {
        let now = system_now_ms();
        let mut st = self.inner.state.lock().expect("log lock");
        if let Some((id, epoch)) = fence {
            if st.writers.get(id) != Some(&epoch) {
                return Err(IoError::Fenced(format!(
                    "transactional id {id} epoch {epoch} was fenced by a newer writer"
                )));
            }
        }
        let mut batch = sled::Batch::default();
        let mut next: HashMap<(u32, u32), u64> = HashMap::new();
        let mut written = Vec::with_capacity(records.len());
        for r in records {
            let meta = st
                .topics
                .get(&r.topic)
                .ok_or_else(|| IoError::Fatal(format!("unknown topic {}", r.topic)))?
                .clone();
            let partition = match (r.partition, &r.key) {
                (Some(p), _) if p < meta.partitions => p,
                (Some(p), _) => {
                    return Err(IoError::Fatal(format!(
                        "partition {p} out of range for {}",
                        r.topic
                    )))
                }
                (None, Some(k)) => partition_for(k, meta.partitions),
                (None, None) => {
                    st.round_robin = st.round_robin.wrapping_add(1);
                    st.round_robin % meta.partitions
                }
            };
            let slot = next
                .entry((meta.id, partition))
                .or_insert_with(|| *st.next.get(&(meta.id, partition)).unwrap_or(&0));
            let offset = *slot;
            *slot += 1;
            batch.insert(&record_key(meta.id, partition, offset)[..], encode(r, now));
            written.push(Written { partition, offset });
        }
        for o in offsets {
            batch.insert(
                offset_key(&o.group, &o.topic, o.partition),
                &o.next_offset.to_be_bytes()[..],
            );
        }
        self.inner.tree.apply_batch(batch)?;
        for (k, v) in next {
            st.next.insert(k, v);
        }
        drop(st);
        self.inner.version.send_modify(|v| *v += 1);
        Ok(written)
    }

    async fn flush(&self) -> Result<(), IoError> {
        crate::io::flush_db(&self.inner.db).await?;
        Ok(())
    }

    /// The committed offset of `group` on a partition (next record to read).
    pub async fn committed(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<u64>, IoError> {
        Ok(self
            .inner
            .tree
            .get(offset_key(group, topic, partition))?
            .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]))))
    }

    /// Offset of the next record to be written to a partition.
    pub fn end_offset(&self, topic: &str, partition: u32) -> u64 {
        let st = self.inner.state.lock().expect("log lock");
        st.topics
            .get(topic)
            .and_then(|m| st.next.get(&(m.id, partition)))
            .copied()
            .unwrap_or(0)
    }
}

struct EmbeddedTxnWriter {
    log: EmbeddedLog,
    id: String,
    epoch: u64,
}

#[async_trait::async_trait]
impl TxnWriter for EmbeddedTxnWriter {
    async fn commit(&self, txn: Txn) -> Result<Vec<Written>, IoError> {
        let log = self.log.clone();
        let id = self.id.clone();
        let epoch = self.epoch;
        // sled's apply_batch may block on IO: keep it off the async workers.
        let written = tokio::task::spawn_blocking(move || {
            log.write(&txn.records, &txn.offsets, Some((&id, epoch)))
        })
        .await
        .map_err(|e| IoError::Fatal(format!("commit task: {e}")))??;
        self.log.flush().await?;
        Ok(written)
    }
}

struct EmbeddedReader {
    log: EmbeddedLog,
    topic: String,
    topic_id: Option<(u32, u32)>,
    partition: u32,
    position: u64,
    version: watch::Receiver<u64>,
    /// The last read found fewer records than asked for.
    at_end: bool,
}

impl EmbeddedReader {
    fn read_now(&mut self, max: usize) -> Result<Vec<Record>, IoError> {
        if self.topic_id.is_none() {
            let st = self.log.inner.state.lock().expect("log lock");
            self.topic_id = st.topics.get(&self.topic).map(|m| (m.id, m.partitions));
        }
        let Some((id, _)) = self.topic_id else {
            return Ok(Vec::new());
        };
        let from = record_key(id, self.partition, self.position);
        let to = record_key(id, self.partition, u64::MAX);
        let mut out = Vec::new();
        for item in self.log.inner.tree.range(from..to).take(max) {
            let (k, v) = item?;
            let offset = u64::from_be_bytes(k[9..17].try_into().expect("8 bytes"));
            out.push(decode(self.partition, offset, &v)?);
        }
        if let Some(last) = out.last() {
            self.position = last.offset + 1;
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl PartitionReader for EmbeddedReader {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, IoError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            self.version.borrow_and_update();
            let got = self.read_now(max)?;
            self.at_end = got.len() < max;
            if !got.is_empty() {
                return Ok(got);
            }
            match tokio::time::timeout_at(deadline, self.version.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Ok(Vec::new()),
            }
        }
    }
    fn position(&self) -> u64 {
        self.position
    }
    fn seek(&mut self, offset: u64) {
        self.position = offset;
        self.at_end = false;
    }
    fn at_end(&self) -> bool {
        self.at_end
    }
}

#[async_trait::async_trait]
impl EventLog for EmbeddedLog {
    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<(), IoError> {
        let mut st = self.inner.state.lock().expect("log lock");
        if let Some(existing) = st.topics.get(&spec.name) {
            if existing.partitions != spec.partitions {
                return Err(IoError::Fatal(format!(
                    "topic {} exists with {} partitions, config says {}",
                    spec.name, existing.partitions, spec.partitions
                )));
            }
            return Ok(());
        }
        let id = st.topics.values().map(|m| m.id + 1).max().unwrap_or(0);
        let meta = TopicMeta {
            id,
            partitions: spec.partitions,
            compacted: spec.compacted,
        };
        let mut key = vec![b'T'];
        key.extend_from_slice(spec.name.as_bytes());
        self.inner
            .tree
            .insert(key, serde_json::to_vec(&meta).expect("serialisable"))?;
        for p in 0..spec.partitions {
            st.next.insert((id, p), 0);
        }
        st.topics.insert(spec.name.clone(), meta);
        Ok(())
    }

    fn partitions(&self, topic: &str) -> Option<u32> {
        let st = self.inner.state.lock().expect("log lock");
        st.topics.get(topic).map(|m| m.partitions)
    }

    async fn publish(&self, records: Vec<OutRecord>) -> Result<Vec<Written>, IoError> {
        let log = self.clone();
        let written = tokio::task::spawn_blocking(move || log.write(&records, &[], None))
            .await
            .map_err(|e| IoError::Fatal(format!("publish task: {e}")))??;
        self.flush().await?;
        Ok(written)
    }

    async fn txn_writer(&self, transactional_id: &str) -> Result<Arc<dyn TxnWriter>, IoError> {
        let mut st = self.inner.state.lock().expect("log lock");
        let epoch = st.writers.get(transactional_id).map_or(0, |e| e + 1);
        st.writers.insert(transactional_id.to_string(), epoch);
        Ok(Arc::new(EmbeddedTxnWriter {
            log: self.clone(),
            id: transactional_id.to_string(),
            epoch,
        }))
    }

    fn reader(&self, topic: &str, partition: u32, from: u64) -> Box<dyn PartitionReader> {
        Box::new(EmbeddedReader {
            log: self.clone(),
            topic: topic.to_string(),
            topic_id: None,
            partition,
            position: from,
            version: self.inner.version.subscribe(),
            at_end: false,
        })
    }

    fn topic_reader(&self, topic: &str, from: &[u64]) -> Result<Box<dyn TopicReader>, IoError> {
        let readers = from
            .iter()
            .enumerate()
            .map(|(p, o)| EmbeddedReader {
                log: self.clone(),
                topic: topic.to_string(),
                topic_id: None,
                partition: p as u32,
                position: *o,
                version: self.inner.version.subscribe(),
                at_end: false,
            })
            .collect();
        Ok(Box::new(EmbeddedTopicReader {
            readers,
            version: self.inner.version.subscribe(),
            next: 0,
        }))
    }

    async fn join_group(
        &self,
        group: &str,
        topic: &str,
        transactional_id: &str,
    ) -> Result<Arc<dyn GroupMember>, IoError> {
        let partitions = self
            .partitions(topic)
            .ok_or_else(|| IoError::Fatal(format!("unknown topic {topic}")))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // The only member of its group: every partition is assigned at once.
        let _ = tx.send(PartitionEvent::Assigned((0..partitions).collect()));
        Ok(Arc::new(EmbeddedGroup {
            log: self.clone(),
            group: group.to_string(),
            topic: topic.to_string(),
            writer: self.txn_writer(transactional_id).await?,
            events: tokio::sync::Mutex::new(rx),
            leave: Mutex::new(Some(tx)),
        }))
    }

    async fn healthcheck(&self) -> Result<(), IoError> {
        self.inner.tree.get(b"health")?;
        Ok(())
    }

    async fn group_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<u64>, IoError> {
        self.committed(group, topic, partition).await
    }
}

struct EmbeddedTopicReader {
    readers: Vec<EmbeddedReader>,
    version: watch::Receiver<u64>,
    next: usize,
}

#[async_trait::async_trait]
impl TopicReader for EmbeddedTopicReader {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, IoError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            self.version.borrow_and_update();
            let mut out = Vec::new();
            let n = self.readers.len();
            // Round-robin so no partition starves another.
            for i in 0..n {
                if out.len() >= max {
                    break;
                }
                let idx = (self.next + i) % n;
                let mut got = self.readers[idx].read_now(max - out.len())?;
                out.append(&mut got);
            }
            self.next = (self.next + 1) % n.max(1);
            if !out.is_empty() {
                return Ok(out);
            }
            match tokio::time::timeout_at(deadline, self.version.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Ok(Vec::new()),
            }
        }
    }
}

/// The embedded log's consumer group: one member owning every partition.
struct EmbeddedGroup {
    log: EmbeddedLog,
    group: String,
    topic: String,
    writer: Arc<dyn TxnWriter>,
    events: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<PartitionEvent>>,
    leave: Mutex<Option<tokio::sync::mpsc::UnboundedSender<PartitionEvent>>>,
}

#[async_trait::async_trait]
impl GroupMember for EmbeddedGroup {
    fn topic(&self) -> &str {
        &self.topic
    }
    async fn next_event(&self) -> Option<PartitionEvent> {
        self.events.lock().await.recv().await
    }
    async fn committed(&self, partition: u32) -> Result<Option<u64>, IoError> {
        self.log
            .committed(&self.group, &self.topic, partition)
            .await
    }
    async fn reader(&self, partition: u32, from: u64) -> Result<Box<dyn PartitionReader>, IoError> {
        Ok(self.log.reader(&self.topic, partition, from))
    }
    fn writer(&self) -> Arc<dyn TxnWriter> {
        self.writer.clone()
    }
    async fn leave(&self) {
        self.leave.lock().expect("group lock").take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::store::reopen;

    fn spec(name: &str, partitions: u32) -> TopicSpec {
        TopicSpec {
            name: name.into(),
            partitions,
            compacted: false,
            max_message_bytes: None,
        }
    }

    #[tokio::test]
    async fn append_read_commit_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let log = EmbeddedLog::open(&db).unwrap();
            log.ensure_topic(&spec("a", 2)).await.unwrap();
            log.ensure_topic(&spec("b", 1)).await.unwrap();
            let w = log
                .publish(vec![
                    OutRecord::keyed("a", "k1", Some(b"v1".to_vec())),
                    OutRecord::keyed("a", "k1", Some(b"v2".to_vec())),
                ])
                .await
                .unwrap();
            assert_eq!(w[0].partition, w[1].partition);
            assert_eq!(w[1].offset, w[0].offset + 1);
            let writer = log.txn_writer("t").await.unwrap();
            writer
                .commit(Txn {
                    records: vec![OutRecord::keyed("b", "x", None)],
                    offsets: vec![OffsetCommit {
                        group: "g".into(),
                        topic: "a".into(),
                        partition: w[0].partition,
                        next_offset: 2,
                    }],
                })
                .await
                .unwrap();
        }
        let db = reopen(dir.path());
        let log = EmbeddedLog::open(&db).unwrap();
        let p = partition_for(b"k1", 2);
        assert_eq!(log.committed("g", "a", p).await.unwrap(), Some(2));
        let mut r = log.reader("a", p, 0);
        let recs = r.next_batch(10, Duration::from_millis(10)).await.unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].value.as_deref(), Some(&b"v2"[..]));
        assert!(r
            .next_batch(10, Duration::from_millis(10))
            .await
            .unwrap()
            .is_empty());
        let mut rb = log.reader("b", partition_for(b"x", 1), 0);
        let tomb = rb.next_batch(10, Duration::from_millis(10)).await.unwrap();
        assert_eq!(tomb[0].value, None);
        // Appends continue after the reopened end.
        let w = log
            .publish(vec![OutRecord::keyed("a", "k1", Some(b"v3".to_vec()))])
            .await
            .unwrap();
        assert_eq!(w[0].offset, 2);
    }

    #[tokio::test]
    async fn reader_wakes_on_new_records() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = EmbeddedLog::open(&db).unwrap();
        log.ensure_topic(&spec("a", 1)).await.unwrap();
        let mut r = log.reader("a", 0, 0);
        let l2 = log.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            l2.publish(vec![OutRecord::keyed("a", "k", Some(b"v".to_vec()))])
                .await
                .unwrap();
        });
        let recs = r.next_batch(10, Duration::from_secs(5)).await.unwrap();
        assert_eq!(recs.len(), 1);
    }

    #[tokio::test]
    async fn older_writer_is_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = EmbeddedLog::open(&db).unwrap();
        log.ensure_topic(&spec("a", 1)).await.unwrap();
        let old = log.txn_writer("owner-0").await.unwrap();
        let new = log.txn_writer("owner-0").await.unwrap();
        let txn = || Txn {
            records: vec![OutRecord::keyed("a", "k", Some(b"v".to_vec()))],
            offsets: vec![],
        };
        assert!(matches!(old.commit(txn()).await, Err(IoError::Fenced(_))));
        new.commit(txn()).await.unwrap();
        assert_eq!(log.end_offset("a", 0), 1);
    }
}
