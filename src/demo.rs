//! `smartmsg demo`: one process, embedded backends, a temporary data dir. A
//! simulated channel of subscribers with hidden per-creative response
//! probabilities, one campaign run batch by batch on an accelerated clock,
//! impressions and clicks simulated from the hidden probabilities and fed
//! back through `reaction-logs`, and a report comparing the outcome with
//! random targeting.

use crate::clock::{system_now_ms, ScaledClock, SharedClock};
use crate::config::Config;
use crate::domain::campaign::{Command, CommandKind, Creative, Status};
use crate::io::{OutRecord, SharedLog};
use crate::node::Node;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Simulated subscribers in the channel.
    #[arg(long, default_value_t = 20_000)]
    pub subscribers: usize,
    /// Campaign budget (messages).
    #[arg(long, default_value_t = 6_000)]
    pub budget: u64,
    /// Number of one-minute batches.
    #[arg(long, default_value_t = 12)]
    pub batches: u64,
    /// Clock speed-up (simulated seconds per real second).
    #[arg(long, default_value_t = 60.0)]
    pub speed: f64,
    /// Seed of the simulated world.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Keep state here instead of a temporary directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Show the daemon's logs.
    #[arg(long)]
    pub verbose: bool,
}

pub const CREATIVES: [(&str, &str, f64); 4] = [
    ("plain", "Our spring sale starts today.", 0.020),
    ("emoji", "Spring sale is here!", 0.035),
    ("personal", "We picked these just for you.", 0.050),
    ("urgent", "Last hours: 40% off everything.", 0.080),
];
pub const IMPRESSION_P: f64 = 0.75;

/// The hidden truth of the simulated channel.
pub struct World {
    pub users: Vec<(String, [f64; 3])>,
}

impl World {
    pub fn new(n: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let users = (0..n)
            .map(|i| (format!("user-{i:06}"), [rng.gen(), rng.gen(), rng.gen()]))
            .collect();
        World { users }
    }

    /// Probability that `features` clicks creative `c` once it is seen.
    pub fn click_p(features: &[f64; 3], c: usize) -> f64 {
        CREATIVES[c].2 * (0.4 + 1.2 * features[c % 3])
    }
}

fn creative_index(id: &str) -> usize {
    CREATIVES.iter().position(|c| c.0 == id).unwrap_or(0)
}

#[derive(Default)]
pub struct SimStats {
    pub sends: u64,
    pub impressions: u64,
    pub clicks: u64,
    pub expected_clicks: f64,
    clicks_by_batch: BTreeMap<u64, u64>,
    sends_by_batch: BTreeMap<u64, u64>,
    pending: usize,
}

/// Who the simulated subscribers are and how they react.
pub struct SimWorld {
    /// Only this campaign's messages get reactions.
    pub campaign_id: String,
    pub features: Arc<HashMap<String, [f64; 3]>>,
    pub seed: u64,
    /// A seen message is seen this many ms after its send (uniform, ms).
    pub impression_delay: std::ops::Range<i64>,
    /// A click comes this many ms after the impression.
    pub click_delay: std::ops::Range<i64>,
}

/// Reads outbound messages and emits send / impression / click reactions at
/// their (simulated) event times, until `stop` and nothing is pending.
pub async fn simulate(
    log: SharedLog,
    clock: SharedClock,
    topics: crate::io::topics::Topics,
    world: SimWorld,
    stats: Arc<Mutex<SimStats>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let SimWorld {
        campaign_id,
        features,
        seed,
        impression_delay,
        click_delay,
    } = world;
    let mut readers: Vec<_> = (0..topics.partitions)
        .map(|p| log.reader(&topics.outbound, p, 0))
        .collect();
    let mut heap: BinaryHeap<Reverse<(i64, u64, String)>> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        for r in readers.iter_mut() {
            for rec in r.next_batch(5000, Duration::ZERO).await? {
                let Some(v) = rec
                    .value
                    .as_deref()
                    .and_then(|v| serde_json::from_slice::<Value>(v).ok())
                else {
                    continue;
                };
                let user = v["user_id"].as_str().unwrap_or_default().to_string();
                let creative = v["creative_id"].as_str().unwrap_or_default().to_string();
                let campaign = v["campaign_id"].as_str().unwrap_or_default().to_string();
                if campaign != campaign_id {
                    continue;
                }
                let batch = v["batch"].as_u64().unwrap_or(0);
                let ts = v["ts"].as_i64().unwrap_or(0);
                let f = features.get(&user).copied().unwrap_or([0.5; 3]);
                let c = creative_index(&creative);
                let mut rng = ChaCha8Rng::seed_from_u64(
                    seed ^ crate::domain::model::stable_hash(&[
                        campaign.as_bytes(),
                        user.as_bytes(),
                    ]),
                );
                let p = World::click_p(&f, c);
                let mut push = |action: &str, at: i64, heap: &mut BinaryHeap<_>| {
                    seq += 1;
                    let ev = json!({"event_id": format!("{campaign}/{user}/{action}"), "campaign_id": campaign,
                        "creative_id": creative, "user_id": user, "action": action, "ts": at, "batch": batch});
                    heap.push(Reverse((at, seq, ev.to_string())));
                };
                push("send", ts, &mut heap);
                let mut st = stats.lock().expect("stats");
                st.sends += 1;
                st.expected_clicks += IMPRESSION_P * p;
                *st.sends_by_batch.entry(batch).or_default() += 1;
                if rng.gen::<f64>() < IMPRESSION_P {
                    let seen = ts + rng.gen_range(impression_delay.clone());
                    push("impression", seen, &mut heap);
                    st.impressions += 1;
                    if rng.gen::<f64>() < p {
                        push(
                            "click",
                            seen + rng.gen_range(click_delay.clone()),
                            &mut heap,
                        );
                        st.clicks += 1;
                        *st.clicks_by_batch.entry(batch).or_default() += 1;
                    }
                }
            }
        }
        let now = clock.now_ms();
        let mut due = Vec::new();
        while let Some(Reverse((at, _, _))) = heap.peek() {
            if *at > now {
                break;
            }
            let Reverse((_, _, ev)) = heap.pop().expect("peeked");
            let user = serde_json::from_str::<Value>(&ev)?["user_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            due.push(OutRecord::keyed(
                &topics.reactions,
                user,
                Some(ev.into_bytes()),
            ));
        }
        if !due.is_empty() {
            log.publish(due).await?;
        }
        stats.lock().expect("stats").pending = heap.len();
        if *stop.borrow() && heap.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of a report's per-creative `k` ("sends", "impressions", ...).
pub fn report_total(report: &Value, k: &str) -> u64 {
    report["creatives"]
        .as_array()
        .map(|a| a.iter().map(|c| c[k].as_u64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

/// Clicks the same budget would have earned with random users and creatives.
pub fn random_baseline(world: &World, budget: u64, seed: u64) -> (u64, f64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut idx: Vec<usize> = (0..world.users.len()).collect();
    rand::seq::SliceRandom::shuffle(&mut idx[..], &mut rng);
    let mut clicks = 0;
    let mut expected = 0.0;
    for &i in idx.iter().take(budget as usize) {
        let c = rng.gen_range(0..CREATIVES.len());
        let p = World::click_p(&world.users[i].1, c);
        expected += IMPRESSION_P * p;
        if rng.gen::<f64>() < IMPRESSION_P && rng.gen::<f64>() < p {
            clicks += 1;
        }
    }
    (clicks, expected)
}

pub async fn run(mut cfg: Config, args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let tmp = tempfile::tempdir()?;
    cfg.storage.data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    cfg.kafka.partitions = 4;
    cfg.model.retrain_interval_ms = 200;
    // Event time runs `speed` times faster than real time here, so the
    // grace (10 s by default) would tolerate only 10 s / speed of real
    // delay — 170 ms at x60 — before a reaction counts as late. A slow
    // disk (a sled flush) stalls the simulated senders longer than that:
    // one real second of grace at any speed.
    cfg.aggregator.grace_ms = cfg.aggregator.grace_ms.max((args.speed * 1000.0) as u64);
    cfg.node.id = "demo".into();
    cfg.log.level = if args.verbose {
        "info".into()
    } else {
        "error".into()
    };
    crate::logging::init(&cfg);
    let clock: SharedClock = Arc::new(ScaledClock::new(system_now_ms(), args.speed));
    println!(
        "smartmsg demo: embedded backends in {}",
        cfg.storage.data_dir.display()
    );
    let node = Node::start(cfg, clock.clone(), false).await?;
    let ctx = node.ctx.clone();

    // 1. The channel's subscribers.
    let world = World::new(args.subscribers, args.seed);
    let channel = "demo-channel";
    let records: Vec<OutRecord> = world
        .users
        .iter()
        .map(|(u, f)| {
            let v = json!({"channel_id": channel, "user_id": u,
                "features": {"f0": f[0], "f1": f[1], "f2": f[2]}});
            OutRecord::keyed(
                &ctx.topics.subscribers,
                format!("{channel}/{u}"),
                Some(v.to_string().into_bytes()),
            )
        })
        .collect();
    for chunk in records.chunks(5000) {
        ctx.log.publish(chunk.to_vec()).await?;
    }
    while ctx.subscribers.count(channel) < args.subscribers {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "registered {} subscribers in channel {channel}",
        args.subscribers
    );

    // 2. The campaign.
    let start_at = clock.now_ms() + 5_000;
    let cmd = Command {
        command_id: "demo-create".into(),
        campaign_id: "demo-campaign".into(),
        kind: CommandKind::Create {
            channel_id: channel.into(),
            creatives: CREATIVES
                .iter()
                .map(|(id, text, _)| Creative {
                    creative_id: id.to_string(),
                    text: text.to_string(),
                })
                .collect(),
            budget: args.budget,
            start_at,
            end_at: start_at + args.batches as i64 * 60_000,
            batch_interval_secs: 60,
        },
    };
    ctx.log
        .publish(vec![OutRecord::keyed(
            &ctx.topics.commands,
            cmd.campaign_id.clone(),
            Some(serde_json::to_vec(&cmd)?),
        )])
        .await?;
    println!(
        "campaign demo-campaign: budget {} over {} batches of one (simulated) minute, {} creatives, clock x{}",
        args.budget,
        args.batches,
        CREATIVES.len(),
        args.speed
    );

    // 3. The simulated subscribers react.
    let features: Arc<HashMap<String, [f64; 3]>> = Arc::new(world.users.iter().cloned().collect());
    let stats = Arc::new(Mutex::new(SimStats::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sim = tokio::spawn(simulate(
        ctx.log.clone(),
        clock.clone(),
        ctx.topics.clone(),
        SimWorld {
            campaign_id: "demo-campaign".into(),
            features,
            seed: args.seed,
            impression_delay: 1_000..30_000,
            click_delay: 1_000..60_000,
        },
        stats.clone(),
        stop_rx,
    ));

    // 4. Progress until the campaign ends.
    let mut seen_batches = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    let state = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(c) = ctx.read_model.campaign("demo-campaign")? else {
            continue;
        };
        if c.batches_done > seen_batches {
            seen_batches = c.batches_done;
            let st = stats.lock().expect("stats");
            println!(
                "  batch {:>2}/{}: {:>5} messages sent in total, model v{}, clicks so far {}",
                c.batches_done, c.batches_total, c.messages_sent, c.model_version, st.clicks
            );
        }
        if matches!(c.status, Some(Status::Completed | Status::Cancelled)) {
            break c;
        }
        if Instant::now() > deadline {
            anyhow::bail!("campaign did not finish in time (status {:?})", c.status);
        }
    };
    println!(
        "campaign {}; waiting for the last reactions and windows",
        state.status.map(|s| s.as_str()).unwrap_or("?")
    );
    let _ = stop_tx.send(true);
    sim.await??;

    // 5. Wait until the final windows account for every simulated reaction.
    let (want_imp, want_clicks) = {
        let st = stats.lock().expect("stats");
        (st.impressions, st.clicks)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        let c = ctx
            .read_model
            .campaign("demo-campaign")?
            .expect("campaign exists");
        let report = crate::io::http::report_json(&ctx, &c)?;
        let sum = |k: &str| report_total(&report, k);
        if sum("impressions") == want_imp && sum("clicks") == want_clicks {
            break report;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "report incomplete: impressions {}/{want_imp}, clicks {}/{want_clicks}",
                sum("impressions"),
                sum("clicks")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // 6. The report.
    print_report(&ctx, &state, &report, &stats, &world, &args);
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    node.shutdown().await;
    Ok(())
}

fn print_report(
    ctx: &crate::actors::SharedCtx,
    state: &crate::domain::campaign::CampaignState,
    report: &Value,
    stats: &Mutex<SimStats>,
    world: &World,
    args: &DemoArgs,
) {
    let st = stats.lock().expect("stats");
    println!();
    println!(
        "== report: demo-campaign ({} messages, model v{} at the end) ==",
        state.messages_sent,
        ctx.model.load().version
    );
    println!(
        "{:<10} {:>7} {:>12} {:>7} {:>7}   hidden base CTR",
        "creative", "sends", "impressions", "clicks", "ctr"
    );
    for c in report["creatives"].as_array().into_iter().flatten() {
        let id = c["creative_id"].as_str().unwrap_or_default();
        println!(
            "{:<10} {:>7} {:>12} {:>7} {:>6.2}%   {:.1}%",
            id,
            c["sends"].as_u64().unwrap_or(0),
            c["impressions"].as_u64().unwrap_or(0),
            c["clicks"].as_u64().unwrap_or(0),
            c["ctr"].as_f64().unwrap_or(0.0) * 100.0,
            CREATIVES[creative_index(id)].2 * 100.0
        );
    }
    println!();
    println!("clicks per batch:");
    for (b, sends) in &st.sends_by_batch {
        let clicks = st.clicks_by_batch.get(b).copied().unwrap_or(0);
        println!(
            "  batch {b:>2}: {sends:>5} sends {clicks:>4} clicks  {}",
            "#".repeat(clicks as usize / 2)
        );
    }
    let (rand_clicks, rand_expected) = random_baseline(world, state.messages_sent, args.seed);
    println!();
    println!(
        "targeting vs random, same budget ({} messages):",
        state.messages_sent
    );
    println!(
        "  smartmsg : {:>5} clicks (expected {:.0})",
        st.clicks, st.expected_clicks
    );
    println!(
        "  random   : {:>5} clicks (expected {:.0})",
        rand_clicks, rand_expected
    );
    if rand_expected > 0.0 {
        println!(
            "  lift     : {:+.0}% expected clicks",
            (st.expected_clicks / rand_expected - 1.0) * 100.0
        );
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_is_deterministic_and_baseline_is_sane() {
        let a = World::new(100, 1);
        let b = World::new(100, 1);
        assert_eq!(a.users[5].1, b.users[5].1);
        let (_, expected) = random_baseline(&a, 100, 1);
        // mean click probability is about the mean base CTR
        let mean_base: f64 = CREATIVES.iter().map(|c| c.2).sum::<f64>() / 4.0;
        assert!(
            (expected / 100.0 - IMPRESSION_P * mean_base).abs() < 0.02,
            "{expected}"
        );
    }
}
