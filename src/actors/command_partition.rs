//! `CommandPartitionActor`: owns one partition of `campaign-commands`. On
//! start it rebuilds every campaign of the partition from `campaign-events`
//! and makes sure each pending batch has its job in the delay queue; then it
//! feeds commands one by one to the `CampaignActor` of their campaign, which
//! it supervises (restart with backoff, escalation past the intensity).

use crate::actors::campaign::{job_of, load_events, CampaignActor, CampaignArgs, CampaignMsg};
use crate::actors::targeting::TargetingRef;
use crate::actors::{SharedCtx, POLL_WAIT};
use crate::domain::campaign::{CampaignState, Command, Restored};
use crate::io::{GroupMember, OffsetCommit, PartitionReader, Txn, TxnWriter};
use crate::supervision::{Decision, RestartPolicy, RestartTracker, Strategy};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub struct CommandPartitionActor;

pub struct CommandPartitionArgs {
    pub ctx: SharedCtx,
    pub partition: u32,
    pub targeting: TargetingRef,
    /// The consumer group membership that owns this partition.
    pub member: Arc<dyn GroupMember>,
}

pub enum CommandPartitionMsg {
    Poll,
}

pub struct CommandPartitionState {
    ctx: SharedCtx,
    partition: u32,
    targeting: TargetingRef,
    writer: Arc<dyn TxnWriter>,
    reader: Box<dyn PartitionReader>,
    campaigns: HashMap<String, ActorRef<CampaignMsg>>,
    /// Events read at start, handed to each campaign actor on first use.
    preloaded: HashMap<String, Restored>,
    member: Arc<dyn GroupMember>,
    /// Campaigns whose actor failed: not restarted before this time (ms).
    backoff_until: HashMap<String, i64>,
    tracker: RestartTracker,
}

impl CommandPartitionState {
    async fn campaign(
        &mut self,
        myself: &ActorRef<CommandPartitionMsg>,
        id: &str,
    ) -> Result<ActorRef<CampaignMsg>, ActorProcessingErr> {
        if let Some(a) = self.campaigns.get(id) {
            return Ok(a.clone());
        }
        let republish = if let Some(until) = self.backoff_until.remove(id) {
            let wait = until - crate::clock::system_now_ms();
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            }
            true
        } else {
            false
        };
        // A restarted campaign reads the log again, against the offset
        // committed now (read first, see `Restored`).
        let committed = if republish {
            self.member.committed(self.partition).await?.unwrap_or(0)
        } else {
            0
        };
        let preloaded = self.preloaded.remove(id).unwrap_or_default();
        let args = CampaignArgs {
            ctx: self.ctx.clone(),
            campaign_id: id.to_string(),
            partition: self.partition,
            writer: self.writer.clone(),
            targeting: self.targeting.clone(),
            preloaded: Some(preloaded).filter(|_| !republish),
            committed,
            republish,
        };
        let (actor, _) = Actor::spawn_linked(None, CampaignActor, args, myself.get_cell()).await?;
        self.campaigns.insert(id.to_string(), actor.clone());
        Ok(actor)
    }

    /// Route an unreadable command record to the commands DLQ with its offset
    /// committed in the same transaction.
    async fn dead_letter(
        &self,
        offset: u64,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        reason: String,
    ) -> Result<(), ActorProcessingErr> {
        tracing::warn!(partition = self.partition, offset, %reason, "unreadable command dead-lettered");
        metrics::counter!("smartmsg_dlq_records_total", "reason" => "malformed_command")
            .increment(1);
        self.writer
            .commit(Txn {
                records: vec![crate::io::dead_letter(
                    &self.ctx.topics.commands_dlq,
                    &self.ctx.topics.commands,
                    self.partition,
                    offset,
                    key.as_deref(),
                    payload.as_deref(),
                    &reason,
                )],
                offsets: vec![OffsetCommit {
                    group: self.ctx.group().to_string(),
                    topic: self.ctx.topics.commands.clone(),
                    partition: self.partition,
                    next_offset: offset + 1,
                }],
            })
            .await?;
        Ok(())
    }
}

impl Actor for CommandPartitionActor {
    type Msg = CommandPartitionMsg;
    type State = CommandPartitionState;
    type Arguments = CommandPartitionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: CommandPartitionArgs,
    ) -> Result<CommandPartitionState, ActorProcessingErr> {
        let ctx = args.ctx;
        let p = args.partition;
        let writer = args.member.writer();
        // The committed offset first: the events are read against it, and
        // the commands are read again from it (see `Restored`).
        let from = args.member.committed(p).await?.unwrap_or(0);
        let preloaded = load_events(&ctx, p, None, from).await?.by_campaign();
        // Re-publish the job of every pending batch: the publish after the
        // commit that scheduled it may not have happened. Duplicates are
        // harmless (same command id, applied once).
        let mut republished = 0;
        for (id, r) in &preloaded {
            let mut s = CampaignState::new(id, false);
            for e in &r.events {
                s.apply(e);
            }
            if let Some(job) = job_of(&s) {
                ctx.queue()?.publish(&job).await?;
                republished += 1;
            }
        }
        tracing::info!(
            partition = p,
            campaigns = preloaded.len(),
            republished,
            from,
            "command partition restored"
        );
        let reader = args.member.reader(p, from).await?;
        let policy = RestartPolicy::from_config(Strategy::OneForOne, &ctx.cfg.supervision);
        myself.send_message(CommandPartitionMsg::Poll)?;
        Ok(CommandPartitionState {
            ctx,
            partition: p,
            targeting: args.targeting,
            writer,
            reader,
            campaigns: HashMap::new(),
            preloaded,
            member: args.member,
            backoff_until: HashMap::new(),
            tracker: RestartTracker::new(policy),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut CommandPartitionState,
    ) -> Result<(), ActorProcessingErr> {
        for (_, a) in state.campaigns.drain() {
            let _ = a.stop_and_wait(None, Some(Duration::from_secs(10))).await;
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: CommandPartitionMsg,
        state: &mut CommandPartitionState,
    ) -> Result<(), ActorProcessingErr> {
        let records = state.reader.next_batch(100, POLL_WAIT).await?;
        for r in records {
            let command = match r.value.as_deref().map(serde_json::from_slice::<Command>) {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    state
                        .dead_letter(r.offset, r.key, r.value, format!("malformed: {e}"))
                        .await?;
                    continue;
                }
                None => {
                    state
                        .dead_letter(r.offset, r.key, None, "invalid: null value".into())
                        .await?;
                    continue;
                }
            };
            let actor = state.campaign(&myself, &command.campaign_id).await?;
            let id = command.campaign_id.clone();
            let res = actor
                .call(
                    |reply| CampaignMsg::Apply {
                        command,
                        offset: r.offset,
                        reply,
                    },
                    Some(Duration::from_secs(120)),
                )
                .await;
            match res {
                Ok(CallResult::Success(_)) => {}
                other => {
                    // The campaign actor died (or hung) mid-command: retry
                    // this command once it has been restarted from the log.
                    tracing::warn!(campaign = %id, offset = r.offset, result = ?other.map(|_| ()), "command not applied; will retry");
                    // Its supervision event (handled before the next poll)
                    // counts the failure and sets the backoff.
                    if let Some(a) = state.campaigns.get(&id) {
                        a.kill();
                    }
                    state.reader.seek(r.offset);
                    myself.send_after(Duration::from_millis(50), || CommandPartitionMsg::Poll);
                    return Ok(());
                }
            }
        }
        myself.send_message(CommandPartitionMsg::Poll)?;
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut CommandPartitionState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match event {
            SupervisionEvent::ActorFailed(c, e) => (c, e.to_string()),
            SupervisionEvent::ActorTerminated(c, _, r) => {
                (c, format!("stopped: {}", r.unwrap_or_default()))
            }
            _ => return Ok(()),
        };
        let id = cell.get_id();
        let Some(campaign) = state
            .campaigns
            .iter()
            .find(|(_, a)| a.get_id() == id)
            .map(|(k, _)| k.clone())
        else {
            return Ok(());
        };
        state.campaigns.remove(&campaign);
        match state
            .tracker
            .on_failure(crate::clock::system_now_ms(), rand::random())
        {
            Decision::Escalate { restarts } => {
                metrics::counter!("smartmsg_actor_escalations_total", "actor" => "command_partition").increment(1);
                Err(format!(
                    "partition {}: campaign actors failed {restarts} times within the period (last: {campaign}: {why})",
                    state.partition
                )
                .into())
            }
            Decision::Restart { delay, attempt } => {
                tracing::warn!(partition = state.partition, %campaign, attempt, delay_ms = delay.as_millis() as u64,
                    reason = %why, "campaign actor failed; restarting from the log on its next command");
                metrics::counter!("smartmsg_actor_restarts_total", "actor" => "campaign")
                    .increment(1);
                state.backoff_until.insert(
                    campaign,
                    crate::clock::system_now_ms() + delay.as_millis() as i64,
                );
                Ok(())
            }
        }
    }
}
