//! `smartmsg bench ...`: benchmarks against the real services. Each prints
//! progress to stderr and one JSON object on its last stdout line.

pub mod aggregate;
pub mod ingest;
pub mod latency;
pub mod model;
pub mod percolate;
pub mod rebuild;
pub mod synth;
pub mod targeting;

use crate::clock::{system_now_ms, SharedClock, SystemClock};
use crate::io::amqp::{AmqpSettings, RabbitDelayQueue};
use crate::io::{DelayQueue, Job};
use futures::StreamExt;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCmd {
    /// Reaction windows on Kafka: end-to-end rate with exactly-once, CPU,
    /// peak RSS, restore; every window verified.
    Aggregate(aggregate::AggregateArgs),
    /// Reaction windows on Kafka at a steady input rate: how long a
    /// reaction waits until the transaction that counts it commits.
    AggregateLatency(latency::AggregateLatencyArgs),
    /// The aggregator's per-event cost (parse, validate, count) without a
    /// broker.
    Ingest(ingest::IngestArgs),
    /// An aggregator's full rebuild from a long changelog (no local
    /// state): restore time, the rebuilt state verified.
    Rebuild(rebuild::RebuildArgs),
    /// Jobs through the RabbitMQ delay queue: publish rate and lateness.
    DelayQueue(DelayQueueArgs),
    /// Content classification on one core: the filter index against
    /// checking every filter (brute force), matches verified.
    Percolate(percolate::PercolateArgs),
    /// The targeting model on simulated channels: expected clicks against
    /// an oracle that knows the hidden click rates, and against random.
    Model(model::ModelArgs),
    /// One batch selection on a large channel: scoring and top-k, and the
    /// creative draws, on one core.
    Targeting(targeting::TargetingArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Order {
    Random,
    Sorted,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DelayQueueArgs {
    /// Number of jobs.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Due times are spread uniformly over this many seconds.
    #[arg(long, default_value_t = 60)]
    pub spread_secs: u64,
    /// Publish order.
    #[arg(long, value_enum, default_value_t = Order::Random)]
    pub order: Order,
    /// RabbitMQ URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub url: String,
    /// Publishes awaiting their confirm at once.
    #[arg(long, default_value_t = 512)]
    pub concurrency: usize,
    /// Seed of the due times.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::DelayQueue(a) => delay_queue(a).await,
        BenchCmd::Aggregate(a) => aggregate::run(a).await,
        BenchCmd::AggregateLatency(a) => latency::run(a).await,
        BenchCmd::Ingest(a) => ingest::run(a),
        BenchCmd::Percolate(a) => percolate::run(a),
        BenchCmd::Model(a) => model::run(a),
        BenchCmd::Targeting(a) => targeting::run(a),
        BenchCmd::Rebuild(a) => rebuild::run(a).await,
    }
}

/// The middle value (the upper one of an even count), as the percentiles.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn delay_queue(a: DelayQueueArgs) -> anyhow::Result<()> {
    let clock: SharedClock = Arc::new(SystemClock);
    let settings = AmqpSettings {
        url: a.url.clone(),
        prefix: format!("smartmsg.bench.{}.", uuid::Uuid::new_v4().simple()),
        prefetch: 20_000,
        connection_name: "smartmsg-bench".into(),
    };
    let q = RabbitDelayQueue::open(settings, clock.clone(), Duration::from_secs(20)).await?;
    let lead_ms = 3_000i64;
    let t0 = system_now_ms() + lead_ms;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let spread = (a.spread_secs * 1000) as i64;
    let mut jobs: Vec<Job> = (0..a.jobs)
        .map(|i| Job {
            campaign_id: format!("bench-{i}"),
            batch: i as u64,
            due_at: t0 + rng.gen_range(0..spread.max(1)),
            command_id: format!("bench-{i}"),
        })
        .collect();
    match a.order {
        Order::Sorted => jobs.sort_by_key(|j| j.due_at),
        Order::Random => jobs.shuffle(&mut rng),
    }
    let last_due = jobs.iter().map(|j| j.due_at).max().unwrap_or(t0);

    // Consume concurrently with publishing.
    let consumer = {
        let q = q.clone();
        let clock = clock.clone();
        let n = a.jobs;
        tokio::spawn(async move {
            let mut seen = HashSet::with_capacity(n);
            let mut lateness = Vec::with_capacity(n);
            let deadline = Instant::now()
                + Duration::from_millis((last_due - system_now_ms()).max(0) as u64)
                + Duration::from_secs(30);
            while seen.len() < n && Instant::now() < deadline {
                if let Some(d) = q.next_due(Duration::from_millis(500)).await? {
                    let late = (clock.now_ms() - d.job.due_at) as f64;
                    if seen.insert(d.job.command_id.clone()) {
                        lateness.push(late);
                    }
                    q.ack(d.tag).await?;
                }
            }
            Ok::<_, crate::io::IoError>((seen.len(), lateness))
        })
    };

    let started = Instant::now();
    let published = futures::stream::iter(jobs.iter().cloned())
        .map(|j| {
            let q = q.clone();
            async move { q.publish(&j).await }
        })
        .buffer_unordered(a.concurrency.max(1))
        .fold(0usize, |n, r| async move {
            match r {
                Ok(()) => n + 1,
                Err(e) => {
                    eprintln!("publish failed: {e}");
                    n
                }
            }
        })
        .await;
    let publish_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "published {published}/{} jobs in {publish_secs:.2} s; waiting for them to fire",
        a.jobs
    );
    let (fired, mut lateness) = consumer.await??;
    lateness.sort_by(|x, y| x.partial_cmp(y).expect("finite"));
    let result = json!({
        "jobs": a.jobs,
        "order": match a.order { Order::Random => "random", Order::Sorted => "sorted" },
        "publish_jobs_per_s": (published as f64 / publish_secs).round(),
        "lateness_ms": {
            "p50": percentile(&lateness, 0.50),
            "p99": percentile(&lateness, 0.99),
            "max": lateness.last().copied().unwrap_or(0.0),
        },
        "fired": fired,
        "lost": a.jobs - fired,
    });
    q.destroy().await?;
    println!("{result}");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles() {
        let v: Vec<f64> = (0..=100).map(|i| i as f64).collect();
        assert_eq!(super::percentile(&v, 0.5), 50.0);
        assert_eq!(super::percentile(&v, 0.99), 99.0);
        assert_eq!(super::percentile(&[], 0.5), 0.0);
    }
}
