//! Window golden files, like Kafka Streams' TopologyTestDriver: each
//! `tests/data/windows/<case>.input.ndjson` is replayed into `reaction-logs`
//! of a real node on the embedded backend with a manual clock, and the final
//! windows and dead letters it produces must equal
//! `<case>.expected.json`. Input lines:
//! * `{"p":0,"key":"u1","value":{...}}` a record (the value as JSON text),
//!   `"raw":"..."` instead of `value` for bytes as they are, `"null":true`
//!   for a null value;
//! * `{"clock":MS}` wait until every record so far is processed, then set
//!   the wall clock (idle partitions close what it says is past).
//!
//! `SMARTMSG_BLESS=1` rewrites the expected files (review them!).
//!
//! The same node also shows how a transaction is cut: by its output (final
//! windows), not only by its input records.

use serde_json::{json, Value};
use smartmsg::clock::ManualClock;
use smartmsg::config::Config;
use smartmsg::domain::changelog::{TxnMarker, META_KEY};
use smartmsg::domain::window::WindowKind;
use smartmsg::io::OutRecord;
use smartmsg::node::Node;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PARTITIONS: u32 = 2;

async fn read_topic(node: &Node, topic: &str) -> Vec<(u32, u64, Value)> {
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        let mut r = node.ctx.log.reader(topic, p, 0);
        loop {
            let batch = r.next_batch(10_000, Duration::ZERO).await.unwrap();
            if batch.is_empty() {
                break;
            }
            for rec in batch {
                let v: Value = serde_json::from_slice(rec.value.as_deref().unwrap()).unwrap();
                out.push((p, rec.offset, v));
            }
        }
    }
    out
}

/// Wait until the aggregators committed everything published so far.
async fn wait_processed(node: &Node, published: &[u64]) {
    let ctx = &node.ctx;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut done = true;
        for (p, end) in published.iter().enumerate() {
            let c = ctx
                .log
                .group_offset(ctx.group(), &ctx.topics.reactions, p as u32)
                .await
                .unwrap()
                .unwrap_or(0);
            done &= c >= *end;
        }
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "records not processed in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until the outputs stop changing (idle closes are committed).
async fn wait_settled(node: &Node) {
    let mut last = usize::MAX;
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = read_topic(node, &node.ctx.topics.aggregates).await.len()
            + read_topic(node, &node.ctx.topics.reactions_dlq).await.len();
        if n != last {
            last = n;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= Duration::from_millis(800) {
            return;
        }
        assert!(Instant::now() < deadline, "outputs never settled");
    }
}

/// The transaction markers on a partition of the aggregator changelog:
/// one per committed transaction, in order.
async fn changelog_markers(node: &Node, partition: u32) -> Vec<TxnMarker> {
    let mut out = Vec::new();
    let mut reader = node
        .ctx
        .log
        .reader(&node.ctx.topics.aggregator_changelog, partition, 0);
    loop {
        let batch = reader.next_batch(10_000, Duration::ZERO).await.unwrap();
        if batch.is_empty() {
            return out;
        }
        for rec in batch {
            if rec.key.as_deref() == Some(META_KEY) {
                out.push(serde_json::from_slice(rec.value.as_deref().unwrap()).unwrap());
            }
        }
    }
}

/// An aggregator-only node on the embedded backend in `data`.
fn aggregator_config(name: &str, data: &Path) -> Config {
    let mut cfg = Config::defaults();
    cfg.node.id = format!("golden-{name}");
    cfg.node.roles = "aggregator".into();
    cfg.storage.data_dir = data.to_path_buf();
    cfg.kafka.partitions = PARTITIONS;
    cfg.aggregator.grace_ms = 10_000;
    cfg.aggregator.idle_close_ms = 200;
    cfg
}

async fn run_case(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/windows");
    let input = std::fs::read_to_string(dir.join(format!("{name}.input.ndjson"))).unwrap();
    let data = tempfile::tempdir().unwrap();
    let cfg = aggregator_config(name, data.path());
    let clock = ManualClock::new(0);
    let node = Node::start(cfg, Arc::new(clock.clone()), false)
        .await
        .unwrap();
    let topic = node.ctx.topics.reactions.clone();
    let mut published = vec![0u64; PARTITIONS as usize];
    for (n, line) in input.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}", n + 1));
        if let Some(ms) = v.get("clock") {
            wait_processed(&node, &published).await;
            clock.set(ms.as_i64().unwrap());
            wait_settled(&node).await;
            continue;
        }
        let p = v["p"].as_u64().unwrap() as u32;
        let value = if v.get("null").is_some() {
            None
        } else if let Some(raw) = v.get("raw") {
            Some(raw.as_str().unwrap().as_bytes().to_vec())
        } else {
            Some(v["value"].to_string().into_bytes())
        };
        let rec = OutRecord {
            topic: topic.clone(),
            partition: Some(p),
            key: v["key"].as_str().map(|k| k.as_bytes().to_vec()),
            value,
        };
        node.ctx.log.publish(vec![rec]).await.unwrap();
        published[p as usize] += 1;
    }
    wait_processed(&node, &published).await;
    wait_settled(&node).await;
    let mut finals: Vec<Value> = read_topic(&node, &node.ctx.topics.aggregates)
        .await
        .into_iter()
        .map(|(_, _, v)| v)
        .collect();
    finals.sort_by_key(|v| {
        (
            v["partition"].as_u64(),
            v["window"].as_str().map(String::from),
            v["window_start"].as_i64(),
            v["campaign_id"].as_str().map(String::from),
            v["creative_id"].as_str().map(String::from),
            v["action"].as_str().map(String::from),
        )
    });
    let dlq: Vec<Value> = read_topic(&node, &node.ctx.topics.reactions_dlq)
        .await
        .into_iter()
        .map(|(_, _, v)| json!({"partition": v["partition"], "offset": v["offset"], "reason": v["reason"]}))
        .collect();
    node.shutdown().await;
    let got = json!({"finals": finals, "dlq": dlq});
    let path = dir.join(format!("{name}.expected.json"));
    if std::env::var("SMARTMSG_BLESS").is_ok() {
        std::fs::write(&path, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
        return;
    }
    let want: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        got,
        want,
        "{name}: got\n{}",
        serde_json::to_string_pretty(&got).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tumbling_and_hopping_windows_with_grace() {
    run_case("grace").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_late_records_are_dead_lettered() {
    run_case("bad_and_late").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_partition_closes_its_windows_by_the_wall_clock() {
    run_case("idle").await;
}

/// The end of a final window record (its start plus its kind's size).
fn window_end(v: &Value) -> i64 {
    let kind = v["window"].as_str().unwrap();
    let kind = WindowKind::parse(kind).unwrap_or_else(|| panic!("unknown window kind {kind}"));
    v["window_start"].as_i64().unwrap() + kind.size_ms()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_cut_by_its_output_not_only_its_input() {
    // 400 campaigns with a click each minute for 20 minutes, published at
    // once: every event closes two windows of its own (high cardinality).
    // Input and interval limits are out of reach, so only the output bound
    // cuts transactions; each may exceed it by what one fetch chunk of
    // 2,000 input records closes (2 windows per record).
    const BOUND: usize = 500;
    const CHUNK_FINALS: usize = 2 * 2_000;
    let data = tempfile::tempdir().unwrap();
    let mut cfg = aggregator_config("output-bound", data.path());
    cfg.aggregator.max_batch_records = 1_000_000;
    cfg.aggregator.commit_interval_ms = 3_600_000;
    cfg.aggregator.max_batch_output = BOUND as u64;
    let node = Node::start(cfg, Arc::new(ManualClock::new(0)), false)
        .await
        .unwrap();
    let topic = node.ctx.topics.reactions.clone();
    let mut records = Vec::new();
    for minute in 0..20i64 {
        for c in 0..400 {
            let value = json!({
                "event_id": format!("e{minute}-{c}"),
                "campaign_id": format!("c{c}"),
                "creative_id": "a",
                "user_id": "u",
                "action": "click",
                "ts": minute * 60_000 + c,
            });
            records.push(OutRecord {
                topic: topic.clone(),
                partition: Some(0),
                key: Some(b"u".to_vec()),
                value: Some(value.to_string().into_bytes()),
            });
        }
    }
    let n = records.len() as u64;
    node.ctx.log.publish(records).await.unwrap();
    wait_processed(&node, &[n, 0]).await;
    wait_settled(&node).await;

    let closed_until: Vec<i64> = changelog_markers(&node, 0)
        .await
        .iter()
        .map(|m| m.closed_until)
        .collect();
    let finals = read_topic(&node, &node.ctx.topics.aggregates).await;
    node.shutdown().await;
    // Stream time reaches 19:00.399, so windows ending by 18:50 are final:
    // 18 tumbling and 14 hopping windows per campaign.
    assert_eq!(finals.len(), 400 * (18 + 14));
    // A final window belongs to the transaction whose marker first reports
    // its end closed.
    let mut per_txn = vec![0usize; closed_until.len()];
    for (_, _, v) in &finals {
        let end = window_end(v);
        let t = closed_until
            .iter()
            .position(|&c| c >= end)
            .expect("every final window is covered by a marker");
        per_txn[t] += 1;
    }
    let most = per_txn.iter().copied().max().unwrap();
    assert!(
        most <= BOUND + CHUNK_FINALS,
        "a transaction held {most} final windows: {per_txn:?}"
    );
    assert!(per_txn.len() >= finals.len() / (BOUND + CHUNK_FINALS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_up_partition_spaces_its_commits() {
    // A trickle of records, each read as soon as it is published: with no
    // gap each would be a transaction of its own.
    const GAP_MS: u64 = 400;
    const RECORDS: usize = 40;
    let data = tempfile::tempdir().unwrap();
    let mut cfg = aggregator_config("commit-gap", data.path());
    cfg.aggregator.commit_interval_ms = 3_600_000;
    cfg.aggregator.min_commit_gap_ms = GAP_MS;
    let node = Node::start(cfg, Arc::new(ManualClock::new(0)), false)
        .await
        .unwrap();
    let topic = node.ctx.topics.reactions.clone();
    let started = Instant::now();
    for i in 0..RECORDS {
        let value = json!({
            "event_id": format!("e{i}"),
            "campaign_id": "c",
            "creative_id": "a",
            "user_id": "u",
            "action": "send",
            "ts": i as i64 * 1_000,
        });
        let rec = OutRecord {
            topic: topic.clone(),
            partition: Some(0),
            key: Some(b"u".to_vec()),
            value: Some(value.to_string().into_bytes()),
        };
        node.ctx.log.publish(vec![rec]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_processed(&node, &[RECORDS as u64, 0]).await;
    wait_settled(&node).await;
    let elapsed = started.elapsed();
    let markers = changelog_markers(&node, 0).await.len() as u128;
    node.shutdown().await;
    // One transaction per gap at most (and the first at once).
    let bound = elapsed.as_millis() / GAP_MS as u128 + 2;
    assert!(markers >= 1);
    assert!(
        markers <= bound,
        "{markers} transactions in {elapsed:?} with a {GAP_MS} ms gap"
    );
}
