//! The targeting model: a Beta-Bernoulli posterior of the click rate per
//! (campaign, creative), Thompson sampling for the creative of each user,
//! users in a seeded random order. Versioned and checksummed so a corrupt or
//! invalid artifact is refused. Pure: training input comes in as counts.

use crate::domain::linear::{LinearStats, Population, Posterior};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// Evidence for one creative: sends and the clicks attributed to them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Arm {
    pub sends: u64,
    pub clicks: u64,
    /// The same sends (those whose subscriber's features were known) over
    /// the subscribers' features, for user targeting.
    #[serde(default, skip_serializing_if = "LinearStats::is_empty")]
    pub linear: LinearStats,
}

impl Arm {
    pub fn posterior_mean(&self) -> f64 {
        (1.0 + self.clicks as f64) / (2.0 + self.sends as f64)
    }
}

/// A versioned model artifact (the value on the `models` topic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    pub version: u64,
    pub trained_at: i64,
    pub examples: u64,
    /// campaign_id -> creative_id -> evidence.
    pub arms: BTreeMap<String, BTreeMap<String, Arm>>,
    pub metrics: BTreeMap<String, f64>,
    /// Set on an artifact published by a rollback: the version whose
    /// evidence it serves again. While the current model is such a restore
    /// the trainer publishes no new fit (until a resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<u64>,
    /// FNV-1a 64 of the canonical JSON of everything above, hex.
    #[serde(default)]
    pub checksum: String,
}

/// An operator's request to the trainer, on the `model-commands` topic:
/// go back one version, or end the hold a rollback put on training. It
/// names the version it was made against and applies only while that is
/// still the latest (so a replayed or overtaken request does nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCommand {
    pub command_id: String,
    #[serde(rename = "type")]
    pub kind: ModelCommandKind,
    pub from_version: u64,
    pub ts: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelCommandKind {
    Rollback,
    Resume,
}

impl ModelCommandKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelCommandKind::Rollback => "rollback",
            ModelCommandKind::Resume => "resume",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("checksum mismatch")]
    Checksum,
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("unreadable model: {0}")]
    Unreadable(String),
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Stable 64-bit hash of a few strings (seeds, ids).
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut buf = Vec::new();
    for p in parts {
        buf.extend_from_slice(&(p.len() as u64).to_le_bytes());
        buf.extend_from_slice(p);
    }
    fnv1a(&buf)
}

impl Model {
    /// The untrained prior (version 0).
    pub fn prior() -> Model {
        Model::new(0, 0, BTreeMap::new())
    }

    pub fn new(
        version: u64,
        trained_at: i64,
        arms: BTreeMap<String, BTreeMap<String, Arm>>,
    ) -> Model {
        let examples = arms
            .values()
            .flat_map(|m| m.values())
            .map(|a| a.sends)
            .sum();
        let clicks: u64 = arms
            .values()
            .flat_map(|m| m.values())
            .map(|a| a.clicks)
            .sum();
        let mut metrics = BTreeMap::new();
        metrics.insert(
            "ctr".to_string(),
            if examples > 0 {
                clicks as f64 / examples as f64
            } else {
                0.0
            },
        );
        metrics.insert("campaigns".to_string(), arms.len() as f64);
        // Sends whose subscriber's features were known: what user
        // targeting learns from.
        let featured: f64 = arms
            .values()
            .flat_map(|m| m.values())
            .map(|a| a.linear.sends())
            .sum();
        metrics.insert("featured_examples".to_string(), featured);
        let mut m = Model {
            version,
            trained_at,
            examples,
            arms,
            metrics,
            restored_from: None,
            checksum: String::new(),
        };
        m.checksum = m.compute_checksum();
        m
    }

    /// The version whose evidence this artifact carries: its own, or the
    /// one a rollback restored.
    pub fn base(&self) -> u64 {
        self.restored_from.unwrap_or(self.version)
    }

    /// Which version a rollback from this (current) model goes back to:
    /// the one published just before this model's evidence was first
    /// served (a restore of a restore goes further back). `None` when
    /// there is nothing earlier; `Some(0)` is the untrained prior. The
    /// artifact of that version may itself be a restore: serve its base.
    pub fn rollback_source(&self) -> Option<u64> {
        self.base().checked_sub(1)
    }

    /// A new version `version` serving the evidence of `source` again.
    pub fn restore(version: u64, restored_at: i64, source: &Model) -> Model {
        let mut m = Model::new(version, restored_at, source.arms.clone());
        m.restored_from = Some(source.base());
        m.checksum = m.compute_checksum();
        m
    }

    fn compute_checksum(&self) -> String {
        let mut c = self.clone();
        c.checksum = String::new();
        format!(
            "{:016x}",
            fnv1a(&serde_json::to_vec(&c).expect("serialisable"))
        )
    }

    /// Check integrity and sanity; a model failing this is never swapped in.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.checksum != self.compute_checksum() {
            return Err(ModelError::Checksum);
        }
        for (campaign, arms) in &self.arms {
            for (creative, a) in arms {
                if a.clicks > a.sends {
                    return Err(ModelError::Invalid(format!(
                        "{campaign}/{creative}: more clicks than sends"
                    )));
                }
                a.linear
                    .check(a.sends)
                    .map_err(|e| ModelError::Invalid(format!("{campaign}/{creative}: {e}")))?;
            }
        }
        if self.metrics.values().any(|v| !v.is_finite()) {
            return Err(ModelError::Invalid("non-finite metric".into()));
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serialisable")
    }

    pub fn from_bytes(b: &[u8]) -> Result<Model, ModelError> {
        let m: Model =
            serde_json::from_slice(b).map_err(|e| ModelError::Unreadable(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    pub fn arm(&self, campaign: &str, creative: &str) -> Arm {
        self.arms
            .get(campaign)
            .and_then(|m| m.get(creative))
            .cloned()
            .unwrap_or_default()
    }

    /// The campaign's linear model over subscriber features, its creatives
    /// in the order given; `None` while none of its sends had features.
    pub fn posterior(
        &self,
        campaign: &str,
        creatives: &[String],
        max_features: usize,
    ) -> Option<Posterior> {
        let empty = LinearStats::default();
        let arms = self.arms.get(campaign);
        let stats: Vec<&LinearStats> = creatives
            .iter()
            .map(|c| arms.and_then(|a| a.get(c)).map_or(&empty, |a| &a.linear))
            .collect();
        Posterior::fit(&stats, max_features)
    }

    /// Pick up to `b.size` subscribers of `pop` not in `b.exclude`, each
    /// with a creative. With features learnt for the campaign: the best by
    /// the linear model's expected click rate (user targeting), each with
    /// the creative of its own posterior draw (linear Thompson sampling).
    /// Without: in a random order, each creative by Thompson sampling of
    /// its click rate. Deterministic in `b.seed`, so a re-executed batch
    /// makes the same choices.
    pub fn select_batch(
        &self,
        b: &BatchSpec<'_>,
        pop: &Population,
        max_features: usize,
    ) -> Vec<(String, String)> {
        let BatchSpec {
            campaign,
            creatives,
            exclude,
            size: n,
            seed,
        } = *b;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // The population's rows are sorted by id; a random order of them
        // breaks ties (and is the order without features).
        let rows: Vec<u32> = (0..pop.len() as u32)
            .filter(|&r| exclude.is_empty() || !exclude.contains(&pop.ids[r as usize]))
            .collect();
        let mut order: Vec<u32> = (0..rows.len() as u32).collect();
        order.shuffle(&mut rng);
        if creatives.is_empty() {
            return Vec::new();
        }
        if let Some(post) = self.posterior(campaign, creatives, max_features) {
            let mut rank = vec![0u32; rows.len()];
            for (i, &pos) in order.iter().enumerate() {
                rank[pos as usize] = i as u32;
            }
            let rows = post.score_topk(pop, &rows, &rank, n);
            let picks = post.assign(pop, &rows, &mut rng);
            return rows
                .into_iter()
                .zip(picks)
                .map(|(r, c)| (pop.ids[r as usize].clone(), creatives[c].clone()))
                .collect();
        }
        order.truncate(n);
        let order: Vec<u32> = order.into_iter().map(|pos| rows[pos as usize]).collect();
        let betas: Vec<Beta<f64>> = creatives
            .iter()
            .map(|c| {
                let a = self.arm(campaign, c);
                Beta::new(1.0 + a.clicks as f64, 1.0 + (a.sends - a.clicks) as f64)
                    .expect("positive parameters")
            })
            .collect();
        order
            .into_iter()
            .map(|r| {
                let mut best = 0;
                let mut best_v = f64::MIN;
                for (i, b) in betas.iter().enumerate() {
                    let v = b.sample(&mut rng);
                    if v > best_v {
                        best_v = v;
                        best = i;
                    }
                }
                (pop.ids[r as usize].clone(), creatives[best].clone())
            })
            .collect()
    }
}

/// What a batch selection is for: a campaign's creatives, the subscribers
/// it has messaged already, how many to pick, and the batch's seed.
#[derive(Debug, Clone, Copy)]
pub struct BatchSpec<'a> {
    pub campaign: &'a str,
    pub creatives: &'a [String],
    pub exclude: &'a HashSet<String>,
    pub size: usize,
    pub seed: u64,
}

/// Seed of a batch's random choices: campaign, batch and model version.
pub fn batch_seed(campaign: &str, batch: u64, model_version: u64) -> u64 {
    stable_hash(&[
        campaign.as_bytes(),
        &batch.to_le_bytes(),
        &model_version.to_le_bytes(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("u{i}")).collect()
    }

    fn trained(version: u64, sends: u64) -> Model {
        let mut arms = BTreeMap::new();
        arms.entry("c".to_string())
            .or_insert_with(BTreeMap::new)
            .insert(
                "a".to_string(),
                Arm {
                    sends,
                    ..Default::default()
                },
            );
        Model::new(version, version as i64, arms)
    }

    /// A rollback as the trainer makes it: from the current model to the
    /// artifact its `rollback_source` names, served again as a new version.
    fn roll_back(history: &mut Vec<Model>) -> Option<u64> {
        let current = history.last().expect("a current model");
        let source = current.rollback_source()?;
        let artifact = if source == 0 {
            Model::prior()
        } else {
            history[source as usize - 1].clone()
        };
        let m = Model::restore(current.version + 1, 0, &artifact);
        m.validate().unwrap();
        let restored = m.restored_from;
        history.push(m);
        restored
    }

    #[test]
    fn rollbacks_step_back_through_what_was_served() {
        let mut h: Vec<Model> = (1..=3).map(|v| trained(v, v * 10)).collect();
        // From 3 back to 2's evidence, as version 4.
        assert_eq!(roll_back(&mut h), Some(2));
        assert_eq!(h[3].version, 4);
        assert_eq!(h[3].arms, h[1].arms);
        // Again: further back, to 1 (not to 3, nor to 2 once more).
        assert_eq!(roll_back(&mut h), Some(1));
        assert_eq!(h[4].arms, h[0].arms);
        // A new fit (version 6), then a rollback: back to what was served
        // before it, version 5's evidence, which is 1's.
        h.push(trained(6, 60));
        assert_eq!(roll_back(&mut h), Some(1));
        // Down to the prior, then nothing earlier.
        assert_eq!(roll_back(&mut h), Some(0));
        assert!(h.last().unwrap().arms.is_empty());
        assert_eq!(roll_back(&mut h), None);
        assert_eq!(Model::prior().rollback_source(), None);
        // A restore is checksummed like any artifact, its origin included.
        let mut bad = h[3].clone();
        bad.restored_from = Some(3);
        assert_eq!(bad.validate(), Err(ModelError::Checksum));
        // A trained artifact's bytes carry no `restored_from` at all.
        assert!(!String::from_utf8(h[0].to_bytes())
            .unwrap()
            .contains("restored_from"));
    }

    #[test]
    fn checksum_detects_tampering() {
        let mut arms = BTreeMap::new();
        arms.entry("c".to_string())
            .or_insert_with(BTreeMap::new)
            .insert(
                "a".to_string(),
                Arm {
                    sends: 10,
                    clicks: 2,
                    ..Default::default()
                },
            );
        let m = Model::new(1, 5, arms);
        m.validate().unwrap();
        let back = Model::from_bytes(&m.to_bytes()).unwrap();
        assert_eq!(back, m);
        let mut bad = m.clone();
        bad.arms.get_mut("c").unwrap().get_mut("a").unwrap().clicks = 3;
        assert_eq!(bad.validate(), Err(ModelError::Checksum));
        let mut arms = BTreeMap::new();
        arms.entry("c".to_string())
            .or_insert_with(BTreeMap::new)
            .insert(
                "a".to_string(),
                Arm {
                    sends: 1,
                    clicks: 2,
                    ..Default::default()
                },
            );
        assert!(matches!(
            Model::new(2, 0, arms).validate(),
            Err(ModelError::Invalid(_))
        ));
    }

    #[test]
    fn selection_is_deterministic_excludes_and_prefers_the_better_arm() {
        let mut arms = BTreeMap::new();
        let c = arms.entry("c".to_string()).or_insert_with(BTreeMap::new);
        c.insert(
            "good".to_string(),
            Arm {
                sends: 1000,
                clicks: 300,
                ..Default::default()
            },
        );
        c.insert(
            "bad".to_string(),
            Arm {
                sends: 1000,
                clicks: 10,
                ..Default::default()
            },
        );
        let m = Model::new(1, 0, arms);
        let creatives = vec!["good".to_string(), "bad".to_string()];
        let all = users(500);
        let pop = |ids: &[String]| {
            Population::from_rows(ids.iter().map(|u| (u.clone(), BTreeMap::new())).collect())
        };
        let exclude: HashSet<String> = all[..100].iter().cloned().collect();
        let select = |ids: &[String], seed: u64| {
            let spec = BatchSpec {
                campaign: "c",
                creatives: &creatives,
                exclude: &exclude,
                size: 200,
                seed,
            };
            m.select_batch(&spec, &pop(ids), 8)
        };
        let s1 = select(&all, 42);
        let s2 = select(&all, 42);
        assert_eq!(s1, s2);
        assert_eq!(s1.len(), 200);
        assert!(s1.iter().all(|(u, _)| !exclude.contains(u)));
        let good = s1.iter().filter(|(_, c)| c == "good").count();
        assert!(good > 190, "{good}");
        let fewer = select(&all[..150], 1);
        assert_eq!(fewer.len(), 50);
    }
}
