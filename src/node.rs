//! A running node: opens its backends, builds the supervision tree, serves
//! HTTP, and shuts down gracefully (children drain newest first, then the
//! stores flush).

use crate::actors::aggregator::{AggregatorArgs, WindowAggregatorActor};
use crate::actors::command_partition::{CommandPartitionActor, CommandPartitionArgs};
use crate::actors::filters::FiltersProjection;
use crate::actors::materializer::{
    EventsProjection, MaterializerActor, MaterializerArgs, Projection, ReportProjection,
    SubscribersProjection,
};
use crate::actors::percolator::{PercolatorActor, PercolatorArgs};
use crate::actors::scheduler::SchedulerActor;
use crate::actors::targeting::{TargetingModelActor, TargetingRef};
use crate::actors::trainer::TrainerActor;
use crate::actors::{Ctx, Readiness, SharedCtx, StateStores};
use crate::clock::SharedClock;
use crate::config::{BackendKind, Config, Role};
use crate::domain::model::Model;
use crate::io::amqp::{AmqpSettings, RabbitDelayQueue};
use crate::io::embedded_delay::EmbeddedDelayQueue;
use crate::io::embedded_log::EmbeddedLog;
use crate::io::kafka::{KafkaLog, KafkaSettings};
use crate::io::store::{
    is_lock_held, open_sled, AggStateStore, ReadModelStore, ReportStore, SubscriberStore,
    TrainerStore,
};
use crate::io::topics::Topics;
use crate::io::{GroupMember, IoError, SharedLog, SharedQueue};
use crate::supervision::partitions::{PartitionSupervisorActor, PartitionSupervisorArgs};
use crate::supervision::{
    start_supervisor, ChildSpec, RestartPolicy, Strategy, SupervisorArgs, SupervisorMsg,
};
use arc_swap::ArcSwap;
use ractor::{Actor, ActorRef};
use std::sync::Arc;
use std::time::Duration;

/// Errors that stop a node from starting, each a clear one-liner.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {0}: {1}")]
    DataDir(String, String),
    #[error("backend: {0}")]
    Backend(#[from] IoError),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("supervision tree: {0}")]
    Tree(String),
    #[error("http listen {0}: {1}")]
    Http(String, String),
}

struct SledStores {
    db: sled::Db,
}

impl StateStores for SledStores {
    fn aggregator(&self, partition: u32) -> Result<AggStateStore, IoError> {
        AggStateStore::open(&self.db, partition)
    }
}

/// A started node.
pub struct Node {
    pub ctx: SharedCtx,
    pub root: ActorRef<SupervisorMsg>,
    pub http_addr: Option<std::net::SocketAddr>,
    http_task: Option<tokio::task::JoinHandle<()>>,
    db: sled::Db,
}

/// Open the sled database of a data directory, with a clear error when it
/// is missing permissions or held by another process.
pub fn open_db(cfg: &Config) -> Result<sled::Db, StartError> {
    let dir = &cfg.storage.data_dir;
    let shown = dir.display().to_string();
    std::fs::create_dir_all(dir).map_err(|e| StartError::DataDir(shown.clone(), e.to_string()))?;
    let config = sled::Config::new()
        .path(dir.join("sled"))
        .flush_every_ms(Some(200))
        .cache_capacity(cfg.storage.cache_mb * 1024 * 1024)
        .mode(sled::Mode::LowSpace);
    // A node restarted in this process finds the lock of the one it
    // replaces for a moment; another process holding it is an error.
    open_sled(&config, Duration::from_secs(3)).map_err(|e| {
        if is_lock_held(&e) {
            StartError::DataDir(shown, "in use by another smartmsg process".into())
        } else {
            StartError::DataDir(shown, e.to_string())
        }
    })
}

fn policy(cfg: &Config, strategy: Strategy) -> RestartPolicy {
    RestartPolicy::from_config(strategy, &cfg.supervision)
}

fn materializer(ctx: &SharedCtx, projection: Arc<dyn Projection>) -> ChildSpec {
    let ctx = ctx.clone();
    ChildSpec::new(projection.kind(), "materializer", move || {
        (
            MaterializerActor,
            MaterializerArgs {
                ctx: ctx.clone(),
                projection: projection.clone(),
            },
        )
    })
}

/// A partition supervisor child: joins the node's consumer group on `topic`
/// on every (re)start and runs one `child(member, partition)` per owned
/// partition.
fn partition_group(
    ctx: &SharedCtx,
    kind: &str,
    topic: String,
    child: impl Fn(Arc<dyn GroupMember>, u32) -> ChildSpec + Send + Sync + 'static,
) -> ChildSpec {
    let group = ctx.group().to_string();
    group_children(ctx, kind, group, topic, move |m, p| Some(child(m, p)))
}

/// As `partition_group`, in the consumer group `group`, with a child only
/// for the partitions `child` gives one (a group used as an election).
fn group_children(
    ctx: &SharedCtx,
    kind: &str,
    group: String,
    topic: String,
    child: impl Fn(Arc<dyn GroupMember>, u32) -> Option<ChildSpec> + Send + Sync + 'static,
) -> ChildSpec {
    let ctx = ctx.clone();
    let kind_s = kind.to_string();
    let child = Arc::new(child);
    ChildSpec {
        name: kind.to_string(),
        kind: kind.to_string(),
        restart: crate::supervision::RestartType::Permanent,
        start: Arc::new(move |sup| {
            let ctx = ctx.clone();
            let kind = kind_s.clone();
            let topic = topic.clone();
            let group = group.clone();
            let child = child.clone();
            Box::pin(async move {
                let txn_id = format!("{}{kind}-{}", ctx.cfg.kafka.topic_prefix, ctx.node_id);
                let member = ctx.log.join_group(&group, &topic, &txn_id).await?;
                let m = member.clone();
                let args = PartitionSupervisorArgs {
                    kind: kind.clone(),
                    member,
                    policy: policy(&ctx.cfg, Strategy::OneForOne),
                    child: Arc::new(move |p| child(m.clone(), p)),
                };
                let (r, _) = Actor::spawn_linked(None, PartitionSupervisorActor, args, sup).await?;
                Ok(r.get_cell())
            })
        }),
    }
}

fn tree(ctx: &SharedCtx) -> SupervisorArgs {
    let cfg = &ctx.cfg;
    let state_children = vec![
        materializer(ctx, Arc::new(EventsProjection(ctx.clone()))),
        materializer(ctx, Arc::new(SubscribersProjection(ctx.clone()))),
        materializer(ctx, Arc::new(ReportProjection(ctx.clone()))),
        materializer(ctx, Arc::new(FiltersProjection(ctx.clone()))),
    ];
    let targeting_name = TargetingRef::for_node(&ctx.node_id).name;
    let c = ctx.clone();
    let targeting = ChildSpec {
        name: "targeting".into(),
        kind: "targeting".into(),
        restart: crate::supervision::RestartType::Permanent,
        start: Arc::new(move |sup| {
            let c = c.clone();
            let name = targeting_name.clone();
            Box::pin(async move {
                let (r, _) = Actor::spawn_linked(Some(name), TargetingModelActor, c, sup).await?;
                Ok(r.get_cell())
            })
        }),
    };
    let commands = partition_group(ctx, "commands", ctx.topics.commands.clone(), {
        let c = ctx.clone();
        move |member, p| {
            let c = c.clone();
            ChildSpec::new(format!("commands-{p}"), "command_partition", move || {
                (
                    CommandPartitionActor,
                    CommandPartitionArgs {
                        ctx: c.clone(),
                        partition: p,
                        targeting: TargetingRef::for_node(&c.node_id),
                        member: member.clone(),
                    },
                )
            })
        }
    });
    let aggregators = partition_group(ctx, "aggregators", ctx.topics.reactions.clone(), {
        let c = ctx.clone();
        move |member, p| {
            let c = c.clone();
            ChildSpec::new(format!("aggregator-{p}"), "aggregator", move || {
                (
                    WindowAggregatorActor,
                    AggregatorArgs {
                        ctx: c.clone(),
                        partition: p,
                        member: member.clone(),
                    },
                )
            })
        }
    });
    let percolators = partition_group(ctx, "percolators", ctx.topics.contents.clone(), {
        let c = ctx.clone();
        move |member, p| {
            let c = c.clone();
            ChildSpec::new(format!("percolator-{p}"), "percolator", move || {
                (
                    PercolatorActor,
                    PercolatorArgs {
                        ctx: c.clone(),
                        partition: p,
                        member: member.clone(),
                    },
                )
            })
        }
    });
    // One trainer per cluster: the trainer-role nodes form a group of their
    // own on the models topic, and the owner of the partition of its
    // `current` key trains. When that node leaves or dies, the partition,
    // and the training, move to another (whose trainer's writer fences the
    // old one's: they share a transactional id).
    let leader = crate::domain::partition::partition_for(b"current", ctx.topics.partitions);
    let trainer = group_children(
        ctx,
        "trainer",
        format!("{}.trainer", ctx.group()),
        ctx.topics.models.clone(),
        {
            let c = ctx.clone();
            move |_member, p| {
                let c = c.clone();
                (p == leader).then(|| {
                    ChildSpec::new("trainer", "trainer", move || (TrainerActor, c.clone()))
                })
            }
        },
    );
    let c1 = ctx.clone();
    let one = |kind: &str, children: Vec<ChildSpec>| {
        let kind = kind.to_string();
        let p = policy(cfg, Strategy::OneForOne);
        crate::supervision::supervisor::supervisor_child(&kind.clone(), move || SupervisorArgs {
            kind: kind.clone(),
            policy: p,
            children: children.clone(),
        })
    };
    // Start order matters for rest-for-one and for draining (newest first).
    let mut children = Vec::new();
    if cfg.runs(Role::Materializer) {
        children.push(one("state", state_children));
    }
    if cfg.runs(Role::Commands) {
        children.push(one("targeting", vec![targeting]));
        children.push(commands);
    }
    if cfg.runs(Role::Scheduler) {
        children.push(one(
            "scheduler",
            vec![ChildSpec::new("scheduler", "scheduler", move || {
                (SchedulerActor, c1.clone())
            })],
        ));
    }
    if cfg.runs(Role::Aggregator) {
        children.push(aggregators);
    }
    if cfg.runs(Role::Trainer) {
        children.push(trainer);
    }
    if cfg.runs(Role::Percolator) {
        children.push(percolators);
    }
    SupervisorArgs {
        kind: "root".into(),
        policy: policy(cfg, Strategy::OneForOne),
        children,
    }
}

impl Node {
    /// Open the backends named by the config and start everything.
    pub async fn start(
        cfg: Config,
        clock: SharedClock,
        serve_http: bool,
    ) -> Result<Node, StartError> {
        let metrics = crate::io::metrics::install();
        let cfg = Arc::new(cfg);
        let db = open_db(&cfg)?;
        let needs_queue = cfg.runs(Role::Commands) || cfg.runs(Role::Scheduler);
        let (log, queue): (SharedLog, Option<SharedQueue>) = match cfg.backend.kind {
            BackendKind::Embedded => (
                Arc::new(EmbeddedLog::open(&db)?),
                Some(Arc::new(EmbeddedDelayQueue::open(
                    &db,
                    "batches",
                    clock.clone(),
                )?)),
            ),
            BackendKind::Cluster if !needs_queue => (
                Arc::new(KafkaLog::connect(KafkaSettings::from_config(&cfg)).await?),
                None,
            ),
            BackendKind::Cluster => {
                let kafka = KafkaLog::connect(KafkaSettings::from_config(&cfg)).await?;
                let queue = RabbitDelayQueue::open(
                    AmqpSettings {
                        url: cfg.amqp.url.clone(),
                        prefix: cfg.amqp.queue_prefix.clone(),
                        prefetch: cfg.amqp.prefetch as u16,
                        connection_name: format!("smartmsg-{}", cfg.node_id()),
                    },
                    clock.clone(),
                    Duration::from_millis(cfg.amqp.connect_timeout_ms),
                )
                .await?;
                (Arc::new(kafka), Some(Arc::new(queue)))
            }
        };
        let topics = Topics::new(&cfg);
        for spec in topics.specs() {
            log.ensure_topic(&spec).await?;
        }
        let ctx = Arc::new(Ctx {
            node_id: cfg.node_id(),
            cfg: cfg.clone(),
            clock,
            log,
            queue,
            topics,
            read_model: ReadModelStore::open(&db)?,
            subscribers: SubscriberStore::open(&db)?,
            reports: ReportStore::open(&db)?,
            trainer_store: TrainerStore::open(&db)?,
            stores: Arc::new(SledStores { db: db.clone() }),
            model: Arc::new(ArcSwap::from_pointee(Model::prior())),
            filters: Default::default(),
            readiness: Arc::new(Readiness::default()),
        });
        let root = start_supervisor(tree(&ctx), None)
            .await
            .map_err(|e| StartError::Tree(e.to_string()))?;
        let (http_addr, http_task) = if serve_http {
            let listener = tokio::net::TcpListener::bind(&cfg.http.listen)
                .await
                .map_err(|e| StartError::Http(cfg.http.listen.clone(), e.to_string()))?;
            let addr = listener.local_addr().ok();
            let app = crate::io::http::router(ctx.clone(), metrics);
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "http server stopped");
                }
            });
            (addr, Some(task))
        } else {
            (None, None)
        };
        ctx.readiness
            .started
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(node = %ctx.node_id, backend = ?cfg.backend.kind, http = ?http_addr, "node started");
        Ok(Node {
            ctx,
            root,
            http_addr,
            http_task,
            db,
        })
    }

    /// Graceful stop: stop serving, drain the tree, flush the stores.
    pub async fn shutdown(mut self) {
        tracing::info!(node = %self.ctx.node_id, "draining");
        self.ctx
            .readiness
            .started
            .store(false, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.http_task.take() {
            t.abort();
        }
        let _ = self
            .root
            .stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(60)))
            .await;
        let _ = crate::io::flush_db(&self.db).await;
        tracing::info!(node = %self.ctx.node_id, "stopped");
    }

    /// Resolves when the root supervisor has terminated (escalation).
    pub async fn wait(&self) {
        let _ = self.root.get_cell().wait(None).await;
    }
}
