//! `TrainerActor`: joins sends with later clicks per (campaign, user) within
//! the attribution window, keeps the evidence per (campaign, creative) in
//! sled (with the consumed offsets in the same batch), and every retrain
//! interval with new evidence publishes a new validated model version to
//! the compacted `models` topic (`v<N>` and `current`; versions older than
//! `model.keep_versions` are tombstoned). Operators' requests come in on
//! `model-commands`: a rollback serves the version before the current one
//! again, as a new version, and holds training until a resume. One node of the
//! cluster trains at a time (see `node::tree`: an election through a
//! consumer group), and only once it has caught up with the reactions.

use crate::actors::SharedCtx;
use crate::domain::model::{Arm, Model, ModelCommand, ModelCommandKind};
use crate::domain::reaction::{parse_reaction, Action};
use crate::io::store::SendRecord;
use crate::io::{OutRecord, TopicReader, Txn, TxnWriter};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct TrainerActor;

pub enum TrainerMsg {
    Poll,
}

pub struct TrainerState {
    ctx: SharedCtx,
    reader: Box<dyn TopicReader>,
    /// Operators' rollback and resume requests (`model-commands`).
    commands: Box<dyn TopicReader>,
    writer: Arc<dyn TxnWriter>,
    /// The latest version on the models topic, and its artifact (`None`
    /// if unreadable: then a rollback has nothing to go back from).
    version: u64,
    current: Option<Model>,
    /// The current model is a rollback: no new fit is published until an
    /// operator resumes training.
    held: bool,
    dirty: bool,
    /// Whether the reader has reached the end of the reactions once: a
    /// trainer that has just taken over (or whose node was down) first
    /// catches up, and only then publishes, never a model of part of the
    /// evidence.
    caught_up: bool,
    last_fit: Instant,
}

/// The number of a `v<N>` key.
fn version_key(key: Option<&[u8]>) -> Option<u64> {
    std::str::from_utf8(key?)
        .ok()?
        .strip_prefix('v')?
        .parse()
        .ok()
}

/// Read the whole models topic: the highest `v<N>` ever written (a
/// tombstoned version still counts: numbers are never reused) and the
/// artifact of version `want` (`None` for the highest), if still kept.
async fn scan_models(
    ctx: &SharedCtx,
    want: Option<u64>,
) -> Result<(u64, Option<Model>), ActorProcessingErr> {
    let mut max = 0;
    // The last record of the wanted (else the highest) version so far: a
    // version's records share a key, hence a partition, so a tombstone
    // comes after the value it retires.
    let mut chosen: Option<(u64, Option<Vec<u8>>)> = None;
    let from = vec![0; ctx.topics.partitions as usize];
    let mut r = ctx.log.topic_reader(&ctx.topics.models, &from)?;
    loop {
        let recs = r.next_batch(1000, Duration::ZERO).await?;
        if recs.is_empty() {
            break;
        }
        for rec in recs {
            if let Some(n) = version_key(rec.key.as_deref()) {
                max = max.max(n);
                let take = match want {
                    Some(w) => w == n,
                    None => chosen.as_ref().is_none_or(|(c, _)| n >= *c),
                };
                if take {
                    chosen = Some((n, rec.value));
                }
            }
        }
    }
    let want = want.unwrap_or(max);
    let artifact = match chosen.and_then(|(_, v)| v) {
        Some(bytes) => match Model::from_bytes(&bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(version = want, error = %e, "model artifact unreadable");
                None
            }
        },
        None => None,
    };
    Ok((max, artifact))
}

/// Fold a batch of reaction records into the evidence (blocking sled IO).
fn absorb(
    ctx: &SharedCtx,
    partition: u32,
    records: &[crate::io::Record],
    next: u64,
) -> Result<bool, crate::io::IoError> {
    let store = &ctx.trainer_store;
    let window = ctx.cfg.model.attribution_window_ms as i64;
    let mut sends: BTreeMap<(String, String), SendRecord> = BTreeMap::new();
    let mut arms: BTreeMap<(String, String), Arm> = BTreeMap::new();
    let mut changed = false;
    // The channel of each campaign (from the read model), and a
    // subscriber's features: what the linear statistics count.
    let mut channels: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut features = |campaign: &str, user: &str| -> Result<_, crate::io::IoError> {
        if !channels.contains_key(campaign) {
            let ch = ctx.read_model.campaign(campaign)?.map(|c| c.channel_id);
            channels.insert(campaign.to_string(), ch);
        }
        match &channels[campaign] {
            Some(ch) => ctx.subscribers.features(ch, user),
            None => Ok(None),
        }
    };
    let max_features = ctx.cfg.model.max_features;
    for r in records {
        // Invalid records are the aggregator's to dead-letter; the trainer skips them.
        let Ok(ev) = parse_reaction(r.value.as_deref()) else {
            continue;
        };
        let key = (ev.campaign_id.clone(), ev.user_id.clone());
        let known = match sends.get(&key) {
            Some(s) => Some(s.clone()),
            None => store.send(&ev.campaign_id, &ev.user_id)?,
        };
        match ev.action {
            Action::Send if known.is_none() => {
                let ak = (ev.campaign_id.clone(), ev.creative_id.clone());
                let mut arm = match arms.remove(&ak) {
                    Some(a) => a,
                    None => store.arm(&ev.campaign_id, &ev.creative_id)?,
                };
                arm.sends += 1;
                let f = features(&ev.campaign_id, &ev.user_id)?;
                if let Some(f) = &f {
                    let left_out = arm.linear.add_send(f, max_features);
                    if left_out > 0 {
                        metrics::counter!("smartmsg_model_features_left_out_total")
                            .increment(left_out as u64);
                    }
                }
                arms.insert(ak, arm);
                sends.insert(
                    key,
                    SendRecord {
                        creative_id: ev.creative_id.clone(),
                        ts: ev.ts,
                        clicked: false,
                        featured: f.is_some(),
                    },
                );
                changed = true;
            }
            Action::Click => {
                if let Some(mut s) = known {
                    let dt = ev.ts - s.ts;
                    if !s.clicked && (0..=window).contains(&dt) {
                        s.clicked = true;
                        let ak = (ev.campaign_id.clone(), s.creative_id.clone());
                        let mut arm = match arms.remove(&ak) {
                            Some(a) => a,
                            None => store.arm(&ev.campaign_id, &s.creative_id)?,
                        };
                        arm.clicks += 1;
                        if s.featured {
                            // The features as now (a subscriber removed
                            // since counts as having none).
                            let f = features(&ev.campaign_id, &ev.user_id)?.unwrap_or_default();
                            arm.linear.add_click(&f);
                        }
                        arms.insert(ak, arm);
                        sends.insert(key, s);
                        changed = true;
                    }
                }
            }
            _ => {}
        }
    }
    store.apply(&ctx.topics.reactions, partition, &sends, &arms, next)?;
    Ok(changed)
}

impl TrainerState {
    async fn fit_and_publish(&mut self) -> Result<(), ActorProcessingErr> {
        let mut arms = self.ctx.trainer_store.arms()?;
        // A completed or cancelled campaign never selects again: the
        // artifact carries the others (their feature statistics make it
        // grow with every campaign), campaigns not in the read model yet
        // included.
        let mut finished = Vec::new();
        for campaign in arms.keys() {
            if let Some(c) = self.ctx.read_model.campaign(campaign)? {
                if c.status.is_some_and(|s| s.is_terminal()) {
                    finished.push(campaign.clone());
                }
            }
        }
        for campaign in finished {
            arms.remove(&campaign);
        }
        let model = Model::new(self.version + 1, self.ctx.clock.now_ms(), arms);
        if let Err(e) = model.validate() {
            tracing::error!(version = model.version, error = %e,
                "trained model failed validation; not published");
            metrics::counter!("smartmsg_model_swaps_total", "result" => "invalid_trained")
                .increment(1);
            return Ok(());
        }
        self.publish(model).await?;
        metrics::counter!("smartmsg_models_trained_total").increment(1);
        Ok(())
    }

    /// Write `model` as `v<N>` and `current`, and retire the version that
    /// falls out of `model.keep_versions`, in one transaction.
    async fn publish(&mut self, model: Model) -> Result<(), ActorProcessingErr> {
        let topic = &self.ctx.topics.models;
        let version = model.version;
        let bytes = model.to_bytes();
        let mut records = vec![
            OutRecord::keyed(topic, format!("v{version}"), Some(bytes.clone())),
            OutRecord::keyed(topic, "current", Some(bytes)),
        ];
        let keep = self.ctx.cfg.model.keep_versions;
        if version > keep {
            records.push(OutRecord::keyed(
                topic,
                format!("v{}", version - keep),
                None,
            ));
        }
        self.writer
            .commit(Txn {
                records,
                offsets: vec![],
            })
            .await?;
        tracing::info!(
            version,
            examples = model.examples,
            restored_from = model.restored_from,
            "model published"
        );
        self.version = version;
        self.held = model.restored_from.is_some();
        self.current = Some(model);
        Ok(())
    }

    /// Apply an operator's request; what it did is logged and counted.
    async fn apply(&mut self, cmd: ModelCommand) -> Result<(), ActorProcessingErr> {
        let outcome = if cmd.from_version != self.version {
            "stale"
        } else {
            match cmd.kind {
                ModelCommandKind::Rollback => self.roll_back().await?,
                ModelCommandKind::Resume if self.held => {
                    self.fit_and_publish().await?;
                    self.dirty = false;
                    self.last_fit = Instant::now();
                    "applied"
                }
                ModelCommandKind::Resume => "not_held",
            }
        };
        tracing::info!(command_id = %cmd.command_id, kind = cmd.kind.as_str(),
            from_version = cmd.from_version, version = self.version, outcome, "model command");
        metrics::counter!("smartmsg_model_commands_total",
            "type" => cmd.kind.as_str(), "result" => outcome)
        .increment(1);
        Ok(())
    }

    /// Serve the evidence of the version before the current one again, as
    /// a new version; training is held until a resume.
    async fn roll_back(&mut self) -> Result<&'static str, ActorProcessingErr> {
        let Some(current) = &self.current else {
            return Ok("current_unreadable");
        };
        let Some(source) = current.rollback_source() else {
            return Ok("none_earlier");
        };
        let artifact = if source == 0 {
            Some(Model::prior())
        } else {
            scan_models(&self.ctx, Some(source)).await?.1
        };
        let Some(artifact) = artifact else {
            return Ok("not_kept");
        };
        let model = Model::restore(self.version + 1, self.ctx.clock.now_ms(), &artifact);
        self.publish(model).await?;
        Ok("applied")
    }

    /// Requests that arrived since the last poll, in order.
    async fn poll_commands(&mut self) -> Result<(), ActorProcessingErr> {
        for rec in self.commands.next_batch(100, Duration::ZERO).await? {
            match serde_json::from_slice::<ModelCommand>(rec.value.as_deref().unwrap_or_default()) {
                Ok(cmd) => self.apply(cmd).await?,
                Err(e) => {
                    tracing::warn!(partition = rec.partition, offset = rec.offset, error = %e,
                        "unreadable model command skipped");
                    metrics::counter!("smartmsg_model_commands_total",
                        "type" => "unknown", "result" => "unreadable")
                    .increment(1);
                }
            }
        }
        Ok(())
    }
}

impl Actor for TrainerActor {
    type Msg = TrainerMsg;
    type State = TrainerState;
    type Arguments = SharedCtx;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        ctx: SharedCtx,
    ) -> Result<TrainerState, ActorProcessingErr> {
        // Every trainer shares one transactional id: a trainer taking over
        // fences the previous one, and an empty transaction waits until
        // that is done (the transaction it may have left open aborted).
        // Only then is the latest version read: no version it wrote, even
        // one of an aborted transaction that a broker shows, is reused.
        let writer = ctx
            .log
            .txn_writer(&format!("{}trainer", ctx.cfg.kafka.topic_prefix))
            .await?;
        writer.commit(Txn::default()).await?;
        let (version, current) = scan_models(&ctx, None).await?;
        let current = if version == 0 {
            Some(Model::prior())
        } else {
            current
        };
        let held = current.as_ref().is_some_and(|m| m.restored_from.is_some());
        if held {
            tracing::info!(
                version,
                "the current model is a rollback: training is held until a resume"
            );
        }
        metrics::gauge!("smartmsg_trainer_active").set(1.0);
        // Every request is read again at each takeover: those already
        // applied name an older version and do nothing.
        let commands = ctx.log.topic_reader(
            &ctx.topics.model_commands,
            &vec![0; ctx.topics.partitions as usize],
        )?;
        let from = (0..ctx.topics.partitions)
            .map(|p| ctx.trainer_store.offset(&ctx.topics.reactions, p))
            .collect::<Result<Vec<u64>, _>>()?;
        let reader = ctx.log.topic_reader(&ctx.topics.reactions, &from)?;
        myself.send_message(TrainerMsg::Poll)?;
        Ok(TrainerState {
            ctx,
            reader,
            commands,
            writer,
            version,
            current,
            held,
            dirty: false,
            caught_up: false,
            last_fit: Instant::now(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        _state: &mut TrainerState,
    ) -> Result<(), ActorProcessingErr> {
        metrics::gauge!("smartmsg_trainer_active").set(0.0);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: TrainerMsg,
        state: &mut TrainerState,
    ) -> Result<(), ActorProcessingErr> {
        let recs = state
            .reader
            .next_batch(5000, Duration::from_millis(50))
            .await?;
        let any = !recs.is_empty();
        if !any && !state.caught_up {
            state.caught_up = true;
            tracing::info!(
                version = state.version,
                "trainer caught up with the reactions"
            );
        }
        if any {
            let ctx = state.ctx.clone();
            let changed =
                tokio::task::spawn_blocking(move || -> Result<bool, crate::io::IoError> {
                    let mut changed = false;
                    for (p, recs) in crate::actors::materializer::by_partition(recs) {
                        let next = recs.last().map(|r| r.offset + 1).unwrap_or(0);
                        changed |= absorb(&ctx, p, &recs, next)?;
                    }
                    Ok(changed)
                })
                .await??;
            state.dirty |= changed;
        }
        let interval = Duration::from_millis(state.ctx.cfg.model.retrain_interval_ms);
        if state.caught_up {
            // Only once caught up: a resume publishes a fit of all the evidence.
            state.poll_commands().await?;
        }
        if state.caught_up && state.dirty && !state.held && state.last_fit.elapsed() >= interval {
            state.fit_and_publish().await?;
            state.dirty = false;
            state.last_fit = Instant::now();
        }
        let delay = if any {
            Duration::ZERO
        } else {
            Duration::from_millis(50)
        };
        myself.send_after(delay, || TrainerMsg::Poll);
        Ok(())
    }
}
