//! The campaign state machine: commands, events, validation, pacing. Pure —
//! no IO, no actors. `decide` turns a command into events (or a rejection),
//! `apply` folds an event into state; the actor and the read model both fold
//! with the same `apply`, so they cannot disagree.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};

pub const MAX_ID_BYTES: usize = 128;
pub const MAX_CREATIVES: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creative {
    pub creative_id: String,
    pub text: String,
}

/// A command as it travels on `campaign-commands`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub command_id: String,
    pub campaign_id: String,
    #[serde(flatten)]
    pub kind: CommandKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CommandKind {
    Create {
        channel_id: String,
        creatives: Vec<Creative>,
        budget: u64,
        start_at: i64,
        end_at: i64,
        batch_interval_secs: u64,
    },
    Pause,
    Resume,
    Cancel,
    SetBudget {
        budget: u64,
    },
    ExecuteBatch {
        batch: u64,
    },
}

impl CommandKind {
    pub fn name(&self) -> &'static str {
        match self {
            CommandKind::Create { .. } => "create",
            CommandKind::Pause => "pause",
            CommandKind::Resume => "resume",
            CommandKind::Cancel => "cancel",
            CommandKind::SetBudget { .. } => "set_budget",
            CommandKind::ExecuteBatch { .. } => "execute_batch",
        }
    }
}

/// An event on `campaign-events`. Identity: `(campaign_id, seq)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub campaign_id: String,
    pub seq: u64,
    pub command_id: String,
    pub ts: i64,
    /// Offset in its `campaign-commands` partition of the command that
    /// produced the event, written in the transaction that commits that
    /// offset: an event at or beyond the group's committed offset is from
    /// a transaction that never committed (see `Restored`). Absent in
    /// events written before it existed (counted as committed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_offset: Option<u64>,
    #[serde(flatten)]
    pub body: EventBody,
}

/// A selection made for a batch in a transaction that did not commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub pairs: Vec<(String, String)>,
    pub model_version: u64,
}

/// A partition's events as its owner restores them: those of committed
/// transactions, deduplicated by identity `(campaign_id, seq)` with the
/// last record winning, and the latest uncommitted selection of each
/// (campaign, batch).
///
/// A broker may show records of aborted transactions (Tansu does,
/// BROKERS.md), and an aborted transaction may have reached the broker only
/// in part (its writer was killed, or its commit failed mid-way): taking
/// its `batch_executed` as done would skip the batch's re-execution and
/// leave its outbound messages incomplete. Its command is at or beyond the
/// committed offset, so it is read again and re-executed — with the same
/// selection (`Attempt`), so that the messages it writes again are the
/// same ones, whatever model version is current by then.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Restored {
    pub events: Vec<Event>,
    pub attempts: HashMap<(String, u64), Attempt>,
}

impl Restored {
    /// Split events in log order against the commands partition's
    /// committed offset, read before the events.
    pub fn from_log(events: impl IntoIterator<Item = Event>, committed: u64) -> Restored {
        let mut by_identity: BTreeMap<(String, u64), Event> = BTreeMap::new();
        let mut attempts = HashMap::new();
        for e in events {
            if e.command_offset.is_some_and(|o| o >= committed) {
                if let EventBody::BatchExecuted {
                    batch,
                    model_version,
                    assignments,
                    ..
                } = e.body
                {
                    let pairs = assignments
                        .into_iter()
                        .flat_map(|(c, users)| users.into_iter().map(move |u| (u, c.clone())))
                        .collect();
                    attempts.insert(
                        (e.campaign_id, batch),
                        Attempt {
                            pairs,
                            model_version,
                        },
                    );
                }
                continue;
            }
            by_identity.insert((e.campaign_id.clone(), e.seq), e);
        }
        Restored {
            events: by_identity.into_values().collect(),
            attempts,
        }
    }

    /// Each campaign's share.
    pub fn by_campaign(self) -> HashMap<String, Restored> {
        let mut out: HashMap<String, Restored> = HashMap::new();
        for e in self.events {
            out.entry(e.campaign_id.clone()).or_default().events.push(e);
        }
        for ((c, batch), a) in self.attempts {
            out.entry(c.clone())
                .or_default()
                .attempts
                .insert((c, batch), a);
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    Created {
        channel_id: String,
        creatives: Vec<Creative>,
        budget: u64,
        start_at: i64,
        end_at: i64,
        batch_interval_secs: u64,
        batches_total: u64,
    },
    Started,
    Paused,
    Resumed,
    BudgetSet {
        budget: u64,
    },
    BatchScheduled {
        batch: u64,
        due_at: i64,
        /// The id the scheduler gives the `execute_batch` command of this job.
        execute_command_id: String,
    },
    BatchExecuted {
        batch: u64,
        due_at: i64,
        size: u64,
        model_version: u64,
        /// creative_id -> users messaged with it in this batch.
        assignments: BTreeMap<String, Vec<String>>,
    },
    Completed {
        reason: String,
    },
    Cancelled,
    CommandRejected {
        reason: String,
        command_type: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Scheduled,
    Running,
    Paused,
    Completed,
    Cancelled,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Cancelled)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Scheduled => "scheduled",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Completed => "completed",
            Status::Cancelled => "cancelled",
        }
    }
}

/// A batch whose job is in the delay queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingBatch {
    pub batch: u64,
    pub due_at: i64,
    pub command_id: String,
}

/// The outcome of one command, as remembered for idempotency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Applied,
    Rejected(String),
}

/// A campaign's state: the fold of its events.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CampaignState {
    pub campaign_id: String,
    pub channel_id: String,
    pub creatives: Vec<Creative>,
    pub budget: u64,
    pub start_at: i64,
    pub end_at: i64,
    pub batch_interval_secs: u64,
    pub batches_total: u64,
    pub status: Option<Status>,
    /// Last applied event seq (0 = none).
    pub seq: u64,
    pub batches_done: u64,
    pub messages_sent: u64,
    pub model_version: u64,
    pub sends_per_creative: BTreeMap<String, u64>,
    pub pending: Option<PendingBatch>,
    /// Highest batch index executed + 1 (0 = none yet).
    pub next_batch: u64,
    /// Users already messaged (only kept by the owner, not by read models).
    #[serde(skip)]
    pub sent_users: HashSet<String>,
    #[serde(skip)]
    pub track_users: bool,
    /// command_id -> outcome (idempotency).
    #[serde(skip)]
    pub outcomes: HashMap<String, Outcome>,
}

pub fn batches_total(start_at: i64, end_at: i64, interval_secs: u64) -> u64 {
    let span = (end_at - start_at).max(0) as u64;
    let step = interval_secs.max(1) * 1000;
    span.div_ceil(step)
}

impl CampaignState {
    pub fn new(campaign_id: &str, track_users: bool) -> Self {
        CampaignState {
            campaign_id: campaign_id.to_string(),
            track_users,
            ..Default::default()
        }
    }

    pub fn exists(&self) -> bool {
        self.status.is_some()
    }

    pub fn due_at(&self, batch: u64) -> i64 {
        self.start_at + (batch * self.batch_interval_secs * 1000) as i64
    }

    /// Size of batch `batch`: the remaining budget paced over the remaining batches.
    pub fn paced_size(&self, batch: u64, max_batch: u64) -> u64 {
        let remaining_budget = self.budget.saturating_sub(self.messages_sent);
        let remaining_batches = self.batches_total.saturating_sub(batch).max(1);
        remaining_budget.div_ceil(remaining_batches).min(max_batch)
    }

    /// Fold one event. Events at or below the current seq are ignored, so
    /// re-reading a log (or a duplicate record) is harmless.
    pub fn apply(&mut self, e: &Event) {
        if e.seq <= self.seq {
            return;
        }
        self.seq = e.seq;
        let outcome = match &e.body {
            EventBody::CommandRejected { reason, .. } => Outcome::Rejected(reason.clone()),
            _ => Outcome::Applied,
        };
        self.outcomes.entry(e.command_id.clone()).or_insert(outcome);
        match &e.body {
            EventBody::Created {
                channel_id,
                creatives,
                budget,
                start_at,
                end_at,
                batch_interval_secs,
                batches_total,
            } => {
                self.channel_id = channel_id.clone();
                self.creatives = creatives.clone();
                self.budget = *budget;
                self.start_at = *start_at;
                self.end_at = *end_at;
                self.batch_interval_secs = *batch_interval_secs;
                self.batches_total = *batches_total;
                self.status = Some(Status::Scheduled);
            }
            EventBody::Started => self.status = Some(Status::Running),
            EventBody::Paused => self.status = Some(Status::Paused),
            EventBody::Resumed => {
                self.status = Some(if self.batches_done > 0 {
                    Status::Running
                } else {
                    Status::Scheduled
                })
            }
            EventBody::BudgetSet { budget } => self.budget = *budget,
            EventBody::BatchScheduled {
                batch,
                due_at,
                execute_command_id,
            } => {
                self.pending = Some(PendingBatch {
                    batch: *batch,
                    due_at: *due_at,
                    command_id: execute_command_id.clone(),
                })
            }
            EventBody::BatchExecuted {
                batch,
                size,
                model_version,
                assignments,
                ..
            } => {
                self.batches_done += 1;
                self.messages_sent += size;
                self.model_version = *model_version;
                self.next_batch = self.next_batch.max(batch + 1);
                self.pending = None;
                for (creative, users) in assignments {
                    *self.sends_per_creative.entry(creative.clone()).or_default() +=
                        users.len() as u64;
                    if self.track_users {
                        self.sent_users.extend(users.iter().cloned());
                    }
                }
            }
            EventBody::Completed { .. } => {
                self.status = Some(Status::Completed);
                self.pending = None;
            }
            EventBody::Cancelled => {
                self.status = Some(Status::Cancelled);
                self.pending = None;
            }
            EventBody::CommandRejected { .. } => {}
        }
    }
}

/// Whether `kind` is allowed in `status` (None = campaign unknown). This is
/// the check the HTTP API makes against its read model (409) and the owner
/// makes authoritatively (rejection event).
pub fn check_transition(status: Option<Status>, kind: &CommandKind) -> Result<(), String> {
    use Status::*;
    match (status, kind) {
        (None, CommandKind::Create { .. }) => Ok(()),
        (Some(_), CommandKind::Create { .. }) => Err("campaign already exists".into()),
        (None, _) => Err("unknown campaign".into()),
        (Some(s @ (Completed | Cancelled)), _) => Err(format!("campaign is {}", s.as_str())),
        (Some(Scheduled | Running), CommandKind::Pause) => Ok(()),
        (Some(Paused), CommandKind::Pause) => Err("campaign is already paused".into()),
        (Some(Paused), CommandKind::Resume) => Ok(()),
        (Some(s), CommandKind::Resume) => Err(format!("campaign is {}, not paused", s.as_str())),
        (Some(_), CommandKind::Cancel | CommandKind::SetBudget { .. }) => Ok(()),
        (Some(Paused), CommandKind::ExecuteBatch { .. }) => Err("campaign is paused".into()),
        (Some(_), CommandKind::ExecuteBatch { .. }) => Ok(()),
    }
}

/// What an `execute_batch` needs from the targeting side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    pub batch: u64,
    pub due_at: i64,
    pub size: u64,
}

/// The result of deciding a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Already applied: nothing new to write.
    Duplicate(Outcome),
    /// Events to append.
    Events(Vec<Event>),
    /// An execute_batch that needs a selection of `plan.size` users first.
    NeedsSelection(BatchPlan),
}

fn rejection(state: &CampaignState, cmd: &Command, reason: String, now: i64) -> Vec<Event> {
    vec![Event {
        campaign_id: cmd.campaign_id.clone(),
        seq: state.seq + 1,
        command_id: cmd.command_id.clone(),
        ts: now,
        command_offset: None,
        body: EventBody::CommandRejected {
            reason,
            command_type: cmd.kind.name().into(),
        },
    }]
}

/// The command id the scheduler uses for the job of a scheduled batch.
pub fn execute_command_id(campaign_id: &str, batch: u64, seq: u64) -> String {
    format!("exec:{campaign_id}:{batch}:{seq}")
}

struct EventBuilder<'a> {
    state: &'a CampaignState,
    cmd: &'a Command,
    now: i64,
    events: Vec<Event>,
}

impl<'a> EventBuilder<'a> {
    fn new(state: &'a CampaignState, cmd: &'a Command, now: i64) -> Self {
        EventBuilder {
            state,
            cmd,
            now,
            events: Vec::new(),
        }
    }
    fn next_seq(&self) -> u64 {
        self.state.seq + 1 + self.events.len() as u64
    }
    fn push(&mut self, body: EventBody) {
        let seq = self.next_seq();
        self.events.push(Event {
            campaign_id: self.cmd.campaign_id.clone(),
            seq,
            command_id: self.cmd.command_id.clone(),
            ts: self.now,
            command_offset: None,
            body,
        });
    }
    fn schedule(&mut self, batch: u64, due_at: i64) {
        let seq = self.next_seq();
        let execute_command_id = execute_command_id(&self.cmd.campaign_id, batch, seq);
        self.push(EventBody::BatchScheduled {
            batch,
            due_at,
            execute_command_id,
        });
    }
}

/// Decide a command against the state. `now` stamps the events.
pub fn decide(state: &CampaignState, cmd: &Command, now: i64, max_batch: u64) -> Decision {
    if let Some(o) = state.outcomes.get(&cmd.command_id) {
        return Decision::Duplicate(o.clone());
    }
    if let Err(reason) = check_transition(state.status, &cmd.kind) {
        return Decision::Events(rejection(state, cmd, reason, now));
    }
    let mut b = EventBuilder::new(state, cmd, now);
    match &cmd.kind {
        CommandKind::Create {
            channel_id,
            creatives,
            budget,
            start_at,
            end_at,
            batch_interval_secs,
        } => {
            let total = batches_total(*start_at, *end_at, *batch_interval_secs);
            b.push(EventBody::Created {
                channel_id: channel_id.clone(),
                creatives: creatives.clone(),
                budget: *budget,
                start_at: *start_at,
                end_at: *end_at,
                batch_interval_secs: *batch_interval_secs,
                batches_total: total,
            });
            b.schedule(0, *start_at);
        }
        CommandKind::Pause => b.push(EventBody::Paused),
        CommandKind::Resume => {
            b.push(EventBody::Resumed);
            // Batches whose time passed while paused are skipped; their
            // budget is paced over the batches that remain.
            let interval = (state.batch_interval_secs * 1000) as i64;
            let first_due_now = if now <= state.start_at {
                0
            } else {
                ((now - state.start_at) as u64).div_ceil(interval as u64)
            };
            let pending = state.pending.as_ref().map(|p| p.batch).unwrap_or(0);
            let next = state.next_batch.max(pending).max(first_due_now);
            if next >= state.batches_total {
                b.push(EventBody::Completed {
                    reason: "no batch left before end_at".into(),
                });
            } else {
                b.schedule(next, state.due_at(next));
            }
        }
        CommandKind::Cancel => b.push(EventBody::Cancelled),
        CommandKind::SetBudget { budget } => {
            b.push(EventBody::BudgetSet { budget: *budget });
            if *budget <= state.messages_sent {
                b.push(EventBody::Completed {
                    reason: "budget spent".into(),
                });
            }
        }
        CommandKind::ExecuteBatch { batch } => {
            let batch = *batch;
            if batch < state.next_batch {
                return Decision::Events(rejection(
                    state,
                    cmd,
                    format!("batch {batch} already executed"),
                    now,
                ));
            }
            match &state.pending {
                Some(p) if p.batch == batch && p.command_id == cmd.command_id => {}
                _ => {
                    return Decision::Events(rejection(
                        state,
                        cmd,
                        format!("batch {batch} is not the scheduled batch"),
                        now,
                    ))
                }
            }
            return Decision::NeedsSelection(BatchPlan {
                batch,
                due_at: state.due_at(batch),
                size: state.paced_size(batch, max_batch),
            });
        }
    }
    Decision::Events(b.events)
}

/// Events of an executed batch, given the targeting selection.
pub fn batch_events(
    state: &CampaignState,
    cmd: &Command,
    plan: &BatchPlan,
    selection: &[(String, String)],
    model_version: u64,
    now: i64,
) -> Vec<Event> {
    let mut b = EventBuilder::new(state, cmd, now);
    if state.status == Some(Status::Scheduled) {
        b.push(EventBody::Started);
    }
    let mut assignments: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (user, creative) in selection {
        assignments
            .entry(creative.clone())
            .or_default()
            .push(user.clone());
    }
    let size = selection.len() as u64;
    b.push(EventBody::BatchExecuted {
        batch: plan.batch,
        due_at: plan.due_at,
        size,
        model_version,
        assignments,
    });
    let next = plan.batch + 1;
    if state.messages_sent + size >= state.budget {
        b.push(EventBody::Completed {
            reason: "budget spent".into(),
        });
    } else if next >= state.batches_total {
        b.push(EventBody::Completed {
            reason: "all batches executed".into(),
        });
    } else {
        b.schedule(next, state.due_at(next));
    }
    b.events
}

/// A field-level validation error (HTTP 400 names the field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn ferr(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Validate an id (non-empty UTF-8, at most 128 bytes).
pub fn valid_id(field: &str, s: &str) -> Result<(), FieldError> {
    if s.is_empty() {
        return Err(ferr(field, "must not be empty"));
    }
    if s.len() > MAX_ID_BYTES {
        return Err(ferr(field, "must be at most 128 bytes"));
    }
    Ok(())
}

fn get_str(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            valid_id(field, s)?;
            Ok(Some(s.clone()))
        }
        Some(_) => Err(ferr(field, "must be a string")),
    }
}

fn req_str(obj: &Map<String, Value>, field: &str) -> Result<String, FieldError> {
    get_str(obj, field)?.ok_or_else(|| ferr(field, "is required"))
}

fn req_int(obj: &Map<String, Value>, field: &str) -> Result<i64, FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(ferr(field, "is required")),
        Some(v) => v.as_i64().ok_or_else(|| ferr(field, "must be an integer")),
    }
}

/// Parse and validate the body of `POST /v1/campaigns`. `campaign_id` and
/// `command_id` are generated by `gen_id` when absent.
pub fn parse_create(body: &Value, gen_id: impl Fn() -> String) -> Result<Command, FieldError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ferr("body", "must be a JSON object"))?;
    let command_id = get_str(obj, "command_id")?.unwrap_or_else(&gen_id);
    let campaign_id = get_str(obj, "campaign_id")?.unwrap_or_else(&gen_id);
    let channel_id = req_str(obj, "channel_id")?;
    let creatives_v = obj
        .get("creatives")
        .ok_or_else(|| ferr("creatives", "is required"))?
        .as_array()
        .ok_or_else(|| ferr("creatives", "must be an array"))?;
    if creatives_v.is_empty() || creatives_v.len() > MAX_CREATIVES {
        return Err(ferr("creatives", "must hold 1 to 16 creatives"));
    }
    let mut creatives = Vec::new();
    let mut seen = HashSet::new();
    for (i, c) in creatives_v.iter().enumerate() {
        let field = format!("creatives[{i}]");
        let co = c
            .as_object()
            .ok_or_else(|| ferr(&field, "must be an object"))?;
        let creative_id = get_str(co, "creative_id")
            .map_err(|e| ferr(&format!("{field}.creative_id"), e.message))?
            .ok_or_else(|| ferr(&format!("{field}.creative_id"), "is required"))?;
        let text = match co.get("text") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => return Err(ferr(&format!("{field}.text"), "is required")),
            Some(_) => return Err(ferr(&format!("{field}.text"), "must be a string")),
        };
        if !seen.insert(creative_id.clone()) {
            return Err(ferr(&format!("{field}.creative_id"), "is duplicated"));
        }
        creatives.push(Creative { creative_id, text });
    }
    let budget = req_int(obj, "budget")?;
    if budget <= 0 {
        return Err(ferr("budget", "must be > 0"));
    }
    let start_at = req_int(obj, "start_at")?;
    if start_at < 0 {
        return Err(ferr("start_at", "must be >= 0"));
    }
    let end_at = req_int(obj, "end_at")?;
    if end_at <= start_at {
        return Err(ferr("end_at", "must be > start_at"));
    }
    let batch_interval_secs = req_int(obj, "batch_interval_secs")?;
    if batch_interval_secs < 1 {
        return Err(ferr("batch_interval_secs", "must be >= 1"));
    }
    Ok(Command {
        command_id,
        campaign_id,
        kind: CommandKind::Create {
            channel_id,
            creatives,
            budget: budget as u64,
            start_at,
            end_at,
            batch_interval_secs: batch_interval_secs as u64,
        },
    })
}

/// Parse the optional body of pause/resume/cancel: only `command_id` matters.
pub fn parse_simple(
    body: Option<&Value>,
    campaign_id: &str,
    kind: CommandKind,
    gen_id: impl Fn() -> String,
) -> Result<Command, FieldError> {
    valid_id("campaign_id", campaign_id)?;
    let command_id = match body {
        None | Some(Value::Null) => gen_id(),
        Some(Value::Object(o)) => get_str(o, "command_id")?.unwrap_or_else(&gen_id),
        Some(_) => return Err(ferr("body", "must be a JSON object")),
    };
    Ok(Command {
        command_id,
        campaign_id: campaign_id.into(),
        kind,
    })
}

/// Parse the body of `PUT /v1/campaigns/{id}/budget`.
pub fn parse_budget(
    body: &Value,
    campaign_id: &str,
    gen_id: impl Fn() -> String,
) -> Result<Command, FieldError> {
    valid_id("campaign_id", campaign_id)?;
    let obj = body
        .as_object()
        .ok_or_else(|| ferr("body", "must be a JSON object"))?;
    let command_id = get_str(obj, "command_id")?.unwrap_or_else(&gen_id);
    let budget = req_int(obj, "budget")?;
    if budget <= 0 {
        return Err(ferr("budget", "must be > 0"));
    }
    Ok(Command {
        command_id,
        campaign_id: campaign_id.into(),
        kind: CommandKind::SetBudget {
            budget: budget as u64,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn create_cmd(budget: u64) -> Command {
        Command {
            command_id: "c1".into(),
            campaign_id: "camp".into(),
            kind: CommandKind::Create {
                channel_id: "ch".into(),
                creatives: vec![
                    Creative {
                        creative_id: "a".into(),
                        text: "A".into(),
                    },
                    Creative {
                        creative_id: "b".into(),
                        text: "B".into(),
                    },
                ],
                budget,
                start_at: 0,
                end_at: 10_000,
                batch_interval_secs: 2,
            },
        }
    }

    fn run(s: &mut CampaignState, cmd: &Command, now: i64) -> Vec<Event> {
        match decide(s, cmd, now, 100) {
            Decision::Events(evs) => {
                for e in &evs {
                    s.apply(e);
                }
                evs
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn exec(s: &mut CampaignState, users: &[&str]) -> Vec<Event> {
        let p = s.pending.clone().expect("pending batch");
        let cmd = Command {
            command_id: p.command_id.clone(),
            campaign_id: "camp".into(),
            kind: CommandKind::ExecuteBatch { batch: p.batch },
        };
        let plan = match decide(s, &cmd, 1, 100) {
            Decision::NeedsSelection(plan) => plan,
            other => panic!("{other:?}"),
        };
        let sel: Vec<(String, String)> = users
            .iter()
            .take(plan.size as usize)
            .map(|u| (u.to_string(), "a".to_string()))
            .collect();
        let evs = batch_events(s, &cmd, &plan, &sel, 0, 1);
        for e in &evs {
            s.apply(e);
        }
        evs
    }

    #[test]
    fn batches_total_matches_contract() {
        assert_eq!(batches_total(0, 10_000, 2), 5);
        assert_eq!(batches_total(0, 10_001, 2), 6);
        assert_eq!(batches_total(0, 1, 1), 1);
    }

    #[test]
    fn create_schedules_first_batch_and_pacing_spreads_budget() {
        let mut s = CampaignState::new("camp", true);
        let evs = run(&mut s, &create_cmd(10), 5);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].seq, 1);
        assert!(matches!(
            evs[1].body,
            EventBody::BatchScheduled {
                batch: 0,
                due_at: 0,
                ..
            }
        ));
        assert_eq!(s.status, Some(Status::Scheduled));
        assert_eq!(s.batches_total, 5);
        // 10 over 5 batches = 2 each
        let evs = exec(&mut s, &["u1", "u2", "u3"]);
        assert!(matches!(evs[0].body, EventBody::Started));
        assert_eq!(s.messages_sent, 2);
        assert_eq!(s.status, Some(Status::Running));
        assert_eq!(s.pending.as_ref().unwrap().batch, 1);
        for _ in 0..4 {
            exec(&mut s, &["x", "y"]);
        }
        assert_eq!(s.status, Some(Status::Completed));
        assert_eq!(s.messages_sent, 10);
    }

    #[test]
    fn duplicate_commands_are_answered_with_first_outcome() {
        let mut s = CampaignState::new("camp", true);
        run(&mut s, &create_cmd(10), 5);
        assert_eq!(
            decide(&s, &create_cmd(10), 6, 100),
            Decision::Duplicate(Outcome::Applied)
        );
        let mut again = create_cmd(10);
        again.command_id = "c2".into();
        let evs = run(&mut s, &again, 6);
        assert!(matches!(evs[0].body, EventBody::CommandRejected { .. }));
        assert!(matches!(
            decide(&s, &again, 7, 100),
            Decision::Duplicate(Outcome::Rejected(_))
        ));
    }

    #[test]
    fn paused_campaign_executes_nothing_and_resume_reschedules() {
        let mut s = CampaignState::new("camp", true);
        run(&mut s, &create_cmd(10), 0);
        let p = s.pending.clone().unwrap();
        let pause = Command {
            command_id: "p".into(),
            campaign_id: "camp".into(),
            kind: CommandKind::Pause,
        };
        run(&mut s, &pause, 0);
        let exec_cmd = Command {
            command_id: p.command_id.clone(),
            campaign_id: "camp".into(),
            kind: CommandKind::ExecuteBatch { batch: 0 },
        };
        let evs = run(&mut s, &exec_cmd, 0);
        assert!(
            matches!(&evs[0].body, EventBody::CommandRejected { reason, .. } if reason.contains("paused"))
        );
        let resume = Command {
            command_id: "r".into(),
            campaign_id: "camp".into(),
            kind: CommandKind::Resume,
        };
        // resumed at t=4500: batches 0..=2 are past, next due is batch 3 (6000)
        run(&mut s, &resume, 4500);
        let p2 = s.pending.clone().unwrap();
        assert_eq!(p2.batch, 3);
        assert_ne!(p2.command_id, p.command_id);
        // budget 10 over remaining 2 batches
        assert_eq!(s.paced_size(3, 100), 5);
    }

    #[test]
    fn stale_and_repeated_execute_are_rejected_without_effect() {
        let mut s = CampaignState::new("camp", true);
        run(&mut s, &create_cmd(10), 0);
        let first = s.pending.clone().unwrap();
        exec(&mut s, &["u1", "u2"]);
        let sent = s.messages_sent;
        let stale = Command {
            command_id: "other".into(),
            campaign_id: "camp".into(),
            kind: CommandKind::ExecuteBatch { batch: first.batch },
        };
        let evs = run(&mut s, &stale, 0);
        assert!(
            matches!(&evs[0].body, EventBody::CommandRejected { reason, .. } if reason.contains("already executed"))
        );
        assert_eq!(s.messages_sent, sent);
    }

    #[test]
    fn transitions() {
        assert!(check_transition(None, &CommandKind::Pause).is_err());
        assert!(check_transition(Some(Status::Running), &CommandKind::Resume).is_err());
        assert!(check_transition(Some(Status::Paused), &CommandKind::Resume).is_ok());
        assert!(check_transition(Some(Status::Cancelled), &CommandKind::Cancel).is_err());
        assert!(check_transition(
            Some(Status::Completed),
            &CommandKind::SetBudget { budget: 1 }
        )
        .is_err());
    }

    #[test]
    fn budget_below_sent_completes() {
        let mut s = CampaignState::new("camp", true);
        run(&mut s, &create_cmd(10), 0);
        exec(&mut s, &["u1", "u2"]);
        let cmd = Command {
            command_id: "b".into(),
            campaign_id: "camp".into(),
            kind: CommandKind::SetBudget { budget: 2 },
        };
        run(&mut s, &cmd, 0);
        assert_eq!(s.status, Some(Status::Completed));
    }

    #[test]
    fn parse_create_names_fields() {
        let gen = || "gen".to_string();
        let ok = json!({"channel_id":"ch","creatives":[{"creative_id":"a","text":"x"}],
            "budget":5,"start_at":0,"end_at":10,"batch_interval_secs":1});
        let c = parse_create(&ok, gen).unwrap();
        assert_eq!(c.campaign_id, "gen");
        let cases = [
            (json!({"creatives":[]}), "channel_id"),
            (json!({"channel_id":"c","creatives":[]}), "creatives"),
            (
                json!({"channel_id":"c","creatives":[{"creative_id":"a"}]}),
                "creatives[0].text",
            ),
            (
                json!({"channel_id":"c","creatives":[{"creative_id":"a","text":"t"}],"budget":0}),
                "budget",
            ),
            (
                json!({"channel_id":"c","creatives":[{"creative_id":"a","text":"t"}],"budget":1,"start_at":5,"end_at":5,"batch_interval_secs":1}),
                "end_at",
            ),
            (
                json!({"channel_id":"c","creatives":[{"creative_id":"a","text":"t"}],"budget":1,"start_at":0,"end_at":5,"batch_interval_secs":0}),
                "batch_interval_secs",
            ),
            (json!({"campaign_id":"", "channel_id":"c"}), "campaign_id"),
            (json!([1]), "body"),
        ];
        for (body, field) in cases {
            let e = parse_create(&body, gen).unwrap_err();
            assert_eq!(e.field, field, "{body}");
        }
        let long = "x".repeat(129);
        let e = parse_create(&json!({"campaign_id": long}), gen).unwrap_err();
        assert_eq!(e.field, "campaign_id");
    }

    #[test]
    fn events_of_uncommitted_transactions_are_attempts_not_history() {
        let ev = |campaign: &str, seq: u64, offset: Option<u64>, body: EventBody| Event {
            campaign_id: campaign.into(),
            seq,
            command_id: format!("c{seq}"),
            ts: 0,
            command_offset: offset,
            body,
        };
        let executed = |batch: u64, users: &[&str], version: u64| EventBody::BatchExecuted {
            batch,
            due_at: 0,
            size: users.len() as u64,
            model_version: version,
            assignments: [(
                "a".to_string(),
                users.iter().map(|u| u.to_string()).collect(),
            )]
            .into(),
        };
        let log = vec![
            // Before command offsets were written: counted as committed.
            ev("x", 1, None, EventBody::Started),
            ev("x", 2, Some(3), executed(0, &["u1", "u2"], 1)),
            // A zombie's attempt at seq 2 after the committed one: left out,
            // the committed record stays.
            ev("x", 2, Some(7), executed(0, &["u9"], 1)),
            // Batch 1 of "x" tried twice, neither committed: the later wins.
            ev("x", 3, Some(8), executed(1, &["u3"], 1)),
            ev("x", 3, Some(9), executed(1, &["u4"], 2)),
            ev("y", 1, Some(4), EventBody::Started),
            ev("y", 2, Some(10), executed(0, &["u5"], 2)),
        ];
        let r = Restored::from_log(log, 5);
        let seqs: Vec<(&str, u64)> = r
            .events
            .iter()
            .map(|e| (e.campaign_id.as_str(), e.seq))
            .collect();
        assert_eq!(seqs, [("x", 1), ("x", 2), ("y", 1)]);
        assert!(matches!(
            &r.events[1].body,
            EventBody::BatchExecuted { size: 2, .. }
        ));
        let want = |u: &str, v| Attempt {
            pairs: vec![(u.to_string(), "a".to_string())],
            model_version: v,
        };
        assert_eq!(r.attempts.len(), 3);
        assert_eq!(r.attempts[&("x".to_string(), 1)], want("u4", 2));
        let mut split = r.by_campaign();
        let (x, y) = (split.remove("x").unwrap(), split.remove("y").unwrap());
        assert!(split.is_empty());
        assert_eq!(y.events.len(), 1);
        assert_eq!(y.attempts.len(), 1);
        assert_eq!(y.attempts[&("y".to_string(), 0)], want("u5", 2));
        assert_eq!(x.events.len(), 2);
        assert!(x.events.iter().all(|e| e.campaign_id == "x"));
        assert_eq!(x.attempts.len(), 2);
        assert!(x.attempts.keys().all(|(c, _)| c == "x"));
        // A committed offset past every command: all of it is history.
        let all = Restored::from_log(
            vec![
                ev("x", 1, Some(3), EventBody::Started),
                ev("x", 2, Some(9), EventBody::Paused),
            ],
            10,
        );
        assert_eq!(all.events.len(), 2);
        assert!(all.attempts.is_empty());
    }

    #[test]
    fn command_json_round_trip() {
        let c = create_cmd(3);
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["type"], "create");
        let back: Command = serde_json::from_value(v).unwrap();
        assert_eq!(back, c);
        let e = Event {
            campaign_id: "c".into(),
            seq: 1,
            command_id: "x".into(),
            ts: 1,
            command_offset: None,
            body: EventBody::CommandRejected {
                reason: "r".into(),
                command_type: "pause".into(),
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "command_rejected");
        assert_eq!(v["reason"], "r");
    }
}
