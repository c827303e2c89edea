//! The RabbitMQ delay queue (lapin), built only from RabbitMQ 3.10 features
//! without plugins. A single wait queue with per-message TTL blocks short
//! delays behind long ones (TTL expires only at the head), so jobs travel
//! through fixed-TTL tier queues instead: tier `k` holds messages for
//! exactly `2^k` seconds, so its head is always the next to expire. A job
//! enters the largest tier not longer than its remaining delay; when it
//! expires it is dead-lettered (quorum queues, at-least-once dead-lettering)
//! to the ready queue; a consumer that receives it with more than the hold
//! window left sends it on to the next tier (publish confirmed, then ack),
//! otherwise holds it unacked until its exact due time. Nothing is ever
//! dead-lettered through the same queue twice, and a lost connection only
//! returns held jobs to the ready queue.
//!
//! Publishing uses publisher confirms and `mandatory`: an unroutable or
//! nacked job is retried and counted, never dropped. The connection is
//! re-established with backoff; topology, prefetch, confirms and the
//! consumer are restored on every reconnect.

use crate::clock::SharedClock;
use crate::io::{DelayQueue, Delivery, IoError, Job};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Tier hops aim to deliver a job at least this early, so the dead-letter
/// hop's own latency (quorum queues dead-letter a burst of jobs that expire
/// together a few at a time) never makes it late; the consumer holds it
/// until due.
pub const EARLY_MS: i64 = 600;
/// Jobs with at most this much left wait in the consumer, unacked.
pub const HOLD_MS: i64 = 1000 + EARLY_MS;

/// Highest tier: 2^16 s (about 18 hours); longer delays take several rounds
/// through it.
pub const MAX_TIER: u32 = 16;
/// Queues per tier. Quorum queues dead-letter with a bounded number of
/// messages in flight each; jobs published together expire together, so a
/// tier is split over several queues (by job) to dead-letter bursts in
/// parallel.
pub const TIER_SHARDS: u32 = 4;
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of the RabbitMQ delay queue.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    pub url: String,
    /// Prefix of every queue name (`amqp.queue_prefix`).
    pub prefix: String,
    /// Deliveries a consumer may hold unacked (jobs due within the hold window).
    pub prefetch: u16,
    /// Shown in the broker's connection list.
    pub connection_name: String,
}

impl AmqpSettings {
    pub fn ready_queue(&self) -> String {
        format!("{}batches.ready", self.prefix)
    }
    pub fn tier_queue(&self, k: u32, shard: u32) -> String {
        format!("{}batches.delay.{}s.{shard}", self.prefix, 1u64 << k)
    }
    /// Every tier queue name.
    pub fn tier_queues(&self) -> Vec<String> {
        (0..=MAX_TIER)
            .flat_map(|k| (0..TIER_SHARDS).map(move |s| (k, s)))
            .map(|(k, s)| self.tier_queue(k, s))
            .collect()
    }
}

/// The tier a job with `remaining_ms` left enters, or `None` for the ready
/// queue (within the hold window).
pub fn tier_for(remaining_ms: i64) -> Option<u32> {
    if remaining_ms <= HOLD_MS {
        return None;
    }
    (0..=MAX_TIER)
        .rev()
        .find(|&k| (1000i64 << k) + EARLY_MS <= remaining_ms)
        .or(Some(0))
}

fn amqp_err(what: &str, e: lapin::Error) -> IoError {
    IoError::Retryable(format!("{what}: {e}"))
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Held {
    due_at: i64,
    tag: u64,
}

struct HeldJob {
    job: Job,
    redelivered: bool,
    generation: u64,
    amqp_tag: u64,
}

struct Session {
    generation: u64,
    conn: Connection,
    publish: Channel,
    consume: Channel,
}

struct Shared {
    s: AmqpSettings,
    clock: SharedClock,
    session: Mutex<Option<Arc<Session>>>,
    connected: watch::Sender<bool>,
    generation: AtomicU64,
    next_tag: AtomicU64,
    heap: Mutex<BinaryHeap<Reverse<Held>>>,
    held: Mutex<HashMap<u64, HeldJob>>,
    /// Deliveries handed out by `next_due`, awaiting ack.
    out: Mutex<HashMap<u64, HeldJob>>,
    changed: watch::Sender<u64>,
    stop: AtomicBool,
}

/// Delay queue on RabbitMQ. Cheap to clone.
#[derive(Clone)]
pub struct RabbitDelayQueue {
    shared: Arc<Shared>,
}

fn quorum_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    t
}

async fn declare(ch: &Channel, s: &AmqpSettings) -> Result<(), IoError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(s.ready_queue().into(), durable, quorum_args())
        .await
        .map_err(|e| amqp_err("declare ready queue", e))?;
    for (i, name) in s.tier_queues().into_iter().enumerate() {
        let k = i as u32 / TIER_SHARDS;
        let mut args = quorum_args();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongInt((1000u64 << k) as i32),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(s.ready_queue().as_str().into()),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        ch.queue_declare(name.as_str().into(), durable, args)
            .await
            .map_err(|e| amqp_err("declare tier queue", e))?;
    }
    Ok(())
}

async fn connect(s: &AmqpSettings, generation: u64) -> Result<(Session, lapin::Consumer), IoError> {
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(s.connection_name.as_str()));
    let conn = Connection::connect(&s.url, props)
        .await
        .map_err(|e| amqp_err(&format!("connect to {}", redact(&s.url)), e))?;
    let publish = conn
        .create_channel()
        .await
        .map_err(|e| amqp_err("channel", e))?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| amqp_err("confirm select", e))?;
    declare(&publish, s).await?;
    let consume = conn
        .create_channel()
        .await
        .map_err(|e| amqp_err("channel", e))?;
    consume
        .basic_qos(s.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| amqp_err("qos", e))?;
    let consumer = consume
        .basic_consume(
            s.ready_queue().into(),
            ShortString::from(format!("{}-{generation}", s.connection_name)),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_err("consume", e))?;
    Ok((
        Session {
            generation,
            conn,
            publish,
            consume,
        },
        consumer,
    ))
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or_default();
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

impl Shared {
    fn current(&self) -> Option<Arc<Session>> {
        self.session.lock().expect("session lock").clone()
    }

    async fn wait_session(&self, deadline: tokio::time::Instant) -> Result<Arc<Session>, IoError> {
        let mut rx = self.connected.subscribe();
        loop {
            if let Some(s) = self.current() {
                if *rx.borrow_and_update() {
                    return Ok(s);
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(IoError::Retryable("RabbitMQ is not connected".into()));
            }
        }
    }

    /// Publish one job to its tier (or the ready queue), confirmed; retried
    /// until `PUBLISH_TIMEOUT`.
    async fn send(&self, job: &Job) -> Result<(), IoError> {
        let payload = serde_json::to_vec(job).expect("serialisable");
        let deadline = tokio::time::Instant::now() + PUBLISH_TIMEOUT;
        let mut attempt = 0u32;
        loop {
            let remaining = job.due_at - self.clock.now_ms();
            let shard = (crate::domain::model::stable_hash(&[job.command_id.as_bytes()])
                % TIER_SHARDS as u64) as u32;
            let queue = match tier_for(remaining) {
                Some(k) => self.s.tier_queue(k, shard),
                None => self.s.ready_queue(),
            };
            let res = async {
                let session = self.wait_session(deadline).await?;
                let confirm = session
                    .publish
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &payload,
                        BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_content_type("application/json".into()),
                    )
                    .await
                    .map_err(|e| amqp_err("publish", e))?
                    .await
                    .map_err(|e| amqp_err("publish confirm", e))?;
                match confirm {
                    Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
                    Confirmation::Ack(Some(_)) => {
                        Err(IoError::Retryable(format!("job unroutable to {queue}")))
                    }
                    Confirmation::Nack(_) => {
                        Err(IoError::Retryable(format!("job nacked by {queue}")))
                    }
                }
            }
            .await;
            match res {
                Ok(()) => return Ok(()),
                Err(e) => {
                    metrics::counter!("smartmsg_jobs_publish_retries_total").increment(1);
                    // A publish channel the broker closed while the
                    // connection lives on: drop the connection, so the
                    // session is rebuilt with fresh channels.
                    if let Some(sess) = self.current() {
                        if !sess.publish.status().connected() {
                            let _ = sess.conn.close(320, "publish channel lost".into()).await;
                        }
                    }
                    attempt += 1;
                    if tokio::time::Instant::now() >= deadline {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, attempt, "job publish failed; retrying");
                    let backoff = Duration::from_millis((50u64 << attempt.min(6)).min(2000));
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

/// Handle one delivery from the ready queue: hold it, or send it on.
async fn on_delivery(shared: Arc<Shared>, session: Arc<Session>, d: lapin::message::Delivery) {
    let amqp_tag = d.delivery_tag;
    let job: Job = match serde_json::from_slice(&d.data) {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(error = %e, "unreadable job in the ready queue; dropping it");
            metrics::counter!("smartmsg_dlq_records_total", "reason" => "malformed_job")
                .increment(1);
            let _ = session
                .consume
                .basic_ack(amqp_tag, BasicAckOptions::default())
                .await;
            return;
        }
    };
    let remaining = job.due_at - shared.clock.now_ms();
    if tier_for(remaining).is_some() {
        // Not due within the hold window: on to the next tier.
        let s = shared.clone();
        tokio::spawn(async move {
            match s.send(&job).await {
                Ok(()) => {
                    let _ = session
                        .consume
                        .basic_ack(amqp_tag, BasicAckOptions::default())
                        .await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "forwarding a job failed; returning it");
                    let _ = session
                        .consume
                        .basic_nack(
                            amqp_tag,
                            BasicNackOptions {
                                requeue: true,
                                multiple: false,
                            },
                        )
                        .await;
                }
            }
        });
        return;
    }
    let tag = shared.next_tag.fetch_add(1, Ordering::SeqCst);
    shared.held.lock().expect("held lock").insert(
        tag,
        HeldJob {
            job: job.clone(),
            redelivered: d.redelivered,
            generation: session.generation,
            amqp_tag,
        },
    );
    shared.heap.lock().expect("heap lock").push(Reverse(Held {
        due_at: job.due_at,
        tag,
    }));
    shared.notify();
}

/// Keep a session up: connect, consume, and on loss reconnect with backoff.
async fn run_connection(shared: Arc<Shared>) {
    let mut failures = 0u32;
    while !shared.stop.load(Ordering::SeqCst) {
        let generation = shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
        match connect(&shared.s, generation).await {
            Ok((session, mut consumer)) => {
                if failures > 0 || generation > 1 {
                    metrics::counter!("smartmsg_amqp_reconnects_total").increment(1);
                    tracing::info!(generation, "RabbitMQ reconnected");
                }
                failures = 0;
                let session = Arc::new(session);
                *shared.session.lock().expect("session lock") = Some(session.clone());
                shared.connected.send_replace(true);
                while let Some(d) = consumer.next().await {
                    match d {
                        Ok(d) => on_delivery(shared.clone(), session.clone(), d).await,
                        Err(e) => {
                            tracing::warn!(error = %e, "RabbitMQ consumer failed");
                            break;
                        }
                    }
                    if shared.stop.load(Ordering::SeqCst) {
                        break;
                    }
                }
                shared.connected.send_replace(false);
                *shared.session.lock().expect("session lock") = None;
                // Held deliveries of the dead channel go back to the queue
                // on the broker's side; forget them here.
                shared
                    .held
                    .lock()
                    .expect("held lock")
                    .retain(|_, h| h.generation != generation);
                let _ = session.conn.close(200, "reconnecting".into()).await;
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                tracing::warn!(generation, "RabbitMQ connection lost; reconnecting");
            }
            Err(e) => {
                failures += 1;
                shared.connected.send_replace(false);
                tracing::warn!(error = %e, failures, "RabbitMQ unavailable");
            }
        }
        let backoff = Duration::from_millis((100u64 << failures.min(6)).min(5000));
        tokio::time::sleep(backoff).await;
    }
}

impl RabbitDelayQueue {
    /// Connect (retrying in the background) and declare the topology. Fails
    /// with a clear error when the broker does not answer within `timeout`.
    pub async fn open(
        s: AmqpSettings,
        clock: SharedClock,
        timeout: Duration,
    ) -> Result<Self, IoError> {
        let (connected, _) = watch::channel(false);
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            s,
            clock,
            session: Mutex::new(None),
            connected,
            generation: AtomicU64::new(0),
            next_tag: AtomicU64::new(1),
            heap: Mutex::new(BinaryHeap::new()),
            held: Mutex::new(HashMap::new()),
            out: Mutex::new(HashMap::new()),
            changed,
            stop: AtomicBool::new(false),
        });
        tokio::spawn(run_connection(shared.clone()));
        let deadline = tokio::time::Instant::now() + timeout;
        shared.wait_session(deadline).await.map_err(|_| {
            IoError::Retryable(format!(
                "RabbitMQ at {} unreachable within {timeout:?}",
                redact(&shared.s.url)
            ))
        })?;
        Ok(RabbitDelayQueue { shared })
    }

    /// Whether a session is up now.
    pub fn is_connected(&self) -> bool {
        *self.shared.connected.borrow()
    }

    /// Deliveries held in this consumer, waiting for their due time.
    pub fn held(&self) -> usize {
        self.shared.held.lock().expect("held lock").len()
    }

    /// Stop consuming and close the connection (held jobs go back to the queue).
    pub async fn close(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(s) = self.shared.current() {
            let _ = s.conn.close(200, "closing".into()).await;
        }
    }

    /// Delete every queue of this topology (tests and benchmarks), on a
    /// connection of its own, then close this queue.
    pub async fn destroy(&self) -> Result<(), IoError> {
        self.close().await;
        delete_topology(&self.shared.s).await
    }
}

/// Delete every queue of the topology named by `s` (missing ones are fine).
pub async fn delete_topology(s: &AmqpSettings) -> Result<(), IoError> {
    let conn = Connection::connect(&s.url, ConnectionProperties::default())
        .await
        .map_err(|e| amqp_err("connect", e))?;
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| amqp_err("channel", e))?;
    let mut names = vec![s.ready_queue()];
    names.extend(s.tier_queues());
    for n in names {
        ch.queue_delete(n.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(|e| amqp_err("delete queue", e))?;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

#[async_trait::async_trait]
impl DelayQueue for RabbitDelayQueue {
    async fn publish(&self, job: &Job) -> Result<(), IoError> {
        self.shared.send(job).await
    }

    async fn next_due(&self, wait: Duration) -> Result<Option<Delivery>, IoError> {
        let sh = &self.shared;
        let deadline = tokio::time::Instant::now() + wait;
        let mut changed = sh.changed.subscribe();
        loop {
            changed.borrow_and_update();
            let now = sh.clock.now_ms();
            let mut next_due = None;
            {
                let mut heap = sh.heap.lock().expect("heap lock");
                while let Some(Reverse(top)) = heap.peek().cloned() {
                    let mut held = sh.held.lock().expect("held lock");
                    if !held.contains_key(&top.tag) {
                        heap.pop(); // its channel died
                        continue;
                    }
                    if top.due_at > now {
                        next_due = Some(top.due_at);
                        break;
                    }
                    heap.pop();
                    let h = held.remove(&top.tag).expect("present");
                    let d = Delivery {
                        tag: top.tag,
                        job: h.job.clone(),
                        redelivered: h.redelivered,
                    };
                    sh.out.lock().expect("out lock").insert(top.tag, h);
                    return Ok(Some(d));
                }
            }
            let sleep = match next_due {
                Some(at) => sh.clock.sleep_until(at),
                None => Box::pin(futures::future::pending()),
            };
            tokio::select! {
                _ = sleep => {}
                _ = changed.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
            }
        }
    }

    async fn ack(&self, tag: u64) -> Result<(), IoError> {
        let h = self.shared.out.lock().expect("out lock").remove(&tag);
        if let (Some(h), Some(s)) = (h, self.shared.current()) {
            if s.generation == h.generation {
                s.consume
                    .basic_ack(h.amqp_tag, BasicAckOptions::default())
                    .await
                    .map_err(|e| amqp_err("ack", e))?;
            }
        }
        Ok(())
    }

    async fn requeue(&self, tag: u64) -> Result<(), IoError> {
        let h = self.shared.out.lock().expect("out lock").remove(&tag);
        if let (Some(h), Some(s)) = (h, self.shared.current()) {
            if s.generation == h.generation {
                s.consume
                    .basic_nack(
                        h.amqp_tag,
                        BasicNackOptions {
                            requeue: true,
                            multiple: false,
                        },
                    )
                    .await
                    .map_err(|e| amqp_err("nack", e))?;
            }
        }
        Ok(())
    }

    async fn healthcheck(&self) -> Result<(), IoError> {
        if self.is_connected() {
            Ok(())
        } else {
            Err(IoError::Retryable("RabbitMQ is not connected".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_are_the_largest_that_still_deliver_early() {
        assert_eq!(tier_for(500), None);
        assert_eq!(tier_for(HOLD_MS), None);
        assert_eq!(tier_for(HOLD_MS + 1), Some(0));
        assert_eq!(tier_for(3_600_000), Some(11));
        assert_eq!(tier_for(100_000_000), Some(MAX_TIER));
        assert_eq!(tier_for(i64::MAX / 4), Some(MAX_TIER));
        for ms in (HOLD_MS + 1..200_000).step_by(97) {
            let k = tier_for(ms).unwrap();
            let left = ms - (1000i64 << k);
            // delivered at least EARLY_MS early...
            assert!(left >= EARLY_MS, "{ms}");
            // ...by the largest tier that can.
            if k < MAX_TIER {
                assert!((1000i64 << (k + 1)) + EARLY_MS > ms, "{ms}");
            }
        }
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host"), "amqp://host");
    }
}
