//! The HTTP API of an in-process node on the embedded backends: the whole
//! campaign loop end to end, reactions into reports, and every error code.

mod common;

use common::{client, eventually, now_ms, post_campaign, put_subscribers, subscribers_ndjson};
use serde_json::{json, Value};
use smartmsg::clock::SystemClock;
use smartmsg::config::Config;
use smartmsg::io::OutRecord;
use smartmsg::node::Node;
use std::sync::Arc;
use std::time::Duration;

async fn start(
    node_id: &str,
    tweak: impl FnOnce(&mut Config),
) -> (Node, String, tempfile::TempDir) {
    start_with_clock(node_id, Arc::new(SystemClock), tweak).await
}

async fn start_with_clock(
    node_id: &str,
    clock: smartmsg::clock::SharedClock,
    tweak: impl FnOnce(&mut Config),
) -> (Node, String, tempfile::TempDir) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_at(node_id, dir.path());
    tweak(&mut cfg);
    let node = Node::start(cfg, clock, true).await.unwrap();
    let base = format!("http://{}", node.http_addr.unwrap());
    (node, base, dir)
}

/// A node whose data is in `dir` (kept across restarts), and its base URL.
async fn start_in(node_id: &str, dir: &std::path::Path) -> (Node, String) {
    let node = Node::start(config_at(node_id, dir), Arc::new(SystemClock), true)
        .await
        .unwrap();
    let base = format!("http://{}", node.http_addr.unwrap());
    (node, base)
}

/// A test node's config, with its data in `dir`.
fn config_at(node_id: &str, dir: &std::path::Path) -> Config {
    let mut cfg = Config::defaults();
    cfg.node.id = node_id.into();
    cfg.storage.data_dir = dir.to_path_buf();
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.kafka.partitions = 4;
    cfg.model.retrain_interval_ms = 100;
    cfg
}

async fn status_of(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.get(url).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn campaign_body(id: &str, budget: u64, batches: i64) -> Value {
    let start = now_ms() + 300;
    json!({
        "campaign_id": id,
        "channel_id": "ch1",
        "creatives": [{"creative_id": "a", "text": "A"}, {"creative_id": "b", "text": "B"}],
        "budget": budget,
        "start_at": start,
        "end_at": start + batches * 1000,
        "batch_interval_secs": 1
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_runs_end_to_end_through_the_api() {
    let (node, base, _dir) = start("api-e2e", |_| {}).await;
    let c = client();
    assert_eq!(
        c.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    eventually("ready", Duration::from_secs(10), || async {
        (c.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            == 200)
            .then_some(())
    })
    .await;

    let r = put_subscribers(&c, &base, "ch1", subscribers_ndjson(300)).await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap()["count"], 300);
    eventually(
        "subscribers materialised",
        Duration::from_secs(10),
        || async { (node.ctx.subscribers.count("ch1") == 300).then_some(()) },
    )
    .await;

    let mut body = campaign_body("camp-1", 90, 3);
    body["command_id"] = json!("create-1");
    let r = post_campaign(&c, &base, &body).await;
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"command_id": "create-1", "campaign_id": "camp-1"})
    );

    let cmd = eventually("create applied", Duration::from_secs(10), || async {
        let (s, v) = status_of(&c, &format!("{base}/v1/commands/create-1")).await;
        (s == 200 && v["status"] == "applied").then_some(v)
    })
    .await;
    assert_eq!(cmd["campaign_id"], "camp-1");

    // A repeated command id is answered with the first outcome, not re-applied.
    let r = post_campaign(&c, &base, &body).await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap()["command_id"], "create-1");
    // The same campaign id under a new command id conflicts.
    let mut again = body.clone();
    again["command_id"] = json!("create-2");
    let r = post_campaign(&c, &base, &again).await;
    assert_eq!(r.status(), 409);
    assert_eq!(r.json::<Value>().await.unwrap()["command_id"], "create-2");

    let done = eventually("campaign completed", Duration::from_secs(20), || async {
        let (_, v) = status_of(&c, &format!("{base}/v1/campaigns/camp-1")).await;
        (v["status"] == "completed").then_some(v)
    })
    .await;
    assert_eq!(done["messages_sent"], 90);
    assert_eq!(done["batches_done"], 3);
    assert_eq!(done["batches_total"], 3);
    assert_eq!(done["budget"], 90);
    assert_eq!(done["creatives"].as_array().unwrap().len(), 2);

    let (s, list) = status_of(&c, &format!("{base}/v1/campaigns")).await;
    assert_eq!(s, 200);
    assert_eq!(list["campaigns"].as_array().unwrap().len(), 1);

    let (s, report) = status_of(&c, &format!("{base}/v1/campaigns/camp-1/report")).await;
    assert_eq!(s, 200);
    let sends: u64 = report["creatives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["sends"].as_u64().unwrap())
        .sum();
    assert_eq!(sends, 90);

    // A completed campaign cannot be paused: 409 against the read model.
    let r = c
        .post(format!("{base}/v1/campaigns/camp-1/pause"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(r.json::<Value>().await.unwrap()["command_id"].is_string());

    let metrics = common::get_text(&c, &format!("{base}/metrics")).await;
    for name in [
        "smartmsg_batches_executed_total",
        "smartmsg_messages_sent_total",
        "smartmsg_commands_total",
        "smartmsg_job_lateness_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    let (s, model) = status_of(&c, &format!("{base}/v1/model")).await;
    assert_eq!(s, 200);
    assert!(model["version"].is_u64());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_cancel_and_budget() {
    let (node, base, _dir) = start("api-lifecycle", |_| {}).await;
    let c = client();
    put_subscribers(&c, &base, "ch1", subscribers_ndjson(100)).await;
    // Far in the future: stays scheduled.
    let start = now_ms() + 3_600_000;
    let body = json!({"campaign_id": "later", "channel_id": "ch1",
        "creatives": [{"creative_id": "a", "text": "A"}], "budget": 10,
        "start_at": start, "end_at": start + 10_000, "batch_interval_secs": 1});
    assert_eq!(
        c.post(format!("{base}/v1/campaigns"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    eventually("created", Duration::from_secs(10), || async {
        let (_, v) = status_of(&c, &format!("{base}/v1/campaigns/later")).await;
        (v["status"] == "scheduled").then_some(())
    })
    .await;
    let r = c
        .post(format!("{base}/v1/campaigns/later/pause"))
        .json(&json!({"command_id": "p1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"command_id": "p1"})
    );
    eventually("paused", Duration::from_secs(10), || async {
        let (_, v) = status_of(&c, &format!("{base}/v1/campaigns/later")).await;
        (v["status"] == "paused").then_some(())
    })
    .await;
    // Pausing twice is refused by the read model.
    assert_eq!(
        c.post(format!("{base}/v1/campaigns/later/pause"))
            .send()
            .await
            .unwrap()
            .status(),
        409
    );
    assert_eq!(
        c.post(format!("{base}/v1/campaigns/later/resume"))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    eventually("resumed", Duration::from_secs(10), || async {
        let (_, v) = status_of(&c, &format!("{base}/v1/campaigns/later")).await;
        (v["status"] == "scheduled").then_some(())
    })
    .await;
    let r = c
        .put(format!("{base}/v1/campaigns/later/budget"))
        .json(&json!({"budget": 25, "command_id": "b1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    eventually("budget set", Duration::from_secs(10), || async {
        let (_, v) = status_of(&c, &format!("{base}/v1/campaigns/later")).await;
        (v["budget"] == 25).then_some(())
    })
    .await;
    assert_eq!(
        c.post(format!("{base}/v1/campaigns/later/cancel"))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    eventually("cancelled", Duration::from_secs(10), || async {
        let (_, v) = status_of(&c, &format!("{base}/v1/campaigns/later")).await;
        (v["status"] == "cancelled").then_some(())
    })
    .await;
    assert_eq!(
        c.post(format!("{base}/v1/campaigns/later/resume"))
            .send()
            .await
            .unwrap()
            .status(),
        409
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let (node, base, _dir) = start("api-errors", |c| c.http.max_body_bytes = 4096).await;
    let c = client();
    let post = |body: String| {
        let c = c.clone();
        let url = format!("{base}/v1/campaigns");
        async move {
            let r = c
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap())
        }
    };
    let (s, v) = post("{not json".into()).await;
    assert_eq!((s, v["field"].as_str()), (400, Some("body")));
    assert!(v["error"].as_str().unwrap().contains("malformed"));
    let mut body = campaign_body("x", 10, 2);
    body.as_object_mut().unwrap().remove("channel_id");
    let (s, v) = post(body.to_string()).await;
    assert_eq!((s, v["field"].as_str()), (400, Some("channel_id")));
    let mut body = campaign_body("x", 10, 2);
    body["creatives"] = json!([]);
    let (s, v) = post(body.to_string()).await;
    assert_eq!((s, v["field"].as_str()), (400, Some("creatives")));
    let mut body = campaign_body("x", 10, 2);
    body["budget"] = json!(-3);
    let (s, v) = post(body.to_string()).await;
    assert_eq!((s, v["field"].as_str()), (400, Some("budget")));
    let mut body = campaign_body("x", 10, 2);
    body["end_at"] = body["start_at"].clone();
    let (s, v) = post(body.to_string()).await;
    assert_eq!((s, v["field"].as_str()), (400, Some("end_at")));
    // Too large.
    let (s, v) = post(format!("{{\"pad\":\"{}\"}}", "x".repeat(5000))).await;
    assert_eq!(s, 413);
    assert!(v["error"].is_string());
    // Unknown things.
    let (s, _) = status_of(&c, &format!("{base}/v1/campaigns/nope")).await;
    assert_eq!(s, 404);
    let (s, _) = status_of(&c, &format!("{base}/v1/commands/nope")).await;
    assert_eq!(s, 404);
    assert_eq!(
        c.post(format!("{base}/v1/campaigns/nope/pause"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let (s, _) = status_of(&c, &format!("{base}/v1/nothing")).await;
    assert_eq!(s, 404);
    // Bad budget body.
    let r = c
        .put(format!("{base}/v1/campaigns/nope/budget"))
        .json(&json!({"budget": "lots"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "budget");
    // Bad subscribers line, nothing written.
    let r = put_subscribers(
        &c,
        &base,
        "ch1",
        "{\"user_id\":\"u1\"}\n{\"user_id\":\"u2\",\"features\":{\"age\":\"old\"}}\n",
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["field"], "features.age");
    assert!(v["error"].as_str().unwrap().starts_with("line 2"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(node.ctx.subscribers.count("ch1"), 0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_endpoints_need_the_bearer_token() {
    let (node, base, _dir) = start("api-auth", |c| c.http.auth_token = "s3cret".into()).await;
    let c = client();
    let body = campaign_body("authz", 10, 2);
    let r = post_campaign(&c, &base, &body).await;
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // So do the model, filter and classification endpoints.
    let f = json!({"filter_id": "f", "all": [{"field": "t", "gte": 1}]});
    for (method, path, body) in [
        (reqwest::Method::POST, "/v1/model/rollback", Value::Null),
        (reqwest::Method::POST, "/v1/model/resume", Value::Null),
        (reqwest::Method::POST, "/v1/filters", f),
        (reqwest::Method::DELETE, "/v1/filters/f", Value::Null),
        (reqwest::Method::POST, "/v1/classify", json!({"fields": {}})),
    ] {
        let r = c
            .request(method, format!("{base}{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = c
        .post(format!("{base}/v1/classify"))
        .bearer_auth("s3cret")
        .json(&json!({"fields": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Reads and health stay open.
    assert_eq!(
        c.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(format!("{base}/v1/campaigns"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reactions_become_report_windows_and_bad_ones_are_dead_lettered() {
    // Event time is driven by a manual clock: windows close only when told.
    let t0: i64 = 1_800_000_000_000 / 60_000 * 60_000;
    let clock = smartmsg::clock::ManualClock::new(t0 + 10_000);
    let (node, base, _dir) = start_with_clock("api-report", Arc::new(clock.clone()), |c| {
        c.aggregator.grace_ms = 1_000;
        c.aggregator.idle_close_ms = 200;
    })
    .await;
    let c = client();
    let body = json!({"campaign_id": "rep", "channel_id": "ch1",
        "creatives": [{"creative_id": "a", "text": "A"}, {"creative_id": "b", "text": "B"}],
        "budget": 20, "start_at": t0 + 3_600_000, "end_at": t0 + 3_700_000, "batch_interval_secs": 10});
    assert_eq!(
        c.post(format!("{base}/v1/campaigns"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    eventually("created", Duration::from_secs(15), || async {
        let (_, v) = status_of(&c, &format!("{base}/v1/campaigns/rep")).await;
        (v["status"] == "scheduled").then_some(())
    })
    .await;
    // 3 impressions and 2 clicks of creative a in the first minute, 1 click
    // of b in the second; plus junk.
    let ev = |id: &str, cr: &str, user: &str, action: &str, ts: i64| {
        let v = json!({"event_id": id, "campaign_id": "rep", "creative_id": cr, "user_id": user, "action": action, "ts": ts});
        OutRecord::keyed(
            &node.ctx.topics.reactions,
            user.to_string(),
            Some(v.to_string().into_bytes()),
        )
    };
    let ctx = &node.ctx;
    ctx.log
        .publish(vec![
            ev("e1", "a", "u1", "impression", t0 + 1_000),
            ev("e2", "a", "u2", "impression", t0 + 2_000),
            ev("e3", "a", "u3", "impression", t0 + 3_000),
            ev("e4", "a", "u1", "click", t0 + 4_000),
            ev("e5", "a", "u2", "click", t0 + 5_000),
            ev("e6", "b", "u4", "click", t0 + 61_000),
            OutRecord::keyed(&ctx.topics.reactions, "u9", Some(b"{broken".to_vec())),
            OutRecord::keyed(&ctx.topics.reactions, "u9", None),
        ])
        .await
        .unwrap();
    // Let the aggregators count them, then move time past every window.
    eventually("events counted", Duration::from_secs(10), || async {
        let m = c
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        m.lines()
            .any(|l| l.starts_with("smartmsg_events_aggregated_total") && l.ends_with(" 6"))
            .then_some(())
    })
    .await;
    clock.advance(10 * 60_000);
    let report = eventually("windows in the report", Duration::from_secs(15), || async {
        let (_, v) = status_of(&c, &format!("{base}/v1/campaigns/rep/report")).await;
        let total: u64 = v["series"]
            .as_array()
            .map(|a| a.iter().map(|w| w["count"].as_u64().unwrap()).sum())
            .unwrap_or(0);
        (total == 6).then_some(v)
    })
    .await;
    let a = report["creatives"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["creative_id"] == "a")
        .unwrap()
        .clone();
    assert_eq!(a["impressions"], 3);
    assert_eq!(a["clicks"], 2);
    let series = report["series"].as_array().unwrap();
    assert!(series
        .contains(&json!({"window_start": t0, "creative_id": "a", "action": "click", "count": 2})));
    assert!(series.contains(
        &json!({"window_start": t0 + 60_000, "creative_id": "b", "action": "click", "count": 1})
    ));
    // The junk went to the DLQ with reasons, the partition kept going.
    let mut dlq = Vec::new();
    for p in 0..4 {
        let mut r = ctx.log.reader(&ctx.topics.reactions_dlq, p, 0);
        for rec in r.next_batch(100, Duration::ZERO).await.unwrap() {
            dlq.push(serde_json::from_slice::<Value>(&rec.value.unwrap()).unwrap());
        }
    }
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    assert!(dlq.iter().any(
        |d| d["reason"].as_str().unwrap().starts_with("malformed") && d["payload"] == "{broken"
    ));
    assert!(dlq
        .iter()
        .any(|d| d["reason"].as_str().unwrap().contains("null")));
    // A late event (its window already emitted) is dead-lettered as late.
    ctx.log
        .publish(vec![ev("late1", "a", "u1", "click", t0 + 7_000)])
        .await
        .unwrap();
    eventually(
        "late event dead-lettered",
        Duration::from_secs(10),
        || async {
            let mut n = 0;
            for p in 0..4 {
                let mut r = ctx.log.reader(&ctx.topics.reactions_dlq, p, 0);
                for rec in r.next_batch(100, Duration::ZERO).await.unwrap() {
                    let v: Value = serde_json::from_slice(&rec.value.unwrap()).unwrap();
                    if v["reason"].as_str().unwrap().starts_with("late") {
                        n += 1;
                    }
                }
            }
            (n == 1).then_some(())
        },
    )
    .await;
    node.shutdown().await;
}

/// POST to `url` with an optional JSON body: status and body.
async fn post_json(c: &reqwest::Client, url: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = c.post(url);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_rollback_holds_training_until_resumed() {
    // No aggregator: the other tests of this binary count the process's
    // aggregated events, and these reactions are only the trainer's.
    let (node, base, _dir) = start("api-model", |c| {
        c.model.keep_versions = 3;
        c.node.roles = "commands,materializer,trainer".into();
    })
    .await;
    let c = client();
    let model_url = format!("{base}/v1/model");
    let (rollback, resume) = (
        format!("{base}/v1/model/rollback"),
        format!("{base}/v1/model/resume"),
    );
    // Nothing to go back to from the prior, and nothing held.
    assert_eq!(post_json(&c, &rollback, None).await.0, 409);
    assert_eq!(post_json(&c, &resume, None).await.0, 409);
    let ctx = node.ctx.clone();
    let sends = |from: usize, to: usize| {
        (from..to)
            .map(|i| {
                let v = json!({"event_id": format!("s{i}"), "campaign_id": "m",
                    "creative_id": "a", "user_id": format!("u{i}"), "action": "send", "ts": 1000 + i});
                OutRecord::keyed(&ctx.topics.reactions, format!("u{i}"), Some(v.to_string().into_bytes()))
            })
            .collect::<Vec<_>>()
    };
    let model_with = |examples: u64| {
        let (c, url) = (c.clone(), model_url.clone());
        async move {
            eventually("model version", Duration::from_secs(20), || async {
                let (_, m) = status_of(&c, &url).await;
                (m["examples"] == examples && m["restored_from"].is_null()).then_some(m)
            })
            .await
        }
    };
    ctx.log.publish(sends(0, 10)).await.unwrap();
    model_with(10).await;
    ctx.log.publish(sends(10, 20)).await.unwrap();
    let v = model_with(20).await["version"].as_u64().unwrap();
    assert!(v >= 2);

    // Bad bodies and a rollback against a version that is not current.
    assert_eq!(post_json(&c, &rollback, Some(json!([1]))).await.0, 400);
    let (s, e) = post_json(&c, &rollback, Some(json!({"from_version": "x"}))).await;
    assert_eq!((s, e["field"].as_str()), (400, Some("from_version")));
    let (s, e) = post_json(&c, &rollback, Some(json!({"from_version": v + 7}))).await;
    assert_eq!((s, e["version"].as_u64()), (409, Some(v)));

    // Back one version: v - 1's evidence is served again as v + 1.
    let (s, r) = post_json(&c, &rollback, Some(json!({"command_id": "rb-1"}))).await;
    assert_eq!(
        (s, r["command_id"].as_str(), r["from_version"].as_u64()),
        (202, Some("rb-1"), Some(v))
    );
    let m = eventually("rolled back", Duration::from_secs(20), || async {
        let (_, m) = status_of(&c, &model_url).await;
        (m["version"] == v + 1).then_some(m)
    })
    .await;
    assert_eq!(m["restored_from"].as_u64(), Some(v - 1));
    assert_eq!(m["training_held"], true);
    assert!(m["examples"].as_u64().unwrap() < 20, "{m}");
    assert_eq!(post_json(&c, &rollback, None).await.0, 202);
    let m = eventually("rolled back twice", Duration::from_secs(20), || async {
        let (_, m) = status_of(&c, &model_url).await;
        (m["version"] == v + 2).then_some(m)
    })
    .await;
    assert_eq!(m["restored_from"].as_u64(), Some(v - 2));

    // New evidence while held publishes nothing...
    ctx.log.publish(sends(20, 30)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(status_of(&c, &model_url).await.1["version"], v + 2);
    // ... until resumed: a fit of all of it, then training goes on.
    assert_eq!(
        post_json(&c, &resume, Some(json!({"from_version": v + 2})))
            .await
            .0,
        202
    );
    let m = model_with(30).await;
    assert_eq!(m["version"], v + 3);
    assert_eq!(m["training_held"], false);
    ctx.log.publish(sends(30, 35)).await.unwrap();
    model_with(35).await;

    // A replayed request names an old version: it does nothing.
    let stale = json!({"command_id": "old", "type": "rollback", "from_version": v, "ts": 0});
    ctx.log
        .publish(vec![OutRecord::keyed(
            &ctx.topics.model_commands,
            "model",
            Some(stale.to_string().into_bytes()),
        )])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let m = status_of(&c, &model_url).await.1;
    assert!(m["restored_from"].is_null(), "{m}");
    let metrics = common::get_text(&c, &format!("{base}/metrics")).await;
    assert!(
        metrics.contains(r#"smartmsg_model_commands_total{type="rollback",result="stale"}"#)
            || metrics.contains(r#"smartmsg_model_commands_total{result="stale",type="rollback"}"#),
        "{metrics}"
    );

    // Only `model.keep_versions` versions stay on the topic.
    let latest = m["version"].as_u64().unwrap();
    let mut last: std::collections::BTreeMap<String, bool> = Default::default();
    for r in common::read_all(ctx.log.as_ref(), &ctx.topics.models, 4).await {
        let key = String::from_utf8(r.key.unwrap()).unwrap();
        last.insert(key, r.value.is_some());
    }
    for n in 1..=latest {
        assert_eq!(
            last.get(&format!("v{n}")),
            Some(&(n + 3 > latest)),
            "v{n} of {latest}: {last:?}"
        );
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_are_registered_listed_deleted_and_classify_documents() {
    let (node, base, _dir) = start("api-filters", |_| {}).await;
    let c = client();
    let filters = format!("{base}/v1/filters");
    let classify = |fields: Value| {
        let (c, url) = (c.clone(), format!("{base}/v1/classify"));
        async move { post_json(&c, &url, Some(json!({ "fields": fields }))).await }
    };
    let sale = json!({"filter_id": "sale", "all": [
        {"field": "title", "contains_any": ["Sale", "deal"]},
        {"field": "image_count", "gte": 2}]});
    let (s, r) = post_json(&c, &filters, Some(sale)).await;
    assert_eq!((s, r["filter_id"].as_str()), (201, Some("sale")));
    // No id: one is generated. Read back at once on this node.
    let (s, r) = post_json(
        &c,
        &filters,
        Some(json!({"all": [{"field": "cat", "in": ["shoes", 7]}]})),
    )
    .await;
    assert_eq!(s, 201);
    let generated = r["filter_id"].as_str().unwrap().to_string();
    let doc = json!({"title": "Big SALE!", "image_count": 3, "cat": 7.0});
    let (s, r) = classify(doc.clone()).await;
    let mut want = vec![generated.clone(), "sale".to_string()];
    want.sort();
    assert_eq!((s, r["filter_ids"].clone()), (200, json!(want)));
    assert_eq!(
        classify(json!({"title": "wholesale", "image_count": 3}))
            .await
            .1["filter_ids"],
        json!([])
    );
    // Replacing an id answers 200.
    let narrower =
        json!({"filter_id": "sale", "all": [{"field": "title", "contains_any": ["deal"]}]});
    assert_eq!(post_json(&c, &filters, Some(narrower)).await.0, 200);
    assert_eq!(
        classify(doc.clone()).await.1["filter_ids"],
        json!([generated])
    );
    let (s, list) = status_of(&c, &filters).await;
    assert_eq!(s, 200);
    let ids: Vec<&str> = list["filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["filter_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    assert!(list["filters"].as_array().unwrap().contains(
        &json!({"filter_id": "sale", "all": [{"field": "title", "contains_any": ["deal"]}]})
    ));
    // Delete: 204, then 404; the filter no longer matches.
    let del = |id: &str| {
        let (c, url) = (c.clone(), format!("{filters}/{id}"));
        async move { c.delete(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(del(&generated).await, 204);
    assert_eq!(del(&generated).await, 404);
    assert_eq!(classify(doc).await.1["filter_ids"], json!([]));
    // Bad filters and documents: 400 naming the field.
    for (body, field) in [
        (json!({"all": []}), "all"),
        (
            json!({"all": [{"field": "t", "contains_any": [""]}]}),
            "all[0].contains_any[0]",
        ),
        (json!({"all": [{"field": "t", "in": []}]}), "all[0].in"),
        (json!({"all": [{"field": "t", "near": 1}]}), "all[0]"),
    ] {
        let (s, e) = post_json(&c, &filters, Some(body.clone())).await;
        assert_eq!((s, e["field"].as_str()), (400, Some(field)), "{body}: {e}");
    }
    let (s, e) = post_json(
        &c,
        &format!("{base}/v1/classify"),
        Some(json!({"fields": 3})),
    )
    .await;
    assert_eq!((s, e["field"].as_str()), (400, Some("fields")));
    let r = c.post(&filters).body("{nope").send().await.unwrap();
    assert_eq!(r.status(), 400);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contents_are_classified_into_content_matches_and_bad_ones_dead_lettered() {
    let (node, base, _dir) = start("api-percolate", |_| {}).await;
    let c = client();
    for f in [
        json!({"filter_id": "shoes", "all": [{"field": "category", "in": ["shoes"]}]}),
        json!({"filter_id": "sale", "all": [{"field": "title", "contains_any": ["sale"]}, {"field": "images", "gte": 2}]}),
    ] {
        assert_eq!(
            post_json(&c, &format!("{base}/v1/filters"), Some(f))
                .await
                .0,
            201
        );
    }
    let ctx = node.ctx.clone();
    let doc = |id: &str, fields: Value| {
        OutRecord::keyed(
            &ctx.topics.contents,
            id.to_string(),
            Some(
                json!({"document_id": id, "fields": fields})
                    .to_string()
                    .into_bytes(),
            ),
        )
    };
    ctx.log
        .publish(vec![
            doc(
                "d1",
                json!({"category": "shoes", "title": "Shoe SALE", "images": 3}),
            ),
            doc(
                "d2",
                json!({"category": "hats", "title": "sale", "images": 1}),
            ),
            doc(
                "d3",
                json!({"category": "hats", "title": "Sale!", "images": [1, 5]}),
            ),
            OutRecord::keyed(&ctx.topics.contents, "bad1", Some(b"{oops".to_vec())),
            OutRecord::keyed(
                &ctx.topics.contents,
                "bad2",
                Some(br#"{"document_id":"x"}"#.to_vec()),
            ),
        ])
        .await
        .unwrap();
    let read = |topic: String| {
        let log = ctx.log.clone();
        async move { common::read_all(log.as_ref(), &topic, 4).await }
    };
    let matches = eventually("content matches", Duration::from_secs(20), || async {
        let recs = read(ctx.topics.content_matches.clone()).await;
        (recs.len() >= 2).then_some(recs)
    })
    .await;
    let mut got: Vec<(String, Value)> = matches
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
            assert_eq!(
                r.key.as_deref(),
                v["document_id"].as_str().map(str::as_bytes)
            );
            assert!(v["ts"].is_i64(), "{v}");
            (
                v["document_id"].as_str().unwrap().to_string(),
                v["filter_ids"].clone(),
            )
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    // d2 matches nothing (one image): no record.
    assert_eq!(
        got,
        vec![
            ("d1".to_string(), json!(["sale", "shoes"])),
            ("d3".to_string(), json!(["sale"]))
        ]
    );
    let dlq = eventually("content dead letters", Duration::from_secs(20), || async {
        let recs = read(ctx.topics.contents_dlq.clone()).await;
        (recs.len() >= 2).then_some(recs)
    })
    .await;
    let reasons: Vec<String> = dlq
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
            v["reason"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.starts_with("malformed")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("fields")), "{reasons:?}");
    node.shutdown().await;
}

/// User targeting end to end: the trainer counts each send over its
/// subscriber's features (subscribers and the campaign's channel from the
/// read model), the model it publishes carries them, and a selection by
/// that model picks the subscribers whose feature the clicks followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trainer_learns_from_subscriber_features() {
    use smartmsg::domain::model::BatchSpec;
    // No aggregator: the other tests of this binary count the process's
    // aggregated events.
    let (node, base, _dir) = start("api-features", |c| {
        c.node.roles = "commands,materializer,trainer".into();
    })
    .await;
    let c = client();
    // 400 subscribers; "x" from 0 to 1, "y" noise.
    let ndjson: String = (0..400)
        .map(|i| {
            format!(
                "{{\"user_id\":\"f{i:03}\",\"features\":{{\"x\":{},\"y\":{}}}}}\n",
                i as f64 / 400.0,
                (i * 37 % 400) as f64 / 400.0
            )
        })
        .collect();
    let r = put_subscribers(&c, &base, "chf", ndjson).await;
    assert_eq!(r.status(), 202);
    let t0 = now_ms();
    let body = json!({"campaign_id": "feat", "channel_id": "chf",
        "creatives": [{"creative_id": "a", "text": "A"}, {"creative_id": "b", "text": "B"}],
        "budget": 100, "start_at": t0 + 3_600_000, "end_at": t0 + 3_700_000, "batch_interval_secs": 10});
    let r = post_campaign(&c, &base, &body).await;
    assert_eq!(r.status(), 202);
    let ctx = node.ctx.clone();
    eventually(
        "campaign and subscribers materialised",
        Duration::from_secs(15),
        || async {
            let (_, v) = status_of(&c, &format!("{base}/v1/campaigns/feat")).await;
            (v["status"] == "scheduled" && ctx.subscribers.count("chf") == 400).then_some(())
        },
    )
    .await;
    // The first 200 got a send (alternating creatives); those with x > 0.3
    // clicked, whatever the creative.
    let mut recs = Vec::new();
    for i in 0..200 {
        let user = format!("f{i:03}");
        let creative = if i % 2 == 0 { "a" } else { "b" };
        let mut ev = |action: &str, ts: i64| {
            let v = json!({"event_id": format!("{user}/{action}"), "campaign_id": "feat",
                "creative_id": creative, "user_id": user, "action": action, "ts": ts});
            recs.push(OutRecord::keyed(
                &ctx.topics.reactions,
                user.clone(),
                Some(v.to_string().into_bytes()),
            ));
        };
        ev("send", t0);
        if i as f64 / 400.0 > 0.3 {
            ev("click", t0 + 5_000);
        }
    }
    ctx.log.publish(recs).await.unwrap();
    let m = eventually(
        "a model of the 200 sends",
        Duration::from_secs(20),
        || async {
            let (_, m) = status_of(&c, &format!("{base}/v1/model")).await;
            (m["examples"] == 200).then_some(m)
        },
    )
    .await;
    assert_eq!(m["metrics"]["featured_examples"], 200.0, "{m}");
    let model = ctx.model.load_full();
    let arm = model.arm("feat", "a");
    assert_eq!((arm.sends, arm.clicks), (100, 39));
    assert_eq!(arm.linear.names, vec!["x", "y"]);
    // The next batch from the 200 not yet messaged: the high-x ones.
    let exclude: std::collections::HashSet<String> = (0..200).map(|i| format!("f{i:03}")).collect();
    let pop = ctx.subscribers.population("chf").unwrap();
    let creatives = vec!["a".to_string(), "b".to_string()];
    let picks = model.select_batch(
        &BatchSpec {
            campaign: "feat",
            creatives: &creatives,
            exclude: &exclude,
            size: 50,
            seed: 1,
        },
        &pop,
        32,
    );
    assert_eq!(picks.len(), 50);
    let mut picked: Vec<usize> = picks
        .iter()
        .map(|(u, _)| u[1..].parse::<usize>().unwrap())
        .collect();
    picked.sort_unstable();
    assert!(picked.iter().all(|i| *i >= 350), "{picked:?}");
    node.shutdown().await;
}

/// A batch chooses from the subscribers as they are when it runs: the
/// targeting actor keeps the last channel's table between batches, and a
/// change to the subscribers makes it read the table again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_added_between_batches_are_chosen() {
    let (node, base, _dir) = start("api-newsubs", |_| {}).await;
    let c = client();
    let put = |from: usize, to: usize| {
        let body: String = (from..to)
            .map(|i| format!("{{\"user_id\":\"n{i}\",\"features\":{{}}}}\n"))
            .collect();
        c.put(format!("{base}/v1/channels/chn/subscribers"))
            .body(body)
            .send()
    };
    assert_eq!(put(0, 5).await.unwrap().status(), 202);
    let ctx = node.ctx.clone();
    eventually("5 subscribers", Duration::from_secs(10), || async {
        (ctx.subscribers.count("chn") == 5).then_some(())
    })
    .await;
    // Two batches, 3 s apart, 5 messages each.
    let start = now_ms() + 1_500;
    let body = json!({"campaign_id": "grow", "channel_id": "chn",
        "creatives": [{"creative_id": "a", "text": "A"}], "budget": 10,
        "start_at": start, "end_at": start + 6_000, "batch_interval_secs": 3});
    let r = post_campaign(&c, &base, &body).await;
    assert_eq!(r.status(), 202);
    let url = format!("{base}/v1/campaigns/grow");
    eventually("the first batch", Duration::from_secs(10), || async {
        let (_, v) = status_of(&c, &url).await;
        (v["batches_done"] == 1).then_some(())
    })
    .await;
    let (_, v) = status_of(&c, &url).await;
    assert_eq!(v["messages_sent"], 5, "{v}");
    // Five more before the second batch: it messages them.
    assert_eq!(put(5, 10).await.unwrap().status(), 202);
    let v = eventually("completed", Duration::from_secs(15), || async {
        let (_, v) = status_of(&c, &url).await;
        (v["status"] == "completed").then_some(v)
    })
    .await;
    assert_eq!(v["messages_sent"], 10, "{v}");
    node.shutdown().await;
}

/// A batch whose transaction did not commit, seen in the log as a broker
/// that shows aborted records shows it (Tansu: BROKERS.md), with only part
/// of its outbound messages: the restarted owner runs the batch again,
/// with that attempt's selection, and every message of it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncommitted_batch_runs_again_with_its_selection() {
    use smartmsg::domain::campaign::{execute_command_id, Event, EventBody};
    use smartmsg::domain::partition::partition_for;
    let dir = tempfile::tempdir().unwrap();
    let (node, base) = start_in("api-attempt", dir.path()).await;
    let c = client();
    let r = put_subscribers(&c, &base, "cha", subscribers_ndjson(20)).await;
    assert_eq!(r.status(), 202);
    // Two batches of two, the first due once the node has restarted.
    let start = now_ms() + 5_000;
    let body = json!({"campaign_id": "att", "channel_id": "cha",
        "creatives": [{"creative_id": "a", "text": "A"}, {"creative_id": "b", "text": "B"}],
        "budget": 4, "start_at": start, "end_at": start + 2_000, "batch_interval_secs": 1});
    let r = post_campaign(&c, &base, &body).await;
    assert_eq!(r.status(), 202);
    let ctx = node.ctx.clone();
    let (events_topic, outbound_topic) = (ctx.topics.events.clone(), ctx.topics.outbound.clone());
    let p = partition_for(b"att", 4);
    let history = eventually("the campaign's events", Duration::from_secs(10), || async {
        let evs: Vec<Event> = common::read_all(&*ctx.log, &events_topic, 4)
            .await
            .into_iter()
            .filter_map(|r| serde_json::from_slice::<Event>(r.value.as_deref()?).ok())
            .filter(|e| e.campaign_id == "att")
            .collect();
        (evs.len() >= 2).then_some(evs)
    })
    .await;
    let seq = history.iter().map(|e| e.seq).max().unwrap();
    // The attempt: batch 0 to u7 and u11 by a model version no node has,
    // its command beyond any committed offset, and u7's message only.
    let attempt = |seq: u64, body: EventBody| {
        let e = Event {
            campaign_id: "att".into(),
            seq,
            command_id: "exec-attempt".into(),
            ts: now_ms(),
            command_offset: Some(1_000_000),
            body,
        };
        OutRecord::keyed(&events_topic, "att", Some(serde_json::to_vec(&e).unwrap()))
            .to_partition(p)
    };
    let message = |user: &str, creative: &str| {
        let v = json!({"campaign_id": "att", "batch": 0, "user_id": user,
            "creative_id": creative, "model_version": 777, "ts": now_ms()});
        OutRecord::keyed(&outbound_topic, user, Some(v.to_string().into_bytes()))
    };
    ctx.log
        .publish(vec![
            attempt(seq + 1, EventBody::Started),
            attempt(
                seq + 2,
                EventBody::BatchExecuted {
                    batch: 0,
                    due_at: start,
                    size: 2,
                    model_version: 777,
                    assignments: [
                        ("a".to_string(), vec!["u7".to_string()]),
                        ("b".to_string(), vec!["u11".to_string()]),
                    ]
                    .into(),
                },
            ),
            attempt(
                seq + 3,
                EventBody::BatchScheduled {
                    batch: 1,
                    due_at: start + 1_000,
                    execute_command_id: execute_command_id("att", 1, seq + 3),
                },
            ),
            message("u7", "a"),
        ])
        .await
        .unwrap();
    drop(ctx);
    node.shutdown().await;

    let (node, base) = start_in("api-attempt", dir.path()).await;
    let url = format!("{base}/v1/campaigns/att");
    let v = eventually("completed", Duration::from_secs(20), || async {
        let (_, v) = status_of(&c, &url).await;
        (v["status"] == "completed" && v["batches_done"] == 2).then_some(v)
    })
    .await;
    assert_eq!(v["messages_sent"], 4, "{v}");
    let ctx = node.ctx.clone();
    let mut batch0: Vec<(String, String, u64)> = Vec::new();
    let mut users: Vec<String> = Vec::new();
    for r in common::read_all(&*ctx.log, &ctx.topics.outbound, 4).await {
        let m: Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        if m["campaign_id"] != "att" {
            continue;
        }
        let user = m["user_id"].as_str().unwrap().to_string();
        if m["batch"] == 0 {
            batch0.push((
                user.clone(),
                m["creative_id"].as_str().unwrap().to_string(),
                m["model_version"].as_u64().unwrap(),
            ));
        }
        users.push(user);
    }
    batch0.sort();
    batch0.dedup();
    assert_eq!(
        batch0,
        [
            ("u11".to_string(), "b".to_string(), 777),
            ("u7".to_string(), "a".to_string(), 777)
        ],
        "batch 0 ran again with the attempt's selection"
    );
    users.sort();
    users.dedup();
    assert_eq!(users.len(), 4, "one message per user: {users:?}");
    node.shutdown().await;
}
