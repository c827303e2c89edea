//! `TargetingModelActor`: owns the model in use. It follows the `models`
//! topic, validates each new version and swaps it in atomically (an
//! `ArcSwap`: selections take a snapshot and never wait on a swap), and
//! answers batch selections: which subscribers, and which creative each.

use crate::actors::{SharedCtx, POLL_WAIT};
use crate::domain::linear::Population;
use crate::domain::model::{batch_seed, BatchSpec, Model};
use crate::io::TopicReader;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

pub struct TargetingModelActor;

/// Finds the node's targeting actor by its registered name, so callers
/// reach the restarted actor after a failure, never a dead one.
#[derive(Debug, Clone)]
pub struct TargetingRef {
    pub name: String,
}

impl TargetingRef {
    pub fn for_node(node_id: &str) -> Self {
        TargetingRef {
            name: format!("targeting/{node_id}"),
        }
    }
    pub fn get(&self) -> Option<ActorRef<TargetingMsg>> {
        ractor::registry::where_is(self.name.clone()).map(ActorRef::from)
    }
}

/// A batch request from a campaign owner.
pub struct SelectRequest {
    pub campaign_id: String,
    pub channel_id: String,
    pub creatives: Vec<String>,
    pub exclude: Arc<HashSet<String>>,
    pub size: u64,
    pub batch: u64,
}

/// The chosen (user, creative) pairs and the model version that chose them.
#[derive(Debug, Clone)]
pub struct Selection {
    pub pairs: Vec<(String, String)>,
    pub model_version: u64,
}

pub enum TargetingMsg {
    Select(SelectRequest, RpcReplyPort<Selection>),
    PollModels,
}

pub struct TargetingState {
    ctx: SharedCtx,
    reader: Box<dyn TopicReader>,
    populations: PopulationCache,
}

/// A channel's population, with the channel's generation it was read at
/// (see `SubscriberStore::generation`).
#[derive(Clone)]
struct CachedPopulation {
    channel: String,
    generation: u64,
    pop: Arc<Population>,
    bytes: usize,
}

/// The populations of the channels selected from last, least recently
/// used first, within `budget` bytes (the latest one is kept whatever its
/// size). The batches of a campaign, and the campaigns of a channel, reuse
/// a channel's table until one of its subscribers changes: reading a
/// channel of 1M subscribers takes seconds (BENCHMARKS.md).
struct PopulationCache {
    budget: usize,
    entries: std::collections::VecDeque<CachedPopulation>,
}

impl PopulationCache {
    fn new(budget: usize) -> Self {
        PopulationCache {
            budget,
            entries: Default::default(),
        }
    }

    /// The channel's cached population (current or not), now the most
    /// recently used.
    fn get(&mut self, channel: &str) -> Option<CachedPopulation> {
        let i = self.entries.iter().position(|c| c.channel == channel)?;
        let c = self.entries.remove(i)?;
        self.entries.push_back(c.clone());
        Some(c)
    }

    /// Keep `c` as its channel's population; drop the least recently used
    /// ones beyond the budget.
    fn put(&mut self, c: CachedPopulation) {
        self.entries.retain(|e| e.channel != c.channel);
        self.entries.push_back(c);
        let mut total: usize = self.entries.iter().map(|e| e.bytes).sum();
        while total > self.budget && self.entries.len() > 1 {
            if let Some(old) = self.entries.pop_front() {
                total -= old.bytes;
            }
        }
        metrics::gauge!("smartmsg_population_cache_bytes").set(total as f64);
    }
}

/// Offer a model: swapped in when valid and newer, refused otherwise.
pub fn offer_model(ctx: &SharedCtx, bytes: &[u8]) -> bool {
    match Model::from_bytes(bytes) {
        Ok(m) => {
            let current = ctx.model.load();
            if m.version > current.version {
                tracing::info!(
                    version = m.version,
                    examples = m.examples,
                    "model swapped in"
                );
                metrics::gauge!("smartmsg_model_version").set(m.version as f64);
                metrics::counter!("smartmsg_model_swaps_total", "result" => "swapped").increment(1);
                ctx.model.store(Arc::new(m));
                true
            } else {
                false
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "model refused");
            metrics::counter!("smartmsg_model_swaps_total", "result" => "refused").increment(1);
            false
        }
    }
}

impl Actor for TargetingModelActor {
    type Msg = TargetingMsg;
    type State = TargetingState;
    type Arguments = SharedCtx;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        ctx: SharedCtx,
    ) -> Result<TargetingState, ActorProcessingErr> {
        // Rebuild from the models topic: read it all, keep the newest valid.
        let from = vec![0; ctx.topics.partitions as usize];
        let mut reader = ctx.log.topic_reader(&ctx.topics.models, &from)?;
        loop {
            let recs = reader.next_batch(1000, Duration::ZERO).await?;
            if recs.is_empty() {
                break;
            }
            for rec in recs {
                if rec.key.as_deref() == Some(b"current") {
                    if let Some(v) = rec.value.as_deref() {
                        offer_model(&ctx, v);
                    }
                }
            }
        }
        metrics::gauge!("smartmsg_model_version").set(ctx.model.load().version as f64);
        myself.send_message(TargetingMsg::PollModels)?;
        let budget = ctx.cfg.model.population_cache_mb as usize * 1024 * 1024;
        Ok(TargetingState {
            ctx,
            reader,
            populations: PopulationCache::new(budget),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: TargetingMsg,
        state: &mut TargetingState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TargetingMsg::Select(req, reply) => {
                let model = state.ctx.model.load_full();
                let subscribers = state.ctx.subscribers.clone();
                let max_features = state.ctx.cfg.model.max_features;
                let cached = state.populations.get(&req.channel_id);
                let (sel, cache) = tokio::task::spawn_blocking(
                    move || -> Result<(Selection, CachedPopulation), crate::io::IoError> {
                        let generation = subscribers.generation(&req.channel_id);
                        let cache = match cached {
                            Some(c) if c.generation == generation => {
                                metrics::counter!("smartmsg_population_cache_total", "result" => "hit")
                                    .increment(1);
                                c
                            }
                            _ => {
                                metrics::counter!("smartmsg_population_cache_total", "result" => "miss")
                                    .increment(1);
                                let pop = subscribers.population(&req.channel_id)?;
                                CachedPopulation {
                                    channel: req.channel_id.clone(),
                                    generation,
                                    bytes: pop.approx_bytes(),
                                    pop: Arc::new(pop),
                                }
                            }
                        };
                        let pop = &cache.pop;
                        let seed = batch_seed(&req.campaign_id, req.batch, model.version);
                        let spec = BatchSpec {
                            campaign: &req.campaign_id,
                            creatives: &req.creatives,
                            exclude: &req.exclude,
                            size: req.size as usize,
                            seed,
                        };
                        let pairs = model.select_batch(&spec, pop, max_features);
                        let sel = Selection {
                            pairs,
                            model_version: model.version,
                        };
                        Ok((sel, cache))
                    },
                )
                .await??;
                state.populations.put(cache);
                let _ = reply.send(sel);
            }
            TargetingMsg::PollModels => {
                let mut any = false;
                for rec in state.reader.next_batch(100, Duration::ZERO).await? {
                    any = true;
                    if rec.key.as_deref() == Some(b"current") {
                        if let Some(v) = rec.value.as_deref() {
                            offer_model(&state.ctx, v);
                        }
                    }
                }
                let delay = if any { Duration::ZERO } else { POLL_WAIT };
                myself.send_after(delay, || TargetingMsg::PollModels);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(channel: &str, bytes: usize) -> CachedPopulation {
        CachedPopulation {
            channel: channel.into(),
            generation: 1,
            pop: Arc::new(Population::from_rows(Vec::new())),
            bytes,
        }
    }

    fn channels(c: &PopulationCache) -> Vec<&str> {
        c.entries.iter().map(|e| e.channel.as_str()).collect()
    }

    #[test]
    fn populations_are_kept_least_recently_used_first_within_the_budget() {
        let mut c = PopulationCache::new(100);
        c.put(entry("a", 40));
        c.put(entry("b", 40));
        assert_eq!(channels(&c), ["a", "b"]);
        // A use makes "a" the most recent: "b" goes first.
        assert!(c.get("a").is_some());
        c.put(entry("c", 40));
        assert_eq!(channels(&c), ["a", "c"]);
        assert!(c.get("b").is_none());
        // A new copy of a channel replaces the old one.
        let mut newer = entry("a", 50);
        newer.generation = 2;
        c.put(newer);
        assert_eq!(channels(&c), ["c", "a"]);
        assert_eq!(c.get("a").unwrap().generation, 2);
        // The latest is kept even when it alone is over the budget.
        c.put(entry("big", 500));
        assert_eq!(channels(&c), ["big"]);
    }
}
