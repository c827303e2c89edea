//! The targeting model: a Beta-Bernoulli posterior of the click rate per
//! (campaign, creative), Thompson sampling for the creative of each user,
//! users in a seeded random order. Versioned and checksummed so a corrupt or
//! invalid artifact is refused. Pure: training input comes in as counts.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// Evidence for one creative: sends and the clicks attributed to them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Arm {
    pub sends: u64,
    pub clicks: u64,
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
    /// FNV-1a 64 of the canonical JSON of everything above, hex.
    #[serde(default)]
    pub checksum: String,
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
        let mut m = Model {
            version,
            trained_at,
            examples,
            arms,
            metrics,
            checksum: String::new(),
        };
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
            .copied()
            .unwrap_or_default()
    }

    /// Pick up to `n` users of `candidates` not in `exclude`, each with a
    /// creative drawn by Thompson sampling. Deterministic in `seed`, so a
    /// re-executed batch makes the same choices.
    pub fn select_batch(
        &self,
        campaign: &str,
        creatives: &[String],
        candidates: &[String],
        exclude: &HashSet<String>,
        n: usize,
        seed: u64,
    ) -> Vec<(String, String)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut order: Vec<&String> = candidates
            .iter()
            .filter(|u| !exclude.contains(*u))
            .collect();
        order.sort();
        order.shuffle(&mut rng);
        order.truncate(n);
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
            .map(|u| {
                let mut best = 0;
                let mut best_v = f64::MIN;
                for (i, b) in betas.iter().enumerate() {
                    let v = b.sample(&mut rng);
                    if v > best_v {
                        best_v = v;
                        best = i;
                    }
                }
                (u.clone(), creatives[best].clone())
            })
            .collect()
    }
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
            },
        );
        c.insert(
            "bad".to_string(),
            Arm {
                sends: 1000,
                clicks: 10,
            },
        );
        let m = Model::new(1, 0, arms);
        let creatives = vec!["good".to_string(), "bad".to_string()];
        let all = users(500);
        let exclude: HashSet<String> = all[..100].iter().cloned().collect();
        let s1 = m.select_batch("c", &creatives, &all, &exclude, 200, 42);
        let s2 = m.select_batch("c", &creatives, &all, &exclude, 200, 42);
        assert_eq!(s1, s2);
        assert_eq!(s1.len(), 200);
        assert!(s1.iter().all(|(u, _)| !exclude.contains(u)));
        let good = s1.iter().filter(|(_, c)| c == "good").count();
        assert!(good > 190, "{good}");
        let fewer = m.select_batch("c", &creatives, &all[..150], &exclude, 200, 1);
        assert_eq!(fewer.len(), 50);
    }
}
