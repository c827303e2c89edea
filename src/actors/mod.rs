//! The actors: each owns one piece of state and reacts to messages. They
//! reach the outside only through the traits and stores of `crate::io`, so
//! every actor runs the same on the embedded backends as on the brokers.
//!
//! | actor | owns |
//! | --- | --- |
//! | [`command_partition::CommandPartitionActor`] | one partition of `campaign-commands`; supervises its campaigns |
//! | [`campaign::CampaignActor`] | one campaign's event-sourced state |
//! | [`scheduler::SchedulerActor`] | turning due delay-queue jobs into `execute_batch` commands |
//! | [`targeting::TargetingModelActor`] | the current model (hot-swapped) and batch selection |
//! | [`trainer::TrainerActor`] | attribution of clicks to sends, model versions |
//! | [`aggregator::WindowAggregatorActor`] | one partition of `reaction-logs`: event-time windows |
//! | [`materializer::MaterializerActor`] | one partition of a topic projected into a sled store |
//! | ([`filters::FiltersProjection`]) | the `filters` topic projected into the node's filter index |
//! | [`percolator::PercolatorActor`] | one partition of `contents`: documents classified into `content-matches` |

pub mod aggregator;
pub mod campaign;
pub mod command_partition;
pub mod filters;
pub mod materializer;
pub mod percolator;
pub mod scheduler;
pub mod targeting;
pub mod trainer;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::domain::model::Model;
use crate::io::store::{ReadModelStore, ReportStore, SubscriberStore, TrainerStore};
use crate::io::topics::Topics;
use crate::io::{SharedLog, SharedQueue};
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Opens per-partition local state (implemented by the node over its sled db).
pub trait StateStores: Send + Sync + 'static {
    fn aggregator(
        &self,
        partition: u32,
    ) -> Result<crate::io::store::AggStateStore, crate::io::IoError>;
}

/// Readiness as `/readyz` reports it.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Partitions still restoring their state.
    pub restoring: AtomicI64,
    /// Set once the supervision tree is up.
    pub started: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.started.load(Ordering::SeqCst) && self.restoring.load(Ordering::SeqCst) <= 0
    }
}

/// Everything an actor may use, passed down explicitly.
pub struct Ctx {
    pub cfg: Arc<Config>,
    pub node_id: String,
    pub clock: SharedClock,
    pub log: SharedLog,
    /// The delay queue; `None` on a node without the commands and scheduler roles.
    pub queue: Option<SharedQueue>,
    pub topics: Topics,
    pub read_model: ReadModelStore,
    pub subscribers: SubscriberStore,
    pub reports: ReportStore,
    pub trainer_store: TrainerStore,
    pub stores: Arc<dyn StateStores>,
    /// The model in use; swapped atomically by the targeting actor.
    pub model: Arc<ArcSwap<Model>>,
    /// The content filters and their index (materializer role).
    pub filters: Arc<filters::FilterRegistry>,
    pub readiness: Arc<Readiness>,
}

pub type SharedCtx = Arc<Ctx>;

impl Ctx {
    /// The delay queue, or an error on a node that runs none.
    pub fn queue(&self) -> Result<&SharedQueue, crate::io::IoError> {
        self.queue.as_ref().ok_or_else(|| {
            crate::io::IoError::Fatal("this node runs no delay queue (node.roles)".into())
        })
    }

    pub fn group(&self) -> &str {
        &self.cfg.kafka.group_id
    }
}

/// How long a polling actor waits for new records before it looks again.
pub const POLL_WAIT: Duration = Duration::from_millis(200);
