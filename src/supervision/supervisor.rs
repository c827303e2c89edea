//! `SupervisorActor`: an OTP-style supervisor on ractor. It starts its
//! children in order, and when one fails applies its [`RestartPolicy`]:
//! which children restart (strategy), after what backoff, and escalation
//! (the supervisor fails, so its own parent decides) once the restart
//! intensity is exceeded. Children rebuild their state in `pre_start` from
//! their store or log: a restart never reuses the dead actor's memory.

use crate::supervision::policy::{Decision, RestartPolicy, RestartTracker, RestartType};
use futures::future::BoxFuture;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::sync::Arc;
use std::time::Duration;

/// Starts one child linked to the given supervisor cell.
pub type StartFn = Arc<
    dyn Fn(ActorCell) -> BoxFuture<'static, Result<ActorCell, ActorProcessingErr>> + Send + Sync,
>;

/// How to (re)start one child.
#[derive(Clone)]
pub struct ChildSpec {
    /// Unique name among the supervisor's children (for logs).
    pub name: String,
    /// Bounded label for metrics: the actor kind.
    pub kind: String,
    pub restart: RestartType,
    pub start: StartFn,
}

impl ChildSpec {
    /// A child spec from an actor value and its arguments (cloned per start).
    pub fn new<A, F>(name: impl Into<String>, kind: impl Into<String>, make: F) -> Self
    where
        A: Actor,
        F: Fn() -> (A, A::Arguments) + Send + Sync + 'static,
    {
        let name = name.into();
        let actor_name = name.clone();
        let make = Arc::new(make);
        ChildSpec {
            name,
            kind: kind.into(),
            restart: RestartType::Permanent,
            start: Arc::new(move |sup: ActorCell| {
                let make = make.clone();
                let actor_name = actor_name.clone();
                Box::pin(async move {
                    let (actor, args) = make();
                    let _ = actor_name;
                    let (r, _) = Actor::spawn_linked(None, actor, args, sup).await?;
                    Ok(r.get_cell())
                })
            }),
        }
    }

    pub fn transient(mut self) -> Self {
        self.restart = RestartType::Transient;
        self
    }
}

pub struct SupervisorArgs {
    /// Bounded label: this supervisor's kind (for its own escalations).
    pub kind: String,
    pub policy: RestartPolicy,
    pub children: Vec<ChildSpec>,
}

pub enum SupervisorMsg {
    /// Start the given children (after a backoff).
    Restart(Vec<String>),
    /// Add and start a child (dynamic supervision).
    AddChild(ChildSpec),
    /// Stop and forget a child.
    RemoveChild(String, RpcReplyPort<()>),
    /// Names of live children and their cells.
    Children(RpcReplyPort<Vec<(String, Option<ActorCell>)>>),
}

struct Slot {
    spec: ChildSpec,
    cell: Option<ActorCell>,
}

pub struct SupervisorState {
    kind: String,
    tracker: RestartTracker,
    slots: Vec<Slot>,
}

pub struct SupervisorActor;

fn jitter() -> f64 {
    rand::random::<f64>()
}

impl SupervisorState {
    fn index_of(&self, cell: &ActorCell) -> Option<usize> {
        let id = cell.get_id();
        self.slots
            .iter()
            .position(|s| s.cell.as_ref().map(|c| c.get_id()) == Some(id))
    }
}

async fn start_slot(slot: &mut Slot, me: ActorCell) -> Result<(), ActorProcessingErr> {
    let cell = (slot.spec.start)(me).await?;
    slot.cell = Some(cell);
    Ok(())
}

impl SupervisorActor {
    /// Handle a child's failure: restart per strategy with backoff, or escalate.
    async fn child_down(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        idx: usize,
        why: String,
    ) -> Result<(), ActorProcessingErr> {
        let kind = state.slots[idx].spec.kind.clone();
        let name = state.slots[idx].spec.name.clone();
        state.slots[idx].cell = None;
        let now = crate::clock::system_now_ms();
        match state.tracker.on_failure(now, jitter()) {
            Decision::Escalate { restarts } => {
                tracing::error!(supervisor = %state.kind, child = %name, restarts, reason = %why,
                    "restart intensity exceeded; escalating");
                metrics::counter!("smartmsg_actor_escalations_total", "actor" => state.kind.clone())
                    .increment(1);
                for slot in state.slots.iter_mut().rev() {
                    if let Some(c) = slot.cell.take() {
                        c.stop(Some("supervisor escalating".into()));
                    }
                }
                Err(format!(
                    "{}: child {name} failed {restarts} times within the period: {why}",
                    state.kind
                )
                .into())
            }
            Decision::Restart { delay, attempt } => {
                let affected = state
                    .tracker
                    .policy()
                    .strategy
                    .affected(idx, state.slots.len());
                // Stop the siblings that restart with it, newest first.
                for &i in affected.iter().rev() {
                    if let Some(c) = state.slots[i].cell.take() {
                        let _ = c
                            .stop_and_wait(
                                Some("sibling restart".into()),
                                Some(Duration::from_secs(10)),
                            )
                            .await;
                    }
                }
                let names: Vec<String> = affected
                    .iter()
                    .map(|&i| state.slots[i].spec.name.clone())
                    .collect();
                tracing::warn!(supervisor = %state.kind, child = %name, attempt,
                    delay_ms = delay.as_millis() as u64, reason = %why, restarting = ?names,
                    "child failed; restarting");
                metrics::counter!("smartmsg_actor_restarts_total", "actor" => kind).increment(1);
                myself.send_after(delay, move || SupervisorMsg::Restart(names));
                Ok(())
            }
        }
    }
}

impl Actor for SupervisorActor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut state = SupervisorState {
            kind: args.kind,
            tracker: RestartTracker::new(args.policy),
            slots: args
                .children
                .into_iter()
                .map(|spec| Slot { spec, cell: None })
                .collect(),
        };
        for i in 0..state.slots.len() {
            if let Err(e) = start_slot(&mut state.slots[i], myself.get_cell()).await {
                for s in state.slots.iter_mut().rev() {
                    if let Some(c) = s.cell.take() {
                        c.stop(None);
                    }
                }
                return Err(
                    format!("{}: starting {}: {e}", state.kind, state.slots[i].spec.name).into(),
                );
            }
        }
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        // Stop children newest first and wait, so a drain finishes in order.
        for slot in state.slots.iter_mut().rev() {
            if let Some(c) = slot.cell.take() {
                let _ = c
                    .stop_and_wait(
                        Some("supervisor stopping".into()),
                        Some(Duration::from_secs(30)),
                    )
                    .await;
            }
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restart(names) => {
                for name in names {
                    let Some(i) = state.slots.iter().position(|s| s.spec.name == name) else {
                        continue;
                    };
                    if state.slots[i].cell.is_some() {
                        continue;
                    }
                    if let Err(e) = start_slot(&mut state.slots[i], myself.get_cell()).await {
                        // A failed start counts as a failure of that child.
                        return self
                            .child_down(&myself, state, i, format!("start failed: {e}"))
                            .await;
                    }
                    tracing::info!(supervisor = %state.kind, child = %name, "child restarted");
                }
            }
            SupervisorMsg::AddChild(spec) => {
                if state.slots.iter().any(|s| s.spec.name == spec.name) {
                    return Ok(());
                }
                state.slots.push(Slot { spec, cell: None });
                let i = state.slots.len() - 1;
                if let Err(e) = start_slot(&mut state.slots[i], myself.get_cell()).await {
                    return self
                        .child_down(&myself, state, i, format!("start failed: {e}"))
                        .await;
                }
            }
            SupervisorMsg::RemoveChild(name, reply) => {
                if let Some(i) = state.slots.iter().position(|s| s.spec.name == name) {
                    let slot = state.slots.remove(i);
                    if let Some(c) = slot.cell {
                        let _ = c
                            .stop_and_wait(Some("removed".into()), Some(Duration::from_secs(30)))
                            .await;
                    }
                }
                let _ = reply.send(());
            }
            SupervisorMsg::Children(reply) => {
                let _ = reply.send(
                    state
                        .slots
                        .iter()
                        .map(|s| (s.spec.name.clone(), s.cell.clone()))
                        .collect(),
                );
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(i) = state.index_of(&cell) {
                    return self.child_down(&myself, state, i, err.to_string()).await;
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(i) = state.index_of(&cell) {
                    match state.slots[i].spec.restart {
                        RestartType::Transient => {
                            tracing::info!(supervisor = %state.kind, child = %state.slots[i].spec.name,
                                ?reason, "transient child stopped");
                            state.slots[i].cell = None;
                        }
                        RestartType::Permanent => {
                            let why = format!("stopped: {}", reason.unwrap_or_default());
                            return self.child_down(&myself, state, i, why).await;
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Start a supervisor, optionally linked under a parent.
pub async fn start_supervisor(
    args: SupervisorArgs,
    parent: Option<ActorCell>,
) -> Result<ActorRef<SupervisorMsg>, ActorProcessingErr> {
    let r = match parent {
        Some(p) => Actor::spawn_linked(None, SupervisorActor, args, p).await?.0,
        None => Actor::spawn(None, SupervisorActor, args).await?.0,
    };
    Ok(r)
}

/// A child spec for a nested supervisor.
pub fn supervisor_child(
    name: &str,
    make: impl Fn() -> SupervisorArgs + Send + Sync + 'static,
) -> ChildSpec {
    let kind = name.to_string();
    ChildSpec::new(name, kind, move || (SupervisorActor, make()))
}
