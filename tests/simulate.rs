//! `smartmsg simulate` against a cluster node on a real Kafka-protocol
//! broker (Tansu) and RabbitMQ. A binary of its own, so that it never runs
//! beside the 3-node tests of `cluster.rs` (their kill timing is sensitive
//! to load).

mod common;

use common::tansu::Tansu;
use common::{client, eventually};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

const PARTITIONS: u32 = 4;

/// `smartmsg simulate` against a running cluster node: it registers its
/// subscribers and a campaign through the API, reacts to the campaign's
/// messages through Kafka, and ends once the report counts every reaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_runs_a_campaign_against_a_cluster_node() {
    let broker = Tansu::start();
    let brokers = broker.brokers();
    let root = tempfile::tempdir().unwrap();
    let queue_prefix = format!("test.sim.{}.", uuid::Uuid::new_v4().simple());
    let _cleanup = common::RabbitCleanup(smartmsg::io::amqp::AmqpSettings {
        url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        prefix: queue_prefix.clone(),
        prefetch: 10,
        connection_name: "sim-cleanup".into(),
    });
    let mut node = common::daemon::ClusterNode::new(
        "sim-0",
        root.path().join("sim0"),
        &queue_prefix,
        PARTITIONS,
    );
    node.start(&brokers);
    let c = client();
    let base = node.base();
    eventually("node healthy", Duration::from_secs(60), || async {
        match c.get(format!("{base}/healthz")).send().await {
            Ok(r) if r.status() == 200 => Some(()),
            _ => None,
        }
    })
    .await;
    let base = node.base();
    let b = brokers.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_smartmsg"))
            .args([
                "simulate",
                "--api",
                &base,
                "--subscribers",
                "1000",
                "--budget",
                "200",
                "--batches",
                "2",
                "--batch-interval-secs",
                "2",
                "--reaction-delay-secs",
                "2",
                "--timeout-secs",
                "240",
            ])
            .env("SMARTMSG__BACKEND__KIND", "cluster")
            .env("SMARTMSG__KAFKA__BROKERS", &b)
            .env("SMARTMSG__KAFKA__PARTITIONS", PARTITIONS.to_string())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = common::success_stdout(&out);
    let v: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["messages_sent"], 200, "{v}");
    assert_eq!(v["sends"], 200, "{v}");
    let report = v["report"].as_array().unwrap();
    let sum = |k: &str| report.iter().map(|c| c[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("sends"), 200, "{v}");
    assert_eq!(
        sum("impressions"),
        v["impressions"].as_u64().unwrap(),
        "{v}"
    );
    assert_eq!(sum("clicks"), v["clicks"].as_u64().unwrap(), "{v}");
    assert!(v["impressions"].as_u64().unwrap() > 100, "{v}");
    // Without a cluster config it refuses, with one clear line.
    let out = Command::new(env!("CARGO_BIN_EXE_smartmsg"))
        .args(["simulate", "--api", &node.base()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a cluster config"));
    node.terminate();
}
