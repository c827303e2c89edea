//! Every adapter to the outside world, and the traits actors use to reach it.
//! Actors see only [`EventLog`], [`PartitionReader`], [`TxnWriter`],
//! [`DelayQueue`] and the typed sled stores of [`store`]; the embedded
//! backends here implement the traits on sled, the Kafka and RabbitMQ
//! adapters implement the same traits for cluster mode.

pub mod amqp;
pub mod embedded_delay;
pub mod embedded_log;
pub mod http;
pub mod kafka;
mod kafka_queue;
pub mod metrics;
pub mod store;
pub mod topics;

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// An IO failure, classified by whether retrying makes sense.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IoError {
    /// Transient (timeouts, broker unavailable): retry with backoff.
    #[error("retryable: {0}")]
    Retryable(String),
    /// This writer was fenced by a newer instance: stop, rebuild from the log.
    #[error("fenced: {0}")]
    Fenced(String),
    /// Not recoverable by retrying (corrupt data, misconfiguration).
    #[error("fatal: {0}")]
    Fatal(String),
}

impl IoError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, IoError::Retryable(_))
    }
}

impl From<sled::Error> for IoError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) => IoError::Retryable(format!("sled io: {io}")),
            other => IoError::Fatal(format!("sled: {other}")),
        }
    }
}

impl From<sled::transaction::TransactionError<IoError>> for IoError {
    fn from(e: sled::transaction::TransactionError<IoError>) -> Self {
        match e {
            sled::transaction::TransactionError::Abort(e) => e,
            sled::transaction::TransactionError::Storage(e) => e.into(),
        }
    }
}

/// Flush a sled database to disk off the async workers. (sled 0.34's
/// `flush_async` can deadlock when called concurrently: sled issue #1308.)
pub async fn flush_db(db: &sled::Db) -> Result<(), IoError> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || db.flush())
        .await
        .map_err(|e| IoError::Fatal(format!("flush task: {e}")))??;
    Ok(())
}

/// A payload for a dead-letter record: the original bytes as text when they
/// are UTF-8, else base64.
/// A dead letter: the record at `offset` of `topic`/`partition`, its reason,
/// and its original bytes (CONTRACT.md's DLQ shape), keyed as it was.
pub fn dead_letter(
    dlq_topic: &str,
    topic: &str,
    partition: u32,
    offset: u64,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    reason: &str,
) -> OutRecord {
    let v = serde_json::json!({
        "reason": reason,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "payload": payload_text(value),
    });
    OutRecord {
        topic: dlq_topic.to_string(),
        partition: None,
        key: key.map(<[u8]>::to_vec),
        value: Some(serde_json::to_vec(&v).expect("serialisable")),
    }
}

pub fn payload_text(payload: Option<&[u8]>) -> serde_json::Value {
    use base64::Engine;
    match payload {
        None => serde_json::Value::Null,
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => serde_json::Value::String(s.to_string()),
            Err(_) => {
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
        },
    }
}

/// A record read from a topic partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition: u32,
    pub offset: u64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub timestamp: i64,
}

impl Record {
    /// This record, borrowed.
    pub fn as_ref(&self) -> RecordRef<'_> {
        RecordRef {
            partition: self.partition,
            offset: self.offset,
            key: self.key.as_deref(),
            value: self.value.as_deref(),
            timestamp: self.timestamp,
        }
    }
}

/// A record lent by a reader (see [`PartitionReader::visit_batch`]): its
/// bytes stay in the client's fetch buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub partition: u32,
    pub offset: u64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub timestamp: i64,
}

impl RecordRef<'_> {
    pub fn to_record(&self) -> Record {
        Record {
            partition: self.partition,
            offset: self.offset,
            key: self.key.map(<[u8]>::to_vec),
            value: self.value.map(<[u8]>::to_vec),
            timestamp: self.timestamp,
        }
    }
}

/// A record to write. Without an explicit partition the key decides it
/// (Kafka's murmur2 partitioner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub topic: String,
    pub partition: Option<u32>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

impl OutRecord {
    pub fn keyed(topic: &str, key: impl Into<Vec<u8>>, value: Option<Vec<u8>>) -> Self {
        OutRecord {
            topic: topic.to_string(),
            partition: None,
            key: Some(key.into()),
            value,
        }
    }
    pub fn to_partition(mut self, p: u32) -> Self {
        self.partition = Some(p);
        self
    }
}

/// "Consumer `group` has processed `topic`/`partition` up to `next_offset`."
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetCommit {
    pub group: String,
    pub topic: String,
    pub partition: u32,
    pub next_offset: u64,
}

/// Records and consumed offsets that become visible together or not at all.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    pub records: Vec<OutRecord>,
    pub offsets: Vec<OffsetCommit>,
}

/// Where a written record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub partition: u32,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: u32,
    pub compacted: bool,
    /// The largest record the topic takes (`max.message.bytes`), when
    /// above the broker's default (1 MB on Apache Kafka).
    pub max_message_bytes: Option<u32>,
}

/// The largest model artifact: a campaign's creatives carry its feature
/// statistics (`model.max_features`), so a cluster with many running
/// campaigns writes artifacts of several MB.
pub const MODEL_MAX_BYTES: u32 = 16 * 1024 * 1024;

/// A transactional writer. A newer writer with the same transactional id
/// fences the older one: its commits fail with [`IoError::Fenced`].
#[async_trait::async_trait]
pub trait TxnWriter: Send + Sync {
    async fn commit(&self, txn: Txn) -> Result<Vec<Written>, IoError>;
}

/// Sequential reader of one topic partition.
#[async_trait::async_trait]
pub trait PartitionReader: Send + Sync {
    /// Up to `max` records from the current position. When there is none,
    /// waits up to `wait` for one; an empty result means caught up.
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, IoError>;
    /// `next_batch` without copying: lends each record to `f` in order and
    /// returns how many there were. Readers that hold records in a client
    /// buffer (Kafka) implement it without a copy per record.
    async fn visit_batch(
        &mut self,
        max: usize,
        wait: Duration,
        f: &mut (dyn for<'r> FnMut(RecordRef<'r>) + Send),
    ) -> Result<usize, IoError> {
        let records = self.next_batch(max, wait).await?;
        for r in &records {
            f(r.as_ref());
        }
        Ok(records.len())
    }
    /// Offset of the next record to read.
    fn position(&self) -> u64;
    fn seek(&mut self, offset: u64);
    /// Whether the reader is known to be at the end of the partition (it
    /// read everything there was), as opposed to merely not having
    /// received anything yet.
    fn at_end(&self) -> bool;
}

/// Reader of every partition of a topic (records carry their partition).
#[async_trait::async_trait]
pub trait TopicReader: Send + Sync {
    /// Up to `max` records from any partition, in order within each
    /// partition; waits up to `wait` when none. Empty means caught up.
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, IoError>;
}

/// What a consumer group tells its member about partition ownership.
#[derive(Debug)]
pub enum PartitionEvent {
    /// These partitions are now ours.
    Assigned(Vec<u32>),
    /// These partitions go elsewhere: drain their actors (finish and commit
    /// in-flight work), then send on `done`. The rebalance waits for it, up
    /// to a bound.
    Revoked {
        partitions: Vec<u32>,
        done: tokio::sync::oneshot::Sender<()>,
    },
    /// These partitions were lost (session expired): stop their actors; their
    /// uncommitted work belongs to the new owner.
    Lost(Vec<u32>),
}

/// Membership of one consumer group on one topic: partition events, readers
/// of owned partitions and the transactional writer whose commits carry the
/// group's consumed offsets.
#[async_trait::async_trait]
pub trait GroupMember: Send + Sync {
    fn topic(&self) -> &str;
    /// The next partition event; `None` once the membership has ended.
    async fn next_event(&self) -> Option<PartitionEvent>;
    /// The group's committed offset of an owned partition.
    async fn committed(&self, partition: u32) -> Result<Option<u64>, IoError>;
    /// A reader of an owned partition, starting at `from`.
    async fn reader(&self, partition: u32, from: u64) -> Result<Box<dyn PartitionReader>, IoError>;
    /// The transactional writer of this member (offsets in its commits are
    /// this group's).
    fn writer(&self) -> Arc<dyn TxnWriter>;
    /// Leave the group (after the owned partitions were drained).
    async fn leave(&self);
}

/// A partitioned, offset-addressed log of keyed records (Kafka-like).
#[async_trait::async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Create the topic if missing (idempotent).
    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<(), IoError>;
    /// Partition count of a topic, if it exists.
    fn partitions(&self, topic: &str) -> Option<u32>;
    /// Append records (not transactional, but durable once this returns).
    async fn publish(&self, records: Vec<OutRecord>) -> Result<Vec<Written>, IoError>;
    /// A transactional writer for `transactional_id` (fences older ones).
    async fn txn_writer(&self, transactional_id: &str) -> Result<Arc<dyn TxnWriter>, IoError>;
    /// A reader of one partition positioned at `from` (outside any group).
    fn reader(&self, topic: &str, partition: u32, from: u64) -> Box<dyn PartitionReader>;
    /// A reader of all partitions, partition `i` starting at `from[i]`.
    fn topic_reader(&self, topic: &str, from: &[u64]) -> Result<Box<dyn TopicReader>, IoError>;
    /// Join consumer group `group` on `topic`; the member's transactional
    /// writer uses `transactional_id` (a newer writer with it fences this one).
    async fn join_group(
        &self,
        group: &str,
        topic: &str,
        transactional_id: &str,
    ) -> Result<Arc<dyn GroupMember>, IoError>;
    /// Whether the backend is usable (for `/readyz`).
    async fn healthcheck(&self) -> Result<(), IoError>;
    /// The committed offset of `group` on a partition (next record it
    /// reads), without joining the group.
    async fn group_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<u64>, IoError>;
}

pub type SharedLog = Arc<dyn EventLog>;

/// A scheduled batch job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub campaign_id: String,
    pub batch: u64,
    pub due_at: i64,
    /// The `execute_batch` command id this job turns into.
    pub command_id: String,
}

/// A job handed to a consumer; ack it once its command is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub tag: u64,
    pub job: Job,
    pub redelivered: bool,
}

/// A delay queue: jobs are delivered once due, in due order whatever the
/// publish order; unacked deliveries come back after a restart.
#[async_trait::async_trait]
pub trait DelayQueue: Send + Sync + 'static {
    /// Publish durably (returns once confirmed).
    async fn publish(&self, job: &Job) -> Result<(), IoError>;
    /// The next due job, waiting up to `wait`; `None` when nothing is due.
    async fn next_due(&self, wait: Duration) -> Result<Option<Delivery>, IoError>;
    async fn ack(&self, tag: u64) -> Result<(), IoError>;
    /// Give a delivery back for redelivery.
    async fn requeue(&self, tag: u64) -> Result<(), IoError>;
    async fn healthcheck(&self) -> Result<(), IoError>;
}

pub type SharedQueue = Arc<dyn DelayQueue>;
