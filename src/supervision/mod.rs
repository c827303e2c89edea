//! Supervision: restart strategies, intensity limits, backoff (pure, in
//! [`policy`]) and the supervisor actor that applies them ([`supervisor`]).
//!
//! ```text
//! root (one-for-one)
//! ├── state (one-for-one)        read model, subscribers, reports, model materialisers
//! ├── targeting (one-for-one)    TargetingModelActor
//! ├── commands (one-for-one)     CommandPartitionActor per partition ── CampaignActor per campaign
//! ├── scheduler (one-for-one)    SchedulerActor
//! ├── aggregators (one-for-one)  WindowAggregatorActor per partition
//! └── trainer (one-for-one)      TrainerActor
//! ```

pub mod policy;
pub mod supervisor;

pub use policy::{Decision, RestartPolicy, RestartTracker, RestartType, Strategy};
pub use supervisor::{start_supervisor, ChildSpec, SupervisorActor, SupervisorArgs, SupervisorMsg};
