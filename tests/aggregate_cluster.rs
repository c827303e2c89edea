//! The acceptance run of the reaction windows on a real Kafka-protocol
//! broker: 1M events over 4 partitions, two aggregator processes (cluster
//! mode, exactly-once), one SIGKILLed and restarted twice during the run.
//! Afterwards, for every window, the sum of `count` over partitions equals
//! the number of input events of that key and window; malformed and late
//! records are in the DLQ with reasons; the last windows of every partition
//! close by idleness (their event times are long past, no later event comes).

mod common;

use common::tansu::Tansu;
use smartmsg::bench::aggregate::{
    committed, produce, produce_paced, verify, worker_config, Verdict, Worker,
};
use smartmsg::bench::synth::{Expected, SynthSpec};
use smartmsg::config::Config;
use smartmsg::domain::window::FinalWindow;
use smartmsg::io::kafka::{KafkaLog, KafkaSettings};
use smartmsg::io::topics::Topics;
use smartmsg::io::{EventLog, OffsetCommit, Txn};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

const EVENTS: u64 = 1_000_000;
const PARTITIONS: u32 = 4;
/// Records a second of the acceptance run's input (its aggregation alone
/// runs at well over 1M a second here): ~20 s of input. A killed node's
/// partitions stand still until its successor is in the group (~7 s here,
/// the session timeout), while the input goes on arriving: at 100k/s the
/// second kill came at 976k of 1M records produced.
const PACE_PER_S: f64 = 50_000.0;

/// Wait (on a blocking thread) until the committed input offsets reach
/// `at` records in total.
fn wait_progress(log: &KafkaLog, group: &str, topic: &str, at: u64, timeout: Duration) -> u64 {
    let rt = tokio::runtime::Handle::current();
    let deadline = Instant::now() + timeout;
    loop {
        let n = rt
            .block_on(committed(log, group, topic, PARTITIONS))
            .map(|c| c.iter().sum())
            .unwrap_or(0);
        if n >= at {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "aggregation stalled at {n} of {at} records"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Verify the windows and the DLQ every 2 s until they are right or
/// `timeout` has passed; the last verdict.
async fn verified(brokers: &str, topics: &Topics, exp: &Expected, timeout: Duration) -> Verdict {
    let deadline = Instant::now() + timeout;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let v = tokio::task::block_in_place(|| verify(brokers, topics, PARTITIONS, exp)).unwrap();
        if v.ok || Instant::now() > deadline {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_million_events_two_nodes_one_killed_twice_exact_windows() {
    let broker = Tansu::start();
    let brokers = broker.brokers();
    let dir = tempfile::tempdir().unwrap();
    let prefix = "acc.";
    let bin = Path::new(env!("CARGO_BIN_EXE_smartmsg"));
    // Idle closing after 3 s: the test's last windows close by it.
    let cfg_a = worker_config(dir.path(), &brokers, prefix, PARTITIONS, "agg-a", 3000).unwrap();
    let cfg_b = worker_config(dir.path(), &brokers, prefix, PARTITIONS, "agg-b", 3000).unwrap();
    let cfg = Config::load(Some(&cfg_a)).unwrap();
    let topics = Topics::new(&cfg);
    let log = std::sync::Arc::new(
        KafkaLog::connect(KafkaSettings::from_config(&cfg))
            .await
            .unwrap(),
    );
    for spec in topics.specs() {
        log.ensure_topic(&spec).await.unwrap();
    }
    let spec = SynthSpec::new(EVENTS);
    let group = cfg.kafka.group_id.clone();
    let a = Worker::spawn(bin, &cfg_a).unwrap();
    let b_worker = Worker::spawn(bin, &cfg_b).unwrap();
    // The input arrives while the nodes join, restore and aggregate, at a
    // pace the aggregation keeps up with, so both kills fall while input
    // is still coming, not after the run (produced all at once, it is
    // aggregated within a second or two). Its event times are long past:
    // a partition with no input for `idle_close_ms` closes all its windows
    // (the contract's idle rule), so the input must flow without a pause
    // that long, and it starts before any node has restored (the first
    // fetch finds records waiting).
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let producing = {
        let (b, t, s, sent) = (
            brokers.clone(),
            topics.reactions.clone(),
            spec.clone(),
            sent.clone(),
        );
        tokio::task::spawn_blocking(move || {
            produce_paced(&b, &t, &s, PARTITIONS, Some((PACE_PER_S, &sent)))
        })
    };
    let (l, g, t) = (log.clone(), group.clone(), topics.reactions.clone());
    let sent2 = sent.clone();
    let (a, b_worker) = tokio::task::spawn_blocking(move || {
        let mut a = a;
        // Kill node A twice mid-run, restarting it each time.
        for at in [EVENTS / 4, EVENTS / 2] {
            let reached = wait_progress(&l, &g, &t, at, Duration::from_secs(240));
            let produced = sent2.load(std::sync::atomic::Ordering::Relaxed);
            eprintln!("SIGKILL node A at {reached} committed records, {produced} produced");
            assert!(
                produced < EVENTS,
                "the input was all produced before the kill at {reached}"
            );
            a.kill();
            std::thread::sleep(Duration::from_millis(500));
            a = Worker::spawn(bin, &cfg_a).unwrap();
        }
        (a, b_worker)
    })
    .await
    .unwrap();
    let (ends, exp, _) = producing.await.unwrap().unwrap();
    assert_eq!(ends.iter().sum::<u64>(), EVENTS);
    assert!(exp.bad > 0 && exp.late > 0);
    let (l, g, t) = (log.clone(), group.clone(), topics.reactions.clone());
    tokio::task::spawn_blocking(move || {
        wait_progress(&l, &g, &t, EVENTS, Duration::from_secs(300))
    })
    .await
    .unwrap();
    assert_eq!(
        committed(log.as_ref(), &group, &topics.reactions, PARTITIONS)
            .await
            .unwrap(),
        ends
    );

    // The last windows close when the partitions have been idle.
    let verdict = verified(&brokers, &topics, &exp, Duration::from_secs(90)).await;
    eprintln!("verdict: {verdict:?}");
    assert_eq!(verdict.missing, 0, "{verdict:?}");
    assert_eq!(verdict.wrong_counts, 0, "{verdict:?}");
    assert_eq!(verdict.unexpected, 0, "{verdict:?}");
    assert_eq!(
        verdict.dlq_bad, exp.bad,
        "malformed/invalid records in the DLQ"
    );
    assert_eq!(verdict.dlq_late, exp.late, "late records in the DLQ");
    assert!(verdict.ok);

    // Repeated final records (a killed node's transaction that the broker
    // shows although it was aborted, and its redo) must agree: the same
    // window of the same partition never has two different counts.
    let mut seen: HashMap<String, u64> = HashMap::new();
    for (_, _, v) in
        smartmsg::bench::aggregate::read_topic(&brokers, &topics.aggregates, PARTITIONS).unwrap()
    {
        let f: FinalWindow = serde_json::from_slice(&v.unwrap()).unwrap();
        if let Some(prev) = seen.insert(f.identity(), f.count) {
            assert_eq!(
                prev,
                f.count,
                "conflicting final records for {}",
                f.identity()
            );
        }
    }
    // Every DLQ record names its reason and the original position.
    for (_, _, v) in
        smartmsg::bench::aggregate::read_topic(&brokers, &topics.reactions_dlq, PARTITIONS).unwrap()
    {
        let d: serde_json::Value = serde_json::from_slice(&v.unwrap()).unwrap();
        let reason = d["reason"].as_str().unwrap();
        assert!(
            ["malformed", "invalid", "late"]
                .iter()
                .any(|p| reason.starts_with(p)),
            "{reason}"
        );
        assert_eq!(d["topic"], topics.reactions.as_str());
        assert!(d["offset"].is_u64() && d["partition"].is_u64());
    }
    a.stop().unwrap();
    b_worker.stop().unwrap();
}

/// `smartmsg bench ARGS --brokers <a fresh broker>`: its last stdout line,
/// parsed (the test fails, showing both outputs, if the bench fails).
fn bench_json(args: &[&str]) -> serde_json::Value {
    let broker = Tansu::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smartmsg"))
        .arg("bench")
        .args(args)
        .args(["--brokers", &broker.brokers()])
        .output()
        .unwrap();
    let stdout = common::success_stdout(&out);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn bench_aggregate_prints_its_verified_json() {
    let last = bench_json(&[
        "aggregate",
        "--events",
        "30000",
        "--partitions",
        "2",
        "--passes",
        "2",
    ]);
    for k in [
        "events",
        "events_per_s",
        "events_per_cpu_s",
        "peak_rss_bytes",
        "raw_consume_events_per_s",
        "restore_ms",
        "verified",
    ] {
        assert!(last.get(k).is_some(), "{k} missing in {last}");
    }
    assert_eq!(last["events"], 30000);
    assert_eq!(last["verified"], true);
    // Two measurements, each verified on its own topics.
    let passes = last["passes"].as_array().unwrap();
    assert_eq!(passes.len(), 2, "{last}");
    assert!(passes.iter().all(|p| p["verified"] == true), "{last}");
    assert!(last["peak_rss_bytes"].as_u64().unwrap() > 0);
}

/// The latency bench feeds a real aggregator at a steady rate and reads,
/// for every record, when the group's committed offset passed it.
#[test]
fn bench_aggregate_latency_times_every_record_to_its_commit() {
    let last = bench_json(&[
        "aggregate-latency",
        "--events",
        "20000",
        "--rate",
        "10000",
        "--partitions",
        "2",
        "--commit-interval-ms",
        "100",
    ]);
    assert_eq!(last["verified"], true, "{last}");
    assert_eq!(last["events"], 20000, "{last}");
    assert_eq!(last["commit_interval_ms"], 100, "{last}");
    let lat = &last["latency_ms"];
    let (p50, p99, max) = (
        lat["p50"].as_f64().unwrap(),
        lat["p99"].as_f64().unwrap(),
        lat["max"].as_f64().unwrap(),
    );
    assert!(0.0 <= p50 && p50 <= p99 && p99 <= max, "{last}");
    // The input took ~2 s: it was committed in many transactions, not one
    // at the end.
    assert!(last["transactions"].as_f64().unwrap() >= 4.0, "{last}");
}

/// The rebuild bench writes a changelog of many small transactions the
/// aggregator's way and checks that a process without local state rebuilds
/// exactly that state (parts, window progress, input offset).
#[test]
fn bench_rebuild_rebuilds_the_state_it_wrote() {
    let last = bench_json(&["rebuild", "--records", "20000", "--partitions", "2"]);
    assert_eq!(last["verified"], true, "{last}");
    assert_eq!(last["full_rebuild"], true, "{last}");
    let written = last["changelog_records"].as_u64().unwrap();
    assert!(written >= 20_000, "{last}");
    assert_eq!(last["replayed_records"].as_u64(), Some(written), "{last}");
    assert!(last["rebuild_ms"].is_u64(), "{last}");
    // Restarted with that state intact, it replays nothing.
    assert_eq!(last["restore_full_rebuild"], false, "{last}");
    assert_eq!(last["restore_replayed_records"], 0, "{last}");
}

/// A committed input offset that the changelog does not reach (a lost
/// changelog, say): the aggregator opens its reader at the committed
/// offset while it restores, then goes back to where the changelog ends,
/// and every event is still counted exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_offset_the_changelog_lacks_is_reprocessed_from_where_it_ends() {
    const N: u64 = 20_000;
    let broker = Tansu::start();
    let brokers = broker.brokers();
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_smartmsg"));
    let cfg_path =
        worker_config(dir.path(), &brokers, "gap.", PARTITIONS, "agg-gap", 1000).unwrap();
    let cfg = Config::load(Some(&cfg_path)).unwrap();
    let topics = Topics::new(&cfg);
    let log = KafkaLog::connect(KafkaSettings::from_config(&cfg))
        .await
        .unwrap();
    for spec in topics.specs() {
        log.ensure_topic(&spec).await.unwrap();
    }
    let (ends, exp, _) = {
        let (b, t, s) = (brokers.clone(), topics.reactions.clone(), SynthSpec::new(N));
        tokio::task::spawn_blocking(move || produce(&b, &t, &s, PARTITIONS))
            .await
            .unwrap()
            .unwrap()
    };
    // Half of every partition committed as consumed, nothing in the
    // changelog.
    let group = cfg.kafka.group_id.clone();
    let member = log
        .join_group(&group, &topics.reactions, "gap.offsets-only")
        .await
        .unwrap();
    assert_eq!(
        common::first_assignment(member.as_ref()).await,
        (0..PARTITIONS).collect::<Vec<_>>()
    );
    let halves: Vec<u64> = ends.iter().map(|e| e / 2).collect();
    let offsets = (0..PARTITIONS)
        .map(|p| OffsetCommit {
            group: group.clone(),
            topic: topics.reactions.clone(),
            partition: p,
            next_offset: halves[p as usize],
        })
        .collect();
    member
        .writer()
        .commit(Txn {
            records: vec![],
            offsets,
        })
        .await
        .unwrap();
    member.leave().await;
    drop(member);
    assert_eq!(
        committed(&log, &group, &topics.reactions, PARTITIONS)
            .await
            .unwrap(),
        halves
    );

    let worker = Worker::spawn(bin, &cfg_path).unwrap();
    let verdict = verified(&brokers, &topics, &exp, Duration::from_secs(120)).await;
    assert!(verdict.ok, "{verdict:?}");
    assert_eq!(verdict.duplicate_finals, 0, "{verdict:?}");
    assert_eq!(
        committed(&log, &group, &topics.reactions, PARTITIONS)
            .await
            .unwrap(),
        ends
    );
    tokio::task::spawn_blocking(move || worker.stop())
        .await
        .unwrap()
        .unwrap();
}
