//! Cluster mode against a real Kafka-protocol broker (Tansu): three daemons
//! as child processes share the work through the consumer group; commands
//! are posted to random nodes while one node is SIGKILLed and restarted.
//! Afterwards `campaign-events` (read_committed, deduplicated by
//! (campaign_id, seq) because Tansu shows aborted transactions) holds each
//! accepted command exactly once, per-campaign seq is gapless, and every
//! node's read model agrees with the log.

mod common;

use common::tansu::Tansu;
use common::{client, eventually, now_ms};
use futures::future;
use rand::Rng;
use serde_json::{json, Value};
use smartmsg::config::Compression;
use smartmsg::domain::campaign::{Event, EventBody};
use smartmsg::io::kafka::{KafkaLog, KafkaSettings};
use smartmsg::io::{EventLog, OutRecord};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

const PARTITIONS: u32 = 6;

type Node = common::daemon::ClusterNode;

async fn healthy(base: &str) {
    let c = client();
    eventually("node healthy", Duration::from_secs(60), || async {
        match c.get(format!("{base}/healthz")).send().await {
            Ok(r) if r.status() == 200 => Some(()),
            _ => None,
        }
    })
    .await;
}

/// Three daemons with isolated RabbitMQ queue names (deleted when the
/// returned guard drops): one first, so the topics exist, then the others.
async fn start_nodes(
    tag: &str,
    brokers: &str,
    root: &std::path::Path,
) -> (common::RabbitCleanup, Vec<Node>) {
    let queue_prefix = format!("test.{tag}.{}.", uuid::Uuid::new_v4().simple());
    let cleanup = common::RabbitCleanup(smartmsg::io::amqp::AmqpSettings {
        url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        prefix: queue_prefix.clone(),
        prefetch: 10,
        connection_name: format!("{tag}-cleanup"),
    });
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| {
            Node::new(
                &format!("{tag}-{i}"),
                root.join(format!("{tag}{i}")),
                &queue_prefix,
                PARTITIONS,
            )
        })
        .collect();
    nodes[0].start(brokers);
    healthy(&nodes[0].base()).await;
    nodes[1].start(brokers);
    nodes[2].start(brokers);
    for n in &nodes {
        healthy(&n.base()).await;
    }
    (cleanup, nodes)
}

/// Campaign events deduplicated by identity (campaign_id, seq), the last
/// record winning: Tansu shows records of aborted transactions too.
async fn read_events(log: &KafkaLog) -> BTreeMap<(String, u64), Event> {
    let mut by_id = BTreeMap::new();
    for rec in common::read_all(log, "smartmsg.campaign-events", PARTITIONS).await {
        let e: Event = serde_json::from_slice(&rec.value.unwrap()).unwrap();
        by_id.insert((e.campaign_id.clone(), e.seq), e);
    }
    by_id
}

/// Post to a random live node; retry on another node when one is down.
async fn post(c: &reqwest::Client, nodes: &[Node], path: &str, body: &Value) -> u16 {
    for attempt in 0..60 {
        let n = &nodes[rand::thread_rng().gen_range(0..nodes.len())];
        if !n.is_running() {
            continue;
        }
        match c
            .request(
                if path.ends_with("/budget") {
                    reqwest::Method::PUT
                } else {
                    reqwest::Method::POST
                },
                format!("{}{path}", n.base()),
            )
            .json(body)
            .send()
            .await
        {
            Ok(r) if r.status().is_server_error() => {}
            Ok(r) => return r.status().as_u16(),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50 * (attempt + 1).min(10))).await;
    }
    panic!("no node accepted {path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_killed_every_command_applied_exactly_once() {
    let tansu = Tansu::start();
    let brokers = tansu.brokers();
    let root = tempfile::tempdir().unwrap();
    let (_cleanup, mut nodes) = start_nodes("node", &brokers, root.path()).await;
    let c = client();

    // 200 campaigns, far in the future (no batches fire during the test).
    let campaigns = 200;
    let start = now_ms() + 3_600_000;
    for i in 0..campaigns {
        let body = json!({"campaign_id": format!("c{i}"), "command_id": format!("c{i}-create"),
            "channel_id": "ch", "creatives": [{"creative_id": "a", "text": "A"}],
            "budget": 100, "start_at": start, "end_at": start + 600_000, "batch_interval_secs": 60});
        assert_eq!(post(&c, &nodes, "/v1/campaigns", &body).await, 202);
    }
    // Every node's read model knows every campaign before budgets are set.
    for n in &nodes {
        let base = n.base();
        eventually(
            "campaigns materialised",
            Duration::from_secs(120),
            || async { (common::campaigns(&c, &base).await?.len() == campaigns).then_some(()) },
        )
        .await;
    }
    // 1,800 budget commands to random nodes; node-1 is SIGKILLed at a third
    // and restarted at two thirds.
    let mut expected_budget: HashMap<String, u64> = HashMap::new();
    let mut command_ids = Vec::new();
    let total = campaigns * 9;
    for k in 0..total {
        if k == total / 3 {
            nodes[1].kill9();
        }
        if k == 2 * total / 3 {
            let b = brokers.clone();
            nodes[1].start(&b);
        }
        let i = k % campaigns;
        let round = k / campaigns;
        let id = format!("c{i}");
        let budget = 200 + round as u64;
        let cmd_id = format!("c{i}-budget-{round}");
        let body = json!({"budget": budget, "command_id": cmd_id});
        let status = post(&c, &nodes, &format!("/v1/campaigns/{id}/budget"), &body).await;
        assert_eq!(status, 202, "{cmd_id}");
        expected_budget.insert(id, budget);
        command_ids.push(cmd_id);
    }
    healthy(&nodes[1].base()).await;

    // Every command ends applied, visible on every node.
    for n in &nodes {
        let base = n.base();
        for id in command_ids.iter().step_by(97) {
            eventually("command applied", Duration::from_secs(120), || async {
                let v = common::get_json(&c, &format!("{base}/v1/commands/{id}")).await?;
                (v["status"] == "applied").then_some(())
            })
            .await;
        }
    }
    // The log, deduplicated by identity (Tansu shows aborted records too).
    let log = KafkaLog::connect(KafkaSettings {
        brokers: brokers.clone(),
        session_timeout_ms: 6000,
        replication_factor: 1,
        compression: Compression::Lz4,
        client_id: "checker".into(),
    })
    .await
    .unwrap();
    let seen = std::sync::atomic::AtomicUsize::new(0);
    let events = tokio::time::timeout(
        Duration::from_secs(120),
        eventually(
            "every command in the log",
            Duration::from_secs(150),
            || async {
                let ev = read_events(&log).await;
                seen.store(ev.len(), std::sync::atomic::Ordering::SeqCst);
                (ev.len() == campaigns * 11).then_some(ev)
            },
        ),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "timed out waiting for every command in the log: {} events of {}",
            seen.load(std::sync::atomic::Ordering::SeqCst),
            campaigns * 11
        )
    });
    let mut per_campaign: BTreeMap<String, Vec<&Event>> = BTreeMap::new();
    for e in events.values() {
        per_campaign
            .entry(e.campaign_id.clone())
            .or_default()
            .push(e);
    }
    assert_eq!(per_campaign.len(), campaigns);
    for (id, evs) in &per_campaign {
        let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=11).collect::<Vec<u64>>(), "{id}: gapless seq");
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for e in evs {
            assert!(
                !matches!(e.body, EventBody::CommandRejected { .. }),
                "{id}: {e:?}"
            );
            *count.entry(&e.command_id).or_default() += 1;
        }
        assert_eq!(count.len(), 10, "{id}: 10 commands");
        assert_eq!(
            count[format!("{id}-create").as_str()],
            2,
            "created + batch_scheduled"
        );
        for round in 0..9 {
            assert_eq!(
                count[format!("{id}-budget-{round}").as_str()],
                1,
                "{id} round {round}"
            );
        }
    }
    // Every node's read model agrees with the log.
    for n in &nodes {
        let base = n.base();
        eventually("read model agrees", Duration::from_secs(60), || async {
            let list = common::campaigns(&c, &base).await?;
            let ok = list.len() == campaigns
                && list.iter().all(|camp| {
                    let id = camp["campaign_id"].as_str().unwrap_or_default();
                    camp["budget"].as_u64() == expected_budget.get(id).copied()
                        && camp["status"] == "scheduled"
                });
            ok.then_some(())
        })
        .await;
    }
    for n in nodes.iter_mut() {
        n.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_killed_execute_every_batch_exactly_once_through_rabbitmq() {
    let tansu = Tansu::start();
    let brokers = tansu.brokers();
    let root = tempfile::tempdir().unwrap();
    let (_cleanup, mut nodes) = start_nodes("bnode", &brokers, root.path()).await;
    let c = client();
    let r =
        common::put_subscribers(&c, &nodes[0].base(), "ch", common::subscribers_ndjson(500)).await;
    assert_eq!(r.status(), 202);
    for n in &nodes {
        let base = n.base();
        eventually("ready", Duration::from_secs(60), || async {
            let r = c.get(format!("{base}/readyz")).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
    }
    // Let every node materialise the subscribers before batches run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let campaigns = 50;
    let start = now_ms() + 4_000;
    for i in 0..campaigns {
        let body = json!({"campaign_id": format!("b{i}"), "channel_id": "ch",
            "creatives": [{"creative_id": "a", "text": "A"}, {"creative_id": "b", "text": "B"}],
            "budget": 50, "start_at": start, "end_at": start + 5_000, "batch_interval_secs": 1});
        assert_eq!(post(&c, &nodes, "/v1/campaigns", &body).await, 202);
    }
    // Mid-run, SIGKILL a node: the jobs it holds unacked go back to the
    // ready queue and its partitions to the others. It comes back later (its
    // restart also fences the transaction it left open, which read_committed
    // readers of a broker without transaction timeouts wait for).
    let kill_at = start + 2_500;
    tokio::time::sleep(Duration::from_millis((kill_at - now_ms()).max(0) as u64)).await;
    nodes[1].kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    nodes[1].start(&brokers);
    for n in &nodes {
        common::all_completed(&c, &n.base(), campaigns, Duration::from_secs(120)).await;
    }
    let log = KafkaLog::connect(KafkaSettings {
        brokers: brokers.clone(),
        session_timeout_ms: 6000,
        replication_factor: 1,
        compression: Compression::Lz4,
        client_id: "checker".into(),
    })
    .await
    .unwrap();
    let events = read_events(&log).await;
    let mut assigned: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut batches: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for e in events.values() {
        if let EventBody::BatchExecuted {
            batch,
            size,
            assignments,
            ..
        } = &e.body
        {
            batches
                .entry(e.campaign_id.clone())
                .or_default()
                .push((*batch, *size));
            for users in assignments.values() {
                assigned
                    .entry(e.campaign_id.clone())
                    .or_default()
                    .extend(users.iter().cloned());
            }
        }
    }
    assert_eq!(batches.len(), campaigns);
    for (id, b) in &batches {
        assert_eq!(
            b,
            &(0..5).map(|k| (k, 10)).collect::<Vec<_>>(),
            "{id}: each batch once, paced"
        );
    }
    let mut pairs: BTreeMap<(String, String), Value> = BTreeMap::new();
    // Every record per campaign, to show what went wrong if the count is.
    let mut records: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for rec in common::read_all(&log, "smartmsg.outbound-messages", PARTITIONS).await {
        let v: Value = serde_json::from_slice(&rec.value.unwrap()).unwrap();
        let key = (
            v["campaign_id"].as_str().unwrap().to_string(),
            v["user_id"].as_str().unwrap().to_string(),
        );
        records.entry(key.0.clone()).or_default().push(format!(
            "p{}@{} batch {} {} {} v{}",
            rec.partition,
            rec.offset,
            v["batch"],
            v["user_id"],
            v["creative_id"],
            v["model_version"]
        ));
        pairs.insert(key, v);
    }
    if pairs.len() != campaigns * 50 {
        for (id, recs) in &records {
            let distinct = pairs.keys().filter(|(c, _)| c == id).count();
            if distinct != 50 {
                let events: Vec<String> = events
                    .values()
                    .filter(|e| &e.campaign_id == id)
                    .map(|e| format!("{e:?}"))
                    .collect();
                eprintln!("{id}: {distinct} distinct users; records {recs:#?}; events {events:#?}");
            }
        }
    }
    assert_eq!(
        pairs.len(),
        campaigns * 50,
        "one message per (campaign, user)"
    );
    for (id, users) in &assigned {
        let mut u = users.clone();
        u.sort();
        u.dedup();
        assert_eq!(u.len(), 50, "{id}: 50 distinct users");
        for user in &u {
            assert!(
                pairs.contains_key(&(id.clone(), user.clone())),
                "{id}/{user} missing"
            );
        }
    }
    for n in nodes.iter_mut() {
        n.terminate();
    }
}

/// A metric of a node without labels (0 when not yet exported).
async fn metric_value(c: &reqwest::Client, base: &str, name: &str) -> Option<f64> {
    let text = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let prefix = format!("{name} ");
    Some(
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0),
    )
}

/// `smartmsg_models_trained_total` of a node (0 when not yet exported).
async fn models_trained(c: &reqwest::Client, base: &str) -> Option<f64> {
    metric_value(c, base, "smartmsg_models_trained_total").await
}

/// The versions in the `current` records of the models topic, in order.
async fn current_versions(log: &KafkaLog) -> Vec<u64> {
    common::read_all(log, "smartmsg.models", PARTITIONS)
        .await
        .iter()
        .filter(|r| r.key.as_deref() == Some(&b"current"[..]))
        .filter_map(|r| smartmsg::domain::model::Model::from_bytes(r.value.as_deref()?).ok())
        .map(|m| m.version)
        .collect()
}

/// One trainer per cluster: of three nodes that all have the trainer role,
/// one trains; when it is SIGKILLed, another takes over, and the published
/// versions keep increasing, none written twice. A rollback asked of any
/// node holds training, also across a takeover, until a resume. A filter
/// registered on one node classifies on all, and documents on `contents`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_trains_and_another_takes_over_when_it_dies() {
    let tansu = Tansu::start();
    let brokers = tansu.brokers();
    let root = tempfile::tempdir().unwrap();
    let (_cleanup, mut nodes) = start_nodes("tnode", &brokers, root.path()).await;
    let log = KafkaLog::connect(KafkaSettings {
        brokers: brokers.clone(),
        session_timeout_ms: 6000,
        replication_factor: 1,
        compression: Compression::Lz4,
        client_id: "reactions".into(),
    })
    .await
    .unwrap();
    // Reactions keep coming: sends, and clicks on creative "a".
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (log, stop) = (log.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut recs = Vec::new();
                for _ in 0..20 {
                    let (user, creative) =
                        (format!("u{i}"), if i.is_multiple_of(2) { "a" } else { "b" });
                    let ts = now_ms();
                    for (n, action) in ["send", "click"].iter().enumerate() {
                        if *action == "click" && creative == "b" {
                            continue;
                        }
                        let v = json!({"event_id": format!("e{i}-{n}"), "campaign_id": "t",
                            "creative_id": creative, "user_id": user, "action": action, "ts": ts + n as i64});
                        recs.push(OutRecord::keyed(
                            "smartmsg.reaction-logs",
                            user.clone(),
                            Some(serde_json::to_vec(&v).unwrap()),
                        ));
                    }
                    i += 1;
                }
                log.publish(recs).await.unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let c = client();
    let trainers = |nodes: &[Node]| {
        let bases: Vec<(usize, String)> = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.is_running())
            .map(|(i, n)| (i, n.base()))
            .collect();
        let c = c.clone();
        async move {
            let mut out = Vec::new();
            for (i, base) in bases {
                out.push((i, models_trained(&c, &base).await.unwrap_or(0.0)));
            }
            out
        }
    };
    let first = eventually("a node trains", Duration::from_secs(90), || async {
        let t = trainers(&nodes).await;
        t.iter().find(|(_, n)| *n >= 2.0).map(|(i, _)| *i)
    })
    .await;
    // A filter registered on one node classifies on every node.
    let bases: Vec<String> = nodes.iter().map(|n| n.base()).collect();
    let filter = json!({"filter_id": "f1", "all": [{"field": "title", "contains_any": ["sale"]}]});
    let r = c
        .post(format!("{}/v1/filters", bases[0]))
        .json(&filter)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for base in &bases {
        eventually(
            "the filter on every node",
            Duration::from_secs(30),
            || async {
                let r: serde_json::Value = c
                    .post(format!("{base}/v1/classify"))
                    .json(&json!({"fields": {"title": "Summer SALE"}}))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                (r["filter_ids"] == json!(["f1"])).then_some(())
            },
        )
        .await;
    }
    // A document on `contents` is classified by the partition's owner.
    log.publish(vec![OutRecord::keyed(
        "smartmsg.contents",
        "doc1",
        Some(
            json!({"document_id": "doc1", "fields": {"title": "A sale"}})
                .to_string()
                .into_bytes(),
        ),
    )])
    .await
    .unwrap();
    let m = eventually("a content match", Duration::from_secs(60), || async {
        common::read_all(&log, "smartmsg.content-matches", PARTITIONS)
            .await
            .into_iter()
            .next()
    })
    .await;
    let v: serde_json::Value = serde_json::from_slice(m.value.as_deref().unwrap()).unwrap();
    assert_eq!(
        (v["document_id"].as_str(), v["filter_ids"].clone()),
        (Some("doc1"), json!(["f1"]))
    );
    // Several retrain intervals later, it is still the only one.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let t = trainers(&nodes).await;
    assert_eq!(
        t.iter().filter(|(_, n)| *n > 0.0).count(),
        1,
        "one trainer: {t:?}"
    );
    nodes[first].kill9();
    let second = eventually("another node trains", Duration::from_secs(90), || async {
        let t = trainers(&nodes).await;
        t.iter().find(|(_, n)| *n >= 2.0).map(|(i, _)| *i)
    })
    .await;
    assert_ne!(first, second);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = trainers(&nodes).await;
    assert_eq!(
        t.iter().filter(|(_, n)| *n > 0.0).count(),
        1,
        "one trainer after the takeover: {t:?}"
    );

    // A rollback asked of another node reaches the trainer and every node.
    let third = (0..nodes.len())
        .find(|i| *i != first && *i != second)
        .expect("three nodes");
    let live = [second, third];
    let model_of = |i: usize| {
        let (c, base) = (c.clone(), bases[i].clone());
        async move { common::get_json(&c, &format!("{base}/v1/model")).await }
    };
    // The version every live node serves with training held, if they agree.
    let held_everywhere = || async {
        let mut version = None;
        for i in live {
            let m = model_of(i).await?;
            if m["training_held"] != true || version.is_some_and(|v| m["version"] != v) {
                return None;
            }
            version = Some(m["version"].clone());
        }
        version?.as_u64()
    };
    // A rollback names the version its node serves; a fit published before
    // the trainer takes the request in overtakes it, and it is dropped as
    // stale (by design). Ask again then, unless one did apply.
    let mut held = None;
    for attempt in 0..4 {
        let any_held = future::join_all(live.map(model_of))
            .await
            .iter()
            .any(|m| m.as_ref().is_some_and(|m| m["training_held"] == true));
        if !any_held {
            let r: serde_json::Value = c
                .post(format!("{}/v1/model/rollback", nodes[third].base()))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r["from_version"].as_u64().expect("202 with from_version");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while held.is_none() && std::time::Instant::now() < deadline {
            held = held_everywhere().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if held.is_some() {
            break;
        }
        eprintln!("rollback attempt {attempt} not served everywhere yet");
    }
    let from = held.expect("every node serves the rollback") - 1;
    // The trainer dies while training is held; the node that takes over
    // keeps holding it (the reactions keep coming) until a resume.
    nodes[second].kill9();
    eventually("the last node trains", Duration::from_secs(90), || async {
        let active = metric_value(&c, &bases[third], "smartmsg_trainer_active").await?;
        (active == 1.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = model_of(third).await.unwrap();
    assert_eq!(m["version"], from + 1, "held across the takeover: {m}");
    let resumed = c
        .post(format!("{}/v1/model/resume", bases[third]))
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 202);
    eventually("training resumed", Duration::from_secs(30), || async {
        let m = model_of(third).await?;
        (m["version"].as_u64()? > from + 1 && m["training_held"] == false).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    producer.await.unwrap();
    let versions = current_versions(&log).await;
    assert!(versions.len() >= 4, "{versions:?}");
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions increase, none written twice: {versions:?}"
    );
    for n in nodes.iter_mut() {
        n.terminate();
    }
}
