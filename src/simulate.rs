//! `smartmsg simulate`: the demo's subscriber world against a running
//! cluster, as the outside message sender would be. It registers the
//! subscribers through a node's HTTP API, creates a campaign there (the
//! demo's four creatives), reads the campaign's `outbound-messages` from
//! Kafka and writes `send`, `impression` and `click` records to
//! `reaction-logs` from hidden per-subscriber click rates, at their event
//! times (real time), until the campaign has ended and every reaction is
//! out; then it waits for the campaign's report to count them all and
//! prints a summary as JSON on its last line.

use crate::clock::{SharedClock, SystemClock};
use crate::config::{BackendKind, Config};
use crate::demo::{random_baseline, report_total, simulate, SimStats, SimWorld, World, CREATIVES};
use crate::io::kafka::{KafkaLog, KafkaSettings};
use crate::io::topics::Topics;
use crate::io::SharedLog;
use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// The cluster's config (its `kafka.*` settings are used).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A node's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// Bearer token (`http.auth_token`), if the API requires one.
    #[arg(long, default_value = "")]
    pub token: String,
    /// The channel the subscribers are registered in.
    #[arg(long, default_value = "sim-channel")]
    pub channel: String,
    /// Simulated subscribers.
    #[arg(long, default_value_t = 20_000)]
    pub subscribers: usize,
    /// Seed of the world (features and hidden click rates) and reactions.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Campaign budget (messages).
    #[arg(long, default_value_t = 6_000)]
    pub budget: u64,
    /// Batches of the campaign.
    #[arg(long, default_value_t = 12)]
    pub batches: u64,
    /// Seconds between batches.
    #[arg(long, default_value_t = 10)]
    pub batch_interval_secs: u64,
    /// Longest delay of a reaction (impression after the send, click after
    /// the impression), in seconds.
    #[arg(long, default_value_t = 30)]
    pub reaction_delay_secs: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 1_800)]
    pub timeout_secs: u64,
}

struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        if self.token.is_empty() {
            r
        } else {
            r.bearer_auth(&self.token)
        }
    }

    /// A request that must answer `want`; its JSON body.
    async fn expect(
        &self,
        r: reqwest::RequestBuilder,
        want: u16,
        what: &str,
    ) -> anyhow::Result<Value> {
        let r = self
            .auth(r)
            .send()
            .await
            .with_context(|| format!("{what}: {}", self.base))?;
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        if status != want {
            bail!("{what}: HTTP {status}: {body}");
        }
        Ok(serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r = self.client.get(format!("{}{path}", self.base));
        self.expect(r, 200, &format!("GET {path}")).await
    }
}

pub async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let cfg = Config::load(args.config.as_deref()).map_err(|e| anyhow!("{e}"))?;
    if cfg.backend.kind != BackendKind::Cluster {
        bail!("simulate needs a cluster config (backend.kind = \"cluster\"): it reads and writes the cluster's Kafka topics");
    }
    if args.subscribers == 0
        || args.budget == 0
        || args.batches == 0
        || args.batch_interval_secs == 0
    {
        bail!("subscribers, budget, batches and batch-interval-secs must be > 0");
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let api = Api {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        base: args.api.trim_end_matches('/').to_string(),
        token: args.token.clone(),
    };
    api.get("/healthz").await.context("the node's API")?;
    let log: SharedLog = Arc::new(KafkaLog::connect(KafkaSettings::from_config(&cfg)).await?);
    let topics = Topics::new(&cfg);
    let clock: SharedClock = Arc::new(SystemClock);

    // 1. The subscribers.
    let world = World::new(args.subscribers, args.seed);
    for chunk in world.users.chunks(5_000) {
        let body: String = chunk
            .iter()
            .map(|(u, f)| {
                json!({"user_id": u, "features": {"f0": f[0], "f1": f[1], "f2": f[2]}}).to_string()
                    + "\n"
            })
            .collect();
        let r = api
            .client
            .put(format!(
                "{}/v1/channels/{}/subscribers",
                api.base, args.channel
            ))
            .body(body);
        api.expect(r, 202, "registering subscribers").await?;
    }
    eprintln!(
        "registered {} subscribers in channel {}",
        args.subscribers, args.channel
    );

    // 2. The campaign, starting once the subscribers are materialised.
    let start_at = clock.now_ms() + 5_000;
    let interval_ms = (args.batch_interval_secs * 1000) as i64;
    let creatives: Vec<Value> = CREATIVES
        .iter()
        .map(|(id, text, _)| json!({"creative_id": id, "text": text}))
        .collect();
    let body = json!({"channel_id": args.channel, "creatives": creatives, "budget": args.budget,
        "start_at": start_at, "end_at": start_at + args.batches as i64 * interval_ms,
        "batch_interval_secs": args.batch_interval_secs});
    let r = api
        .client
        .post(format!("{}/v1/campaigns", api.base))
        .json(&body);
    let created = api.expect(r, 202, "creating the campaign").await?;
    let campaign = created["campaign_id"]
        .as_str()
        .ok_or_else(|| anyhow!("no campaign_id in {created}"))?
        .to_string();
    eprintln!(
        "campaign {campaign}: budget {} over {} batches every {} s",
        args.budget, args.batches, args.batch_interval_secs
    );

    // 3. The subscribers react.
    let delay = (args.reaction_delay_secs.max(2) * 1000) as i64;
    let features: Arc<HashMap<String, [f64; 3]>> = Arc::new(world.users.iter().cloned().collect());
    let stats = Arc::new(Mutex::new(SimStats::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sim = tokio::spawn(simulate(
        log,
        clock,
        topics,
        SimWorld {
            campaign_id: campaign.clone(),
            features,
            seed: args.seed,
            impression_delay: 1_000..delay,
            click_delay: 1_000..delay,
        },
        stats.clone(),
        stop_rx,
    ));

    // 4. Until the campaign ends.
    let mut seen_batches = 0;
    let state = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if sim.is_finished() {
            bail!("the simulated senders stopped: {:?}", sim.await);
        }
        let Ok(c) = api.get(&format!("/v1/campaigns/{campaign}")).await else {
            continue;
        };
        let done = c["batches_done"].as_u64().unwrap_or(0);
        if done > seen_batches {
            seen_batches = done;
            eprintln!(
                "  batch {done}/{}: {} messages sent, model v{}, clicks so far {}",
                c["batches_total"],
                c["messages_sent"],
                c["model_version"],
                stats.lock().expect("stats").clicks
            );
        }
        if c["status"] == "completed" || c["status"] == "cancelled" {
            break c;
        }
        if Instant::now() > deadline {
            bail!(
                "the campaign did not end within {} s: {c}",
                args.timeout_secs
            );
        }
    };
    let _ = stop_tx.send(true);
    sim.await??;

    // 5. Until its report counts every reaction (final windows close after
    // the grace, or once the partitions are idle).
    let (sends, impressions, clicks, expected) = {
        let st = stats.lock().expect("stats");
        (st.sends, st.impressions, st.clicks, st.expected_clicks)
    };
    eprintln!(
        "all reactions sent ({impressions} impressions, {clicks} clicks); waiting for the report"
    );
    let report = loop {
        let report = api.get(&format!("/v1/campaigns/{campaign}/report")).await?;
        let sum = |k: &str| report_total(&report, k);
        if sum("impressions") == impressions && sum("clicks") == clicks {
            break report;
        }
        if Instant::now() > deadline {
            bail!(
                "the report counts {} of {impressions} impressions and {} of {clicks} clicks after {} s",
                sum("impressions"),
                sum("clicks"),
                args.timeout_secs
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let messages_sent = state["messages_sent"].as_u64().unwrap_or(0);
    let (random_clicks, random_expected) = random_baseline(&world, messages_sent, args.seed);
    for c in report["creatives"].as_array().into_iter().flatten() {
        eprintln!(
            "  {:<10} sends {:>6}  impressions {:>6}  clicks {:>5}  ctr {:.2}%",
            c["creative_id"].as_str().unwrap_or_default(),
            c["sends"],
            c["impressions"],
            c["clicks"],
            c["ctr"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    let result = json!({
        "campaign_id": campaign,
        "status": state["status"],
        "messages_sent": messages_sent,
        "sends": sends,
        "impressions": impressions,
        "clicks": clicks,
        "expected_clicks": expected.round(),
        "random_clicks": random_clicks,
        "random_expected_clicks": random_expected.round(),
        "report": report["creatives"],
        "seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    });
    println!("{result}");
    Ok(())
}
