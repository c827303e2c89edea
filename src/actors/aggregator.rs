//! `WindowAggregatorActor`: one per partition of `reaction-logs`. Counts
//! reactions in event-time windows (the pure `WindowEngine`), and commits in
//! one transaction: changelog records of every state change, a changelog
//! marker carrying the input offset, the final windows, dead-letters and the
//! consumed input offset. Then it writes the same changes to its local sled
//! state with the offsets they reflect. On start it restores only what its
//! local state lacks from the changelog (everything when it has none or it
//! is inconsistent), ignoring changelog records of transactions beyond the
//! committed input offset.

use crate::actors::SharedCtx;
use crate::clock::system_now_ms;
use crate::domain::changelog::{Parts, Replayer, TxnMarker, META_KEY};
use crate::domain::reaction::parse_reaction_view;
use crate::domain::window::{
    FinalWindow, PartChange, PartKey, WindowConfig, WindowEngine, WindowMeta,
};
use crate::io::store::{AggProgress, AggStateStore};
use crate::io::{GroupMember, OffsetCommit, OutRecord, PartitionReader, RecordRef, Txn, TxnWriter};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rustc_hash::FxHashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct WindowAggregatorActor;

/// Records taken from the reader at a time: a transaction spans many
/// chunks, memory holds one.
const FETCH_CHUNK: usize = 2_000;

pub struct AggregatorArgs {
    pub ctx: SharedCtx,
    pub partition: u32,
    /// The consumer group membership that owns this partition.
    pub member: Arc<dyn GroupMember>,
}

pub enum AggregatorMsg {
    Poll,
}

/// The actor's state: restoring (in `post_start`), then running.
pub struct AggregatorPhase(Phase);

enum Phase {
    Starting(AggregatorArgs, RestoreGuard),
    Running(Box<AggregatorState>),
    Stopped,
}

pub struct AggregatorState {
    ctx: SharedCtx,
    partition: u32,
    /// This incarnation's writer epoch (see `domain::changelog`).
    epoch: u64,
    engine: WindowEngine,
    store: AggStateStore,
    reader: Box<dyn PartitionReader>,
    writer: Arc<dyn TxnWriter>,
    /// What the committed transactions reflect.
    progress: AggProgress,
    /// Input offset the next transaction starts at (the end of the one in
    /// flight, if any).
    next_from: u64,
    inflight: Option<InFlight>,
    /// Committed changes not yet in the local checkpoint (latest per part).
    unsaved: FxHashMap<PartKey, Option<Vec<u8>>>,
    last_checkpoint: Instant,
    /// The progress of the last checkpoint.
    saved: AggProgress,
    dlq: Vec<OutRecord>,
    counted: u64,
    uncommitted: usize,
    first_uncommitted: Option<Instant>,
    /// When the last transaction was submitted.
    last_commit: Instant,
    last_fetch_ms: i64,
    /// Whether the end of the partition was reached since the last backlog
    /// (logged once per catch-up).
    caught_up_logged: bool,
    /// Records since the reader was (re)started or the last catch-up.
    backlog: u64,
    backlog_since: Option<Instant>,
}

struct RestoreGuard(SharedCtx);
impl Drop for RestoreGuard {
    fn drop(&mut self) {
        self.0.readiness.restoring.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How a restore went.
struct Restored {
    engine: WindowEngine,
    /// Input offset to resume at.
    input_offset: u64,
    changelog_offset: u64,
    epoch: u64,
    full: bool,
    records: u64,
}

/// Replay the changelog of `partition` from `from` onto `r`.
async fn replay(
    ctx: &SharedCtx,
    partition: u32,
    from: u64,
    r: &mut Replayer,
) -> Result<u64, ActorProcessingErr> {
    let mut reader = ctx
        .log
        .reader(&ctx.topics.aggregator_changelog, partition, from);
    let gauge = metrics::gauge!("smartmsg_aggregator_restore_records", "partition" => partition.to_string());
    let mut logged = Instant::now();
    loop {
        // Small batches: 20,000 records held ~18 MB more RSS over four
        // partitions restoring at once and were no faster (`bench rebuild`).
        let recs = reader.next_batch(2_000, Duration::ZERO).await?;
        if recs.is_empty() {
            break;
        }
        for rec in &recs {
            r.record(rec.key.as_deref(), rec.value.as_deref());
        }
        gauge.set(r.stats.records as f64);
        if logged.elapsed() >= Duration::from_secs(2) {
            logged = Instant::now();
            tracing::info!(
                partition,
                changelog_records = r.stats.records,
                position = reader.position(),
                "aggregator restore in progress"
            );
        }
    }
    let stats = &r.stats;
    if stats.dropped_txns + stats.undone_txns + stats.unreadable > 0 {
        tracing::warn!(
            partition,
            ?stats,
            "changelog held transactions that never committed or unreadable records"
        );
    }
    Ok(reader.position())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::io::IoError> + Send + 'static,
) -> Result<T, ActorProcessingErr> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

/// The engine over replayed parts (unreadable part values are skipped,
/// with a warning).
fn engine_of(ctx: &SharedCtx, p: u32, meta: WindowMeta, parts: &Parts) -> WindowEngine {
    let cfg = &ctx.cfg.aggregator;
    let wcfg = WindowConfig {
        grace_ms: cfg.grace_ms as i64,
        hopping: cfg.hopping_enabled,
    };
    let (engine, unreadable) = WindowEngine::from_parts(wcfg, p, meta, parts);
    if unreadable > 0 {
        tracing::warn!(
            partition = p,
            unreadable,
            "window state parts that cannot be read were skipped"
        );
    }
    engine
}

/// Restore the window state of `partition`: from intact local state plus
/// the changelog tail it lacks, or else from the whole changelog.
async fn restore(
    ctx: &SharedCtx,
    p: u32,
    store: &AggStateStore,
    committed: u64,
) -> Result<Restored, ActorProcessingErr> {
    let local = {
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.load()).await? {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "local window state unreadable; rebuilding from the changelog");
                None
            }
        }
    };
    if let Some((parts, progress)) = local {
        if progress.input_offset <= committed {
            let mut r = Replayer::new(
                parts,
                progress.window,
                committed,
                progress.input_offset,
                progress.epoch,
                true,
            );
            let position = replay(ctx, p, progress.changelog_offset, &mut r).await?;
            if r.input_offset() == committed {
                let progress = AggProgress {
                    window: r.meta(),
                    input_offset: r.input_offset(),
                    changelog_offset: position,
                    epoch: r.epoch(),
                };
                let s = store.clone();
                let changed = r.changed();
                blocking(move || s.apply(&changed, &progress)).await?;
                let records = r.stats.records;
                let meta = r.meta();
                return Ok(Restored {
                    engine: engine_of(ctx, p, meta, &r.into_parts()),
                    input_offset: progress.input_offset,
                    changelog_offset: position,
                    epoch: progress.epoch,
                    full: false,
                    records,
                });
            }
            tracing::warn!(
                partition = p,
                local = progress.input_offset,
                reached = r.input_offset(),
                committed,
                "local window state and changelog do not reach the committed offset; rebuilding"
            );
        } else {
            tracing::warn!(partition = p, local = progress.input_offset, committed,
                "local window state is ahead of the committed offset; rebuilding from the changelog");
        }
    }
    let empty = WindowEngine::new(
        WindowConfig {
            grace_ms: 0,
            hopping: false,
        },
        p,
    )
    .meta();
    let mut r = Replayer::new(Parts::new(), empty, committed, 0, 0, false);
    let position = replay(ctx, p, 0, &mut r).await?;
    if r.input_offset() != committed {
        tracing::error!(
            partition = p,
            reached = r.input_offset(),
            committed,
            "the changelog does not reach the committed input offset; reprocessing input from where it ends"
        );
    }
    let progress = AggProgress {
        window: r.meta(),
        input_offset: r.input_offset(),
        changelog_offset: position,
        epoch: r.epoch(),
    };
    let records = r.stats.records;
    let parts = r.into_parts();
    let engine = engine_of(ctx, p, progress.window, &parts);
    let snapshot: Vec<PartChange> = parts.into_iter().map(|(k, v)| (k, Some(v))).collect();
    let s = store.clone();
    blocking(move || {
        s.clear()?;
        s.apply(&snapshot, &progress)
    })
    .await?;
    Ok(Restored {
        engine,
        input_offset: progress.input_offset,
        changelog_offset: position,
        epoch: progress.epoch,
        full: true,
        records,
    })
}

fn dlq_record(ctx: &SharedCtx, partition: u32, r: &RecordRef<'_>, reason: &str) -> OutRecord {
    let class = reason.split(':').next().unwrap_or("invalid").to_string();
    metrics::counter!("smartmsg_dlq_records_total", "reason" => class).increment(1);
    tracing::debug!(partition, offset = r.offset, %reason, "reaction dead-lettered");
    crate::io::dead_letter(
        &ctx.topics.reactions_dlq,
        &ctx.topics.reactions,
        partition,
        r.offset,
        r.key,
        r.value,
        reason,
    )
}

/// The changelog records of one transaction of `partition`: the values of
/// the parts it changed (tombstones for dropped ones), then the marker
/// closing it, last. Room is left for `more` records (its output).
pub fn changelog_records(
    topic: &str,
    partition: u32,
    changes: &[PartChange],
    marker: &TxnMarker,
    more: usize,
) -> Vec<OutRecord> {
    let mut records = Vec::with_capacity(changes.len() + 1 + more);
    for (k, v) in changes {
        records.push(OutRecord {
            topic: topic.to_string(),
            partition: Some(partition),
            key: Some(k.encode()),
            value: v.clone(),
        });
    }
    records.push(OutRecord {
        topic: topic.to_string(),
        partition: Some(partition),
        key: Some(META_KEY.to_vec()),
        value: Some(marker.encode()),
    });
    records
}

/// Count one input record, or dead-letter it.
struct Ingest<'a> {
    ctx: &'a SharedCtx,
    partition: u32,
    engine: &'a mut WindowEngine,
    dlq: &'a mut Vec<OutRecord>,
    counted: &'a mut u64,
}

impl Ingest<'_> {
    fn record(&mut self, r: RecordRef<'_>) {
        let res = parse_reaction_view(r.value).and_then(|ev| {
            self.engine
                .ingest_parts(&ev.campaign_id, &ev.creative_id, ev.action, ev.ts)
        });
        match res {
            Ok(()) => *self.counted += 1,
            Err(reason) => {
                let rec = dlq_record(self.ctx, self.partition, &r, &reason);
                self.dlq.push(rec);
            }
        }
    }
}

impl AggregatorState {
    /// Read and count the next records (up to `max`, waiting up to `wait`
    /// for the first), straight from the reader's buffer.
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<usize, ActorProcessingErr> {
        let mut ingest = Ingest {
            ctx: &self.ctx,
            partition: self.partition,
            engine: &mut self.engine,
            dlq: &mut self.dlq,
            counted: &mut self.counted,
        };
        Ok(self
            .reader
            .visit_batch(max, wait, &mut |r| ingest.record(r))
            .await?)
    }

    /// Whether processed input or state changes await a transaction.
    fn has_work(&self) -> bool {
        self.engine.has_changes()
            || !self.dlq.is_empty()
            || self.reader.position() != self.next_from
    }

    /// Submit a transaction of everything processed since the last one. It
    /// commits while the next batch is processed (one in flight at most:
    /// the previous one is awaited first).
    async fn commit(&mut self) -> Result<(), ActorProcessingErr> {
        self.finish_inflight().await?;
        let ctx = self.ctx.clone();
        let p = self.partition;
        let (changes, finals) = self.engine.take_changes();
        let meta = self.engine.meta();
        let next = self.reader.position();
        let marker = TxnMarker {
            stream_time: meta.stream_time,
            closed_until: meta.closed_until,
            from: self.next_from,
            input_offset: next,
            epoch: self.epoch,
        };
        let mut records = changelog_records(
            &ctx.topics.aggregator_changelog,
            p,
            &changes,
            &marker,
            finals.len() + self.dlq.len(),
        );
        let marker_index = records.len() - 1;
        let n_finals = finals.len() as u64;
        emitted_log(p, &finals);
        for f in finals {
            let value = f.to_json();
            records.push(OutRecord::keyed(
                &ctx.topics.aggregates,
                f.campaign_id,
                Some(value),
            ));
        }
        records.append(&mut self.dlq);
        let txn = Txn {
            records,
            offsets: vec![OffsetCommit {
                group: ctx.group().to_string(),
                topic: ctx.topics.reactions.clone(),
                partition: p,
                next_offset: next,
            }],
        };
        let writer = self.writer.clone();
        self.inflight = Some(InFlight {
            task: tokio::spawn(async move { writer.commit(txn).await }),
            marker_index,
            progress: AggProgress {
                window: meta,
                input_offset: next,
                changelog_offset: 0,
                epoch: self.epoch,
            },
            changes,
            finals: n_finals,
            counted: self.counted,
        });
        self.next_from = next;
        self.last_commit = Instant::now();
        self.counted = 0;
        self.uncommitted = 0;
        self.first_uncommitted = None;
        Ok(())
    }

    /// Await the transaction in flight, if any, and take its result in.
    async fn finish_inflight(&mut self) -> Result<(), ActorProcessingErr> {
        let Some(f) = self.inflight.take() else {
            return Ok(());
        };
        let waiting = Instant::now();
        let written = f.task.await??;
        metrics::histogram!("smartmsg_aggregator_commit_wait_seconds",
            "partition" => self.partition.to_string())
        .record(waiting.elapsed().as_secs_f64());
        let mut progress = f.progress;
        progress.changelog_offset = written[f.marker_index].offset + 1;
        self.progress = progress;
        self.unsaved.extend(f.changes);
        metrics::counter!("smartmsg_events_aggregated_total").increment(f.counted);
        metrics::counter!("smartmsg_windows_emitted_total").increment(f.finals);
        let every = Duration::from_millis(self.ctx.cfg.aggregator.checkpoint_interval_ms);
        if self.last_checkpoint.elapsed() >= every {
            self.checkpoint().await?;
        }
        Ok(())
    }
}

/// A submitted transaction and what its commit brings.
struct InFlight {
    task: tokio::task::JoinHandle<Result<Vec<crate::io::Written>, crate::io::IoError>>,
    marker_index: usize,
    progress: AggProgress,
    changes: Vec<PartChange>,
    finals: u64,
    counted: u64,
}

impl AggregatorState {
    /// Write the committed changes not yet saved, with the offsets they
    /// reflect, to the local state in one sled batch.
    async fn checkpoint(&mut self) -> Result<(), ActorProcessingErr> {
        self.last_checkpoint = Instant::now();
        let mut changes: Vec<PartChange> = self.unsaved.drain().collect();
        if changes.is_empty() && self.store_is_current() {
            return Ok(());
        }
        changes.sort_unstable_by_key(|c| c.0);
        let store = self.store.clone();
        let progress = self.progress;
        blocking(move || store.apply(&changes, &progress)).await?;
        self.saved = progress;
        Ok(())
    }

    fn store_is_current(&self) -> bool {
        self.saved == self.progress
    }
}

fn emitted_log(partition: u32, finals: &[FinalWindow]) {
    if !finals.is_empty() {
        tracing::debug!(partition, windows = finals.len(), "final windows emitted");
    }
}

/// Restore the partition's state and open its reader (see `restore`).
async fn start(
    myself: &ActorRef<AggregatorMsg>,
    args: AggregatorArgs,
) -> Result<AggregatorState, ActorProcessingErr> {
    let ctx = args.ctx;
    let p = args.partition;
    let started = Instant::now();
    let committed = args.member.committed(p).await?.unwrap_or(0);
    let store = ctx.stores.aggregator(p)?;
    // The input reader connects (and starts fetching, within its bounds)
    // while the state is restored. A restore ends at the committed offset,
    // unless the changelog says otherwise: then the reader seeks.
    let (reader, restored) = tokio::join!(
        args.member.reader(p, committed),
        restore(&ctx, p, &store, committed)
    );
    let (mut reader, restored) = (reader?, restored?);
    if reader.position() != restored.input_offset {
        reader.seek(restored.input_offset);
    }
    let took = started.elapsed();
    metrics::histogram!("smartmsg_aggregator_restore_seconds").record(took.as_secs_f64());
    metrics::counter!("smartmsg_aggregator_restored_records_total").increment(restored.records);
    tracing::info!(
        partition = p,
        full = restored.full,
        changelog_records = restored.records,
        buckets = restored.engine.open_buckets(),
        input_offset = restored.input_offset,
        took_ms = took.as_millis() as u64,
        "aggregator state restored"
    );
    // A new writer epoch, above every epoch in the state restored.
    let epoch = (system_now_ms().max(0) as u64).max(restored.epoch + 1);
    let writer = args.member.writer();
    myself.send_message(AggregatorMsg::Poll)?;
    let now = ctx.clock.now_ms();
    let progress = AggProgress {
        window: restored.engine.meta(),
        input_offset: restored.input_offset,
        changelog_offset: restored.changelog_offset,
        epoch: restored.epoch,
    };
    Ok(AggregatorState {
        ctx,
        partition: p,
        epoch,
        progress,
        next_from: progress.input_offset,
        inflight: None,
        saved: progress,
        unsaved: FxHashMap::default(),
        last_checkpoint: Instant::now(),
        last_commit: Instant::now(),
        engine: restored.engine,
        store,
        reader,
        writer,
        dlq: Vec::new(),
        counted: 0,
        uncommitted: 0,
        first_uncommitted: None,
        last_fetch_ms: now,
        caught_up_logged: false,
        backlog: 0,
        backlog_since: None,
    })
}

impl Actor for WindowAggregatorActor {
    type Msg = AggregatorMsg;
    type State = AggregatorPhase;
    type Arguments = AggregatorArgs;

    /// Only counts the partition as restoring: the restore itself runs in
    /// `post_start`, in the actor's own task, so that the partitions
    /// assigned together restore in parallel (a supervisor starts its
    /// children one at a time, awaiting each `pre_start`).
    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: AggregatorArgs,
    ) -> Result<AggregatorPhase, ActorProcessingErr> {
        args.ctx.readiness.restoring.fetch_add(1, Ordering::SeqCst);
        let guard = RestoreGuard(args.ctx.clone());
        Ok(AggregatorPhase(Phase::Starting(args, guard)))
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        phase: &mut AggregatorPhase,
    ) -> Result<(), ActorProcessingErr> {
        let Phase::Starting(args, guard) = std::mem::replace(&mut phase.0, Phase::Stopped) else {
            return Ok(());
        };
        let st = start(&myself, args).await?;
        drop(guard);
        phase.0 = Phase::Running(Box::new(st));
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: AggregatorMsg,
        phase: &mut AggregatorPhase,
    ) -> Result<(), ActorProcessingErr> {
        let Phase::Running(st) = &mut phase.0 else {
            return Ok(());
        };
        let cfg = st.ctx.cfg.aggregator.clone();
        let max = cfg.max_batch_records as usize;
        // Caught up, a partition commits at once, but not sooner than
        // `min_commit_gap_ms` after its last commit: records waiting for
        // that wait for more input no longer.
        let gap = Duration::from_millis(cfg.min_commit_gap_ms);
        let spaced_in = gap.saturating_sub(st.last_commit.elapsed());
        let mut wait = Duration::from_millis(cfg.idle_close_ms.min(100));
        if st.has_work() && !gap.is_zero() {
            wait = wait.min(spaced_in);
        }
        let fetched = st
            .fetch(
                max.saturating_sub(st.uncommitted).clamp(1, FETCH_CHUNK),
                wait,
            )
            .await?;
        let now = st.ctx.clock.now_ms();
        let caught_up = fetched == 0;
        if !caught_up {
            st.backlog_since.get_or_insert_with(Instant::now);
            st.backlog += fetched as u64;
            st.caught_up_logged = false;
            st.last_fetch_ms = now;
            st.uncommitted += fetched;
            st.first_uncommitted.get_or_insert_with(Instant::now);
        } else if st.reader.at_end() && now - st.last_fetch_ms >= cfg.idle_close_ms as i64 {
            st.engine.idle_close(now);
        }
        if st.reader.at_end() && !st.caught_up_logged {
            st.caught_up_logged = true;
            let took = st
                .backlog_since
                .take()
                .map(|t| t.elapsed())
                .unwrap_or_default();
            // Only after a real backlog: a partition with a trickle of input
            // catches up after every fetch.
            if took >= Duration::from_secs(1) {
                tracing::info!(
                    partition = st.partition,
                    records = st.backlog,
                    took_ms = took.as_millis() as u64,
                    position = st.reader.position(),
                    "aggregator caught up with the end of its partition"
                );
            }
            st.backlog = 0;
        }
        let has_work = st.has_work();
        // Caught up (nothing came, or the end of the partition was reached):
        // commit now rather than at the interval. Otherwise when the batch
        // is full by its input, by its output (what it holds in memory until
        // committed: at high key cardinality each event closes windows of
        // its own), or old enough.
        let spaced = st.last_commit.elapsed() >= gap;
        let due = ((caught_up || st.reader.at_end()) && spaced)
            || st.uncommitted >= max
            || st.engine.pending_finals() + st.dlq.len() >= cfg.max_batch_output as usize
            || st
                .first_uncommitted
                .map(|t| t.elapsed() >= Duration::from_millis(cfg.commit_interval_ms))
                .unwrap_or(false);
        if has_work && due {
            st.commit().await?;
        } else if caught_up || st.inflight.as_ref().is_some_and(|f| f.task.is_finished()) {
            st.finish_inflight().await?;
        }
        let every = Duration::from_millis(cfg.checkpoint_interval_ms);
        if !st.store_is_current() && st.last_checkpoint.elapsed() >= every {
            st.checkpoint().await?;
        }
        myself.send_message(AggregatorMsg::Poll)?;
        Ok(())
    }

    /// Drain: commit what was processed, then checkpoint the local state.
    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        phase: &mut AggregatorPhase,
    ) -> Result<(), ActorProcessingErr> {
        let Phase::Running(st) = &mut phase.0 else {
            return Ok(()); // stopped before it was restored: nothing to drain
        };
        let mut res = Ok(());
        if st.has_work() {
            res = st.commit().await;
        }
        if res.is_ok() {
            res = st.finish_inflight().await;
        }
        if let Err(e) = res {
            tracing::warn!(partition = st.partition, error = %e, "final commit failed; the next owner reprocesses");
        }
        st.checkpoint().await
    }
}
