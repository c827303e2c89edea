//! `SchedulerActor`: consumes due jobs from the delay queue and turns each
//! into an `execute_batch` command on `campaign-commands`, acking the job
//! only once the command is durably written. A job delivered twice yields
//! the same command id, which the campaign applies once.

use crate::actors::SharedCtx;
use crate::domain::campaign::{Command, CommandKind};
use crate::io::OutRecord;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::time::Duration;

pub struct SchedulerActor;

pub enum SchedulerMsg {
    Poll,
}

pub struct SchedulerState {
    ctx: SharedCtx,
}

impl Actor for SchedulerActor {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = SharedCtx;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        ctx: SharedCtx,
    ) -> Result<SchedulerState, ActorProcessingErr> {
        myself.send_message(SchedulerMsg::Poll)?;
        Ok(SchedulerState { ctx })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: SchedulerMsg,
        state: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = &state.ctx;
        if let Some(d) = ctx.queue()?.next_due(Duration::from_millis(250)).await? {
            let lateness_ms = (ctx.clock.now_ms() - d.job.due_at).max(0);
            metrics::histogram!("smartmsg_job_lateness_seconds")
                .record(lateness_ms as f64 / 1000.0);
            metrics::counter!("smartmsg_jobs_fired_total").increment(1);
            if d.redelivered {
                metrics::counter!("smartmsg_jobs_redelivered_total").increment(1);
            }
            let cmd = Command {
                command_id: d.job.command_id.clone(),
                campaign_id: d.job.campaign_id.clone(),
                kind: CommandKind::ExecuteBatch { batch: d.job.batch },
            };
            let value = serde_json::to_vec(&cmd).expect("serialisable");
            match ctx
                .log
                .publish(vec![OutRecord::keyed(
                    &ctx.topics.commands,
                    cmd.campaign_id.clone(),
                    Some(value),
                )])
                .await
            {
                Ok(_) => {
                    ctx.queue()?.ack(d.tag).await?;
                    tracing::debug!(campaign = %d.job.campaign_id, batch = d.job.batch, lateness_ms, "job fired");
                }
                Err(e) => {
                    ctx.queue()?.requeue(d.tag).await?;
                    return Err(e.into());
                }
            }
        }
        myself.send_message(SchedulerMsg::Poll)?;
        Ok(())
    }
}
