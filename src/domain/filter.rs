//! Content filters and the percolator index (CONTRACT.md, "Filter").
//!
//! A filter is a conjunction of conditions on a document's top-level
//! fields. The index files each filter under one of its conditions (its
//! *anchor*): a word of a `contains_any`, a value of an `in`, or the bound
//! of a `gte`/`lte` in a sorted list per field. Classifying a document
//! looks up only the fields, words and values the document has, and fully
//! checks just the filters found that way (the candidates): never every
//! filter against every document. `matches_brute_force` is the reference
//! the index is tested and benchmarked against. Pure: no IO.

use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};

/// Largest number of conditions, words or values a filter may hold.
pub const MAX_ITEMS: usize = 1024;

/// One condition on a field.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Some word of the field (lowercased) is one of these (lowercased).
    ContainsAny {
        field: String,
        words: Vec<String>,
    },
    /// The field equals one of these JSON values (numbers by value).
    In {
        field: String,
        values: Vec<Value>,
    },
    Gte {
        field: String,
        n: f64,
    },
    Lte {
        field: String,
        n: f64,
    },
}

impl Condition {
    pub fn field(&self) -> &str {
        match self {
            Condition::ContainsAny { field, .. }
            | Condition::In { field, .. }
            | Condition::Gte { field, .. }
            | Condition::Lte { field, .. } => field,
        }
    }

    fn to_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("field".into(), Value::String(self.field().to_string()));
        let (k, v) = match self {
            Condition::ContainsAny { words, .. } => (
                "contains_any",
                Value::Array(words.iter().cloned().map(Value::String).collect()),
            ),
            Condition::In { values, .. } => ("in", Value::Array(values.clone())),
            Condition::Gte { n, .. } => ("gte", number(*n)),
            Condition::Lte { n, .. } => ("lte", number(*n)),
        };
        o.insert(k.into(), v);
        Value::Object(o)
    }

    /// Whether the condition holds for this value of its field (for an
    /// array, for any element).
    fn holds(&self, v: &Value) -> bool {
        if let Value::Array(items) = v {
            return items.iter().any(|i| self.holds_scalar(i));
        }
        self.holds_scalar(v)
    }

    fn holds_scalar(&self, v: &Value) -> bool {
        match self {
            Condition::ContainsAny { words, .. } => match v {
                Value::String(s) => {
                    let mut found = false;
                    for_each_word(s, |w| found = found || words.iter().any(|x| x == w));
                    found
                }
                _ => false,
            },
            Condition::In { values, .. } => values.iter().any(|x| same_value(x, v)),
            Condition::Gte { n, .. } => v.as_f64().is_some_and(|x| x >= *n),
            Condition::Lte { n, .. } => v.as_f64().is_some_and(|x| x <= *n),
        }
    }
}

/// A bound as JSON: an integer when it is one (a filter reads back as it
/// was written), else a float.
fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

/// JSON equality with numbers compared by value (1 equals 1.0).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_value(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, a)| y.get(k).is_some_and(|b| same_value(a, b)))
        }
        _ => a == b,
    }
}

/// A key under which equal values (by `same_value`) meet.
fn value_key(v: &Value) -> String {
    match v {
        Value::Number(n) => match n.as_f64() {
            // -0.0 and 0.0 are equal values.
            Some(f) => format!("n{}", if f == 0.0 { 0.0 } else { f }),
            None => format!("n{n}"),
        },
        Value::String(s) => format!("s{s}"),
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(value_key).collect();
            format!("a{}", serde_json::to_string(&inner).expect("strings"))
        }
        Value::Object(o) => {
            let mut inner: Vec<(&String, String)> =
                o.iter().map(|(k, v)| (k, value_key(v))).collect();
            inner.sort();
            format!("o{}", serde_json::to_string(&inner).expect("strings"))
        }
        other => format!("l{other}"),
    }
}

/// Calls `f` with each word of `s`: maximal runs of Unicode letters and
/// digits, lowercased.
pub fn for_each_word(s: &str, mut f: impl FnMut(&str)) {
    let mut buf = String::new();
    for c in s.chars() {
        if c.is_alphanumeric() {
            buf.extend(c.to_lowercase());
        } else if !buf.is_empty() {
            f(&buf);
            buf.clear();
        }
    }
    if !buf.is_empty() {
        f(&buf);
    }
}

/// A registered filter.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub filter_id: String,
    pub all: Vec<Condition>,
}

/// Why a filter body is refused (the API answers 400 naming the field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FilterError {
    pub field: String,
    pub message: String,
}

fn ferr(field: impl Into<String>, message: impl Into<String>) -> FilterError {
    FilterError {
        field: field.into(),
        message: message.into(),
    }
}

impl Filter {
    /// Parse and validate a filter body; `filter_id` is required here (the
    /// API fills in a generated one first).
    pub fn parse(v: &Value) -> Result<Filter, FilterError> {
        let o = v
            .as_object()
            .ok_or_else(|| ferr("body", "must be a JSON object"))?;
        let filter_id = match o.get("filter_id") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 128 => s.clone(),
            Some(Value::String(_)) => {
                return Err(ferr("filter_id", "must be 1 to 128 bytes"));
            }
            Some(_) => return Err(ferr("filter_id", "must be a string")),
            None => return Err(ferr("filter_id", "missing")),
        };
        let all = match o.get("all") {
            Some(Value::Array(a)) if a.is_empty() => {
                return Err(ferr("all", "must hold at least one condition"))
            }
            Some(Value::Array(a)) if a.len() > MAX_ITEMS => {
                return Err(ferr("all", format!("at most {MAX_ITEMS} conditions")))
            }
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, c)| parse_condition(c, &format!("all[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err(ferr("all", "must be an array of conditions")),
            None => return Err(ferr("all", "missing")),
        };
        Ok(Filter { filter_id, all })
    }

    /// The contract's JSON shape (words as stored: lowercased).
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "filter_id": self.filter_id,
            "all": self.all.iter().map(Condition::to_json).collect::<Vec<_>>(),
        })
    }

    /// Whether every condition holds for the document's fields.
    pub fn matches(&self, fields: &Map<String, Value>) -> bool {
        self.all
            .iter()
            .all(|c| fields.get(c.field()).is_some_and(|v| c.holds(v)))
    }

    /// The same, with the words of the document's fields taken once.
    fn matches_words(&self, fields: &Map<String, Value>, words: &WordSets) -> bool {
        self.all.iter().all(|c| match c {
            // Some element holds some word: some word of all the elements.
            Condition::ContainsAny { field, words: w } => words
                .get(field.as_str())
                .is_some_and(|set| w.iter().any(|x| set.contains(x.as_str()))),
            _ => fields.get(c.field()).is_some_and(|v| c.holds(v)),
        })
    }
}

/// The words of each text field of a document (of all its string elements
/// for an array).
type WordSets = HashMap<String, HashSet<String>>;

/// Only the fields some filter looks for words in are split: a long body
/// nobody filters on costs nothing.
fn word_sets(fields: &Map<String, Value>, wanted: &HashSet<String>) -> WordSets {
    let mut out = WordSets::new();
    for (name, v) in fields.iter().filter(|(n, _)| wanted.contains(n.as_str())) {
        let scalars: &[Value] = match v {
            Value::Array(a) => a,
            other => std::slice::from_ref(other),
        };
        for s in scalars {
            if let Value::String(text) = s {
                let set = out.entry(name.clone()).or_default();
                for_each_word(text, |w| {
                    if !set.contains(w) {
                        set.insert(w.to_string());
                    }
                });
            }
        }
    }
    out
}

fn parse_condition(v: &Value, at: &str) -> Result<Condition, FilterError> {
    let o = v.as_object().ok_or_else(|| ferr(at, "must be an object"))?;
    let field = match o.get("field") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(ferr(format!("{at}.field"), "must be a non-empty string")),
    };
    let ops: Vec<&str> = ["contains_any", "in", "gte", "lte"]
        .into_iter()
        .filter(|k| o.contains_key(*k))
        .collect();
    let [op] = ops[..] else {
        return Err(ferr(
            at,
            "unknown condition: needs exactly one of contains_any, in, gte, lte",
        ));
    };
    let list = |name: &str| -> Result<&Vec<Value>, FilterError> {
        match o.get(name) {
            Some(Value::Array(a)) if a.is_empty() => {
                Err(ferr(format!("{at}.{name}"), "must not be empty"))
            }
            Some(Value::Array(a)) if a.len() > MAX_ITEMS => Err(ferr(
                format!("{at}.{name}"),
                format!("at most {MAX_ITEMS} items"),
            )),
            Some(Value::Array(a)) => Ok(a),
            _ => Err(ferr(format!("{at}.{name}"), "must be an array")),
        }
    };
    let bound = |name: &str| -> Result<f64, FilterError> {
        o.get(name)
            .and_then(Value::as_f64)
            .ok_or_else(|| ferr(format!("{at}.{name}"), "must be a number"))
    };
    Ok(match op {
        "contains_any" => {
            let mut words = Vec::new();
            for (i, w) in list(op)?.iter().enumerate() {
                match w.as_str() {
                    Some(s) if !s.is_empty() => words.push(s.to_lowercase()),
                    _ => {
                        return Err(ferr(
                            format!("{at}.contains_any[{i}]"),
                            "must be a non-empty string",
                        ))
                    }
                }
            }
            Condition::ContainsAny { field, words }
        }
        "in" => Condition::In {
            field,
            values: list(op)?.clone(),
        },
        "gte" => Condition::Gte {
            field,
            n: bound(op)?,
        },
        _ => Condition::Lte {
            field,
            n: bound(op)?,
        },
    })
}

/// Where a field's anchored filters are found.
#[derive(Debug, Default)]
struct FieldIndex {
    words: HashMap<String, Vec<u32>>,
    values: HashMap<String, Vec<u32>>,
    /// (bound, filter) ascending: filters with `gte` bound <= x.
    gte: Vec<(f64, u32)>,
    /// (bound, filter) descending: filters with `lte` bound >= x.
    lte: Vec<(f64, u32)>,
}

/// Every filter, indexed by one condition each. Built once per set of
/// filters (cheap to share behind an `ArcSwap`).
#[derive(Debug, Default)]
pub struct FilterIndex {
    filters: Vec<Filter>,
    fields: HashMap<String, FieldIndex>,
    /// Every field of a `contains_any` condition (anchor or not).
    word_fields: HashSet<String>,
}

/// How many filters a condition's key may bring in, roughly: the anchor is
/// the condition expected to bring in the fewest candidates.
fn anchor_cost(c: &Condition) -> usize {
    match c {
        Condition::ContainsAny { words, .. } => words.len(),
        Condition::In { values, .. } => values.len(),
        // A range brings in every filter whose bound the value passes.
        Condition::Gte { .. } | Condition::Lte { .. } => 1_000_000,
    }
}

impl FilterIndex {
    pub fn new(mut filters: Vec<Filter>) -> FilterIndex {
        filters.sort_by(|a, b| a.filter_id.cmp(&b.filter_id));
        let mut fields: HashMap<String, FieldIndex> = HashMap::new();
        for (i, f) in filters.iter().enumerate() {
            let i = i as u32;
            let Some(anchor) = f.all.iter().min_by_key(|c| anchor_cost(c)) else {
                continue;
            };
            let fi = fields.entry(anchor.field().to_string()).or_default();
            match anchor {
                Condition::ContainsAny { words, .. } => {
                    for w in words {
                        let list = fi.words.entry(w.clone()).or_default();
                        if list.last() != Some(&i) {
                            list.push(i);
                        }
                    }
                }
                Condition::In { values, .. } => {
                    for v in values {
                        let list = fi.values.entry(value_key(v)).or_default();
                        if list.last() != Some(&i) {
                            list.push(i);
                        }
                    }
                }
                Condition::Gte { n, .. } => fi.gte.push((*n, i)),
                Condition::Lte { n, .. } => fi.lte.push((*n, i)),
            }
        }
        for fi in fields.values_mut() {
            fi.gte.sort_by(|a, b| a.0.total_cmp(&b.0));
            fi.lte.sort_by(|a, b| b.0.total_cmp(&a.0));
        }
        let word_fields = filters
            .iter()
            .flat_map(|f| &f.all)
            .filter(|c| matches!(c, Condition::ContainsAny { .. }))
            .map(|c| c.field().to_string())
            .collect();
        FilterIndex {
            filters,
            fields,
            word_fields,
        }
    }

    pub fn len(&self) -> usize {
        self.filters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// The filters, by id.
    pub fn filters(&self) -> &[Filter] {
        &self.filters
    }

    pub fn get(&self, id: &str) -> Option<&Filter> {
        self.filters
            .binary_search_by(|f| f.filter_id.as_str().cmp(id))
            .ok()
            .map(|i| &self.filters[i])
    }

    /// The ids of the filters the document matches, ascending.
    pub fn classify(&self, fields: &Map<String, Value>) -> Vec<String> {
        let words = word_sets(fields, &self.word_fields);
        let mut candidates: Vec<u32> = Vec::new();
        for (name, v) in fields {
            let Some(fi) = self.fields.get(name) else {
                continue;
            };
            if let Some(set) = words.get(name) {
                for w in set {
                    if let Some(l) = fi.words.get(w) {
                        candidates.extend_from_slice(l);
                    }
                }
            }
            let scalars: &[Value] = match v {
                Value::Array(a) => a,
                other => std::slice::from_ref(other),
            };
            for s in scalars {
                if !fi.values.is_empty() {
                    if let Some(l) = fi.values.get(&value_key(s)) {
                        candidates.extend_from_slice(l);
                    }
                }
                if let Some(x) = s.as_f64() {
                    let passed = fi.gte.partition_point(|(n, _)| *n <= x);
                    candidates.extend(fi.gte[..passed].iter().map(|(_, i)| *i));
                    let passed = fi.lte.partition_point(|(n, _)| *n >= x);
                    candidates.extend(fi.lte[..passed].iter().map(|(_, i)| *i));
                }
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        // Filters are sorted by id, so the matches come out ascending.
        candidates
            .into_iter()
            .map(|i| &self.filters[i as usize])
            .filter(|f| f.matches_words(fields, &words))
            .map(|f| f.filter_id.clone())
            .collect()
    }

    /// Every filter checked against the document (its words taken once):
    /// the reference, and the baseline of `bench percolate`.
    pub fn matches_brute_force(&self, fields: &Map<String, Value>) -> Vec<String> {
        let words = word_sets(fields, &self.word_fields);
        self.filters
            .iter()
            .filter(|f| f.matches_words(fields, &words))
            .map(|f| f.filter_id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(v: Value) -> Filter {
        Filter::parse(&v).unwrap()
    }

    fn doc(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn words_are_runs_of_letters_and_digits_lowercased() {
        let mut w = Vec::new();
        for_each_word("Héllo, WORLD!  x2-y_z ÄÖ", |s| w.push(s.to_string()));
        assert_eq!(w, ["héllo", "world", "x2", "y", "z", "äö"]);
    }

    #[test]
    fn the_contracts_conditions() {
        let f = filter(json!({"filter_id": "f", "all": [
            {"field": "title", "contains_any": ["Sale", "deal"]},
            {"field": "category", "in": ["shoes", 7]},
            {"field": "image_count", "gte": 2},
            {"field": "price", "lte": 100.5}
        ]}));
        let ok = doc(json!({"title": "Big SALE today", "category": "shoes",
            "image_count": 3, "price": 100.5}));
        assert!(f.matches(&ok));
        let mut d = ok.clone();
        d.insert("title".into(), json!("wholesale")); // a word, not a substring
        assert!(!f.matches(&d));
        let mut d = ok.clone();
        d.insert("category".into(), json!("Shoes")); // strings case-sensitive
        assert!(!f.matches(&d));
        let mut d = ok.clone();
        d.insert("category".into(), json!(7.0)); // numbers by value
        assert!(f.matches(&d));
        let mut d = ok.clone();
        d.insert("image_count".into(), json!("3")); // gte only on numbers
        assert!(!f.matches(&d));
        let mut d = ok.clone();
        d.remove("price"); // a missing field does not hold
        assert!(!f.matches(&d));
        let mut d = ok.clone();
        d.insert("category".into(), json!(["hats", "shoes"])); // any element
        d.insert("image_count".into(), json!([1, 2]));
        assert!(f.matches(&d));
    }

    #[test]
    fn bad_filters_name_the_field() {
        let bad = |v: Value, field: &str| {
            let e = Filter::parse(&v).unwrap_err();
            assert_eq!(e.field, field, "{v}: {e}");
        };
        bad(json!({"filter_id": "f", "all": []}), "all");
        bad(json!({"filter_id": "f"}), "all");
        bad(
            json!({"filter_id": "f", "all": [{"field": "t", "contains_any": []}]}),
            "all[0].contains_any",
        );
        bad(
            json!({"filter_id": "f", "all": [{"field": "t", "contains_any": [""]}]}),
            "all[0].contains_any[0]",
        );
        bad(
            json!({"filter_id": "f", "all": [{"field": "t", "in": []}]}),
            "all[0].in",
        );
        bad(
            json!({"filter_id": "f", "all": [{"field": "t", "like": "x"}]}),
            "all[0]",
        );
        bad(
            json!({"filter_id": "f", "all": [{"field": "t", "gte": 1, "lte": 2}]}),
            "all[0]",
        );
        bad(
            json!({"filter_id": "f", "all": [{"field": "t", "gte": "1"}]}),
            "all[0].gte",
        );
        bad(
            json!({"filter_id": "f", "all": [{"contains_any": ["x"]}]}),
            "all[0].field",
        );
        bad(
            json!({"filter_id": "", "all": [{"field": "t", "gte": 1}]}),
            "filter_id",
        );
        bad(json!([1]), "body");
    }

    #[test]
    fn the_index_finds_what_brute_force_finds_in_id_order() {
        let idx = FilterIndex::new(vec![
            filter(json!({"filter_id": "b", "all": [{"field": "t", "contains_any": ["red"]}]})),
            filter(
                json!({"filter_id": "a", "all": [{"field": "n", "gte": 2}, {"field": "n", "lte": 5}]}),
            ),
            filter(json!({"filter_id": "c", "all": [{"field": "c", "in": [[1, 2], {"k": 1}]}]})),
            filter(json!({"filter_id": "d", "all": [{"field": "n", "lte": 0}]})),
        ]);
        let cases = [
            (json!({"t": "Red car", "n": 3}), vec!["a", "b"]),
            (json!({"t": "blue", "n": [9, 4]}), vec!["a"]),
            (json!({"c": [1.0, 2]}), vec![]), // an array field: elements compared, not the array
            (json!({"c": {"k": 1.0}}), vec!["c"]),
            (json!({"n": -0.0}), vec!["d"]),
            (json!({}), vec![]),
        ];
        for (d, want) in cases {
            let d = doc(d);
            assert_eq!(idx.classify(&d), want, "{d:?}");
            assert_eq!(idx.matches_brute_force(&d), want, "{d:?}");
        }
        assert_eq!(idx.get("c").unwrap().filter_id, "c");
        // Bounds read back as written.
        assert_eq!(
            idx.get("a").unwrap().to_json()["all"],
            json!([{"field": "n", "gte": 2}, {"field": "n", "lte": 5}])
        );
        let half = filter(json!({"filter_id": "h", "all": [{"field": "n", "gte": 2.5}]}));
        assert_eq!(half.to_json()["all"][0]["gte"], json!(2.5));
        assert!(idx.get("zz").is_none());
    }
}
