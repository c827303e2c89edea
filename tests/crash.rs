//! The daemon as a child process: SIGKILLed in the middle of running
//! campaigns and started again on the same data dir, it loses no campaign,
//! command or scheduled job and executes no batch twice; SIGTERM drains and
//! exits cleanly. The logs are checked from the outside afterwards.

mod common;

use common::{
    all_completed, client, eventually, free_port, get_json, now_ms, read_all, subscribers_ndjson,
};
use serde_json::{json, Value};
use smartmsg::domain::campaign::{Event, EventBody};
use smartmsg::io::embedded_log::EmbeddedLog;
use smartmsg::io::EventLog;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn spawn(data: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_smartmsg"))
        .arg("run")
        .env("SMARTMSG__STORAGE__DATA_DIR", data)
        .env("SMARTMSG__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("SMARTMSG__NODE__ID", "crash-test")
        .env("SMARTMSG__KAFKA__PARTITIONS", "4")
        .env("SMARTMSG__LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("daemon starts")
}

async fn wait_healthy(base: &str) {
    let c = client();
    eventually("daemon healthy", Duration::from_secs(30), || async {
        match c.get(format!("{base}/healthz")).send().await {
            Ok(r) if r.status() == 200 => Some(()),
            _ => None,
        }
    })
    .await;
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY-free: send SIGTERM through the kill command to our own child.
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    for _ in 0..600 {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    panic!("daemon did not exit on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_loses_nothing_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn(dir.path(), port);
    wait_healthy(&base).await;
    let c = client();
    let r = common::put_subscribers(&c, &base, "ch", subscribers_ndjson(1000)).await;
    assert_eq!(r.status(), 202);

    // Five campaigns of 6 one-second batches, 60 messages each.
    let start = now_ms() + 1_500;
    for i in 0..5 {
        let body = json!({"campaign_id": format!("k{i}"), "command_id": format!("create-k{i}"),
            "channel_id": "ch", "creatives": [{"creative_id": "x", "text": "X"}, {"creative_id": "y", "text": "Y"}],
            "budget": 60, "start_at": start, "end_at": start + 6_000, "batch_interval_secs": 1});
        let r = common::post_campaign(&c, &base, &body).await;
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
    }
    // Let a few batches run, then kill -9 in the middle.
    tokio::time::sleep(Duration::from_millis(3_800)).await;
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = spawn(dir.path(), port);
    wait_healthy(&base).await;
    all_completed(&c, &base, 5, Duration::from_secs(60)).await;
    for i in 0..5 {
        let v = get_json(&c, &format!("{base}/v1/campaigns/k{i}"))
            .await
            .expect("the campaign's JSON");
        assert_eq!(v["messages_sent"], 60, "{v}");
        assert_eq!(v["batches_done"], 6, "{v}");
        let cmd = get_json(&c, &format!("{base}/v1/commands/create-k{i}"))
            .await
            .expect("the command's JSON");
        assert_eq!(cmd["status"], "applied");
    }
    let status = terminate(&mut child);
    assert!(status.success(), "graceful exit on SIGTERM: {status:?}");

    // Inspect the logs from outside the (stopped) daemon.
    let db = sled::open(dir.path().join("sled")).unwrap();
    let log = EmbeddedLog::open(&db).unwrap();
    let mut events: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for rec in read_all(&log, "smartmsg.campaign-events", 4).await {
        let e: Event = serde_json::from_slice(&rec.value.unwrap()).unwrap();
        events.entry(e.campaign_id.clone()).or_default().push(e);
    }
    assert_eq!(events.len(), 5);
    for (id, evs) in &events {
        let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
        let want: Vec<u64> = (1..=evs.len() as u64).collect();
        assert_eq!(seqs, want, "{id}: seq gapless, no duplicate");
        let batches: Vec<u64> = evs
            .iter()
            .filter_map(|e| match e.body {
                EventBody::BatchExecuted { batch, .. } => Some(batch),
                _ => None,
            })
            .collect();
        assert_eq!(
            batches,
            vec![0, 1, 2, 3, 4, 5],
            "{id}: every batch exactly once"
        );
        // Each command's events appear once: never both applied and rejected.
        let mut by_command: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for e in evs {
            let kind = if matches!(e.body, EventBody::CommandRejected { .. }) {
                "rejected"
            } else {
                "applied"
            };
            by_command.entry(&e.command_id).or_default().insert(kind);
        }
        assert!(
            by_command.values().all(|k| k.len() == 1),
            "{id}: {by_command:?}"
        );
    }
    let mut pairs = HashSet::new();
    let mut total = 0;
    for rec in read_all(&log, "smartmsg.outbound-messages", 4).await {
        let v: Value = serde_json::from_slice(&rec.value.unwrap()).unwrap();
        total += 1;
        assert!(
            pairs.insert((
                v["campaign_id"].as_str().unwrap().to_string(),
                v["user_id"].as_str().unwrap().to_string()
            )),
            "a subscriber got two messages of one campaign: {v}"
        );
    }
    assert_eq!(
        total, 300,
        "5 campaigns x 60 messages, none lost or doubled"
    );
    assert!(log.partitions("smartmsg.campaign-events").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut first = spawn(dir.path(), port);
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base).await;

    let second = Command::new(env!("CARGO_BIN_EXE_smartmsg"))
        .arg("run")
        .env("SMARTMSG__STORAGE__DATA_DIR", dir.path())
        .env(
            "SMARTMSG__HTTP__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("SMARTMSG__NODE__ID", "crash-test-2")
        .env("SMARTMSG__LOG__LEVEL", "warn")
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1), "{second:?}");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("in use by another smartmsg process"),
        "one clear line: {err}"
    );
    // The first daemon is untouched.
    let r = client()
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(terminate(&mut first).success());
}
