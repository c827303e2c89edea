//! `smartmsg bench targeting`: the cost of one batch selection on a large
//! channel, on one core. A synthetic population (uniform features) and a
//! model trained on simulated sends whose click rates depend on a few of
//! the features; then, timed (median of `--repeat`): scoring every
//! subscriber by its best creative and taking the best `--batch`
//! (`score_topk_ms`, the fit from the statistics included), and the
//! creative draw (Thompson sampling) for each of them (`thompson_ms`);
//! also the whole `select_batch` (exclusions, the seeded order, both).
//! Reading the population from sled is not included.

use crate::domain::linear::Population;
use crate::domain::model::{Arm, BatchSpec, Model};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

#[derive(Debug, Clone, clap::Args)]
pub struct TargetingArgs {
    /// Subscribers of the channel.
    #[arg(long, default_value_t = 1_000_000)]
    pub users: usize,
    /// Creatives of the campaign.
    #[arg(long, default_value_t = 4)]
    pub creatives: usize,
    /// Features per subscriber.
    #[arg(long, default_value_t = 16)]
    pub features: usize,
    /// Subscribers chosen (the batch size).
    #[arg(long, default_value_t = 10_000)]
    pub batch: usize,
    /// Simulated sends per creative the model is trained on.
    #[arg(long, default_value_t = 20_000)]
    pub training_sends: usize,
    /// Timed repetitions (the medians are printed).
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also store the population in a (temporary) sled subscribers table
    /// and time reading it back as a selection does (`load_ms`).
    #[arg(long)]
    pub from_sled: bool,
}

/// The median of durations in seconds, in milliseconds (three decimals).
fn median_ms(v: Vec<f64>) -> f64 {
    (super::median(v) * 1e6).round() / 1000.0
}

pub fn run(a: TargetingArgs) -> anyhow::Result<()> {
    if a.users == 0 || a.creatives == 0 || a.features == 0 || a.repeat == 0 {
        anyhow::bail!("users, creatives, features and repeat must be > 0");
    }
    if a.features > 64 {
        anyhow::bail!("features: at most 64 (model.max_features)");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let names: Vec<String> = (0..a.features).map(|k| format!("f{k:02}")).collect();
    let pop = Population {
        ids: (0..a.users).map(|i| format!("user-{i:08}")).collect(),
        names: names.clone(),
        x: (0..a.users * a.features)
            .map(|_| rng.gen::<f32>())
            .collect(),
    };
    // Creative c's click rate rises with feature c mod F.
    let rate = |row: usize, c: usize| 0.02 + 0.1 * pop.x[row * a.features + c % a.features] as f64;
    let campaign = "bench";
    let creatives: Vec<String> = (0..a.creatives).map(|c| format!("creative-{c}")).collect();
    let mut arms = BTreeMap::new();
    for (c, id) in creatives.iter().enumerate() {
        let mut arm = Arm::default();
        for _ in 0..a.training_sends {
            let row = rng.gen_range(0..a.users);
            let f: BTreeMap<String, f64> = names
                .iter()
                .enumerate()
                .map(|(k, n)| (n.clone(), pop.x[row * a.features + k] as f64))
                .collect();
            arm.sends += 1;
            arm.linear.add_send(&f, 64);
            if rng.gen::<f64>() < rate(row, c) {
                arm.clicks += 1;
                arm.linear.add_click(&f);
            }
        }
        arms.insert(id.clone(), arm);
    }
    let mut all = BTreeMap::new();
    all.insert(campaign.to_string(), arms);
    let model = Model::new(1, 0, all);
    let candidates: Vec<u32> = (0..a.users as u32).collect();
    let (mut score_s, mut thompson_s, mut select_s) = (Vec::new(), Vec::new(), Vec::new());
    let mut chosen = Vec::new();
    let none = HashSet::new();
    for i in 0..a.repeat {
        let t = Instant::now();
        let post = model
            .posterior(campaign, &creatives, 64)
            .expect("trained on features");
        chosen = post.score_topk(&pop, &candidates, &candidates, a.batch);
        score_s.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let picks = post.assign(&pop, &chosen, &mut rng);
        thompson_s.push(t.elapsed().as_secs_f64());
        std::hint::black_box(picks);
        let t = Instant::now();
        let spec = BatchSpec {
            campaign,
            creatives: &creatives,
            exclude: &none,
            size: a.batch,
            seed: i as u64,
        };
        let sel = model.select_batch(&spec, &pop, 64);
        select_s.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(sel.len() == a.batch.min(a.users), "selected {}", sel.len());
    }
    // The chosen subscribers' best click rates against everyone's.
    let best = |row: usize| (0..a.creatives).map(|c| rate(row, c)).fold(0.0, f64::max);
    let chosen_rate =
        chosen.iter().map(|&r| best(r as usize)).sum::<f64>() / chosen.len().max(1) as f64;
    let all_rate = (0..a.users).map(best).sum::<f64>() / a.users as f64;
    let load_ms = if a.from_sled {
        Some(load_from_sled(&pop)?)
    } else {
        None
    };
    let result = json!({
        "users": a.users,
        "creatives": a.creatives,
        "features": a.features,
        "batch": a.batch,
        "score_topk_ms": median_ms(score_s),
        "thompson_ms": median_ms(thompson_s),
        "select_batch_ms": median_ms(select_s),
        "chosen_best_rate": (chosen_rate * 10_000.0).round() / 10_000.0,
        "population_best_rate": (all_rate * 10_000.0).round() / 10_000.0,
        "load_ms": load_ms,
        "peak_rss_bytes": super::aggregate::peak_rss_bytes(std::process::id()),
    });
    println!("{result}");
    Ok(())
}

/// Store `pop` as the subscribers of a channel in a temporary sled table
/// and time `SubscriberStore::population` (the median of three reads),
/// checking it reads back what was stored.
fn load_from_sled(pop: &Population) -> anyhow::Result<f64> {
    use crate::io::store::{Subscriber, SubscriberStore};
    let db = sled::Config::new().temporary(true).open()?;
    let store = SubscriberStore::open(&db)?;
    let w = pop.names.len();
    for (chunk, ids) in pop.ids.chunks(10_000).enumerate() {
        let changes: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let row = chunk * 10_000 + i;
                let features = pop
                    .names
                    .iter()
                    .zip(&pop.x[row * w..(row + 1) * w])
                    .map(|(n, v)| (n.clone(), *v as f64))
                    .collect();
                let sub = Subscriber {
                    channel_id: "bench".into(),
                    user_id: id.clone(),
                    features,
                };
                ("bench".to_string(), id.clone(), Some(sub))
            })
            .collect();
        store.apply("bench-subscribers", 0, &changes, chunk as u64)?;
    }
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let back = store.population("bench")?;
        times.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(
            back.ids == pop.ids && back.names == pop.names && back.x == pop.x,
            "the population read back differs from the one stored"
        );
    }
    Ok(median_ms(times))
}
