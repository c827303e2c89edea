//! `smartmsg bench model`: how well the targeting model spends a budget.
//! For each seed, the demo's simulated channel (hidden click rates per
//! subscriber and creative, linear in its features) plus features that do
//! nothing, one campaign run batch by batch through the daemon's own
//! selection (`Model::select_batch`) and the trainer's own statistics
//! (`Arm`, `LinearStats`), the model refitted between batches. Compared by
//! expected clicks (the sum of the hidden click rates of the messages sent,
//! so the numbers do not depend on the luck of the simulated clicks) with
//! an oracle that knows the hidden rates (the best subscribers, each with
//! its best creative) and with random users and creatives.

use crate::demo::{World, CREATIVES, IMPRESSION_P};
use crate::domain::linear::Population;
use crate::domain::model::{batch_seed, stable_hash, Arm, BatchSpec, Model};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Seeds of the simulated worlds (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 2, 3, 4, 5])]
    pub seeds: Vec<u64>,
    /// Subscribers in the channel.
    #[arg(long, default_value_t = 20_000)]
    pub subscribers: usize,
    /// Campaign budget (messages).
    #[arg(long, default_value_t = 6_000)]
    pub budget: u64,
    /// Batches the budget is paced over.
    #[arg(long, default_value_t = 12)]
    pub batches: u64,
    /// Features besides the three the click rates depend on, uniform noise.
    #[arg(long, default_value_t = 2)]
    pub noise_features: usize,
    /// `model.max_features`.
    #[arg(long, default_value_t = 32)]
    pub max_features: usize,
}

/// One simulated campaign: expected clicks per batch and sends per batch.
struct Run {
    expected: Vec<f64>,
    sends: Vec<u64>,
    clicks: u64,
}

/// Run the campaign; `with_features` false hides the features from the
/// model (creative optimisation only, users at random).
fn campaign(
    world: &World,
    rows: &[(String, BTreeMap<String, f64>)],
    a: &ModelArgs,
    seed: u64,
    with_features: bool,
) -> Run {
    let campaign = "bench-campaign";
    let creatives: Vec<String> = CREATIVES.iter().map(|c| c.0.to_string()).collect();
    let pop = Population::from_rows(if with_features {
        rows.to_vec()
    } else {
        rows.iter()
            .map(|(id, _)| (id.clone(), BTreeMap::new()))
            .collect()
    });
    let index: BTreeMap<&str, usize> = world
        .users
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id.as_str(), i))
        .collect();
    let mut arms: BTreeMap<String, Arm> = BTreeMap::new();
    let mut sent: HashSet<String> = HashSet::new();
    let mut run = Run {
        expected: Vec::new(),
        sends: Vec::new(),
        clicks: 0,
    };
    for batch in 0..a.batches {
        let left = a.budget - sent.len() as u64;
        let size = left.div_ceil(a.batches - batch);
        let mut all = BTreeMap::new();
        all.insert(campaign.to_string(), arms.clone());
        let model = Model::new(batch, 0, all);
        let spec = BatchSpec {
            campaign,
            creatives: &creatives,
            exclude: &sent,
            size: size as usize,
            seed: batch_seed(campaign, batch, batch),
        };
        let picks = model.select_batch(&spec, &pop, a.max_features);
        let mut expected = 0.0;
        for (user, creative) in &picks {
            let i = index[user.as_str()];
            let c = CREATIVES
                .iter()
                .position(|x| x.0 == creative)
                .expect("a known creative");
            let p = IMPRESSION_P * World::click_p(&world.users[i].1, c);
            expected += p;
            let mut rng = ChaCha8Rng::seed_from_u64(
                seed ^ stable_hash(&[campaign.as_bytes(), user.as_bytes()]),
            );
            let clicked = rng.gen::<f64>() < p;
            // As the trainer counts them.
            let arm = arms.entry(creative.clone()).or_default();
            arm.sends += 1;
            let features = &pop_features(rows, i, with_features);
            arm.linear.add_send(features, a.max_features);
            if clicked {
                arm.clicks += 1;
                arm.linear.add_click(features);
                run.clicks += 1;
            }
            sent.insert(user.clone());
        }
        run.expected.push(expected);
        run.sends.push(picks.len() as u64);
    }
    run
}

fn pop_features(
    rows: &[(String, BTreeMap<String, f64>)],
    i: usize,
    with_features: bool,
) -> BTreeMap<String, f64> {
    if with_features {
        rows[i].1.clone()
    } else {
        BTreeMap::new()
    }
}

/// Expected clicks of the oracle (the `budget` best subscribers, each with
/// its best creative) and of random users with random creatives.
fn bounds(world: &World, budget: u64) -> (f64, f64) {
    let mut best: Vec<f64> = world
        .users
        .iter()
        .map(|(_, f)| {
            (0..CREATIVES.len())
                .map(|c| IMPRESSION_P * World::click_p(f, c))
                .fold(0.0, f64::max)
        })
        .collect();
    best.sort_unstable_by(|a, b| b.total_cmp(a));
    let oracle = best.iter().take(budget as usize).sum();
    let mean: f64 = world
        .users
        .iter()
        .map(|(_, f)| {
            (0..CREATIVES.len())
                .map(|c| IMPRESSION_P * World::click_p(f, c))
                .sum::<f64>()
                / CREATIVES.len() as f64
        })
        .sum::<f64>()
        / world.users.len() as f64;
    (oracle, mean * budget as f64)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn run(a: ModelArgs) -> anyhow::Result<()> {
    if a.batches == 0 || a.budget == 0 || a.budget > a.subscribers as u64 {
        anyhow::bail!("need batches > 0 and 0 < budget <= subscribers");
    }
    let mut out = Vec::new();
    for &seed in &a.seeds {
        let world = World::new(a.subscribers, seed);
        let mut noise = ChaCha8Rng::seed_from_u64(seed ^ 0x0153);
        let rows: Vec<(String, BTreeMap<String, f64>)> = world
            .users
            .iter()
            .map(|(id, f)| {
                let mut m: BTreeMap<String, f64> = f
                    .iter()
                    .enumerate()
                    .map(|(k, v)| (format!("f{k}"), *v))
                    .collect();
                for k in 0..a.noise_features {
                    m.insert(format!("noise{k}"), noise.gen());
                }
                (id.clone(), m)
            })
            .collect();
        let (oracle, random) = bounds(&world, a.budget);
        let per_send = oracle / a.budget as f64;
        let model = campaign(&world, &rows, &a, seed, true);
        let creative_only = campaign(&world, &rows, &a, seed, false);
        let expected: f64 = model.expected.iter().sum();
        let expected_co: f64 = creative_only.expected.iter().sum();
        let efficiency: Vec<f64> = model
            .expected
            .iter()
            .zip(&model.sends)
            .map(|(e, s)| round3(e / (*s).max(1) as f64 / per_send))
            .collect();
        eprintln!(
            "seed {seed}: expected clicks {expected:.0} (creative only {expected_co:.0}), oracle {oracle:.0}, random {random:.0}; per batch {efficiency:?}"
        );
        out.push(json!({
            "seed": seed,
            "clicks_vs_oracle": round3(expected / oracle),
            "lift_share": round3((expected - random) / (oracle - random)),
            "batch_efficiency": efficiency,
            "expected_clicks": expected.round(),
            "clicks": model.clicks,
            "oracle_expected_clicks": oracle.round(),
            "random_expected_clicks": random.round(),
            "creative_only_vs_oracle": round3(expected_co / oracle),
            "creative_only_lift_share": round3((expected_co - random) / (oracle - random)),
        }));
    }
    let mean = |k: &str| {
        round3(
            out.iter()
                .map(|s| s[k].as_f64().unwrap_or(0.0))
                .sum::<f64>()
                / out.len().max(1) as f64,
        )
    };
    let result = json!({
        "subscribers": a.subscribers,
        "budget": a.budget,
        "batches": a.batches,
        "noise_features": a.noise_features,
        "clicks_vs_oracle_mean": mean("clicks_vs_oracle"),
        "lift_share_mean": mean("lift_share"),
        "creative_only_lift_share_mean": mean("creative_only_lift_share"),
        "seeds": out,
    });
    println!("{result}");
    Ok(())
}
