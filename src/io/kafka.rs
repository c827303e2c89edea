//! The Kafka adapter (rdkafka): implements the event-log traits for cluster
//! mode against any Kafka-protocol broker, using the standard protocol only.
//!
//! * topics are created at start with explicit configs (partitions, cleanup
//!   policy, retention) — some brokers report only explicit configs;
//! * plain publishing uses an idempotent producer (acks=all, murmur2);
//! * readers are `read_committed` consumers with `enable.partition.eof`:
//!   "caught up" is decided by partition EOF, never by the high watermark;
//! * a group membership ([`KafkaGroup`]) runs its consumer on a dedicated
//!   thread that turns rebalance callbacks into [`PartitionEvent`]s (a revoke
//!   waits, bounded, for the partitions to be drained); the member's own
//!   fetching is paused, and each owned partition is fetched by its reader
//!   over a connection of its own (a consumer of just that partition that
//!   never joins the group, `Fetcher`), so partitions do not wait for each
//!   other's fetches; its records come through the partition's librdkafka queue,
//!   split off before fetching starts and read in batches without copying
//!   (`kafka_queue`), bounded by librdkafka (backpressure);
//! * each membership has one transactional producer (EOS v2: the group's
//!   metadata and offsets go into the transaction), driven by a dedicated
//!   thread that group-commits the transactions of all its partitions.
//!
//! Blocking librdkafka calls never run on the async workers.

use crate::config::{Compression, Config};
use crate::io::kafka_queue::{Polled, ProducerPoller, SplitQueue};
use crate::io::{
    EventLog, GroupMember, IoError, OutRecord, PartitionEvent, PartitionReader, Record, RecordRef,
    TopicReader, TopicSpec, Txn, TxnWriter, Written,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long a revoke waits for its partitions to be drained.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a reader to reach data or EOF before reporting an error.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// Map a librdkafka error to retryable / fenced / fatal.
pub fn kafka_error(what: &str, e: KafkaError) -> IoError {
    use RDKafkaErrorCode as C;
    if let KafkaError::Transaction(rde) = &e {
        let fenced = matches!(
            rde.code(),
            C::ProducerFenced | C::InvalidProducerEpoch | C::InvalidProducerIdMapping
        );
        return if fenced {
            IoError::Fenced(format!("{what}: {e}"))
        } else if rde.is_fatal() {
            IoError::Fatal(format!("{what}: {e}"))
        } else {
            IoError::Retryable(format!("{what}: {e}"))
        };
    }
    match e.rdkafka_error_code() {
        Some(C::ProducerFenced | C::InvalidProducerEpoch) => {
            IoError::Fenced(format!("{what}: {e}"))
        }
        Some(
            C::UnknownTopicOrPartition
            | C::TopicAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::InvalidConfig
            | C::InvalidArgument
            | C::MessageSizeTooLarge
            | C::InvalidPartitions,
        ) => IoError::Fatal(format!("{what}: {e}")),
        _ => IoError::Retryable(format!("{what}: {e}")),
    }
}

/// Client context that keeps librdkafka's end-of-partition notices (which
/// the readers consume as data) out of the error log.
pub struct QuietContext;

fn log_client_error(error: KafkaError, reason: &str) {
    if matches!(error, KafkaError::PartitionEOF(_))
        || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
    {
        return;
    }
    tracing::warn!(error = %error, reason, "kafka client error");
}

impl ClientContext for QuietContext {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(error, reason);
    }
}

impl ConsumerContext for QuietContext {}

/// Connection settings of the adapter, from the `[kafka]` section.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub session_timeout_ms: u64,
    pub replication_factor: i32,
    pub client_id: String,
    pub compression: Compression,
}

impl KafkaSettings {
    pub fn from_config(cfg: &Config) -> Self {
        KafkaSettings {
            brokers: cfg.kafka.brokers.clone(),
            session_timeout_ms: cfg.kafka.session_timeout_ms,
            replication_factor: cfg.kafka.replication_factor as i32,
            client_id: format!("smartmsg-{}", cfg.node_id()),
            compression: cfg.kafka.compression,
        }
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            .set("socket.keepalive.enable", "true")
            .set("allow.auto.create.topics", "false")
            .set("log_level", "3");
        c
    }

    fn reader_config(&self) -> ClientConfig {
        let mut c = self.client();
        c.set("group.id", format!("{}-reader", self.client_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        consumer_tuning(&mut c);
        c
    }
}

/// Fetch tuning of every consumer that reads a partition to its end: the
/// broker answers a fetch after at most 5 ms instead of 500, and the local
/// prefetch is small. librdkafka bounds each partition's queue (about
/// 3,000 records or 2 MB, plus one fetch response): a reader that falls
/// behind stops its partition's fetching, so memory stays bounded
/// (backpressure). A response carries at most ~512 KB, or one record batch
/// when a batch is larger (`fetch.max.bytes` must not be below
/// `message.max.bytes`, hence both): group readers fetch each partition
/// over a connection of its own (`Fetcher`), so these bounds hold per
/// partition, and every queued record holds a ~300-byte librdkafka op
/// besides its bytes. Measured (`bench aggregate`, BENCHMARKS.md): 1 MB
/// fetches over per-partition connections held ~12 MB more RSS and were no
/// faster; deeper queues buy little and cost tens of MB.
pub fn consumer_tuning(c: &mut ClientConfig) {
    c.set("fetch.wait.max.ms", "5")
        .set("fetch.queue.backoff.ms", "5")
        .set("queued.min.messages", "3000")
        .set("queued.max.messages.kbytes", "2048")
        .set("message.max.bytes", "524288")
        .set("max.partition.fetch.bytes", "524288")
        .set("fetch.max.bytes", "524288");
}

struct Inner {
    s: KafkaSettings,
    admin: AdminClient<DefaultClientContext>,
    /// Serves `producer`'s delivery reports (dropped first).
    _poller: ProducerPoller,
    producer: Arc<BaseProducer<PublishContext>>,
    partitions: Mutex<HashMap<String, u32>>,
}

type Delivered = tokio::sync::oneshot::Sender<Result<Written, KafkaError>>;

/// Hands each delivery report of plain publishing to its waiter.
struct PublishContext;

impl ClientContext for PublishContext {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(error, reason);
    }
}

impl ProducerContext for PublishContext {
    type DeliveryOpaque = Box<Delivered>;
    fn delivery(&self, result: &DeliveryResult<'_>, reply: Box<Delivered>) {
        let r = match result {
            Ok(m) => Ok(Written {
                partition: m.partition() as u32,
                offset: m.offset() as u64,
            }),
            Err((e, _)) => Err(e.clone()),
        };
        let _ = reply.send(r);
    }
}

/// The event log on Kafka. Cheap to clone.
#[derive(Clone)]
pub struct KafkaLog {
    inner: Arc<Inner>,
}

/// A consumed message, borrowed.
fn record_ref<'a>(m: &'a BorrowedMessage<'_>) -> RecordRef<'a> {
    RecordRef {
        partition: m.partition() as u32,
        offset: m.offset() as u64,
        key: m.key(),
        value: m.payload(),
        timestamp: m.timestamp().to_millis().unwrap_or(0),
    }
}

impl KafkaLog {
    /// Connect and check the brokers answer; a clear error if they do not.
    pub async fn connect(s: KafkaSettings) -> Result<KafkaLog, IoError> {
        let admin: AdminClient<DefaultClientContext> = s
            .client()
            .create()
            .map_err(|e| IoError::Fatal(format!("kafka admin client: {e}")))?;
        let producer: BaseProducer<PublishContext> = s
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "2")
            .set("compression.type", s.compression.as_str())
            .set("message.timeout.ms", "30000")
            .create_with_context(PublishContext)
            .map_err(|e| IoError::Fatal(format!("kafka producer: {e}")))?;
        let producer = Arc::new(producer);
        let poller = ProducerPoller::start(producer.clone(), "kafka-publish-poll".into())
            .map_err(|e| IoError::Fatal(format!("producer poll thread: {e}")))?;
        let probe = producer.clone();
        let brokers = s.brokers.clone();
        tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(None, Duration::from_secs(10))
                .map(|_| ())
        })
        .await
        .map_err(|e| IoError::Fatal(format!("metadata task: {e}")))?
        .map_err(|e| IoError::Retryable(format!("kafka brokers {brokers} unreachable: {e}")))?;
        Ok(KafkaLog {
            inner: Arc::new(Inner {
                s,
                admin,
                _poller: poller,
                producer,
                partitions: Mutex::new(HashMap::new()),
            }),
        })
    }

    async fn partition_count(&self, topic: &str) -> Result<Option<u32>, IoError> {
        let producer = self.inner.producer.clone();
        let t = topic.to_string();
        let md = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&t), Duration::from_secs(10))
        })
        .await
        .map_err(|e| IoError::Fatal(format!("metadata task: {e}")))?
        .map_err(|e| kafka_error("metadata", e))?;
        Ok(md
            .topics()
            .iter()
            .find(|mt| mt.name() == topic && mt.error().is_none())
            .map(|mt| mt.partitions().len() as u32)
            .filter(|n| *n > 0))
    }

    fn settings(&self) -> &KafkaSettings {
        &self.inner.s
    }

    /// Delete a topic (benchmarks clean up after themselves).
    pub async fn delete_topic(&self, name: &str) -> Result<(), IoError> {
        let res = self
            .inner
            .admin
            .delete_topics(
                &[name],
                &AdminOptions::new().operation_timeout(Some(OP_TIMEOUT)),
            )
            .await
            .map_err(|e| kafka_error("delete topic", e))?;
        for r in res {
            if let Err((t, code)) = r {
                return Err(IoError::Retryable(format!("delete topic {t}: {code}")));
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl EventLog for KafkaLog {
    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<(), IoError> {
        let existing = self.partition_count(&spec.name).await?;
        let count = match existing {
            Some(n) => n,
            None => {
                let policy = if spec.compacted { "compact" } else { "delete" };
                let retention = if spec.compacted { "-1" } else { "604800000" };
                let max_bytes = spec.max_message_bytes.map(|b| b.to_string());
                let mut topic = NewTopic::new(
                    &spec.name,
                    spec.partitions as i32,
                    TopicReplication::Fixed(self.settings().replication_factor),
                )
                .set("cleanup.policy", policy)
                .set("retention.ms", retention);
                if let Some(b) = &max_bytes {
                    topic = topic.set("max.message.bytes", b);
                }
                let res = self
                    .inner
                    .admin
                    .create_topics(
                        &[topic],
                        &AdminOptions::new().operation_timeout(Some(OP_TIMEOUT)),
                    )
                    .await
                    .map_err(|e| kafka_error("create topics", e))?;
                for r in res {
                    match r {
                        Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((name, code)) => {
                            return Err(IoError::Fatal(format!("creating topic {name}: {code}")))
                        }
                    }
                }
                // Metadata can lag the creation by a moment.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    if let Some(n) = self.partition_count(&spec.name).await? {
                        break n;
                    }
                    if Instant::now() > deadline {
                        return Err(IoError::Retryable(format!(
                            "topic {} created but not visible in metadata",
                            spec.name
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        if count != spec.partitions {
            return Err(IoError::Fatal(format!(
                "topic {} has {count} partitions, config says {}",
                spec.name, spec.partitions
            )));
        }
        self.inner
            .partitions
            .lock()
            .expect("partitions lock")
            .insert(spec.name.clone(), count);
        Ok(())
    }

    fn partitions(&self, topic: &str) -> Option<u32> {
        self.inner
            .partitions
            .lock()
            .expect("partitions lock")
            .get(topic)
            .copied()
    }

    async fn publish(&self, records: Vec<OutRecord>) -> Result<Vec<Written>, IoError> {
        let mut waiters = Vec::with_capacity(records.len());
        for r in &records {
            let (reply, wait) = tokio::sync::oneshot::channel();
            let mut rec: BaseRecord<'_, [u8], [u8], Box<Delivered>> =
                BaseRecord::with_opaque_to(&r.topic, Box::new(reply));
            if let Some(k) = &r.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(v) = &r.value {
                rec = rec.payload(v.as_slice());
            }
            if let Some(p) = r.partition {
                rec = rec.partition(p as i32);
            }
            let deadline = Instant::now() + OP_TIMEOUT;
            loop {
                match self.inner.producer.send(rec) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if Instant::now() < deadline =>
                    {
                        rec = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => return Err(kafka_error("publish", e)),
                }
            }
            waiters.push(wait);
        }
        let mut out = Vec::with_capacity(waiters.len());
        for w in waiters {
            match w.await {
                Ok(Ok(written)) => out.push(written),
                Ok(Err(e)) => return Err(kafka_error("publish", e)),
                Err(_) => return Err(IoError::Retryable("publish: producer closed".into())),
            }
        }
        Ok(out)
    }

    async fn txn_writer(&self, transactional_id: &str) -> Result<Arc<dyn TxnWriter>, IoError> {
        let coordinator = TxnCoordinator::start(self.settings(), transactional_id, None)?;
        Ok(Arc::new(coordinator))
    }

    fn reader(&self, topic: &str, partition: u32, from: u64) -> Box<dyn PartitionReader> {
        Box::new(KafkaReader::new(
            self.settings(),
            topic,
            &[(partition, from)],
        ))
    }

    fn topic_reader(&self, topic: &str, from: &[u64]) -> Result<Box<dyn TopicReader>, IoError> {
        let parts: Vec<(u32, u64)> = from
            .iter()
            .enumerate()
            .map(|(p, o)| (p as u32, *o))
            .collect();
        Ok(Box::new(KafkaReader::new(self.settings(), topic, &parts)))
    }

    async fn join_group(
        &self,
        group: &str,
        topic: &str,
        transactional_id: &str,
    ) -> Result<Arc<dyn GroupMember>, IoError> {
        Ok(Arc::new(KafkaGroup::join(
            self.settings(),
            group,
            topic,
            transactional_id,
        )?))
    }

    async fn group_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<u64>, IoError> {
        let consumer: BaseConsumer<QuietContext> = self
            .settings()
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create_with_context(QuietContext)
            .map_err(|e| IoError::Fatal(format!("kafka offsets client: {e}")))?;
        committed_offset(Arc::new(consumer), tpl_one(topic, partition)).await
    }

    async fn healthcheck(&self) -> Result<(), IoError> {
        let producer = self.inner.producer.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(3))
                .map(|_| ())
        })
        .await
        .map_err(|e| IoError::Fatal(format!("metadata task: {e}")))?
        .map_err(|e| kafka_error("kafka unreachable", e))
    }
}

/// A `read_committed` reader of some partitions of one topic, outside any
/// group. "Caught up" means every assigned partition reported EOF.
struct KafkaReader {
    consumer: Option<StreamConsumer<QuietContext>>,
    error: Option<String>,
    topic: String,
    /// partition -> next offset.
    positions: BTreeMap<u32, u64>,
    at_eof: BTreeMap<u32, bool>,
}

impl Drop for KafkaReader {
    /// Closing a librdkafka client joins its threads (~100 ms): never on an
    /// async worker, where it would stall every task queued behind it.
    fn drop(&mut self) {
        if let Some(c) = self.consumer.take() {
            let _ = std::thread::Builder::new()
                .name("kafka-reader-close".into())
                .spawn(move || drop(c));
        }
    }
}

impl KafkaReader {
    fn new(s: &KafkaSettings, topic: &str, parts: &[(u32, u64)]) -> Self {
        let mut r = KafkaReader {
            consumer: None,
            error: None,
            topic: topic.to_string(),
            positions: parts.iter().copied().collect(),
            at_eof: parts.iter().map(|(p, _)| (*p, false)).collect(),
        };
        match s
            .reader_config()
            .create_with_context::<_, StreamConsumer<QuietContext>>(QuietContext)
        {
            Ok(c) => {
                r.consumer = Some(c);
                if let Err(e) = r.assign() {
                    r.error = Some(e.to_string());
                }
            }
            Err(e) => r.error = Some(format!("kafka reader: {e}")),
        }
        r
    }

    fn assign(&mut self) -> Result<(), IoError> {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &self.positions {
            tpl.add_partition_offset(&self.topic, *p as i32, Offset::Offset(*o as i64))
                .map_err(|e| kafka_error("assign", e))?;
        }
        for v in self.at_eof.values_mut() {
            *v = false;
        }
        self.consumer
            .as_ref()
            .expect("consumer")
            .assign(&tpl)
            .map_err(|e| kafka_error("assign", e))
    }

    async fn batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, IoError> {
        if let Some(e) = &self.error {
            return Err(IoError::Retryable(e.clone()));
        }
        let consumer = self.consumer.as_ref().expect("consumer");
        let mut out = Vec::new();
        let started = Instant::now();
        loop {
            let caught_up = self.at_eof.values().all(|e| *e);
            let budget = if !out.is_empty() {
                Duration::ZERO
            } else if caught_up {
                wait.saturating_sub(started.elapsed())
            } else {
                // Not yet known to be at the end: wait for data or EOF.
                CATCH_UP_TIMEOUT.saturating_sub(started.elapsed())
            };
            if budget.is_zero() && out.is_empty() && !caught_up {
                return Err(IoError::Retryable(format!(
                    "{}: no data and no end of partition within {CATCH_UP_TIMEOUT:?}",
                    self.topic
                )));
            }
            match tokio::time::timeout(budget, consumer.recv()).await {
                Err(_) => return Ok(out),
                Ok(Ok(m)) => {
                    let r = record_ref(&m).to_record();
                    self.at_eof.insert(r.partition, false);
                    let expected = self.positions.get(&r.partition).copied().unwrap_or(0);
                    if r.offset < expected {
                        continue; // stale after a seek
                    }
                    self.positions.insert(r.partition, r.offset + 1);
                    out.push(r);
                    if out.len() >= max {
                        return Ok(out);
                    }
                }
                Ok(Err(KafkaError::PartitionEOF(p))) => {
                    self.at_eof.insert(p as u32, true);
                    if !out.is_empty() {
                        return Ok(out);
                    }
                }
                Ok(Err(e)) => return Err(kafka_error("consume", e)),
            }
        }
    }
}

#[async_trait::async_trait]
impl PartitionReader for KafkaReader {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, IoError> {
        self.batch(max, wait).await
    }
    fn position(&self) -> u64 {
        self.positions.values().next().copied().unwrap_or(0)
    }
    fn seek(&mut self, offset: u64) {
        for v in self.positions.values_mut() {
            *v = offset;
        }
        for v in self.at_eof.values_mut() {
            *v = false;
        }
        if let Err(e) = self.assign() {
            self.error = Some(e.to_string());
        }
    }
    fn at_end(&self) -> bool {
        self.at_eof.values().all(|e| *e)
    }
}

#[async_trait::async_trait]
impl TopicReader for KafkaReader {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, IoError> {
        self.batch(max, wait).await
    }
}

// ---------------------------------------------------------------------------
// Transactions

struct TxnRequest {
    txn: Txn,
    reply: tokio::sync::oneshot::Sender<Result<Vec<Written>, IoError>>,
}

/// Collects delivery reports of the transaction in progress.
struct DeliveryContext {
    results: Mutex<Vec<Option<Result<Written, String>>>>,
    reported: std::sync::atomic::AtomicUsize,
    /// Reports the transaction in progress waits for (the waiter is woken
    /// once, when they are all in, not per report).
    expected: std::sync::atomic::AtomicUsize,
    all_reported: std::sync::Condvar,
}

impl ClientContext for DeliveryContext {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(error, reason);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, idx: usize) {
        let r = match result {
            Ok(m) => Ok(Written {
                partition: m.partition() as u32,
                offset: m.offset() as u64,
            }),
            Err((e, _)) => Err(e.to_string()),
        };
        let mut results = self.results.lock().expect("delivery lock");
        let mut complete = false;
        if let Some(slot) = results.get_mut(idx) {
            if slot.is_none() {
                let reported = self.reported.fetch_add(1, Ordering::SeqCst) + 1;
                complete = reported >= self.expected.load(Ordering::SeqCst);
            }
            *slot = Some(r);
        }
        drop(results);
        if complete {
            self.all_reported.notify_all();
        }
    }
}

impl DeliveryContext {
    /// Wait (the producer's polling thread serves the reports) until
    /// `total` delivery reports arrived.
    fn wait_reported(&self, total: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.results.lock().expect("delivery lock");
        while self.reported.load(Ordering::SeqCst) < total {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = self
                .all_reported
                .wait_timeout(guard, left)
                .expect("delivery lock")
                .0;
        }
        true
    }
}

type GroupMetadataFn = Arc<dyn Fn() -> Option<ConsumerGroupMetadata> + Send + Sync>;

/// One transactional producer on a dedicated thread. Requests arriving
/// while a transaction is in flight are committed together in the next one.
pub struct TxnCoordinator {
    tx: std::sync::mpsc::Sender<TxnRequest>,
}

impl TxnCoordinator {
    /// `group`: the consumer group whose offsets its transactions commit
    /// (a group's writer); without, a standalone writer (the trainer's),
    /// whose records (model artifacts) may be up to `MODEL_MAX_BYTES`
    /// (the models topic takes as much). Group writers keep librdkafka's
    /// default request size.
    fn start(
        s: &KafkaSettings,
        transactional_id: &str,
        group: Option<GroupMetadataFn>,
    ) -> Result<Self, IoError> {
        let max_request_bytes: u32 = if group.is_some() {
            1_000_000
        } else {
            crate::io::MODEL_MAX_BYTES
        };
        let producer: BaseProducer<DeliveryContext> = s
            .client()
            .set("transactional.id", transactional_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "1")
            .set("compression.type", s.compression.as_str())
            .set("transaction.timeout.ms", "10000")
            .set("message.timeout.ms", "9000")
            .set("message.max.bytes", max_request_bytes.to_string())
            .create_with_context(DeliveryContext {
                results: Mutex::new(Vec::new()),
                reported: Default::default(),
                expected: usize::MAX.into(),
                all_reported: Default::default(),
            })
            .map_err(|e| IoError::Fatal(format!("transactional producer: {e}")))?;
        let producer = Arc::new(producer);
        let (tx, rx) = std::sync::mpsc::channel::<TxnRequest>();
        let id = transactional_id.to_string();
        let poller = ProducerPoller::start(producer.clone(), format!("txnpoll-{id}"))
            .map_err(|e| IoError::Fatal(format!("producer poll thread: {e}")))?;
        std::thread::Builder::new()
            .name(format!("txn-{id}"))
            .spawn(move || {
                txn_loop(&producer, rx, group, id);
                // The poller goes first: it holds the producer too.
                drop(poller);
            })
            .map_err(|e| IoError::Fatal(format!("txn thread: {e}")))?;
        Ok(TxnCoordinator { tx })
    }
}

fn txn_loop(
    producer: &BaseProducer<DeliveryContext>,
    rx: std::sync::mpsc::Receiver<TxnRequest>,
    group: Option<GroupMetadataFn>,
    id: String,
) {
    let mut dead: Option<IoError> = None;
    // Initialise at once, and until it succeeds, rather than at the first
    // transaction: that fences a previous incarnation with this
    // transactional id now, aborting the transaction it left open when it
    // crashed. Until then `read_committed` readers of its partitions —
    // this node's own restoring aggregators among them, which write nothing
    // before they have read — cannot read past that transaction, and a
    // broker without transaction timeouts keeps it open for good. (Seen on
    // Tansu: an incarnation SIGKILLed half a second after it started left
    // the next one's first attempt failing; deferring the retry to a first
    // transaction that never came stalled the partitions.) Requests that
    // arrive meanwhile are answered with the error (retryable).
    let mut backoff = Duration::from_millis(100);
    loop {
        match producer.init_transactions(OP_TIMEOUT) {
            Ok(()) => break,
            Err(e) => {
                let err = kafka_error(&format!("init transactions {id}"), e);
                if !err.is_retryable() {
                    tracing::error!(transactional_id = %id, error = %err,
                        "initialising transactions failed for good; this writer stops");
                    dead = Some(err);
                    break;
                }
                tracing::warn!(transactional_id = %id, error = %err,
                    retry_in_ms = backoff.as_millis() as u64, "initialising transactions failed; retrying");
                let until = Instant::now() + backoff;
                loop {
                    match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                        Ok(r) => {
                            let _ = r.reply.send(Err(err.clone()));
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    while let Ok(first) = rx.recv() {
        let mut reqs = vec![first];
        while reqs.len() < 256 {
            match rx.try_recv() {
                Ok(r) => reqs.push(r),
                Err(_) => break,
            }
        }
        if let Some(e) = &dead {
            for r in reqs {
                let _ = r.reply.send(Err(e.clone()));
            }
            continue;
        }
        let started = Instant::now();
        let res = run_txn(producer, &mut reqs, group.as_ref());
        metrics::histogram!("smartmsg_kafka_transaction_seconds")
            .record(started.elapsed().as_secs_f64());
        match res {
            Ok(written) => {
                for (r, w) in reqs.into_iter().zip(written) {
                    let _ = r.reply.send(Ok(w));
                }
            }
            Err(err) => {
                let _ = producer.abort_transaction(OP_TIMEOUT);
                if matches!(err, IoError::Fenced(_) | IoError::Fatal(_)) {
                    tracing::error!(transactional_id = %id, error = %err,
                        "transactional producer is fenced or failed fatally; it stops writing");
                    dead = Some(err.clone());
                }
                for r in reqs {
                    let _ = r.reply.send(Err(err.clone()));
                }
            }
        }
    }
}

fn run_txn(
    producer: &BaseProducer<DeliveryContext>,
    reqs: &mut [TxnRequest],
    group: Option<&GroupMetadataFn>,
) -> Result<Vec<Vec<Written>>, IoError> {
    let total: usize = reqs.iter().map(|r| r.txn.records.len()).sum();
    *producer.context().results.lock().expect("delivery lock") = vec![None; total];
    producer.context().reported.store(0, Ordering::SeqCst);
    producer.context().expected.store(total, Ordering::SeqCst);
    producer
        .begin_transaction()
        .map_err(|e| kafka_error("begin transaction", e))?;
    let mut idx = 0;
    let mut offsets: BTreeMap<(String, u32), u64> = BTreeMap::new();
    // Records per request; each record is released once librdkafka has its
    // copy (a transaction can be large: nothing holds it twice).
    let mut counts = Vec::with_capacity(reqs.len());
    for req in reqs.iter_mut() {
        let records = std::mem::take(&mut req.txn.records);
        counts.push(records.len());
        for r in records {
            let mut rec: BaseRecord<'_, [u8], [u8], usize> =
                BaseRecord::with_opaque_to(&r.topic, idx);
            if let Some(k) = &r.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(v) = &r.value {
                rec = rec.payload(v.as_slice());
            }
            if let Some(p) = r.partition {
                rec = rec.partition(p as i32);
            }
            loop {
                match producer.send(rec) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        rec = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err((e, _)) => return Err(kafka_error("produce", e)),
                }
            }
            idx += 1;
        }
        for o in &req.txn.offsets {
            let slot = offsets.entry((o.topic.clone(), o.partition)).or_insert(0);
            *slot = (*slot).max(o.next_offset);
        }
    }
    if !offsets.is_empty() {
        let cgm = group
            .and_then(|g| g())
            .ok_or_else(|| IoError::Fatal("offsets in a transaction need a group member".into()))?;
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &offsets {
            tpl.add_partition_offset(t, *p as i32, Offset::Offset(*o as i64))
                .map_err(|e| kafka_error("offsets", e))?;
        }
        producer
            .send_offsets_to_transaction(&tpl, &cgm, OP_TIMEOUT)
            .map_err(|e| kafka_error("send offsets to transaction", e))?;
    }
    // Wait for every delivery report (served by the producer's polling
    // thread as the broker acknowledges), then commit: rdkafka's `flush`
    // polls in 100 ms steps, and so does a commit with records in flight.
    if !producer.context().wait_reported(total, OP_TIMEOUT) {
        return Err(IoError::Retryable(
            "transaction records not acknowledged in time".into(),
        ));
    }
    // The reports are in; wait (briefly) for the client to release them too:
    // with anything in flight, rdkafka's commit first polls in 100 ms steps.
    let deadline = Instant::now() + OP_TIMEOUT;
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    producer
        .commit_transaction(OP_TIMEOUT)
        .map_err(|e| kafka_error("commit transaction", e))?;
    let results = std::mem::take(&mut *producer.context().results.lock().expect("delivery lock"));
    let mut flat = Vec::with_capacity(total);
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Some(Ok(w)) => flat.push(w),
            Some(Err(e)) => {
                return Err(IoError::Retryable(format!("record {i} not delivered: {e}")))
            }
            None => {
                return Err(IoError::Retryable(format!(
                    "record {i}: no delivery report"
                )))
            }
        }
    }
    let mut out = Vec::with_capacity(counts.len());
    let mut it = flat.into_iter();
    for n in counts {
        out.push(it.by_ref().take(n).collect());
    }
    Ok(out)
}

#[async_trait::async_trait]
impl TxnWriter for TxnCoordinator {
    async fn commit(&self, txn: Txn) -> Result<Vec<Written>, IoError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(TxnRequest { txn, reply })
            .map_err(|_| IoError::Fatal("transaction thread is gone".into()))?;
        rx.await
            .map_err(|_| IoError::Fatal("transaction thread is gone".into()))?
    }
}

// ---------------------------------------------------------------------------
// Consumer groups

/// The owned partitions, each with a flag that turns false once it is no
/// longer ours (its reader then stops).
#[derive(Default)]
struct Routes {
    owned: HashMap<u32, Arc<AtomicBool>>,
}

type SharedRoutes = Arc<Mutex<Routes>>;

struct GroupContext {
    topic: String,
    events: mpsc::UnboundedSender<PartitionEvent>,
    routes: SharedRoutes,
    /// Set when leaving: the partitions were drained already, so a revoke
    /// need not wait for anyone.
    stopping: Arc<AtomicBool>,
}

impl ClientContext for GroupContext {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(error, reason);
    }
}

fn partitions_of(tpl: &TopicPartitionList, topic: &str) -> Vec<u32> {
    tpl.elements()
        .iter()
        .filter(|e| e.topic() == topic)
        .map(|e| e.partition() as u32)
        .collect()
}

impl GroupContext {
    /// Mark newly assigned partitions owned.
    fn take_ownership(&self, parts: &[u32]) {
        let mut routes = self.routes.lock().expect("routes lock");
        for &p in parts {
            if let Some(old) = routes.owned.insert(p, Arc::new(AtomicBool::new(true))) {
                old.store(false, Ordering::SeqCst);
            }
        }
    }

    fn give_up(&self, parts: &[u32]) {
        let mut routes = self.routes.lock().expect("routes lock");
        for p in parts {
            if let Some(owned) = routes.owned.remove(p) {
                owned.store(false, Ordering::SeqCst);
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.take_ownership(&partitions_of(tpl, &self.topic)),
            Rebalance::Revoke(tpl) => {
                let parts = partitions_of(tpl, &self.topic);
                if parts.is_empty() {
                    return;
                }
                if self.stopping.load(Ordering::SeqCst) {
                    // Leaving: our partition actors were drained before.
                } else if consumer.assignment_lost() {
                    let _ = self.events.send(PartitionEvent::Lost(parts.clone()));
                } else {
                    let (done, wait) = tokio::sync::oneshot::channel();
                    let _ = self.events.send(PartitionEvent::Revoked {
                        partitions: parts.clone(),
                        done,
                    });
                    // Bounded drain: the rebalance goes on after DRAIN_TIMEOUT.
                    let deadline = Instant::now() + DRAIN_TIMEOUT;
                    let mut wait = wait;
                    loop {
                        match wait.try_recv() {
                            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
                                if Instant::now() < deadline =>
                            {
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            _ => break,
                        }
                    }
                }
                self.give_up(&parts);
            }
            Rebalance::Error(_) => {}
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts = partitions_of(tpl, &self.topic);
            if !parts.is_empty() {
                // The member owns its partitions; each reader fetches its
                // partition over a connection of its own (see `Fetcher`).
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(topic = %self.topic, error = %e, "cannot pause the group consumer's partitions");
                }
                let _ = self.events.send(PartitionEvent::Assigned(parts));
            }
        }
    }
}

/// Membership of one consumer group on one topic (see the module docs).
pub struct KafkaGroup {
    topic: String,
    settings: KafkaSettings,
    consumer: Arc<BaseConsumer<GroupContext>>,
    routes: SharedRoutes,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<PartitionEvent>>,
    writer: Arc<TxnCoordinator>,
    stop: Arc<AtomicBool>,
    poller: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl KafkaGroup {
    fn join(
        s: &KafkaSettings,
        group: &str,
        topic: &str,
        transactional_id: &str,
    ) -> Result<Self, IoError> {
        let (etx, erx) = mpsc::unbounded_channel();
        let routes: SharedRoutes = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut cc = s.client();
        cc.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", s.session_timeout_ms.to_string());
        consumer_tuning(&mut cc);
        let consumer: BaseConsumer<GroupContext> = cc
            .create_with_context(GroupContext {
                topic: topic.to_string(),
                events: etx,
                routes: routes.clone(),
                stopping: stop.clone(),
            })
            .map_err(|e| IoError::Fatal(format!("kafka group consumer: {e}")))?;
        let consumer = Arc::new(consumer);
        consumer
            .subscribe(&[topic])
            .map_err(|e| kafka_error("subscribe", e))?;
        let meta_source = consumer.clone();
        let writer = TxnCoordinator::start(
            s,
            transactional_id,
            Some(Arc::new(move || meta_source.group_metadata())),
        )?;
        let poller = {
            let consumer = consumer.clone();
            let stop = stop.clone();
            let topic = topic.to_string();
            std::thread::Builder::new()
                .name(format!("group-{topic}"))
                .spawn(move || poll_loop(consumer, stop, topic))
                .map_err(|e| IoError::Fatal(format!("group thread: {e}")))?
        };
        Ok(KafkaGroup {
            topic: topic.to_string(),
            settings: s.clone(),
            consumer,
            routes,
            events: tokio::sync::Mutex::new(erx),
            writer: Arc::new(writer),
            stop,
            poller: Mutex::new(Some(poller)),
        })
    }
}

/// The committed offset of the one partition in `tpl` for the consumer's
/// group (next record to read), off the async workers.
async fn committed_offset<C: ConsumerContext + 'static>(
    consumer: Arc<BaseConsumer<C>>,
    tpl: TopicPartitionList,
) -> Result<Option<u64>, IoError> {
    let res = tokio::task::spawn_blocking(move || consumer.committed_offsets(tpl, OP_TIMEOUT))
        .await
        .map_err(|e| IoError::Fatal(format!("committed task: {e}")))?
        .map_err(|e| kafka_error("committed offsets", e))?;
    Ok(res.elements().first().and_then(|e| match e.offset() {
        Offset::Offset(o) if o >= 0 => Some(o as u64),
        _ => None,
    }))
}

fn tpl_one(topic: &str, p: u32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, p as i32);
    tpl
}

/// Serve the group: rebalances and consumer errors. The partitions are
/// read by their own fetchers; a record this consumer fetched before its
/// partition was paused is a copy of what the fetcher reads, and is dropped.
fn poll_loop(consumer: Arc<BaseConsumer<GroupContext>>, stop: Arc<AtomicBool>, topic: String) {
    while !stop.load(Ordering::SeqCst) {
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(_)) | Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => tracing::warn!(topic = %topic, error = %e, "group consumer error"),
        }
    }
    // Leave the group: revoke (the partitions were drained already) and close.
    consumer.unsubscribe();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        if consumer.poll(Duration::from_millis(50)).is_none()
            && consumer
                .assignment()
                .map(|a| a.count() == 0)
                .unwrap_or(true)
        {
            break;
        }
    }
    let mut routes = consumer.context().routes.lock().expect("routes lock");
    for owned in routes.owned.values() {
        owned.store(false, Ordering::SeqCst);
    }
    routes.owned.clear();
}

/// The fetching of one owned partition, over a connection of its own: a
/// plain read_committed consumer of just that partition (assigned, never
/// joining a group), started at the reader's position; its partition
/// queue is split off and read in batches. librdkafka keeps one fetch in flight per
/// connection, and a broker may answer a fetch of several partitions with
/// one partition's records (Tansu does), so a member fetching all its
/// partitions over one connection starves them in turn; with a connection
/// per partition the fetches run in parallel (measured: BENCHMARKS.md).
/// The group consumer keeps the membership, the offsets and the
/// transactions' group metadata; its own fetching of the partitions is
/// paused. Each queue stays bounded by `consumer_tuning` (backpressure).
struct Fetcher {
    /// Both are released off the async workers (closing a client blocks).
    inner: Option<(SplitQueue<QuietContext>, Arc<FetchClient>)>,
}

type FetchClient = BaseConsumer<QuietContext>;

impl Fetcher {
    /// Blocking: creates a client.
    fn start(s: &KafkaSettings, topic: &str, partition: u32, from: u64) -> Result<Self, IoError> {
        let consumer: BaseConsumer<QuietContext> = s
            .reader_config()
            .create_with_context(QuietContext)
            .map_err(|e| IoError::Fatal(format!("kafka fetch client: {e}")))?;
        let consumer = Arc::new(consumer);
        // Split before assigning: nothing is fetched into the main queue.
        let queue = SplitQueue::split(consumer.clone(), topic, partition).ok_or_else(|| {
            IoError::Fatal(format!("{topic}/{partition}: cannot split the fetch queue"))
        })?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition as i32, Offset::Offset(from as i64))
            .map_err(|e| kafka_error("fetch assignment", e))?;
        consumer
            .assign(&tpl)
            .map_err(|e| kafka_error("fetch assign", e))?;
        Ok(Fetcher {
            inner: Some((queue, consumer)),
        })
    }

    fn queue(&self) -> &SplitQueue<QuietContext> {
        &self.inner.as_ref().expect("live fetcher").0
    }

    fn consumer(&self) -> &Arc<FetchClient> {
        &self.inner.as_ref().expect("live fetcher").1
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        if let Some((queue, consumer)) = self.inner.take() {
            let _ = std::thread::Builder::new()
                .name("fetch-close".into())
                .spawn(move || {
                    drop(queue);
                    drop(consumer);
                });
        }
    }
}

/// A reader of an owned partition: reads its fetcher's queue. "No record
/// within `wait`" is what caught up means here (the contract's idle rule);
/// `at_end` tells whether librdkafka reported the end of the partition.
struct GroupReader {
    fetcher: Fetcher,
    topic: String,
    partition: u32,
    owned: Arc<AtomicBool>,
    position: u64,
    /// A seek has not taken effect yet: what is queued may be from before
    /// it, so nothing is read until it has (librdkafka then drops what it
    /// fetched before the seek by itself).
    seek_pending: Arc<AtomicBool>,
    /// A seek that never succeeded: what was dropped meanwhile is not
    /// coming back, so the reader fails.
    seek_failed: Arc<AtomicBool>,
    /// The consumer reported the end of the partition after our last record.
    at_end: bool,
    /// Records fetched and not yet read (`smartmsg_partition_queue_records`).
    queued: metrics::Gauge,
    /// Waits with nothing fetched (`smartmsg_partition_input_wait_seconds`).
    starved: metrics::Histogram,
}

impl GroupReader {
    /// Seek the consumer to our position, off the async workers.
    fn start_seek(&mut self) {
        self.seek_pending.store(true, Ordering::SeqCst);
        let consumer = self.fetcher.consumer().clone();
        let pending = self.seek_pending.clone();
        let failed = self.seek_failed.clone();
        let topic = self.topic.clone();
        let (p, o) = (self.partition as i32, self.position as i64);
        std::thread::spawn(move || {
            for attempt in 0..50 {
                match consumer.seek(&topic, p, Offset::Offset(o), Duration::from_secs(5)) {
                    Ok(()) => break,
                    Err(e) if attempt == 49 => {
                        tracing::error!(topic = %topic, partition = p, offset = o, error = %e, "seek failed");
                        failed.store(true, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
            pending.store(false, Ordering::SeqCst);
        });
    }

    /// Lend the queued records from our position on to `f`; the number
    /// lent. Offsets may skip (transaction markers, aborted or compacted
    /// records): the next record is the next one the log has.
    fn take(&mut self, max: usize, f: &mut (dyn for<'r> FnMut(RecordRef<'r>) + Send)) -> usize {
        let mut n = 0;
        let (position, at_end) = (&mut self.position, &mut self.at_end);
        let topic = &self.topic;
        self.fetcher.queue().drain(max, |item| match item {
            Polled::Eof => *at_end = true,
            Polled::Error(e) => {
                tracing::warn!(topic = %topic, error = %e, "partition consumer error")
            }
            Polled::Record(r) => {
                if r.offset < *position {
                    return; // not expected once a seek has applied
                }
                *at_end = false;
                *position = r.offset + 1;
                n += 1;
                f(r);
            }
        });
        n
    }
}

#[async_trait::async_trait]
impl PartitionReader for GroupReader {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, IoError> {
        let mut out = Vec::new();
        self.visit_batch(max, wait, &mut |r| out.push(r.to_record()))
            .await?;
        Ok(out)
    }

    async fn visit_batch(
        &mut self,
        max: usize,
        wait: Duration,
        f: &mut (dyn for<'r> FnMut(RecordRef<'r>) + Send),
    ) -> Result<usize, IoError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if !self.owned.load(Ordering::SeqCst) {
                return Err(IoError::Retryable(format!(
                    "{}/{}: partition no longer owned",
                    self.topic, self.partition
                )));
            }
            while self.seek_pending.load(Ordering::SeqCst) {
                if tokio::time::Instant::now() >= deadline {
                    return Ok(0);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if self.seek_failed.load(Ordering::SeqCst) {
                return Err(IoError::Retryable(format!(
                    "{}/{}: a seek failed: the records in between are not coming",
                    self.topic, self.partition
                )));
            }
            let was_at_end = self.at_end;
            let n = self.take(max, f);
            self.queued.set(self.fetcher.queue().len() as f64);
            // Records, or the end of the partition just reached: the caller
            // need not wait for more to know it is caught up.
            if n > 0 || (self.at_end && !was_at_end) {
                return Ok(n);
            }
            // Nothing queued: wait for the queue to fill, up to the deadline.
            let waiting = Instant::now();
            let timed_out = tokio::time::timeout_at(deadline, self.fetcher.queue().wait())
                .await
                .is_err();
            self.starved.record(waiting.elapsed().as_secs_f64());
            if timed_out {
                return Ok(0);
            }
        }
    }

    fn position(&self) -> u64 {
        self.position
    }
    fn seek(&mut self, offset: u64) {
        self.position = offset;
        self.at_end = false;
        self.start_seek();
    }
    fn at_end(&self) -> bool {
        self.at_end
    }
}

#[async_trait::async_trait]
impl GroupMember for KafkaGroup {
    fn topic(&self) -> &str {
        &self.topic
    }

    async fn next_event(&self) -> Option<PartitionEvent> {
        self.events.lock().await.recv().await
    }

    async fn committed(&self, partition: u32) -> Result<Option<u64>, IoError> {
        committed_offset(self.consumer.clone(), tpl_one(&self.topic, partition)).await
    }

    async fn reader(&self, partition: u32, from: u64) -> Result<Box<dyn PartitionReader>, IoError> {
        let owned = {
            let routes = self.routes.lock().expect("routes lock");
            routes.owned.get(&partition).cloned().ok_or_else(|| {
                IoError::Retryable(format!("{}/{partition}: partition not owned", self.topic))
            })?
        };
        let (s, topic) = (self.settings.clone(), self.topic.clone());
        let fetcher =
            tokio::task::spawn_blocking(move || Fetcher::start(&s, &topic, partition, from))
                .await
                .map_err(|e| IoError::Fatal(format!("fetcher task: {e}")))??;
        let reader = GroupReader {
            fetcher,
            topic: self.topic.clone(),
            partition,
            owned,
            position: from,
            seek_pending: Arc::default(),
            seek_failed: Arc::default(),
            at_end: false,
            queued: metrics::gauge!("smartmsg_partition_queue_records",
                "topic" => self.topic.clone(), "partition" => partition.to_string()),
            starved: metrics::histogram!("smartmsg_partition_input_wait_seconds",
                "topic" => self.topic.clone(), "partition" => partition.to_string()),
        };
        Ok(Box::new(reader))
    }

    fn writer(&self) -> Arc<dyn TxnWriter> {
        self.writer.clone()
    }

    async fn leave(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let handle = self.poller.lock().expect("poller lock").take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

impl Drop for KafkaGroup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every codec `kafka.compression` accepts must be built into
    /// librdkafka: a missing one only fails when the node starts.
    #[test]
    fn every_configurable_codec_is_built_in() {
        for c in Compression::ALL {
            let made: Result<BaseProducer, _> = ClientConfig::new()
                .set("bootstrap.servers", "127.0.0.1:9")
                .set("compression.type", c.as_str())
                .create();
            assert!(made.is_ok(), "{}: {:?}", c.as_str(), made.err());
        }
    }
}
