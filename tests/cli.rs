//! The command line: `check-config` prints the effective config or every
//! error at once; `run` refuses bad config with a one-line error.

mod common;

use std::process::Command;

fn smartmsg() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_smartmsg"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SMARTMSG__") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn check_config_prints_the_effective_config() {
    let out = smartmsg()
        .arg("check-config")
        .env("SMARTMSG__HTTP__LISTEN", "127.0.0.1:18080")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:18080\""), "{text}");
    assert!(text.contains("[aggregator]"), "{text}");
}

#[test]
fn check_config_reports_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[http]\nlisten = \"nowhere\"\nbogus = 1\n").unwrap();
    let out = smartmsg()
        .arg("check-config")
        .arg("--config")
        .arg(&file)
        .env("SMARTMSG__KAFKA__PARTITIONS", "eight")
        .env("SMARTMSG__NOPE__KEY", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    for want in [
        "http.bogus",
        "SMARTMSG__KAFKA__PARTITIONS",
        "nope.key",
        "http.listen",
    ] {
        assert!(err.contains(want), "missing {want} in: {err}");
    }
}

#[test]
fn run_refuses_bad_config_in_one_line() {
    let out = smartmsg()
        .arg("run")
        .env("SMARTMSG__BACKEND__KIND", "cloud")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("backend.kind"), "{err}");
}

#[test]
fn shipped_config_files_are_valid() {
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config")).unwrap() {
        let path = entry.unwrap().path();
        let out = smartmsg()
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn demo_runs_a_campaign_and_prints_the_report() {
    let out = smartmsg()
        .args([
            "demo",
            "--subscribers",
            "3000",
            "--budget",
            "900",
            "--batches",
            "6",
            "--speed",
            "120",
        ])
        .output()
        .unwrap();
    let text = common::success_stdout(&out);
    assert!(
        text.contains("== report: demo-campaign (900 messages"),
        "{text}"
    );
    assert!(text.contains("batch  6/6"), "{text}");
    assert!(text.contains("targeting vs random"), "{text}");
}

#[test]
fn bench_delay_queue_prints_its_json_line() {
    let out = smartmsg()
        .args([
            "bench",
            "delay-queue",
            "--jobs",
            "300",
            "--spread-secs",
            "3",
            "--order",
            "random",
        ])
        .output()
        .unwrap();
    let text = common::success_stdout(&out);
    let last = text.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["jobs"], 300);
    assert_eq!(v["order"], "random");
    assert_eq!(v["fired"], 300);
    assert_eq!(v["lost"], 0);
    for k in ["p50", "p99", "max"] {
        assert!(v["lateness_ms"][k].is_number(), "{v}");
    }
    assert!(v["publish_jobs_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_ingest_counts_every_valid_record_and_prints_its_json_line() {
    let out = smartmsg()
        .args(["bench", "ingest", "--events", "30000", "--rounds", "2"])
        .output()
        .unwrap();
    let text = common::success_stdout(&out);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(v["events"], 30000);
    // The synthetic input holds bad and late records on purpose; the bench
    // itself fails unless every valid one was counted.
    let (valid, rejected) = (
        v["valid"].as_u64().unwrap(),
        v["rejected"].as_u64().unwrap(),
    );
    assert_eq!(valid + rejected, 30000, "{v}");
    assert!(rejected > 0 && valid > 29_000, "{v}");
    assert!(v["windows_emitted"].as_u64().unwrap() > 0, "{v}");
    for k in ["parse_ns_per_event", "parse_and_count_ns_per_event"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{v}");
    }
}

#[test]
fn bench_percolate_agrees_with_brute_force_and_prints_the_contracts_fields() {
    let out = smartmsg()
        .args([
            "bench",
            "percolate",
            "--filters",
            "2000",
            "--docs",
            "2000",
            "--brute-force-docs",
            "300",
        ])
        .output()
        .unwrap();
    let text = common::success_stdout(&out);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(
        (v["filters"].as_u64(), v["docs"].as_u64()),
        (Some(2000), Some(2000))
    );
    assert_eq!(v["verified"], true, "{v}");
    assert!(v["matches_per_doc"].as_f64().unwrap() > 0.0, "{v}");
    for k in [
        "docs_per_s_per_core",
        "brute_force_docs_per_s_per_core",
        "speedup",
    ] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {v}");
    }
    // Bad arguments: one clear line, no JSON.
    let out = smartmsg()
        .args(["bench", "percolate", "--filters", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be > 0"));
}

#[test]
fn bench_model_learns_and_prints_the_contracts_fields() {
    let out = smartmsg()
        .args(["bench", "model", "--seeds", "1,2"])
        .output()
        .unwrap();
    let text = common::success_stdout(&out);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let seeds = v["seeds"].as_array().unwrap();
    assert_eq!(seeds.len(), 2, "{v}");
    for s in seeds {
        assert!(s["seed"].is_u64(), "{s}");
        let (vs_oracle, lift) = (
            s["clicks_vs_oracle"].as_f64().unwrap(),
            s["lift_share"].as_f64().unwrap(),
        );
        assert!(vs_oracle > 0.0 && vs_oracle <= 1.0, "{s}");
        // Learning pays: better than random, and better than choosing the
        // creative alone (users at random).
        assert!(lift > 0.0, "{s}");
        assert!(
            lift > s["creative_only_lift_share"].as_f64().unwrap(),
            "{s}"
        );
        let eff: Vec<f64> = s["batch_efficiency"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_f64().unwrap())
            .collect();
        assert_eq!(eff.len(), 12, "{s}");
        // The last batches are spent better than the first (the prior's).
        let late = eff[8..].iter().sum::<f64>() / 4.0;
        assert!(late > eff[0], "{s}");
    }
    let out = smartmsg()
        .args(["bench", "model", "--budget", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("budget"));
}

#[test]
fn bench_targeting_picks_the_best_and_prints_the_contracts_fields() {
    let out = smartmsg()
        .args([
            "bench",
            "targeting",
            "--users",
            "50000",
            "--batch",
            "1000",
            "--repeat",
            "2",
        ])
        .output()
        .unwrap();
    let text = common::success_stdout(&out);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(
        (
            v["users"].as_u64(),
            v["creatives"].as_u64(),
            v["features"].as_u64()
        ),
        (Some(50000), Some(4), Some(16)),
        "{v}"
    );
    for k in ["score_topk_ms", "thompson_ms"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {v}");
    }
    // The chosen 2 % are far better than the average subscriber.
    assert!(
        v["chosen_best_rate"].as_f64().unwrap()
            > v["population_best_rate"].as_f64().unwrap() + 0.01,
        "{v}"
    );
    let out = smartmsg()
        .args(["bench", "targeting", "--features", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be > 0"));
}
