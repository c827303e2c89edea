//! `CampaignActor`: one campaign's event-sourced state. It decides each
//! command with the pure state machine, writes the resulting events (and,
//! for a batch, the outbound messages) in one transaction with the consumed
//! command offset, then schedules the next batch in the delay queue. Its
//! state is rebuilt from `campaign-events` on every start.

use crate::actors::targeting::{SelectRequest, Selection, TargetingMsg, TargetingRef};
use crate::actors::SharedCtx;
use crate::domain::campaign::{
    batch_events, decide, Attempt, CampaignState, Command, Decision, Event, EventBody, Outcome,
    Restored,
};
use crate::io::{Job, OffsetCommit, OutRecord, TxnWriter};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

pub struct CampaignActor;

pub struct CampaignArgs {
    pub ctx: SharedCtx,
    pub campaign_id: String,
    pub partition: u32,
    pub writer: Arc<dyn TxnWriter>,
    pub targeting: TargetingRef,
    /// Events already read by the partition owner (None: read the log).
    pub preloaded: Option<Restored>,
    /// The commands partition's committed offset, read before the events
    /// (see `Restored`); used when the log is read here.
    pub committed: u64,
    /// Publish the pending batch's job again (after a failure, the publish
    /// that followed the last commit may not have happened).
    pub republish: bool,
}

pub enum CampaignMsg {
    /// Apply a command read at `offset` of the commands partition.
    Apply {
        command: Command,
        offset: u64,
        reply: RpcReplyPort<Outcome>,
    },
}

pub struct CampaignActorState {
    args: CampaignArgs,
    state: CampaignState,
    /// Selections of batches whose transaction did not commit, by batch.
    attempts: std::collections::HashMap<u64, Attempt>,
}

/// Read one campaign's (or every campaign's) events from a partition of
/// `campaign-events`, as its owner restores them against the commands
/// partition's `committed` offset (read before): see `Restored`.
pub async fn load_events(
    ctx: &SharedCtx,
    partition: u32,
    campaign_id: Option<&str>,
    committed: u64,
) -> Result<Restored, ActorProcessingErr> {
    let mut reader = ctx.log.reader(&ctx.topics.events, partition, 0);
    let mut events = Vec::new();
    loop {
        let recs = reader.next_batch(5000, Duration::ZERO).await?;
        if recs.is_empty() {
            break;
        }
        for r in recs {
            if let Some(id) = campaign_id {
                if r.key.as_deref() != Some(id.as_bytes()) {
                    continue;
                }
            }
            match r.value.as_deref().map(serde_json::from_slice::<Event>) {
                Some(Ok(e)) => events.push(e),
                _ => tracing::error!(
                    partition,
                    offset = r.offset,
                    "unreadable campaign event skipped"
                ),
            }
        }
    }
    let restored = Restored::from_log(events, committed);
    if !restored.attempts.is_empty() {
        tracing::info!(
            partition,
            batches = restored.attempts.len(),
            committed,
            "events of uncommitted transactions left out; their batches run again with the same selection"
        );
    }
    Ok(restored)
}

pub fn job_of(state: &CampaignState) -> Option<Job> {
    if state.status.map(|s| s.is_terminal()).unwrap_or(true) {
        return None;
    }
    state.pending.as_ref().map(|p| Job {
        campaign_id: state.campaign_id.clone(),
        batch: p.batch,
        due_at: p.due_at,
        command_id: p.command_id.clone(),
    })
}

impl CampaignActor {
    async fn commit(
        &self,
        st: &mut CampaignActorState,
        mut events: Vec<Event>,
        mut extra: Vec<OutRecord>,
        offset: u64,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = &st.args.ctx;
        for e in &mut events {
            e.command_offset = Some(offset);
        }
        let mut records: Vec<OutRecord> = events
            .iter()
            .map(|e| {
                OutRecord::keyed(
                    &ctx.topics.events,
                    e.campaign_id.clone(),
                    Some(serde_json::to_vec(e).expect("serialisable")),
                )
                .to_partition(st.args.partition)
            })
            .collect();
        records.append(&mut extra);
        st.args
            .writer
            .commit(crate::io::Txn {
                records,
                offsets: vec![OffsetCommit {
                    group: ctx.group().to_string(),
                    topic: ctx.topics.commands.clone(),
                    partition: st.args.partition,
                    next_offset: offset + 1,
                }],
            })
            .await?;
        let mut scheduled = false;
        for e in &events {
            st.state.apply(e);
            scheduled |= matches!(e.body, EventBody::BatchScheduled { .. });
            if let EventBody::CommandRejected { reason, .. } = &e.body {
                tracing::info!(campaign = %e.campaign_id, command = %e.command_id, %reason, "command rejected");
                metrics::counter!("smartmsg_commands_total", "result" => "rejected").increment(1);
            }
        }
        if !events
            .iter()
            .any(|e| matches!(e.body, EventBody::CommandRejected { .. }))
            && !events.is_empty()
        {
            metrics::counter!("smartmsg_commands_total", "result" => "applied").increment(1);
        }
        if scheduled {
            if let Some(job) = job_of(&st.state) {
                ctx.queue()?.publish(&job).await?;
                metrics::counter!("smartmsg_jobs_scheduled_total").increment(1);
            }
        }
        Ok(())
    }
}

impl Actor for CampaignActor {
    type Msg = CampaignMsg;
    type State = CampaignActorState;
    type Arguments = CampaignArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        mut args: CampaignArgs,
    ) -> Result<CampaignActorState, ActorProcessingErr> {
        let restored = match args.preloaded.take() {
            Some(r) => r,
            None => {
                load_events(
                    &args.ctx,
                    args.partition,
                    Some(&args.campaign_id),
                    args.committed,
                )
                .await?
            }
        };
        let mut state = CampaignState::new(&args.campaign_id, true);
        for e in &restored.events {
            state.apply(e);
        }
        let attempts = restored
            .attempts
            .into_iter()
            .map(|((_, batch), a)| (batch, a))
            .collect();
        if args.republish {
            if let Some(job) = job_of(&state) {
                args.ctx.queue()?.publish(&job).await?;
            }
        }
        Ok(CampaignActorState {
            args,
            state,
            attempts,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: CampaignMsg,
        st: &mut CampaignActorState,
    ) -> Result<(), ActorProcessingErr> {
        let CampaignMsg::Apply {
            command,
            offset,
            reply,
        } = msg;
        let ctx = st.args.ctx.clone();
        let now = ctx.clock.now_ms();
        let max_batch = ctx.cfg.campaign.max_batch_size;
        let outcome = match decide(&st.state, &command, now, max_batch) {
            Decision::Duplicate(o) => {
                self.commit(st, Vec::new(), Vec::new(), offset).await?;
                o
            }
            Decision::Events(events) => {
                let outcome = match events.first().map(|e| &e.body) {
                    Some(EventBody::CommandRejected { reason, .. }) => {
                        Outcome::Rejected(reason.clone())
                    }
                    _ => Outcome::Applied,
                };
                self.commit(st, events, Vec::new(), offset).await?;
                outcome
            }
            Decision::NeedsSelection(plan) => {
                let req = SelectRequest {
                    campaign_id: st.state.campaign_id.clone(),
                    channel_id: st.state.channel_id.clone(),
                    creatives: st
                        .state
                        .creatives
                        .iter()
                        .map(|c| c.creative_id.clone())
                        .collect(),
                    exclude: Arc::new(st.state.sent_users.clone()),
                    size: plan.size,
                    batch: plan.batch,
                };
                // The selection of an attempt that did not commit, when it
                // still fits: the same messages again.
                let again = st.attempts.remove(&plan.batch).filter(|a| {
                    a.pairs.len() as u64 == plan.size
                        && a.pairs
                            .iter()
                            .all(|(u, _)| !st.state.sent_users.contains(u))
                });
                let sel = match again {
                    Some(a) => {
                        tracing::info!(campaign = %st.state.campaign_id, batch = plan.batch,
                            model_version = a.model_version,
                            "batch runs again with the selection of its uncommitted attempt");
                        Selection {
                            pairs: a.pairs,
                            model_version: a.model_version,
                        }
                    }
                    None => {
                        let targeting = st
                            .args
                            .targeting
                            .get()
                            .ok_or("targeting actor is not running")?;
                        let sel = targeting
                            .call(
                                |r| TargetingMsg::Select(req, r),
                                Some(Duration::from_secs(60)),
                            )
                            .await?;
                        match sel {
                            ractor::rpc::CallResult::Success(s) => s,
                            other => {
                                return Err(format!("targeting did not answer: {other:?}").into())
                            }
                        }
                    }
                };
                let events = batch_events(
                    &st.state,
                    &command,
                    &plan,
                    &sel.pairs,
                    sel.model_version,
                    now,
                );
                let outbound: Vec<OutRecord> = sel
                    .pairs
                    .iter()
                    .map(|(user, creative)| {
                        OutRecord::keyed(
                            &ctx.topics.outbound,
                            user.clone(),
                            Some(
                                serde_json::to_vec(&json!({
                                    "campaign_id": st.state.campaign_id,
                                    "batch": plan.batch,
                                    "user_id": user,
                                    "creative_id": creative,
                                    "model_version": sel.model_version,
                                    "ts": now,
                                }))
                                .expect("serialisable"),
                            ),
                        )
                    })
                    .collect();
                let lateness = (now - plan.due_at).max(0);
                self.commit(st, events, outbound, offset).await?;
                metrics::counter!("smartmsg_batches_executed_total").increment(1);
                metrics::counter!("smartmsg_messages_sent_total").increment(sel.pairs.len() as u64);
                tracing::info!(campaign = %st.state.campaign_id, batch = plan.batch, size = sel.pairs.len(),
                    model_version = sel.model_version, lateness_ms = lateness, "batch executed");
                Outcome::Applied
            }
        };
        let _ = reply.send(outcome);
        Ok(())
    }
}
