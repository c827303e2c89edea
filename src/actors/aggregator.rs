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
use crate::domain::reaction::parse_reaction;
use crate::domain::window::{
    FinalWindow, StateChange, WindowConfig, WindowEngine, WindowKey, WindowMeta,
};
use crate::io::store::{AggProgress, AggStateStore};
use crate::io::{
    payload_text, GroupMember, OffsetCommit, OutRecord, PartitionReader, Record, Txn, TxnWriter,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Key of the per-transaction marker on the changelog.
pub const META_KEY: &[u8] = b"__meta";

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct ChangelogMeta {
    stream_time: i64,
    closed_until: i64,
    /// The next input offset once this transaction is committed.
    input_offset: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct ChangelogCount {
    count: u64,
}

pub struct WindowAggregatorActor;

pub struct AggregatorArgs {
    pub ctx: SharedCtx,
    pub partition: u32,
    /// The consumer group membership that owns this partition.
    pub member: Arc<dyn GroupMember>,
}

pub enum AggregatorMsg {
    Poll,
}

pub struct AggregatorState {
    ctx: SharedCtx,
    partition: u32,
    engine: WindowEngine,
    store: AggStateStore,
    reader: Box<dyn PartitionReader>,
    writer: Arc<dyn TxnWriter>,
    progress: AggProgress,
    dlq: Vec<OutRecord>,
    counted: u64,
    uncommitted: usize,
    first_uncommitted: Option<Instant>,
    last_fetch_ms: i64,
}

struct RestoreGuard(SharedCtx);
impl Drop for RestoreGuard {
    fn drop(&mut self) {
        self.0.readiness.restoring.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Outcome of replaying a changelog tail.
struct Replay {
    changes: Vec<StateChange>,
    meta: Option<WindowMeta>,
    position: u64,
    records: u64,
}

/// Replay changelog records from `from`, applying only transactions whose
/// marker says their input offset is committed.
async fn replay_changelog(
    ctx: &SharedCtx,
    partition: u32,
    from: u64,
    committed: u64,
    engine: &mut WindowEngine,
) -> Result<Replay, ActorProcessingErr> {
    let mut reader = ctx
        .log
        .reader(&ctx.topics.aggregator_changelog, partition, from);
    let mut pending: Vec<StateChange> = Vec::new();
    let mut out = Replay {
        changes: Vec::new(),
        meta: None,
        position: from,
        records: 0,
    };
    loop {
        let recs = reader.next_batch(10_000, Duration::ZERO).await?;
        if recs.is_empty() {
            break;
        }
        for rec in recs {
            out.records += 1;
            if rec.key.as_deref() == Some(META_KEY) {
                let meta: Option<ChangelogMeta> = rec
                    .value
                    .as_deref()
                    .and_then(|v| serde_json::from_slice(v).ok());
                match meta {
                    Some(m) if m.input_offset <= committed => {
                        for (k, c) in pending.drain(..) {
                            engine.restore(k.clone(), c);
                            out.changes.push((k, c));
                        }
                        let wm = WindowMeta {
                            stream_time: m.stream_time,
                            closed_until: m.closed_until,
                        };
                        engine.restore_meta(wm);
                        out.meta = Some(wm);
                    }
                    _ => pending.clear(), // a transaction that never committed
                }
                out.position = rec.offset + 1;
                continue;
            }
            let Some(key) = rec.key.as_deref().and_then(WindowKey::decode) else {
                tracing::error!(
                    partition,
                    offset = rec.offset,
                    "unreadable changelog key skipped"
                );
                continue;
            };
            let count = match rec.value.as_deref() {
                None => None,
                Some(v) => match serde_json::from_slice::<ChangelogCount>(v) {
                    Ok(c) => Some(c.count),
                    Err(_) => {
                        tracing::error!(
                            partition,
                            offset = rec.offset,
                            "unreadable changelog value skipped"
                        );
                        continue;
                    }
                },
            };
            pending.push((key, count));
        }
    }
    Ok(out)
}

fn dlq_record(ctx: &SharedCtx, partition: u32, r: &Record, reason: &str) -> OutRecord {
    let class = reason.split(':').next().unwrap_or("invalid").to_string();
    metrics::counter!("smartmsg_dlq_records_total", "reason" => class).increment(1);
    tracing::debug!(partition, offset = r.offset, %reason, "reaction dead-lettered");
    let value = serde_json::json!({
        "reason": reason,
        "topic": ctx.topics.reactions,
        "partition": partition,
        "offset": r.offset,
        "payload": payload_text(r.value.as_deref()),
    });
    OutRecord {
        topic: ctx.topics.reactions_dlq.clone(),
        partition: None,
        key: r.key.clone(),
        value: Some(serde_json::to_vec(&value).expect("serialisable")),
    }
}

impl AggregatorState {
    fn process(&mut self, records: &[Record]) {
        for r in records {
            let res = parse_reaction(r.value.as_deref()).and_then(|ev| self.engine.ingest(&ev));
            match res {
                Ok(()) => self.counted += 1,
                Err(reason) => {
                    let rec = dlq_record(&self.ctx, self.partition, r, &reason);
                    self.dlq.push(rec);
                }
            }
        }
    }

    async fn commit(&mut self) -> Result<(), ActorProcessingErr> {
        let ctx = self.ctx.clone();
        let p = self.partition;
        let (changes, finals) = self.engine.take_changes();
        let meta = self.engine.meta();
        let next = self.reader.position();
        let mut records: Vec<OutRecord> =
            Vec::with_capacity(changes.len() + finals.len() + self.dlq.len() + 1);
        for (k, c) in &changes {
            records.push(OutRecord {
                topic: ctx.topics.aggregator_changelog.clone(),
                partition: Some(p),
                key: Some(k.encode()),
                value: c.map(|count| {
                    serde_json::to_vec(&ChangelogCount { count }).expect("serialisable")
                }),
            });
        }
        let meta_index = records.len();
        records.push(OutRecord {
            topic: ctx.topics.aggregator_changelog.clone(),
            partition: Some(p),
            key: Some(META_KEY.to_vec()),
            value: Some(
                serde_json::to_vec(&ChangelogMeta {
                    stream_time: meta.stream_time,
                    closed_until: meta.closed_until,
                    input_offset: next,
                })
                .expect("serialisable"),
            ),
        });
        for f in &finals {
            records.push(OutRecord::keyed(
                &ctx.topics.aggregates,
                f.campaign_id.clone(),
                Some(serde_json::to_vec(f).expect("serialisable")),
            ));
        }
        records.append(&mut self.dlq);
        let written = self
            .writer
            .commit(Txn {
                records,
                offsets: vec![OffsetCommit {
                    group: ctx.group().to_string(),
                    topic: ctx.topics.reactions.clone(),
                    partition: p,
                    next_offset: next,
                }],
            })
            .await?;
        let progress = AggProgress {
            window: meta,
            input_offset: next,
            changelog_offset: written[meta_index].offset + 1,
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.apply(&changes, &progress)).await??;
        self.progress = progress;
        metrics::counter!("smartmsg_events_aggregated_total").increment(self.counted);
        metrics::counter!("smartmsg_windows_emitted_total").increment(finals.len() as u64);
        emitted_log(p, &finals);
        self.counted = 0;
        self.uncommitted = 0;
        self.first_uncommitted = None;
        Ok(())
    }
}

fn emitted_log(partition: u32, finals: &[FinalWindow]) {
    if !finals.is_empty() {
        tracing::debug!(partition, windows = finals.len(), "final windows emitted");
    }
}

impl Actor for WindowAggregatorActor {
    type Msg = AggregatorMsg;
    type State = AggregatorState;
    type Arguments = AggregatorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: AggregatorArgs,
    ) -> Result<AggregatorState, ActorProcessingErr> {
        let ctx = args.ctx;
        let p = args.partition;
        ctx.readiness.restoring.fetch_add(1, Ordering::SeqCst);
        let _guard = RestoreGuard(ctx.clone());
        let started = Instant::now();
        let cfg = &ctx.cfg.aggregator;
        let mut engine = WindowEngine::new(
            WindowConfig {
                grace_ms: cfg.grace_ms as i64,
                hopping: cfg.hopping_enabled,
            },
            p,
        );
        let committed = args.member.committed(p).await?.unwrap_or(0);
        let store = ctx.stores.aggregator(p)?;
        let local = {
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.load()).await??
        };
        let (from, full) = match local {
            Some((windows, progress)) if progress.input_offset <= committed => {
                for (k, c) in windows {
                    engine.restore(k, Some(c));
                }
                engine.restore_meta(progress.window);
                (progress.changelog_offset, false)
            }
            Some((_, progress)) => {
                tracing::warn!(partition = p, local = progress.input_offset, committed,
                    "local window state is ahead of the committed offset; rebuilding from the changelog");
                (0, true)
            }
            None => (0, true),
        };
        if full {
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.clear()).await??;
        }
        let replay = replay_changelog(&ctx, p, from, committed, &mut engine).await?;
        let progress = AggProgress {
            window: engine.meta(),
            input_offset: committed,
            changelog_offset: replay.position,
        };
        let changes: Vec<StateChange> = if full {
            engine
                .snapshot()
                .into_iter()
                .map(|(k, c)| (k, Some(c)))
                .collect()
        } else {
            replay.changes
        };
        {
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.apply(&changes, &progress)).await??;
        }
        let took = started.elapsed();
        metrics::histogram!("smartmsg_aggregator_restore_seconds").record(took.as_secs_f64());
        metrics::counter!("smartmsg_aggregator_restored_records_total").increment(replay.records);
        tracing::info!(
            partition = p,
            full,
            changelog_records = replay.records,
            open_windows = engine.open_windows(),
            input_offset = committed,
            took_ms = took.as_millis() as u64,
            "aggregator state restored"
        );
        let writer = args.member.writer();
        let reader = args.member.reader(p, committed).await?;
        myself.send_message(AggregatorMsg::Poll)?;
        let now = ctx.clock.now_ms();
        Ok(AggregatorState {
            ctx,
            partition: p,
            engine,
            store,
            reader,
            writer,
            progress,
            dlq: Vec::new(),
            counted: 0,
            uncommitted: 0,
            first_uncommitted: None,
            last_fetch_ms: now,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: AggregatorMsg,
        st: &mut AggregatorState,
    ) -> Result<(), ActorProcessingErr> {
        let cfg = st.ctx.cfg.aggregator.clone();
        let max = cfg.max_batch_records as usize;
        let wait = Duration::from_millis(cfg.idle_close_ms.min(100));
        let records = st
            .reader
            .next_batch(max.saturating_sub(st.uncommitted).max(1), wait)
            .await?;
        let now = st.ctx.clock.now_ms();
        let caught_up = records.is_empty();
        if !caught_up {
            st.last_fetch_ms = now;
            st.uncommitted += records.len();
            st.first_uncommitted.get_or_insert_with(Instant::now);
            st.process(&records);
        } else if now - st.last_fetch_ms >= cfg.idle_close_ms as i64 {
            st.engine.idle_close(now);
        }
        let has_work = st.engine.has_changes()
            || !st.dlq.is_empty()
            || st.reader.position() != st.progress.input_offset;
        let due = caught_up
            || st.uncommitted >= max
            || st
                .first_uncommitted
                .map(|t| t.elapsed() >= Duration::from_millis(cfg.commit_interval_ms))
                .unwrap_or(false);
        if has_work && due {
            st.commit().await?;
        }
        myself.send_message(AggregatorMsg::Poll)?;
        Ok(())
    }
}
