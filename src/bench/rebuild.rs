//! `smartmsg bench rebuild`: an aggregator's full rebuild of its window
//! state from a large changelog, with no local state.
//!
//! The changelog is what long-lived partitions with little traffic leave
//! behind (the broker does not compact it, see `BROKERS.md`): every
//! aggregator transaction of a few input events writes the state parts it
//! changed and a marker. The bench writes it the aggregator's way: synthetic
//! reactions are produced to `reaction-logs` and counted, partition by
//! partition, by the real window engine; each `--events-per-txn` events,
//! the parts it changed (and the tombstones of minutes it dropped) go to the
//! changelog with the transaction's marker, and the group's input offsets
//! are committed in the same Kafka transactions (many aggregator
//! transactions to one Kafka transaction, so that writing is quick). Then a
//! real `smartmsg run` aggregator process starts without local state and
//! rebuilds every partition from the changelog; its restore times are what
//! it logs. Its rebuilt state, read from its sled store once it has
//! stopped, must equal the engine's: parts, window progress and input
//! offset. Last, it restarts with that state intact: it must resume
//! without a rebuild (`restore_ms`).

use super::aggregate::{
    bench_topics, peak_rss_bytes, send_waiting, worker_config, Deliveries, Worker,
};
use super::synth::{generate, SynthSpec};
use crate::actors::aggregator::changelog_records;
use crate::clock::system_now_ms;
use crate::config::Config;
use crate::domain::changelog::{Parts, TxnMarker};
use crate::domain::reaction::parse_reaction_view;
use crate::domain::window::{WindowConfig, WindowEngine, WindowMeta};
use crate::io::store::{open_sled, AggStateStore};
use crate::io::topics::Topics;
use crate::io::{EventLog, OffsetCommit, OutRecord, PartitionEvent, Txn, TxnWriter};
use anyhow::{anyhow, bail};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct RebuildArgs {
    /// Changelog records to write, over all partitions (the last
    /// transactions end each partition's, so a few more are written).
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Partitions of the topics.
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Campaigns in the synthetic input (4 creatives each): the more, the
    /// more buckets a minute's part holds, and the larger each record.
    #[arg(long, default_value_t = 1)]
    pub campaigns: u32,
    /// Input events per aggregator transaction (a partition with little
    /// traffic commits a few at a time).
    #[arg(long, default_value_t = 4)]
    pub events_per_txn: u64,
    /// Seed of the input.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Aggregator transactions are gathered into Kafka transactions of about
/// this many records.
const KAFKA_TXN_RECORDS: usize = 10_000;

/// One partition as the aggregator would have processed it.
struct Partition {
    engine: WindowEngine,
    /// The parts its changelog holds, as a replay must rebuild them.
    parts: Parts,
    /// Next input offset.
    offset: u64,
    /// Input offset the open aggregator transaction starts at.
    from: u64,
}

/// What was written.
struct Written {
    partitions: Vec<Partition>,
    records: u64,
    bytes: u64,
    txns: u64,
    kafka_txns: u64,
    secs: f64,
}

/// Writes the changelog and the input, the aggregator's way.
struct ChangelogWriter<'a> {
    topics: &'a Topics,
    group: &'a str,
    writer: Arc<dyn TxnWriter>,
    runtime: tokio::runtime::Handle,
    epoch: u64,
    pending: Vec<OutRecord>,
    records: u64,
    bytes: u64,
    txns: u64,
    kafka_txns: u64,
}

impl ChangelogWriter<'_> {
    /// End the open aggregator transaction of partition `p`.
    fn end_txn(&mut self, p: u32, part: &mut Partition) {
        let (changes, _finals) = part.engine.take_changes();
        let meta = part.engine.meta();
        let marker = TxnMarker {
            stream_time: meta.stream_time,
            closed_until: meta.closed_until,
            from: part.from,
            input_offset: part.offset,
            epoch: self.epoch,
        };
        let records = changelog_records(&self.topics.aggregator_changelog, p, &changes, &marker, 0);
        for (k, v) in changes {
            match v {
                Some(v) => part.parts.insert(k, v),
                None => part.parts.remove(&k),
            };
        }
        self.records += records.len() as u64;
        self.bytes += records
            .iter()
            .map(|r| {
                (r.key.as_ref().map_or(0, Vec::len) + r.value.as_ref().map_or(0, Vec::len)) as u64
            })
            .sum::<u64>();
        self.pending.extend(records);
        self.txns += 1;
        part.from = part.offset;
    }

    /// Commit the gathered records with every partition's input offset.
    fn commit(&mut self, parts: &[Partition]) -> anyhow::Result<()> {
        let offsets = parts
            .iter()
            .enumerate()
            .map(|(p, part)| OffsetCommit {
                group: self.group.to_string(),
                topic: self.topics.reactions.clone(),
                partition: p as u32,
                next_offset: part.from,
            })
            .collect();
        let txn = Txn {
            records: std::mem::take(&mut self.pending),
            offsets,
        };
        self.runtime.block_on(self.writer.commit(txn))?;
        self.kafka_txns += 1;
        Ok(())
    }
}

/// Produce the input and write its changelog (blocking).
fn write(
    a: &RebuildArgs,
    cfg: &Config,
    topics: &Topics,
    writer: Arc<dyn TxnWriter>,
    runtime: tokio::runtime::Handle,
) -> anyhow::Result<Written> {
    let started = Instant::now();
    let wcfg = WindowConfig {
        grace_ms: cfg.aggregator.grace_ms as i64,
        hopping: cfg.aggregator.hopping_enabled,
    };
    let mut parts: Vec<Partition> = (0..a.partitions)
        .map(|p| Partition {
            engine: WindowEngine::new(wcfg, p),
            parts: Parts::new(),
            offset: 0,
            from: 0,
        })
        .collect();
    let mut out = ChangelogWriter {
        topics,
        group: &cfg.kafka.group_id,
        writer,
        runtime,
        epoch: system_now_ms().max(0) as u64,
        pending: Vec::new(),
        records: 0,
        bytes: 0,
        txns: 0,
        kafka_txns: 0,
    };
    let producer: ThreadedProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", &a.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "500000")
        .set("log_level", "3")
        .create_with_context(Deliveries::default())?;
    // Enough input for one changelog record per transaction; generation
    // stops counting once the changelog is long enough.
    let mut spec = SynthSpec::new(a.records.saturating_mul(a.events_per_txn));
    spec.campaigns = a.campaigns;
    spec.seed = a.seed;
    spec.grace_ms = cfg.aggregator.grace_ms as i64;
    let mut next = 0u64;
    let mut failure: Option<anyhow::Error> = None;
    generate(&spec, |key, value| {
        if failure.is_some() || out.records >= a.records {
            return;
        }
        let p = (next % u64::from(a.partitions)) as u32;
        next += 1;
        let mut rec = BaseRecord::<str, [u8]>::to(&topics.reactions)
            .key(key)
            .partition(p as i32);
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        if let Err(e) = send_waiting(&producer, rec) {
            failure = Some(anyhow!("produce: {e}"));
            return;
        }
        let part = &mut parts[p as usize];
        // Invalid and late records would be dead-lettered: not state.
        if let Ok(ev) = parse_reaction_view(value) {
            let _ = part
                .engine
                .ingest_parts(&ev.campaign_id, &ev.creative_id, ev.action, ev.ts);
        }
        part.offset += 1;
        if part.offset - part.from == a.events_per_txn {
            out.end_txn(p, part);
            if out.pending.len() >= KAFKA_TXN_RECORDS {
                if let Err(e) = out.commit(&parts) {
                    failure = Some(e);
                }
            }
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    if out.records < a.records {
        bail!(
            "the input made only {} changelog records of {}",
            out.records,
            a.records
        );
    }
    for (p, part) in parts.iter_mut().enumerate() {
        if part.offset > part.from {
            out.end_txn(p as u32, part);
        }
    }
    out.commit(&parts)?;
    producer.flush(Duration::from_secs(120))?;
    let failed = producer.context().failed();
    if failed > 0 {
        bail!("{failed} input records failed to produce");
    }
    let ends = producer.context().ends(a.partitions);
    let offsets: Vec<u64> = parts.iter().map(|p| p.offset).collect();
    if ends != offsets {
        bail!("input ends {ends:?}, expected {offsets:?}");
    }
    Ok(Written {
        partitions: parts,
        records: out.records,
        bytes: out.bytes,
        txns: out.txns,
        kafka_txns: out.kafka_txns,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// The stopped worker's rebuilt state against what was written: the
/// partitions that differ.
fn check(cfg: &Config, written: &[Partition]) -> anyhow::Result<Vec<String>> {
    let db = open_sled(
        &sled::Config::new().path(cfg.storage.data_dir.join("sled")),
        Duration::from_secs(10),
    )?;
    let mut wrong = Vec::new();
    for (p, want) in written.iter().enumerate() {
        let store = AggStateStore::open(&db, p as u32)?;
        let Some((parts, progress)) = store.load()? else {
            wrong.push(format!("partition {p}: no state"));
            continue;
        };
        let meta: WindowMeta = want.engine.meta();
        if parts != want.parts {
            wrong.push(format!(
                "partition {p}: {} parts, expected {}",
                parts.len(),
                want.parts.len()
            ));
        }
        if progress.input_offset != want.offset || progress.window != meta {
            wrong.push(format!(
                "partition {p}: at input offset {} ({:?}), expected {} ({meta:?})",
                progress.input_offset, progress.window, want.offset
            ));
        }
    }
    Ok(wrong)
}

pub async fn run(a: RebuildArgs) -> anyhow::Result<()> {
    if a.partitions == 0 || a.events_per_txn == 0 || a.records == 0 {
        bail!("--partitions, --events-per-txn and --records must be at least 1");
    }
    let dir = tempfile::tempdir()?;
    let prefix = format!(
        "rebuild{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    // Its partitions never close windows by the wall clock: the state
    // checked afterwards is the rebuilt one.
    let cfg_path = worker_config(
        dir.path(),
        &a.brokers,
        &prefix,
        a.partitions,
        "bench-rebuild",
        24 * 3_600_000,
    )?;
    let (cfg, topics, log) = bench_topics(&cfg_path).await?;
    // Input offsets commit in a transaction as a group member's: the bench
    // joins the aggregators' group while it writes, and leaves before the
    // aggregator starts.
    let member = log
        .join_group(
            &cfg.kafka.group_id,
            &topics.reactions,
            &format!("{prefix}bench-rebuild"),
        )
        .await?;
    match tokio::time::timeout(Duration::from_secs(60), member.next_event()).await {
        Ok(Some(PartitionEvent::Assigned(_))) => {}
        other => bail!("joining the group: {other:?}"),
    }
    let writer = member.writer();
    let runtime = tokio::runtime::Handle::current();
    let (a2, cfg2, topics2) = (a.clone(), cfg.clone(), topics.clone());
    let written =
        tokio::task::spawn_blocking(move || write(&a2, &cfg2, &topics2, writer, runtime)).await??;
    member.leave().await;
    let input: u64 = written.partitions.iter().map(|p| p.offset).sum();
    eprintln!(
        "wrote {} changelog records ({} bytes, {} aggregator transactions in {} Kafka transactions) for {input} input records in {:.2} s",
        written.records, written.bytes, written.txns, written.kafka_txns, written.secs
    );

    let spawned = Instant::now();
    let worker = Worker::spawn(&std::env::current_exe()?, &cfg_path)?;
    let parts = a.partitions;
    let (worker, restored) = tokio::task::spawn_blocking(move || {
        let r = worker.await_restores(parts, Duration::from_secs(300));
        (worker, r)
    })
    .await?;
    let wall_s = spawned.elapsed().as_secs_f64();
    let (took_ms, full, replayed, _) = restored?;
    let peak_rss = peak_rss_bytes(worker.pid());
    worker.stop()?;
    let cfg3 = cfg.clone();
    let wrong = tokio::task::spawn_blocking(move || check(&cfg3, &written.partitions)).await??;
    // A restart with the rebuilt state intact resumes without reading the
    // changelog again, however long it is.
    let worker = Worker::spawn(&std::env::current_exe()?, &cfg_path)?;
    let (restore_ms, restore_full, restore_replayed, _) = tokio::task::spawn_blocking(move || {
        let r = worker.await_restores(parts, Duration::from_secs(300));
        let _ = worker.stop();
        r
    })
    .await??;
    for spec in topics.specs() {
        let _ = log.delete_topic(&spec.name).await;
    }
    let verified = full && replayed == written.records && wrong.is_empty() && !restore_full;
    let result = json!({
        "changelog_records": written.records,
        "changelog_bytes": written.bytes,
        "avg_record_bytes": (written.bytes as f64 / written.records.max(1) as f64).round(),
        "aggregator_transactions": written.txns,
        "input_events": input,
        "partitions": parts,
        "write_s": (written.secs * 100.0).round() / 100.0,
        "rebuild_ms": took_ms,
        "rebuild_records_per_s": (written.records as f64 / (took_ms.max(1) as f64 / 1000.0)).round(),
        "replayed_records": replayed,
        "start_to_rebuilt_s": (wall_s * 100.0).round() / 100.0,
        "peak_rss_bytes": peak_rss,
        "full_rebuild": full,
        "restore_ms": restore_ms,
        "restore_full_rebuild": restore_full,
        "restore_replayed_records": restore_replayed,
        "wrong": wrong,
        "verified": verified,
    });
    println!("{result}");
    if !verified {
        bail!("the rebuilt state is not the one written");
    }
    Ok(())
}
