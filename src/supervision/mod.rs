//! Supervision: restart strategies, intensity limits, backoff (pure, in
//! [`policy`]) and the supervisor actor that applies them ([`supervisor`]).
//!
//! ```text
//! root (one-for-one)
//! ├── state (one-for-one)        read model, subscribers, reports materialisers (per topic)
//! ├── targeting (one-for-one)    TargetingModelActor
//! ├── commands (partitions)      CommandPartitionActor per owned partition ── CampaignActor per campaign
//! ├── scheduler (one-for-one)    SchedulerActor
//! ├── aggregators (partitions)   WindowAggregatorActor per owned partition
//! └── trainer (one-for-one)      TrainerActor
//! ```

pub mod partitions;
pub mod policy;
pub mod supervisor;

pub use policy::{Decision, RestartPolicy, RestartTracker, RestartType, Strategy};
pub use supervisor::{start_supervisor, ChildSpec, SupervisorActor, SupervisorArgs, SupervisorMsg};
