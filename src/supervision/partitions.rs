//! `PartitionSupervisorActor`: turns a consumer group's partition events
//! (`Assigned`, `Revoked`, `Lost`) into one supervised actor per owned
//! partition. A revoked partition's actor is drained (stopped and awaited:
//! it finishes and commits what it holds) before the rebalance may go on;
//! on stop the supervisor drains everything and leaves the group.

use crate::io::{GroupMember, PartitionEvent};
use crate::supervision::supervisor::{ChildSpec, SupervisorActor, SupervisorArgs, SupervisorMsg};
use crate::supervision::RestartPolicy;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::BTreeSet;
use std::sync::Arc;

/// Builds the child spec of one partition; `None` for a partition that is
/// owned but runs nothing (a group used as an election: only the owner of
/// one partition runs the actor).
pub type PartitionChild = Arc<dyn Fn(u32) -> Option<ChildSpec> + Send + Sync>;

pub struct PartitionSupervisorArgs {
    /// Bounded label (e.g. "commands", "aggregators").
    pub kind: String,
    pub member: Arc<dyn GroupMember>,
    pub policy: RestartPolicy,
    pub child: PartitionChild,
}

pub enum PartitionSupervisorMsg {
    Event(PartitionEvent),
    /// The group membership ended.
    Ended,
}

pub struct PartitionSupervisorState {
    kind: String,
    member: Arc<dyn GroupMember>,
    child: PartitionChild,
    inner: ActorRef<SupervisorMsg>,
    owned: BTreeSet<u32>,
    pump: tokio::task::JoinHandle<()>,
}

pub struct PartitionSupervisorActor;

impl PartitionSupervisorState {
    async fn release(&mut self, partitions: &[u32], why: &str) {
        for p in partitions {
            if !self.owned.remove(p) {
                continue;
            }
            if let Some(spec) = (self.child)(*p) {
                let _ = ractor::call!(self.inner, SupervisorMsg::RemoveChild, spec.name);
            }
            tracing::info!(kind = %self.kind, partition = p, why, "partition released");
        }
        metrics::gauge!("smartmsg_owned_partitions", "kind" => self.kind.clone())
            .set(self.owned.len() as f64);
    }
}

impl Actor for PartitionSupervisorActor {
    type Msg = PartitionSupervisorMsg;
    type State = PartitionSupervisorState;
    type Arguments = PartitionSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: PartitionSupervisorArgs,
    ) -> Result<PartitionSupervisorState, ActorProcessingErr> {
        let (inner, _) = Actor::spawn_linked(
            None,
            SupervisorActor,
            SupervisorArgs {
                kind: args.kind.clone(),
                policy: args.policy,
                children: Vec::new(),
            },
            myself.get_cell(),
        )
        .await?;
        let member = args.member.clone();
        let me = myself.clone();
        let pump = tokio::spawn(async move {
            while let Some(e) = member.next_event().await {
                if me.send_message(PartitionSupervisorMsg::Event(e)).is_err() {
                    return;
                }
            }
            let _ = me.send_message(PartitionSupervisorMsg::Ended);
        });
        Ok(PartitionSupervisorState {
            kind: args.kind,
            member: args.member,
            child: args.child,
            inner,
            owned: BTreeSet::new(),
            pump,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut PartitionSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let owned: Vec<u32> = state.owned.iter().copied().collect();
        state.release(&owned, "shutdown").await;
        let _ = state
            .inner
            .stop_and_wait(None, Some(std::time::Duration::from_secs(30)))
            .await;
        state.member.leave().await;
        state.pump.abort();
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: PartitionSupervisorMsg,
        state: &mut PartitionSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PartitionSupervisorMsg::Event(PartitionEvent::Assigned(ps)) => {
                tracing::info!(kind = %state.kind, partitions = ?ps, "partitions assigned");
                for p in ps {
                    if state.owned.insert(p) {
                        if let Some(spec) = (state.child)(p) {
                            state.inner.send_message(SupervisorMsg::AddChild(spec))?;
                        }
                    }
                }
                metrics::gauge!("smartmsg_owned_partitions", "kind" => state.kind.clone())
                    .set(state.owned.len() as f64);
            }
            PartitionSupervisorMsg::Event(PartitionEvent::Revoked { partitions, done }) => {
                tracing::info!(kind = %state.kind, partitions = ?partitions, "partitions revoked; draining");
                state.release(&partitions, "revoked").await;
                let _ = done.send(());
            }
            PartitionSupervisorMsg::Event(PartitionEvent::Lost(ps)) => {
                tracing::warn!(kind = %state.kind, partitions = ?ps, "partitions lost");
                state.release(&ps, "lost").await;
            }
            PartitionSupervisorMsg::Ended => {
                tracing::info!(kind = %state.kind, "group membership ended");
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut PartitionSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, e) if cell.get_id() == state.inner.get_id() => {
                Err(format!("{}: partition actors escalated: {e}", state.kind).into())
            }
            SupervisionEvent::ActorTerminated(cell, _, r)
                if cell.get_id() == state.inner.get_id() =>
            {
                Err(format!(
                    "{}: partition supervisor stopped: {}",
                    state.kind,
                    r.unwrap_or_default()
                )
                .into())
            }
            _ => Ok(()),
        }
    }
}
