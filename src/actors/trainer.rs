//! `TrainerActor`: joins sends with later clicks per (campaign, user) within
//! the attribution window, keeps the evidence per (campaign, creative) in
//! sled (with the consumed offsets in the same batch), and every retrain
//! interval with new evidence publishes a new validated model version to
//! the compacted `models` topic (`v<N>` and `current`). One node of the
//! cluster trains at a time (see `node::tree`: an election through a
//! consumer group), and only once it has caught up with the reactions.

use crate::actors::SharedCtx;
use crate::domain::model::{Arm, Model};
use crate::domain::reaction::{parse_reaction, Action};
use crate::io::store::SendRecord;
use crate::io::{OutRecord, TopicReader, Txn, TxnWriter};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct TrainerActor;

pub enum TrainerMsg {
    Poll,
}

pub struct TrainerState {
    ctx: SharedCtx,
    reader: Box<dyn TopicReader>,
    writer: Arc<dyn TxnWriter>,
    version: u64,
    dirty: bool,
    /// Whether the reader has reached the end of the reactions once: a
    /// trainer that has just taken over (or whose node was down) first
    /// catches up, and only then publishes, never a model of part of the
    /// evidence.
    caught_up: bool,
    last_fit: Instant,
}

/// Highest `v<N>` on the models topic.
async fn latest_version(ctx: &SharedCtx) -> Result<u64, ActorProcessingErr> {
    let mut max = 0;
    let from = vec![0; ctx.topics.partitions as usize];
    let mut r = ctx.log.topic_reader(&ctx.topics.models, &from)?;
    {
        loop {
            let recs = r.next_batch(1000, Duration::ZERO).await?;
            if recs.is_empty() {
                break;
            }
            for rec in recs {
                if let Some(n) = rec
                    .key
                    .as_deref()
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .and_then(|k| k.strip_prefix('v'))
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    max = max.max(n);
                }
            }
        }
    }
    Ok(max)
}

/// Fold a batch of reaction records into the evidence (blocking sled IO).
fn absorb(
    ctx: &SharedCtx,
    partition: u32,
    records: &[crate::io::Record],
    next: u64,
) -> Result<bool, crate::io::IoError> {
    let store = &ctx.trainer_store;
    let window = ctx.cfg.model.attribution_window_ms as i64;
    let mut sends: BTreeMap<(String, String), SendRecord> = BTreeMap::new();
    let mut arms: BTreeMap<(String, String), Arm> = BTreeMap::new();
    let mut changed = false;
    for r in records {
        // Invalid records are the aggregator's to dead-letter; the trainer skips them.
        let Ok(ev) = parse_reaction(r.value.as_deref()) else {
            continue;
        };
        let key = (ev.campaign_id.clone(), ev.user_id.clone());
        let known = match sends.get(&key) {
            Some(s) => Some(s.clone()),
            None => store.send(&ev.campaign_id, &ev.user_id)?,
        };
        match ev.action {
            Action::Send if known.is_none() => {
                let ak = (ev.campaign_id.clone(), ev.creative_id.clone());
                let arm = match arms.get(&ak) {
                    Some(a) => *a,
                    None => store.arm(&ev.campaign_id, &ev.creative_id)?,
                };
                arms.insert(
                    ak,
                    Arm {
                        sends: arm.sends + 1,
                        ..arm
                    },
                );
                sends.insert(
                    key,
                    SendRecord {
                        creative_id: ev.creative_id.clone(),
                        ts: ev.ts,
                        clicked: false,
                    },
                );
                changed = true;
            }
            Action::Click => {
                if let Some(mut s) = known {
                    let dt = ev.ts - s.ts;
                    if !s.clicked && (0..=window).contains(&dt) {
                        s.clicked = true;
                        let ak = (ev.campaign_id.clone(), s.creative_id.clone());
                        let arm = match arms.get(&ak) {
                            Some(a) => *a,
                            None => store.arm(&ev.campaign_id, &s.creative_id)?,
                        };
                        arms.insert(
                            ak,
                            Arm {
                                clicks: arm.clicks + 1,
                                ..arm
                            },
                        );
                        sends.insert(key, s);
                        changed = true;
                    }
                }
            }
            _ => {}
        }
    }
    store.apply(&ctx.topics.reactions, partition, &sends, &arms, next)?;
    Ok(changed)
}

impl TrainerState {
    async fn fit_and_publish(&mut self) -> Result<(), ActorProcessingErr> {
        let arms = self.ctx.trainer_store.arms()?;
        let version = self.version + 1;
        let model = Model::new(version, self.ctx.clock.now_ms(), arms);
        if let Err(e) = model.validate() {
            tracing::error!(version, error = %e, "trained model failed validation; not published");
            metrics::counter!("smartmsg_model_swaps_total", "result" => "invalid_trained")
                .increment(1);
            return Ok(());
        }
        let bytes = model.to_bytes();
        let topic = &self.ctx.topics.models;
        self.writer
            .commit(Txn {
                records: vec![
                    OutRecord::keyed(topic, format!("v{version}"), Some(bytes.clone())),
                    OutRecord::keyed(topic, "current", Some(bytes)),
                ],
                offsets: vec![],
            })
            .await?;
        self.version = version;
        metrics::counter!("smartmsg_models_trained_total").increment(1);
        tracing::info!(version, examples = model.examples, "model published");
        Ok(())
    }
}

impl Actor for TrainerActor {
    type Msg = TrainerMsg;
    type State = TrainerState;
    type Arguments = SharedCtx;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        ctx: SharedCtx,
    ) -> Result<TrainerState, ActorProcessingErr> {
        // Every trainer shares one transactional id: a trainer taking over
        // fences the previous one, and an empty transaction waits until
        // that is done (the transaction it may have left open aborted).
        // Only then is the latest version read: no version it wrote, even
        // one of an aborted transaction that a broker shows, is reused.
        let writer = ctx
            .log
            .txn_writer(&format!("{}trainer", ctx.cfg.kafka.topic_prefix))
            .await?;
        writer.commit(Txn::default()).await?;
        let version = latest_version(&ctx).await?;
        let from = (0..ctx.topics.partitions)
            .map(|p| ctx.trainer_store.offset(&ctx.topics.reactions, p))
            .collect::<Result<Vec<u64>, _>>()?;
        let reader = ctx.log.topic_reader(&ctx.topics.reactions, &from)?;
        myself.send_message(TrainerMsg::Poll)?;
        Ok(TrainerState {
            ctx,
            reader,
            writer,
            version,
            dirty: false,
            caught_up: false,
            last_fit: Instant::now(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: TrainerMsg,
        state: &mut TrainerState,
    ) -> Result<(), ActorProcessingErr> {
        let recs = state
            .reader
            .next_batch(5000, Duration::from_millis(50))
            .await?;
        let any = !recs.is_empty();
        if !any && !state.caught_up {
            state.caught_up = true;
            tracing::info!(
                version = state.version,
                "trainer caught up with the reactions"
            );
        }
        if any {
            let ctx = state.ctx.clone();
            let changed =
                tokio::task::spawn_blocking(move || -> Result<bool, crate::io::IoError> {
                    let mut changed = false;
                    for (p, recs) in crate::actors::materializer::by_partition(recs) {
                        let next = recs.last().map(|r| r.offset + 1).unwrap_or(0);
                        changed |= absorb(&ctx, p, &recs, next)?;
                    }
                    Ok(changed)
                })
                .await??;
            state.dirty |= changed;
        }
        let interval = Duration::from_millis(state.ctx.cfg.model.retrain_interval_ms);
        if state.caught_up && state.dirty && state.last_fit.elapsed() >= interval {
            state.fit_and_publish().await?;
            state.dirty = false;
            state.last_fit = Instant::now();
        }
        let delay = if any {
            Duration::ZERO
        } else {
            Duration::from_millis(50)
        };
        myself.send_after(delay, || TrainerMsg::Poll);
        Ok(())
    }
}
