//! `smartmsg bench aggregate-latency`: how long a reaction waits, at a
//! steady input rate, until the aggregator's transaction that counts it
//! commits — its input offset, its state change and any final window it
//! closed become visible to `read_committed` readers together. This is what
//! `aggregator.commit_interval_ms` and `aggregator.max_batch_records` trade
//! against throughput (`bench aggregate`).
//!
//! A real `smartmsg run` aggregator process (cluster mode, exactly-once)
//! restores first; then the synthetic input is produced at `--rate` while
//! a probe reads the group's committed offsets every 2 ms. A record's
//! latency runs from the broker's acknowledgement of it (the producer's
//! delivery report) to the first probe answer whose committed offset is
//! past it: it includes the probe's interval and round trip (a few ms).
//! Every window is verified afterwards, as in `bench aggregate`.

use super::aggregate::{
    await_verified, bench_topics, cpu_seconds, metric_sum, peak_rss_bytes, produce_timed,
    worker_config_with, Ack, OffsetsProbe, Worker,
};
use super::percentile;
use super::synth::SynthSpec;
use anyhow::{anyhow, bail};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct AggregateLatencyArgs {
    /// Number of input records.
    #[arg(long, default_value_t = 300_000)]
    pub events: u64,
    /// Input records produced per second (steady, not a backlog).
    #[arg(long, default_value_t = 100_000.0)]
    pub rate: f64,
    /// Partitions of the topics.
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// `aggregator.commit_interval_ms` of the aggregator (its default when
    /// not given).
    #[arg(long)]
    pub commit_interval_ms: Option<u64>,
    /// `aggregator.max_batch_records` of the aggregator (its default when
    /// not given).
    #[arg(long)]
    pub max_batch_records: Option<u64>,
    /// Campaigns in the synthetic input (4 creatives each).
    #[arg(long, default_value_t = 50)]
    pub campaigns: u32,
    /// Seed of the input.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// PID of the broker, when it runs on this machine: its CPU time during
    /// the run is reported too (each transaction costs the broker as well).
    #[arg(long)]
    pub broker_pid: Option<u32>,
}

/// Committed offsets per partition, as the probe saw them, in time order.
type Samples = Vec<(Instant, Vec<u64>)>;

/// Each acknowledged record's wait, in ms, until a probe answer showed its
/// partition's committed offset past it. `Err` names a record no answer
/// covered.
fn latencies_ms(acks: &[Ack], samples: &Samples) -> anyhow::Result<Vec<f64>> {
    let mut by_partition: std::collections::BTreeMap<i32, Vec<(i64, Instant)>> = Default::default();
    for (p, o, at) in acks {
        by_partition.entry(*p).or_default().push((*o, *at));
    }
    let mut out = Vec::with_capacity(acks.len());
    for (p, mut records) in by_partition {
        records.sort_unstable_by_key(|r| r.0);
        let committed = |i: usize| samples[i].1.get(p as usize).copied().unwrap_or(0);
        // Committed offsets only grow: one walk over the answers.
        let mut i = 0;
        for (offset, acked) in records {
            while i < samples.len() && committed(i) <= offset as u64 {
                i += 1;
            }
            let Some((seen, _)) = samples.get(i) else {
                bail!("{p}/{offset}: never seen committed");
            };
            out.push(seen.saturating_duration_since(acked).as_secs_f64() * 1000.0);
        }
    }
    Ok(out)
}

pub async fn run(a: AggregateLatencyArgs) -> anyhow::Result<()> {
    if a.rate.is_nan() || a.rate <= 0.0 {
        bail!("--rate must be above 0");
    }
    let dir = tempfile::tempdir()?;
    let prefix = format!("lat{}.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut settings = vec![("idle_close_ms", 1000)];
    settings.extend(a.commit_interval_ms.map(|v| ("commit_interval_ms", v)));
    settings.extend(a.max_batch_records.map(|v| ("max_batch_records", v)));
    let cfg_path = worker_config_with(
        dir.path(),
        &a.brokers,
        &prefix,
        a.partitions,
        "bench-latency",
        &settings,
    )?;
    let (cfg, topics, _log) = bench_topics(&cfg_path).await?;
    let parts = a.partitions;
    let worker = Worker::spawn(&std::env::current_exe()?, &cfg_path)?;
    let pid = worker.pid();
    let worker = tokio::task::spawn_blocking(move || {
        worker
            .await_restores(parts, Duration::from_secs(120))
            .map(|_| worker)
    })
    .await??;
    eprintln!(
        "aggregator process up and restored; producing at {}/s",
        a.rate
    );

    let probe = OffsetsProbe::new(&a.brokers, &cfg.kafka.group_id, &topics.reactions, parts)?;
    let samples: Arc<Mutex<Samples>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (samples, stop) = (samples.clone(), stop.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            while !stop.load(Ordering::SeqCst) {
                let committed = probe.committed()?;
                samples
                    .lock()
                    .expect("samples")
                    .push((Instant::now(), committed));
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        })
    };
    let cpu0 = cpu_seconds(pid);
    let broker_cpu = || a.broker_pid.map(cpu_seconds);
    let broker0 = broker_cpu();
    let metrics0 = worker.metrics().unwrap_or_default();
    let mut spec = SynthSpec::new(a.events);
    spec.campaigns = a.campaigns;
    spec.seed = a.seed;
    spec.grace_ms = cfg.aggregator.grace_ms as i64;
    let (brokers, topic, rate) = (a.brokers.clone(), topics.reactions.clone(), a.rate);
    let produced = tokio::task::spawn_blocking(move || {
        let sent = AtomicU64::new(0);
        produce_timed(&brokers, &topic, &spec, parts, Some((rate, &sent)), true)
    })
    .await?;
    let (ends, exp, produce_secs, acks) = match produced {
        Ok(p) => p,
        Err(e) => {
            stop.store(true, Ordering::SeqCst);
            worker.stop()?;
            return Err(e);
        }
    };
    eprintln!(
        "produced {} records in {produce_secs:.2} s; waiting for the last commits",
        acks.len()
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last = samples.lock().expect("samples").last().map(|s| s.1.clone());
        if last.as_ref() == Some(&ends) {
            break;
        }
        if Instant::now() > deadline || prober.is_finished() {
            stop.store(true, Ordering::SeqCst);
            worker.stop()?;
            match prober.join() {
                Ok(Err(e)) => return Err(e),
                _ => bail!("committed offsets {last:?} did not reach {ends:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    prober
        .join()
        .map_err(|_| anyhow!("the offsets probe panicked"))??;
    let cpu = cpu_seconds(pid) - cpu0;
    let broker_cpu = broker_cpu().zip(broker0).map(|(b, b0)| b - b0);
    let m = worker.metrics()?;
    let transactions = metric_sum(&m, "smartmsg_kafka_transaction_seconds_count")
        - metric_sum(&metrics0, "smartmsg_kafka_transaction_seconds_count");
    let samples = std::mem::take(&mut *samples.lock().expect("samples"));
    let mut lat = latencies_ms(&acks, &samples)?;
    lat.sort_by(f64::total_cmp);
    let ms = |p: f64| (percentile(&lat, p) * 10.0).round() / 10.0;

    let verdict = await_verified(&a.brokers, &topics, parts, &exp).await?;
    eprintln!("verification: {verdict:?}");
    let peak_rss = peak_rss_bytes(pid);
    worker.stop()?;
    let out = json!({
        "events": a.events,
        "rate": a.rate,
        "produce_events_per_s": (a.events as f64 / produce_secs).round(),
        "partitions": parts,
        "commit_interval_ms": cfg.aggregator.commit_interval_ms,
        "max_batch_records": cfg.aggregator.max_batch_records,
        "latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": ms(1.0)},
        "probe_answers": samples.len(),
        "transactions": transactions,
        "cpu_s": (cpu * 100.0).round() / 100.0,
        "broker_cpu_s": broker_cpu.map(|c| (c * 100.0).round() / 100.0),
        "peak_rss_bytes": peak_rss,
        "verification": verdict,
        "verified": verdict.ok,
    });
    println!("{out}");
    if !verdict.ok {
        bail!("verification failed: {verdict:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_waits_until_an_answer_shows_its_partition_committed_past_it() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let samples: Samples = vec![
            (at(10), vec![0, 0]),
            (at(20), vec![2, 0]), // partition 0's offsets 0 and 1
            (at(30), vec![2, 1]),
            (at(45), vec![3, 1]),
        ];
        let acks = vec![(0, 0, at(5)), (0, 1, at(8)), (1, 0, at(12)), (0, 2, at(40))];
        let mut got = latencies_ms(&acks, &samples).unwrap();
        got.sort_by(f64::total_cmp);
        let want = [5.0, 12.0, 15.0, 18.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        // Committed before its acknowledgement arrived: no wait, not less.
        assert_eq!(
            latencies_ms(&[(1, 0, at(50))], &samples).unwrap(),
            vec![0.0]
        );
        let err = latencies_ms(&[(1, 1, at(1))], &samples).unwrap_err();
        assert!(err.to_string().contains("1/1"), "{err}");
    }
}
