//! `CampaignActor`: one campaign's event-sourced state. It decides each
//! command with the pure state machine, writes the resulting events (and,
//! for a batch, the outbound messages) in one transaction with the consumed
//! command offset, then schedules the next batch in the delay queue. Its
//! state is rebuilt from `campaign-events` on every start.

use crate::actors::targeting::{SelectRequest, TargetingMsg, TargetingRef};
use crate::actors::SharedCtx;
use crate::domain::campaign::{
    batch_events, decide, CampaignState, Command, Decision, Event, EventBody, Outcome,
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
    pub preloaded: Option<Vec<Event>>,
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
}

/// Read one campaign's (or every campaign's) events from a partition of
/// `campaign-events`, deduplicated by identity `(campaign_id, seq)` with the
/// last record winning: a broker may show records of aborted transactions.
pub async fn load_events(
    ctx: &SharedCtx,
    partition: u32,
    campaign_id: Option<&str>,
) -> Result<Vec<Event>, ActorProcessingErr> {
    let mut reader = ctx.log.reader(&ctx.topics.events, partition, 0);
    let mut by_identity: std::collections::BTreeMap<(String, u64), Event> = Default::default();
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
                Some(Ok(e)) => {
                    by_identity.insert((e.campaign_id.clone(), e.seq), e);
                }
                _ => tracing::error!(
                    partition,
                    offset = r.offset,
                    "unreadable campaign event skipped"
                ),
            }
        }
    }
    Ok(by_identity.into_values().collect())
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
        events: Vec<Event>,
        mut extra: Vec<OutRecord>,
        offset: u64,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = &st.args.ctx;
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
        let events = match args.preloaded.take() {
            Some(e) => e,
            None => load_events(&args.ctx, args.partition, Some(&args.campaign_id)).await?,
        };
        let mut state = CampaignState::new(&args.campaign_id, true);
        for e in &events {
            state.apply(e);
        }
        if args.republish {
            if let Some(job) = job_of(&state) {
                args.ctx.queue()?.publish(&job).await?;
            }
        }
        Ok(CampaignActorState { args, state })
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
                let sel = match sel {
                    ractor::rpc::CallResult::Success(s) => s,
                    other => return Err(format!("targeting did not answer: {other:?}").into()),
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
