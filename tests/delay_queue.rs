//! The delay-queue contract, run against both backends: the embedded sled
//! queue and the RabbitMQ tiered queue on the real broker (isolated queue
//! names, deleted afterwards). Jobs published in any order fire once each,
//! never early and within a bound; with RabbitMQ, a dropped connection or a
//! consumer that dies holding unacked jobs loses none.

mod common;

use rand::seq::SliceRandom;
use rand::Rng;
use smartmsg::clock::{system_now_ms, SharedClock, SystemClock};
use smartmsg::io::amqp::{AmqpSettings, RabbitDelayQueue};
use smartmsg::io::embedded_delay::EmbeddedDelayQueue;
use smartmsg::io::{DelayQueue, Job};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn settings(name: &str) -> AmqpSettings {
    AmqpSettings {
        url: URL.into(),
        prefix: format!("test.{}.{}.", name, uuid::Uuid::new_v4().simple()),
        prefetch: 2000,
        connection_name: format!("smartmsg-test-{}", uuid::Uuid::new_v4().simple()),
    }
}

async fn rabbit(s: AmqpSettings) -> RabbitDelayQueue {
    let clock: SharedClock = Arc::new(SystemClock);
    RabbitDelayQueue::open(s, clock, Duration::from_secs(20))
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (scripts/test.sh starts it)")
}

fn jobs(n: usize, from_ms: i64, to_ms: i64) -> Vec<Job> {
    let now = system_now_ms();
    let mut rng = rand::thread_rng();
    let mut v: Vec<Job> = (0..n)
        .map(|i| Job {
            campaign_id: format!("c{i}"),
            batch: i as u64,
            due_at: now + rng.gen_range(from_ms..to_ms),
            command_id: format!("x{i}"),
        })
        .collect();
    v.shuffle(&mut rng);
    v
}

async fn publish_all(q: Arc<dyn DelayQueue>, jobs: &[Job]) {
    let futs = jobs.iter().map(|j| {
        let q = q.clone();
        let j = j.clone();
        async move { q.publish(&j).await.unwrap() }
    });
    futures::future::join_all(futs).await;
}

/// Consume until `n` distinct jobs fired (acking each); returns lateness per job.
async fn drain(q: &dyn DelayQueue, n: usize, timeout: Duration) -> HashMap<String, i64> {
    let deadline = Instant::now() + timeout;
    let mut fired: HashMap<String, i64> = HashMap::new();
    while fired.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {}/{n} jobs fired",
            fired.len()
        );
        if let Some(d) = q.next_due(Duration::from_millis(500)).await.unwrap() {
            let late = system_now_ms() - d.job.due_at;
            fired.entry(d.job.command_id.clone()).or_insert(late);
            q.ack(d.tag).await.unwrap();
        }
    }
    fired
}

async fn contract(q: Arc<dyn DelayQueue>) {
    let js = jobs(300, 200, 4_000);
    publish_all(q.clone(), &js).await;
    let fired = drain(q.as_ref(), js.len(), Duration::from_secs(30)).await;
    assert_eq!(fired.len(), 300);
    for (id, late) in &fired {
        assert!(*late >= 0, "{id} fired {late} ms early");
        assert!(*late < 1_000, "{id} fired {late} ms late");
    }
    // Nothing fires twice.
    assert!(q
        .next_due(Duration::from_millis(300))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_queue_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let q = EmbeddedDelayQueue::open(&db, "contract", Arc::new(SystemClock)).unwrap();
    contract(Arc::new(q)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_queue_keeps_the_contract_in_any_publish_order() {
    let s = settings("contract");
    let _cleanup = common::RabbitCleanup(s.clone());
    let q = rabbit(s).await;
    contract(Arc::new(q.clone())).await;
    q.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_long_delays_travel_through_tiers() {
    let s = settings("tiers");
    let _cleanup = common::RabbitCleanup(s.clone());
    let q = rabbit(s).await;
    // 5-9 s: through the 4 s tier, then the 2 s / 1 s tiers, then held.
    let js = jobs(50, 5_000, 9_000);
    publish_all(Arc::new(q.clone()), &js).await;
    let fired = drain(&q, js.len(), Duration::from_secs(30)).await;
    assert!(fired.values().all(|l| (0..1_000).contains(l)), "{fired:?}");
    q.destroy().await.unwrap();
}

fn close_connection_named(name: &str) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-s"])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(name))
        .unwrap_or_else(|| panic!("connection {name} not listed"));
    let pid = line.split_whitespace().next().unwrap();
    let st = std::process::Command::new("rabbitmqctl")
        .args(["close_connection", pid, "test: connection drop"])
        .status()
        .unwrap();
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_connection_drop_mid_run_loses_no_job() {
    let s = settings("drop");
    let _cleanup = common::RabbitCleanup(s.clone());
    let name = s.connection_name.clone();
    let q = rabbit(s).await;
    let js = jobs(200, 1_500, 6_000);
    publish_all(Arc::new(q.clone()), &js).await;
    // Hold some, then have the broker close our connection.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    close_connection_named(&name);
    let deadline = Instant::now() + Duration::from_secs(20);
    while q.is_connected() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while !q.is_connected() {
        assert!(Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fired = drain(&q, js.len(), Duration::from_secs(30)).await;
    assert_eq!(fired.len(), 200);
    q.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_jobs_held_by_a_dead_consumer_go_to_another() {
    let s = settings("handover");
    let _cleanup = common::RabbitCleanup(s.clone());
    let a = rabbit(s.clone()).await;
    let js = jobs(100, 1_200, 2_500);
    publish_all(Arc::new(a.clone()), &js).await;
    // a receives and holds them (unacked), never firing them...
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.held() < 100 {
        assert!(Instant::now() < deadline, "a holds only {}", a.held());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and dies.
    a.close().await;
    let mut s2 = s.clone();
    s2.connection_name = format!("{}-b", s.connection_name);
    let b = rabbit(s2).await;
    let fired = drain(&b, js.len(), Duration::from_secs(20)).await;
    assert_eq!(fired.len(), 100);
    b.destroy().await.unwrap();
}
