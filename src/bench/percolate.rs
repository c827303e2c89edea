//! `smartmsg bench percolate`: documents classified per second on one core
//! through the filter index, against checking every filter against every
//! document (brute force) — on synthetic filters and documents of the
//! contract's shapes (title words, category, image count, price, tags).
//! Both must find the same matches (`verified`).

use crate::domain::filter::{Filter, FilterIndex};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};
use std::time::Instant;

#[derive(Debug, Clone, clap::Args)]
pub struct PercolateArgs {
    /// Registered filters.
    #[arg(long, default_value_t = 10_000)]
    pub filters: usize,
    /// Documents classified through the index.
    #[arg(long, default_value_t = 50_000)]
    pub docs: usize,
    /// Documents also checked by brute force (every filter each); the
    /// matches of both must agree on these.
    #[arg(long, default_value_t = 1_000)]
    pub brute_force_docs: usize,
    /// Distinct words in titles.
    #[arg(long, default_value_t = 20_000)]
    pub vocabulary: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

const CATEGORIES: usize = 500;
const TAGS: usize = 2_000;

/// A word drawn with a mild skew: some words are more common than others.
fn word(rng: &mut ChaCha8Rng, vocabulary: usize) -> String {
    let u: f64 = rng.gen();
    format!("w{}", (u * u * vocabulary as f64) as usize)
}

fn filter(rng: &mut ChaCha8Rng, i: usize, vocabulary: usize) -> Filter {
    let mut all = Vec::new();
    match rng.gen_range(0..4) {
        0 | 1 => {
            let words: Vec<String> = (0..rng.gen_range(1..=3))
                .map(|_| word(rng, vocabulary))
                .collect();
            all.push(json!({"field": "title", "contains_any": words}));
        }
        2 => {
            let cats: Vec<String> = (0..rng.gen_range(1..=3))
                .map(|_| format!("cat{}", rng.gen_range(0..CATEGORIES)))
                .collect();
            all.push(json!({"field": "category", "in": cats}));
        }
        _ => all.push(json!({"field": "tags", "in": [format!("tag{}", rng.gen_range(0..TAGS))]})),
    }
    if rng.gen_bool(0.5) {
        all.push(json!({"field": "image_count", "gte": rng.gen_range(0..4)}));
    }
    if rng.gen_bool(0.3) {
        all.push(json!({"field": "price", "lte": rng.gen_range(10..500)}));
    }
    Filter::parse(&json!({"filter_id": format!("f{i:06}"), "all": all}))
        .expect("a valid synthetic filter")
}

fn document(rng: &mut ChaCha8Rng, vocabulary: usize) -> Map<String, Value> {
    let title: Vec<String> = (0..rng.gen_range(6..=14))
        .map(|_| word(rng, vocabulary))
        .collect();
    let tags: Vec<String> = (0..rng.gen_range(0..=3))
        .map(|_| format!("tag{}", rng.gen_range(0..TAGS)))
        .collect();
    json!({
        "title": title.join(" "),
        "category": format!("cat{}", rng.gen_range(0..CATEGORIES)),
        "image_count": rng.gen_range(0..6),
        "price": rng.gen_range(1..1000) as f64 / 2.0,
        "tags": tags,
    })
    .as_object()
    .expect("an object")
    .clone()
}

pub fn run(a: PercolateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.filters > 0 && a.docs > 0 && a.brute_force_docs > 0,
        "--filters, --docs and --brute-force-docs must be > 0"
    );
    anyhow::ensure!(a.vocabulary > 0, "--vocabulary must be > 0");
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let filters: Vec<Filter> = (0..a.filters)
        .map(|i| filter(&mut rng, i, a.vocabulary))
        .collect();
    let docs: Vec<Map<String, Value>> = (0..a.docs)
        .map(|_| document(&mut rng, a.vocabulary))
        .collect();
    let started = Instant::now();
    let index = FilterIndex::new(filters);
    let build_ms = started.elapsed().as_secs_f64() * 1e3;
    eprintln!("index of {} filters built in {build_ms:.1} ms", index.len());

    let started = Instant::now();
    let mut matches = 0usize;
    let mut indexed = Vec::with_capacity(a.brute_force_docs.min(a.docs));
    for (i, d) in docs.iter().enumerate() {
        let m = index.classify(d);
        matches += m.len();
        if i < a.brute_force_docs {
            indexed.push(m);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let rate = a.docs as f64 / secs;
    eprintln!("index: {} docs in {secs:.3} s, {matches} matches", a.docs);

    let sample = &docs[..a.brute_force_docs.min(a.docs)];
    let started = Instant::now();
    let brute: Vec<Vec<String>> = sample
        .iter()
        .map(|d| index.matches_brute_force(d))
        .collect();
    let brute_secs = started.elapsed().as_secs_f64();
    let brute_rate = sample.len() as f64 / brute_secs;
    eprintln!("brute force: {} docs in {brute_secs:.3} s", sample.len());
    let verified = brute == indexed;
    let out = json!({
        "filters": a.filters,
        "docs": a.docs,
        "docs_per_s_per_core": rate.round(),
        "brute_force_docs_per_s_per_core": brute_rate.round(),
        "speedup": (rate / brute_rate * 10.0).round() / 10.0,
        "matches_per_doc": (matches as f64 / a.docs as f64 * 100.0).round() / 100.0,
        "index_build_ms": (build_ms * 10.0).round() / 10.0,
        "brute_force_docs": sample.len(),
        "verified": verified,
    });
    println!("{out}");
    anyhow::ensure!(verified, "the index and brute force disagree");
    Ok(())
}
