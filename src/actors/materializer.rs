//! `MaterializerActor`: follows every partition of a topic and applies its
//! records to a sled store (read model, subscribers, report). The store keeps
//! each partition's consumed offset in the same batch as the state, so a
//! restarted materialiser resumes exactly where its store stands.

use crate::actors::{SharedCtx, POLL_WAIT};
use crate::domain::campaign::Event;
use crate::domain::window::FinalWindow;
use crate::io::store::Subscriber;
use crate::io::{IoError, Record, TopicReader};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::Arc;

/// What to project and where.
pub trait Projection: Send + Sync + 'static {
    /// Bounded label for metrics and logs.
    fn kind(&self) -> &'static str;
    fn topic(&self) -> String;
    /// Next offset the store has not applied.
    fn start_offset(&self, partition: u32) -> Result<u64, IoError>;
    /// Apply records (blocking; runs off the async workers).
    fn apply(&self, partition: u32, records: &[Record], next_offset: u64) -> Result<(), IoError>;
}

pub struct MaterializerActor;

pub struct MaterializerArgs {
    pub ctx: SharedCtx,
    pub projection: Arc<dyn Projection>,
}

pub enum MaterializerMsg {
    Poll,
}

pub struct MaterializerState {
    args: MaterializerArgs,
    reader: Box<dyn TopicReader>,
}

impl Actor for MaterializerActor {
    type Msg = MaterializerMsg;
    type State = MaterializerState;
    type Arguments = MaterializerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: MaterializerArgs,
    ) -> Result<MaterializerState, ActorProcessingErr> {
        let from = (0..args.ctx.topics.partitions)
            .map(|p| args.projection.start_offset(p))
            .collect::<Result<Vec<u64>, IoError>>()?;
        let reader = args.ctx.log.topic_reader(&args.projection.topic(), &from)?;
        myself.send_message(MaterializerMsg::Poll)?;
        Ok(MaterializerState { args, reader })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: MaterializerMsg,
        state: &mut MaterializerState,
    ) -> Result<(), ActorProcessingErr> {
        let records = state.reader.next_batch(2000, POLL_WAIT).await?;
        if !records.is_empty() {
            let projection = state.args.projection.clone();
            tokio::task::spawn_blocking(move || -> Result<(), IoError> {
                for (partition, recs) in by_partition(records) {
                    let next = recs.last().map(|r| r.offset + 1).unwrap_or(0);
                    projection.apply(partition, &recs, next)?;
                }
                Ok(())
            })
            .await??;
        }
        myself.send_message(MaterializerMsg::Poll)?;
        Ok(())
    }
}

/// Split records by partition, keeping their order within each.
pub fn by_partition(records: Vec<Record>) -> std::collections::BTreeMap<u32, Vec<Record>> {
    let mut out: std::collections::BTreeMap<u32, Vec<Record>> = Default::default();
    for r in records {
        out.entry(r.partition).or_default().push(r);
    }
    out
}

/// `campaign-events` -> campaign read model and command outcomes.
pub struct EventsProjection(pub SharedCtx);

impl Projection for EventsProjection {
    fn kind(&self) -> &'static str {
        "read_model"
    }
    fn topic(&self) -> String {
        self.0.topics.events.clone()
    }
    fn start_offset(&self, partition: u32) -> Result<u64, IoError> {
        self.0.read_model.offset(&self.topic(), partition)
    }
    fn apply(&self, partition: u32, records: &[Record], next: u64) -> Result<(), IoError> {
        let mut events = Vec::with_capacity(records.len());
        for r in records {
            match r.value.as_deref().map(serde_json::from_slice::<Event>) {
                Some(Ok(e)) => events.push(e),
                other => {
                    let reason = match other {
                        Some(Err(e)) => format!("unreadable event: {e}"),
                        _ => "null event".to_string(),
                    };
                    tracing::error!(topic = %self.topic(), partition, offset = r.offset, %reason,
                        "skipping unreadable campaign event");
                    metrics::counter!("smartmsg_unreadable_records_total", "topic" => "campaign-events")
                        .increment(1);
                }
            }
        }
        self.0
            .read_model
            .apply_events(&self.topic(), partition, &events, next)
    }
}

/// `subscribers` (compacted) -> the global subscriber table.
pub struct SubscribersProjection(pub SharedCtx);

impl Projection for SubscribersProjection {
    fn kind(&self) -> &'static str {
        "subscribers"
    }
    fn topic(&self) -> String {
        self.0.topics.subscribers.clone()
    }
    fn start_offset(&self, partition: u32) -> Result<u64, IoError> {
        self.0.subscribers.offset(&self.topic(), partition)
    }
    fn apply(&self, partition: u32, records: &[Record], next: u64) -> Result<(), IoError> {
        let mut changes = Vec::with_capacity(records.len());
        for r in records {
            let key = r
                .key
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let Some((channel, user)) = key.split_once('/') else {
                tracing::error!(partition, offset = r.offset, %key, "subscriber key is not channel_id/user_id");
                metrics::counter!("smartmsg_unreadable_records_total", "topic" => "subscribers")
                    .increment(1);
                continue;
            };
            match r.value.as_deref() {
                None => changes.push((channel.to_string(), user.to_string(), None)),
                Some(v) => match serde_json::from_slice::<Subscriber>(v) {
                    Ok(s) => changes.push((channel.to_string(), user.to_string(), Some(s))),
                    Err(e) => {
                        tracing::error!(partition, offset = r.offset, error = %e, "unreadable subscriber");
                        metrics::counter!("smartmsg_unreadable_records_total", "topic" => "subscribers")
                            .increment(1);
                    }
                },
            }
        }
        self.0
            .subscribers
            .apply(&self.topic(), partition, &changes, next)
    }
}

/// `reaction-aggregates` -> per-campaign report windows.
pub struct ReportProjection(pub SharedCtx);

impl Projection for ReportProjection {
    fn kind(&self) -> &'static str {
        "report"
    }
    fn topic(&self) -> String {
        self.0.topics.aggregates.clone()
    }
    fn start_offset(&self, partition: u32) -> Result<u64, IoError> {
        self.0.reports.offset(&self.topic(), partition)
    }
    fn apply(&self, partition: u32, records: &[Record], next: u64) -> Result<(), IoError> {
        let mut finals = Vec::with_capacity(records.len());
        for r in records {
            match r
                .value
                .as_deref()
                .map(serde_json::from_slice::<FinalWindow>)
            {
                Some(Ok(f)) => finals.push(f),
                _ => {
                    tracing::error!(partition, offset = r.offset, "unreadable final window");
                    metrics::counter!("smartmsg_unreadable_records_total", "topic" => "reaction-aggregates")
                        .increment(1);
                }
            }
        }
        self.0
            .reports
            .apply(&self.topic(), partition, &finals, next)
    }
}
