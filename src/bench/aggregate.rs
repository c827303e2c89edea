//! `smartmsg bench aggregate`: synthetic reactions produced to a Kafka
//! broker, the raw consume rate of the same broker (plain rdkafka consumer,
//! the ceiling), then the aggregation in cluster mode with exactly-once by a
//! real `smartmsg run` process with the aggregator role: its end-to-end rate,
//! CPU time and peak RSS (from /proc), every window count verified from
//! `reaction-aggregates`. That is one pass; `--passes` of them (fresh
//! topics each) give the medians. Then the last pass's aggregator restarts
//! with intact local state, and rebuilds from the changelog without it.

use super::median;
use super::synth::{generate, Expected, SynthSpec};
use crate::config::Config;
use crate::domain::window::FinalWindow;
use crate::io::kafka::{consumer_tuning, KafkaLog, KafkaSettings};
use crate::io::topics::Topics;
use crate::io::EventLog;
use anyhow::{anyhow, bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use serde_json::json;
use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct AggregateArgs {
    /// Number of input records.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Partitions of the topics.
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Campaigns in the synthetic input (4 creatives each).
    #[arg(long, default_value_t = 50)]
    pub campaigns: u32,
    /// Minutes of event time the input covers.
    #[arg(long, default_value_t = 30)]
    pub minutes: i64,
    /// Seed of the input.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Skip the restore measurements.
    #[arg(long)]
    pub no_restore: bool,
    /// Measurements, each on fresh topics (input produced, ceiling read,
    /// aggregated by a fresh process, verified): rates and the ratio are
    /// their medians, every pass is listed.
    #[arg(long, default_value_t = 3)]
    pub passes: u32,
    /// PID of the broker, when it runs on this machine: its CPU time during
    /// the raw consume and the aggregation is reported too (diagnosis: the
    /// broker shares the machine's cores).
    #[arg(long)]
    pub broker_pid: Option<u32>,
}

/// Delivery reports: highest offset per partition, failures.
#[derive(Default)]
pub(super) struct Deliveries {
    ends: Mutex<HashMap<i32, i64>>,
    failed: std::sync::atomic::AtomicU64,
    /// When kept: (partition, offset, when acknowledged) of every record.
    acks: Option<Mutex<Vec<Ack>>>,
}

/// A delivered record: (partition, offset, when the broker acknowledged it).
pub(super) type Ack = (i32, i64, Instant);

impl Deliveries {
    /// Records that failed to be delivered.
    pub(super) fn failed(&self) -> u64 {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The end offset (highest delivered + 1) of each of `partitions`.
    pub(super) fn ends(&self, partitions: u32) -> Vec<u64> {
        let ends = self.ends.lock().expect("ends");
        (0..partitions as i32)
            .map(|p| ends.get(&p).map(|o| (*o + 1) as u64).unwrap_or(0))
            .collect()
    }
}

impl ClientContext for Deliveries {}
impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        match r {
            Ok(m) => {
                if let Some(acks) = &self.acks {
                    let at = Instant::now();
                    acks.lock()
                        .expect("acks")
                        .push((m.partition(), m.offset(), at));
                }
                let mut e = self.ends.lock().expect("ends");
                let v = e.entry(m.partition()).or_insert(-1);
                *v = (*v).max(m.offset());
            }
            Err(_) => {
                self.failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// Hand `rec` to the producer, waiting while its queue is full.
pub(super) fn send_waiting<'a>(
    producer: &ThreadedProducer<Deliveries>,
    mut rec: BaseRecord<'a, str, [u8]>,
) -> Result<(), KafkaError> {
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(_), r)) => {
                rec = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Produce the synthetic input: the end offset of every partition, what
/// must come out, and the seconds it took.
pub fn produce(
    brokers: &str,
    topic: &str,
    spec: &SynthSpec,
    partitions: u32,
) -> anyhow::Result<(Vec<u64>, Expected, f64)> {
    produce_paced(brokers, topic, spec, partitions, None)
}

/// Like `produce`, at most `per_s` records a second when given (so that
/// consumers run while the input is still arriving), counting the records
/// handed to the producer so far in `sent`.
pub fn produce_paced(
    brokers: &str,
    topic: &str,
    spec: &SynthSpec,
    partitions: u32,
    pace: Option<(f64, &std::sync::atomic::AtomicU64)>,
) -> anyhow::Result<(Vec<u64>, Expected, f64)> {
    produce_timed(brokers, topic, spec, partitions, pace, false).map(|(e, x, s, _)| (e, x, s))
}

/// Like `produce_paced`; with `timed`, also when each record was
/// acknowledged.
pub(super) fn produce_timed(
    brokers: &str,
    topic: &str,
    spec: &SynthSpec,
    partitions: u32,
    pace: Option<(f64, &std::sync::atomic::AtomicU64)>,
    timed: bool,
) -> anyhow::Result<(Vec<u64>, Expected, f64, Vec<Ack>)> {
    let ctx = Deliveries {
        acks: timed.then(|| Mutex::new(Vec::with_capacity(spec.events as usize))),
        ..Default::default()
    };
    let producer: ThreadedProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "500000")
        .set("log_level", "3")
        .create_with_context(ctx)?;
    let started = Instant::now();
    let mut n = 0u64;
    // Paced in steps of ~10 ms of input (a pause between steps must stay
    // well below the aggregators' idle close, or they would close windows
    // that later records still fall in).
    let step = pace.map(|(per_s, _)| ((per_s / 100.0) as u64).max(1));
    let exp = generate(spec, |key, value| {
        if let (Some((per_s, sent)), Some(step)) = (pace, step) {
            n += 1;
            sent.store(n, std::sync::atomic::Ordering::Relaxed);
            if n.is_multiple_of(step) {
                let due = started + Duration::from_secs_f64(n as f64 / per_s);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        }
        let mut rec = BaseRecord::<str, [u8]>::to(topic).key(key);
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        if let Err(e) = send_waiting(&producer, rec) {
            panic!("produce: {e}");
        }
    });
    producer.flush(Duration::from_secs(120))?;
    let secs = started.elapsed().as_secs_f64();
    let failed = producer.context().failed();
    if failed > 0 {
        bail!("{failed} records failed to produce");
    }
    let acks = match &producer.context().acks {
        Some(a) => std::mem::take(&mut *a.lock().expect("acks")),
        None => Vec::new(),
    };
    Ok((producer.context().ends(partitions), exp, secs, acks))
}

/// How the raw consumer is tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawTuning {
    /// What makes a plain consumer fastest on this broker (`BROKERS.md`):
    /// short fetch waits and a deep prefetch queue, whatever the memory.
    /// One consumer of every partition: this is the ceiling.
    Fastest,
    /// The same, one consumer (connection) per partition.
    FastestPerPartition,
    /// The aggregators' own fetch settings (small prefetch, one connection
    /// per partition): what reading alone costs them.
    Aggregators,
}

/// Plain consumers of `topic` from the beginning (one, or one per
/// partition): records per second from the first record until every
/// partition is at its end.
fn raw_consume(brokers: &str, topic: &str, ends: &[u64], tuning: RawTuning) -> anyhow::Result<f64> {
    let groups: Vec<Vec<usize>> = match tuning {
        RawTuning::Fastest => vec![(0..ends.len()).collect()],
        RawTuning::FastestPerPartition | RawTuning::Aggregators => {
            (0..ends.len()).map(|p| vec![p]).collect()
        }
    };
    let runs = std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .iter()
            .map(|parts| {
                scope.spawn(move || raw_consume_parts(brokers, topic, ends, parts, tuning))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("raw consumer panicked"))?
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let first = runs
        .iter()
        .map(|r| r.0)
        .min()
        .expect("one consumer at least");
    let last = runs
        .iter()
        .map(|r| r.1)
        .max()
        .expect("one consumer at least");
    let total: u64 = ends.iter().sum();
    Ok(total as f64 / (last - first).as_secs_f64().max(1e-6))
}

/// One plain consumer of `parts`: when it read its first record and when
/// its last.
fn raw_consume_parts(
    brokers: &str,
    topic: &str,
    ends: &[u64],
    parts: &[usize],
    tuning: RawTuning,
) -> anyhow::Result<(Instant, Instant)> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("group.id", format!("raw-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("log_level", "3");
    match tuning {
        RawTuning::Fastest | RawTuning::FastestPerPartition => {
            cfg.set("fetch.wait.max.ms", "5")
                .set("fetch.queue.backoff.ms", "5")
                .set("queued.min.messages", "1000000");
        }
        RawTuning::Aggregators => consumer_tuning(&mut cfg),
    }
    let c: BaseConsumer = cfg.create()?;
    let mut tpl = TopicPartitionList::new();
    for &p in parts {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let total: u64 = parts.iter().map(|&p| ends[p]).sum();
    let mut seen = 0u64;
    let mut bytes = 0usize;
    // Timed from the first record: connecting is not consuming.
    let mut started: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen < total && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            started.get_or_insert_with(Instant::now);
            seen += 1;
            bytes += m.payload().map(|p| p.len()).unwrap_or(0);
        }
    }
    std::hint::black_box(bytes);
    if seen < total {
        bail!("raw consumer read {seen} of {total} records");
    }
    Ok((started.unwrap_or_else(Instant::now), Instant::now()))
}

/// Reads a group's committed offsets with one long-lived client (a client
/// per call costs a connection and a coordinator lookup, tens of ms).
/// `read_committed`, so offsets of transactions not yet committed never
/// count; librdkafka retries an unstable offset quickly here. Polled every
/// 5 ms (a run takes about a second).
pub struct OffsetsProbe {
    consumer: BaseConsumer,
    tpl: TopicPartitionList,
}

impl OffsetsProbe {
    pub fn new(brokers: &str, group: &str, topic: &str, partitions: u32) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("retry.backoff.ms", "2")
            .set("retry.backoff.max.ms", "10")
            .set("log_level", "3")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p as i32);
        }
        Ok(OffsetsProbe { consumer, tpl })
    }

    /// Committed offset per partition (0 where none).
    pub fn committed(&self) -> anyhow::Result<Vec<u64>> {
        let res = self
            .consumer
            .committed_offsets(self.tpl.clone(), Duration::from_secs(30))?;
        let mut out = vec![0u64; self.tpl.count()];
        for e in res.elements() {
            if let (Offset::Offset(o), Some(slot)) =
                (e.offset(), out.get_mut(e.partition() as usize))
            {
                *slot = o.max(0) as u64;
            }
        }
        Ok(out)
    }
}

/// The committed offsets of `group` on `topic`, partition by partition
/// (0 where none).
pub async fn committed(
    log: &dyn EventLog,
    group: &str,
    topic: &str,
    partitions: u32,
) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::with_capacity(partitions as usize);
    for p in 0..partitions {
        out.push(log.group_offset(group, topic, p).await?.unwrap_or(0));
    }
    Ok(out)
}

/// (partition, offset, value) of a record read back.
pub type RawRecord = (i32, i64, Option<Vec<u8>>);

/// Read a topic from the beginning to the end of every partition.
pub fn read_topic(brokers: &str, topic: &str, partitions: u32) -> anyhow::Result<Vec<RawRecord>> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("verify-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("log_level", "3");
    let c: BaseConsumer = cfg.create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let mut eof = vec![false; partitions as usize];
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while eof.iter().any(|e| !e) {
        if Instant::now() > deadline {
            bail!("reading {topic}: no end of partition within 120 s");
        }
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                eof[m.partition() as usize] = false;
                out.push((m.partition(), m.offset(), m.payload().map(|p| p.to_vec())));
            }
            Some(Err(KafkaError::PartitionEOF(p))) => eof[p as usize] = true,
            Some(Err(e)) => bail!("reading {topic}: {e}"),
            None => {}
        }
    }
    Ok(out)
}

/// What the final windows and the DLQ say against the expectation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Verdict {
    pub windows_expected: usize,
    pub windows_found: usize,
    pub wrong_counts: usize,
    pub missing: usize,
    pub unexpected: usize,
    /// Final records whose identity appeared more than once.
    pub duplicate_finals: usize,
    pub dlq_bad: u64,
    pub dlq_late: u64,
    pub ok: bool,
}

/// Check the deduplicated final windows (last record per identity wins)
/// and the DLQ against `exp`.
pub fn verify(
    brokers: &str,
    topics: &Topics,
    partitions: u32,
    exp: &Expected,
) -> anyhow::Result<Verdict> {
    let mut last: HashMap<String, FinalWindow> = HashMap::new();
    let mut dup = 0;
    for (_, _, v) in read_topic(brokers, &topics.aggregates, partitions)? {
        let Some(v) = v else { continue };
        let f: FinalWindow = serde_json::from_slice(&v).context("final window record")?;
        if last.insert(f.identity(), f).is_some() {
            dup += 1;
        }
    }
    let mut sums: HashMap<super::synth::WindowId, u64> = HashMap::new();
    let mut unexpected = 0;
    for f in last.values() {
        match Expected::window_id(
            &f.campaign_id,
            &f.creative_id,
            f.action,
            f.window,
            f.window_start,
        ) {
            Some(id) => *sums.entry(id).or_default() += f.count,
            None => unexpected += 1,
        }
    }
    let mut v = Verdict {
        windows_expected: exp.windows.len(),
        windows_found: sums.len(),
        duplicate_finals: dup,
        ..Default::default()
    };
    for (id, n) in &exp.windows {
        match sums.get(id) {
            None => v.missing += 1,
            Some(m) if m != n => v.wrong_counts += 1,
            Some(_) => {}
        }
    }
    v.unexpected = unexpected + sums.keys().filter(|k| !exp.windows.contains_key(k)).count();
    let mut dlq: HashMap<(u64, u64), String> = HashMap::new();
    for (_, _, val) in read_topic(brokers, &topics.reactions_dlq, partitions)? {
        let Some(val) = val else { continue };
        let d: serde_json::Value = serde_json::from_slice(&val)?;
        let id = (
            d["partition"].as_u64().unwrap_or(0),
            d["offset"].as_u64().unwrap_or(0),
        );
        dlq.insert(id, d["reason"].as_str().unwrap_or("").to_string());
    }
    v.dlq_late = dlq.values().filter(|r| r.starts_with("late")).count() as u64;
    v.dlq_bad = dlq.len() as u64 - v.dlq_late;
    v.ok = v.missing == 0
        && v.wrong_counts == 0
        && v.unexpected == 0
        && v.dlq_late == exp.late
        && v.dlq_bad == exp.bad;
    Ok(v)
}

/// Sum of the samples of `name` (any labels) in Prometheus text.
pub(super) fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// CPU seconds of a process's threads, by thread name (digits dropped:
/// `tokio-rt-worker`, `rdk:broker`, ...).
fn thread_cpu(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    for e in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name: String = head
            .split_once('(')
            .map(|(_, n)| n)
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        *out.entry(name).or_insert(0.0) += (ticks(11) + ticks(12)) / hz.max(1.0);
    }
    out
}

/// `/proc/<pid>` readings of a child.
pub(super) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 after ")".
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

pub(super) fn peak_rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// A `smartmsg run` child with the aggregator role.
pub struct Worker {
    pub child: Child,
    /// Its HTTP port (`/metrics`).
    pub port: u16,
    /// (partition, took_ms, full, changelog_records, when) per restore logged.
    pub restores: mpsc::Receiver<(u64, u64, bool, u64, Instant)>,
}

impl Worker {
    /// Start `bin run --config config`. With `SMARTMSG_BENCH_WRAPPER` set
    /// (say `perf record -g -o agg.data`), the process runs under that
    /// command, for profiling (CPU and RSS readings are then the
    /// wrapper's). A wrapper must `exec` the process: the PID started is
    /// the one stopped. Heap profilers that preload `malloc` see nothing:
    /// the binary's own jemalloc serves every allocation.
    pub fn spawn(bin: &Path, config: &Path) -> anyhow::Result<Worker> {
        let wrapper = std::env::var("SMARTMSG_BENCH_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(w) => {
                let mut c = Command::new(w);
                c.args(words).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut child = cmd
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("SMARTMSG__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the aggregator process")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    eprintln!("worker: {line}");
                    continue;
                };
                let f = &v["fields"];
                if f["message"] == "aggregator state restored" {
                    let _ = tx.send((
                        f["partition"].as_u64().unwrap_or(0),
                        f["took_ms"].as_u64().unwrap_or(0),
                        f["full"].as_bool().unwrap_or(false),
                        f["changelog_records"].as_u64().unwrap_or(0),
                        Instant::now(),
                    ));
                } else if v["level"] == "ERROR" || v["level"] == "WARN" {
                    eprintln!("worker: {line}");
                }
            }
        });
        Ok(Worker {
            child,
            port,
            restores: rx,
        })
    }

    /// Its `/metrics` text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("malformed /metrics answer"))?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            bail!("/metrics answered {}", head.lines().next().unwrap_or(""));
        }
        Ok(body.to_string())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for `n` partition restores: (max took_ms, all full, records,
    /// when the first partition was restored, i.e. could start processing).
    pub fn await_restores(
        &self,
        n: u32,
        timeout: Duration,
    ) -> anyhow::Result<(u64, bool, u64, Instant)> {
        let deadline = Instant::now() + timeout;
        let (mut took, mut full, mut records, mut first) = (0, true, 0, None);
        for _ in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            let (_, t, f, r, at) = self
                .restores
                .recv_timeout(left)
                .map_err(|_| anyhow!("the aggregator process did not restore all partitions"))?;
            took = took.max(t);
            full &= f;
            records += r;
            first.get_or_insert(at);
        }
        Ok((took, full, records, first.unwrap_or_else(Instant::now)))
    }

    /// SIGKILL (a crash) and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (graceful drain).
    pub fn stop(mut self) -> anyhow::Result<()> {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        bail!("the aggregator process did not stop within 60 s")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Config file of an aggregator-only node (`idle_close_ms`: when its idle
/// partitions close their windows by the wall clock).
/// A bench worker's config, and its topics created on the broker.
pub(super) async fn bench_topics(cfg_path: &Path) -> anyhow::Result<(Config, Topics, KafkaLog)> {
    let cfg = Config::load(Some(cfg_path)).map_err(|e| anyhow!("{e}"))?;
    let topics = Topics::new(&cfg);
    let log = KafkaLog::connect(KafkaSettings::from_config(&cfg)).await?;
    for spec in topics.specs() {
        log.ensure_topic(&spec).await?;
    }
    Ok((cfg, topics, log))
}

/// `verify` every 1.5 s until it passes or 60 s went by (the last windows
/// close once the partitions are idle): the last verdict.
pub(super) async fn await_verified(
    brokers: &str,
    topics: &Topics,
    partitions: u32,
    exp: &Expected,
) -> anyhow::Result<Verdict> {
    let mut verdict = Verdict::default();
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        verdict = tokio::task::block_in_place(|| verify(brokers, topics, partitions, exp))?;
        if verdict.ok {
            break;
        }
    }
    Ok(verdict)
}

pub fn worker_config(
    dir: &Path,
    brokers: &str,
    prefix: &str,
    partitions: u32,
    node: &str,
    idle_close_ms: u64,
) -> anyhow::Result<PathBuf> {
    worker_config_with(
        dir,
        brokers,
        prefix,
        partitions,
        node,
        &[("idle_close_ms", idle_close_ms)],
    )
}

/// Like `worker_config`, with these `[aggregator]` settings.
pub fn worker_config_with(
    dir: &Path,
    brokers: &str,
    prefix: &str,
    partitions: u32,
    node: &str,
    aggregator: &[(&str, u64)],
) -> anyhow::Result<PathBuf> {
    let data = dir.join(format!("data-{node}"));
    let aggregator: String = aggregator
        .iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
    let text = format!(
        r#"[node]
id = "{node}"
roles = "aggregator"
[storage]
data_dir = "{data}"
[http]
listen = "127.0.0.1:0"
[backend]
kind = "cluster"
[kafka]
brokers = "{brokers}"
topic_prefix = "{prefix}"
partitions = {partitions}
group_id = "{prefix}group"
session_timeout_ms = 6000
[aggregator]
{aggregator}[log]
format = "json"
level = "info"
"#,
        data = data.display()
    );
    let path = dir.join(format!("{node}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// One measurement: fresh topics, the synthetic input produced to them,
/// the ceiling read, then the aggregation by a fresh process, verified.
struct Pass {
    /// The worker's config (its data directory is kept for the restores).
    cfg_path: PathBuf,
    total: u64,
    events_per_s: f64,
    raw: f64,
    ratio: f64,
    events_per_cpu_s: f64,
    peak_rss: u64,
    verdict: Verdict,
    changelog: usize,
    /// Everything else measured, as printed.
    detail: serde_json::Value,
}

async fn measure_pass(a: &AggregateArgs, dir: &Path, n: u32) -> anyhow::Result<Pass> {
    let prefix = format!("bench{}.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let node = format!("bench-agg-{n}");
    let cfg_path = worker_config(dir, &a.brokers, &prefix, a.partitions, &node, 1000)?;
    let (cfg, topics, _log) = bench_topics(&cfg_path).await?;
    let mut spec = SynthSpec::new(a.events);
    spec.campaigns = a.campaigns;
    spec.span_ms = a.minutes * 60_000;
    spec.seed = a.seed;
    spec.grace_ms = cfg.aggregator.grace_ms as i64;
    let (brokers, topic, parts) = (a.brokers.clone(), topics.reactions.clone(), a.partitions);
    let spec2 = spec.clone();
    let (ends, exp, produce_secs) =
        tokio::task::spawn_blocking(move || produce(&brokers, &topic, &spec2, parts)).await??;
    let total: u64 = ends.iter().sum();
    if total != a.events {
        bail!("produced {total} of {} records", a.events);
    }
    eprintln!(
        "pass {n}: produced {total} records in {produce_secs:.2} s ({:.0}/s); ends {ends:?}",
        total as f64 / produce_secs
    );
    let broker_cpu = || a.broker_pid.map(cpu_seconds);
    // The ceiling is read three times, between the other raw reads (a read
    // takes about half a second, and this machine's speed drifts by tens
    // of percent over seconds): its median counts.
    let mut raws = Vec::new();
    for tuning in [
        RawTuning::Fastest,
        RawTuning::Aggregators,
        RawTuning::Fastest,
        RawTuning::FastestPerPartition,
        RawTuning::Fastest,
    ] {
        let (brokers, topic, e2) = (a.brokers.clone(), topics.reactions.clone(), ends.clone());
        let (own0, broker0) = (cpu_seconds(std::process::id()), broker_cpu());
        let raw = tokio::task::spawn_blocking(move || raw_consume(&brokers, &topic, &e2, tuning))
            .await??;
        let own = cpu_seconds(std::process::id()) - own0;
        let broker = broker_cpu().zip(broker0).map(|(b, b0)| b - b0);
        eprintln!("raw consume ({tuning:?} tuning): {raw:.0} records/s, {own:.2} CPU-s, broker {broker:?} CPU-s");
        raws.push((tuning, raw, own, broker));
    }
    let of = |t: RawTuning| {
        raws.iter()
            .filter(move |r| r.0 == t)
            .map(|r| (r.1, r.2, r.3))
    };
    let mut ceiling: Vec<_> = of(RawTuning::Fastest).collect();
    let raw_samples: Vec<f64> = ceiling.iter().map(|c| c.0.round()).collect();
    ceiling.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (raw, raw_cpu, raw_broker_cpu) = ceiling[ceiling.len() / 2];
    let raw_same = of(RawTuning::Aggregators).next().expect("measured").0;
    let raw_per_partition = of(RawTuning::FastestPerPartition)
        .next()
        .expect("measured")
        .0;

    // The aggregation run.
    let spawned = Instant::now();
    let worker = Worker::spawn(&std::env::current_exe()?, &cfg_path)?;
    let pid = worker.pid();
    let w = tokio::task::spawn_blocking(move || {
        let r = worker.await_restores(parts, Duration::from_secs(120));
        (worker, r)
    })
    .await?;
    let (worker, restored) = w;
    // Timed from the first partition restored: it starts processing then.
    let (_, _, _, start) = restored?;
    let cpu0 = cpu_seconds(pid);
    let own0 = cpu_seconds(std::process::id());
    let threads0 = thread_cpu(pid);
    let broker0 = broker_cpu();
    let metrics0 = worker.metrics().unwrap_or_default();
    eprintln!(
        "aggregator process up and restored after {:.2} s; aggregating",
        spawned.elapsed().as_secs_f64()
    );
    let group = cfg.kafka.group_id.clone();
    let probe = OffsetsProbe::new(&a.brokers, &group, &topics.reactions, parts)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    // When each partition's committed offset reached its end.
    let mut done_s: Vec<Option<f64>> = vec![None; parts as usize];
    loop {
        let c = tokio::task::block_in_place(|| probe.committed())?;
        for (i, (o, e)) in c.iter().zip(&ends).enumerate() {
            if o == e && done_s[i].is_none() {
                done_s[i] = Some((start.elapsed().as_secs_f64() * 1000.0).round() / 1000.0);
            }
        }
        if c == ends {
            break;
        }
        if Instant::now() > deadline {
            bail!("aggregation did not finish within 600 s: committed {c:?} of {ends:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    // This process's own CPU meanwhile (the offsets probe): it shares the
    // cores too.
    let own_cpu = cpu_seconds(std::process::id()) - own0;
    let broker_agg_cpu = broker_cpu().zip(broker0).map(|(b, b0)| b - b0);
    let mut threads = thread_cpu(pid);
    for (name, c) in threads.iter_mut() {
        *c = ((*c - threads0.get(name).copied().unwrap_or(0.0)) * 100.0).round() / 100.0;
    }
    threads.retain(|_, c| *c > 0.0);
    eprintln!("aggregated {total} records in {secs:.2} s, {cpu:.2} CPU-s, broker {broker_agg_cpu:?} CPU-s");
    // Where the aggregation waited (summed over partitions).
    let m = worker.metrics()?;
    // During the run (the process waited before and waits after too).
    let during = |name: &str| {
        ((metric_sum(&m, name) - metric_sum(&metrics0, name)) * 1000.0).round() / 1000.0
    };
    let waits = json!({
        "transactions": during("smartmsg_kafka_transaction_seconds_count"),
        "transaction_s": during("smartmsg_kafka_transaction_seconds_sum"),
        "commit_wait_s": during("smartmsg_aggregator_commit_wait_seconds_sum"),
        "input_wait_s": during("smartmsg_partition_input_wait_seconds_sum"),
    });
    eprintln!("waits: {waits}");
    let verdict = await_verified(&a.brokers, &topics, parts, &exp).await?;
    let peak_rss = peak_rss_bytes(pid);
    eprintln!("verification: {verdict:?}");
    let changelog = {
        let (b, t) = (a.brokers.clone(), topics.aggregator_changelog.clone());
        tokio::task::spawn_blocking(move || read_topic(&b, &t, parts).map(|v| v.len())).await??
    };
    worker.stop()?;

    let events_per_s = total as f64 / secs;
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    let detail = json!({
        "events_per_s": events_per_s.round(),
        "events_per_cpu_s": (total as f64 / cpu.max(1e-9)).round(),
        "peak_rss_bytes": peak_rss,
        "raw_consume_events_per_s": raw.round(),
        "raw_consume_samples": raw_samples,
        "raw_ratio": round2(events_per_s / raw),
        "raw_consume_same_settings_events_per_s": raw_same.round(),
        "raw_ratio_same_settings": round2(events_per_s / raw_same),
        "raw_consume_per_partition_events_per_s": raw_per_partition.round(),
        "raw_ratio_per_partition": round2(events_per_s / raw_per_partition),
        "produce_events_per_s": (total as f64 / produce_secs).round(),
        "cpu_s": round2(cpu),
        "raw_consume_cpu_s": round2(raw_cpu),
        "broker_cpu_s": broker_agg_cpu.map(round2),
        "bench_cpu_s": round2(own_cpu),
        "raw_consume_broker_cpu_s": raw_broker_cpu.map(round2),
        "waits": waits,
        "thread_cpu_s": threads,
        "partition_done_s": done_s,
        "verified": verdict.ok,
    });
    Ok(Pass {
        cfg_path,
        total,
        events_per_s,
        raw,
        ratio: events_per_s / raw,
        events_per_cpu_s: total as f64 / cpu.max(1e-9),
        peak_rss,
        verdict,
        changelog,
        detail,
    })
}

pub async fn run(a: AggregateArgs) -> anyhow::Result<()> {
    if a.passes == 0 {
        bail!("--passes must be at least 1");
    }
    let dir = tempfile::tempdir()?;
    let mut passes: Vec<Pass> = Vec::new();
    for n in 1..=a.passes {
        let pass = measure_pass(&a, dir.path(), n).await?;
        let last = n == a.passes;
        if !last {
            // A broker slows down as topics accumulate: only the last
            // pass's are kept, for the restores.
            drop_topics(&pass.cfg_path).await?;
        }
        let ok = pass.verdict.ok;
        passes.push(pass);
        if !ok {
            break; // reported below
        }
    }
    let last = passes.last().expect("one pass at least");
    let parts = a.partitions;

    let (mut restore_ms, mut rebuild_ms, mut rebuild_records) = (None, None, None);
    if !a.no_restore && last.verdict.ok {
        // Restart with intact local state.
        let w = Worker::spawn(&std::env::current_exe()?, &last.cfg_path)?;
        let (took, full, _, _) = tokio::task::spawn_blocking(move || {
            let r = w.await_restores(parts, Duration::from_secs(120));
            let _ = w.stop();
            r
        })
        .await??;
        if full {
            bail!("a restart with intact local state rebuilt from the changelog");
        }
        restore_ms = Some(took);
        // Full rebuild: no local state.
        let cfg = Config::load(Some(&last.cfg_path)).map_err(|e| anyhow!("{e}"))?;
        std::fs::remove_dir_all(&cfg.storage.data_dir)?;
        let w = Worker::spawn(&std::env::current_exe()?, &last.cfg_path)?;
        let (took, full, records, _) = tokio::task::spawn_blocking(move || {
            let r = w.await_restores(parts, Duration::from_secs(120));
            let _ = w.stop();
            r
        })
        .await??;
        if !full {
            bail!("a start without local state did not rebuild");
        }
        rebuild_ms = Some(took);
        rebuild_records = Some(records);
    }
    drop_topics(&last.cfg_path).await?;

    // Rates are the medians over the passes; the ratio is the median of
    // each pass's own ratio (the ceiling read seconds before the
    // aggregation it is compared with). The pass with the median ratio
    // gives the diagnostic details; every pass is listed.
    let verified = passes.iter().all(|p| p.verdict.ok);
    let ratio = median(passes.iter().map(|p| p.ratio).collect());
    let typical = passes
        .iter()
        .min_by(|x, y| (x.ratio - ratio).abs().total_cmp(&(y.ratio - ratio).abs()))
        .expect("one pass at least");
    let mut result = typical.detail.clone();
    let fields = result.as_object_mut().expect("an object");
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    for (k, v) in [
        ("events", json!(last.total)),
        (
            "events_per_s",
            json!(median(passes.iter().map(|p| p.events_per_s).collect()).round()),
        ),
        (
            "events_per_cpu_s",
            json!(median(passes.iter().map(|p| p.events_per_cpu_s).collect()).round()),
        ),
        (
            "peak_rss_bytes",
            json!(passes.iter().map(|p| p.peak_rss).max()),
        ),
        (
            "raw_consume_events_per_s",
            json!(median(passes.iter().map(|p| p.raw).collect()).round()),
        ),
        ("raw_ratio", json!(round2(ratio))),
        ("restore_ms", json!(restore_ms)),
        ("rebuild_ms", json!(rebuild_ms)),
        ("rebuild_changelog_records", json!(rebuild_records)),
        ("changelog_records", json!(last.changelog)),
        ("partitions", json!(parts)),
        (
            "passes",
            json!(passes.iter().map(|p| &p.detail).collect::<Vec<_>>()),
        ),
        ("verified", json!(verified)),
        ("verification", json!(last.verdict)),
    ] {
        fields.insert(k.to_string(), v);
    }
    println!("{result}");
    if !verified {
        bail!("verification failed");
    }
    Ok(())
}

/// Delete the topics of a pass.
async fn drop_topics(cfg_path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(Some(cfg_path)).map_err(|e| anyhow!("{e}"))?;
    let log = KafkaLog::connect(KafkaSettings::from_config(&cfg)).await?;
    for spec in Topics::new(&cfg).specs() {
        let _ = log.delete_topic(&spec.name).await;
    }
    Ok(())
}
