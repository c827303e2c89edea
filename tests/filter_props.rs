//! The percolator index against the reference: for any filters and any
//! document, `classify` finds exactly the filters that checking every
//! filter finds, in ascending id order.

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use smartmsg::domain::filter::{Filter, FilterIndex};

const FIELDS: [&str; 3] = ["title", "cat", "n"];
const WORDS: [&str; 5] = ["red", "Blue", "x2", "é", "sale"];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0..WORDS.len()).prop_map(|i| json!(WORDS[i])),
        (-2i64..4).prop_map(|n| json!(n)),
        (-2i64..4).prop_map(|n| json!(n as f64 + 0.5)),
        (-2i64..4).prop_map(|n| json!(n as f64)),
        any::<bool>().prop_map(|b| json!(b)),
        Just(Value::Null),
        // Text of several words with assorted separators and cases.
        prop::collection::vec((0..WORDS.len(), 0..3usize), 1..4).prop_map(|ws| {
            let seps = [" ", ", ", "-"];
            let text: Vec<String> = ws
                .iter()
                .map(|(w, s)| format!("{}{}", WORDS[*w].to_uppercase(), seps[*s]))
                .collect();
            json!(text.concat())
        }),
    ]
}

fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => scalar(),
        1 => prop::collection::vec(scalar(), 0..3).prop_map(Value::Array),
    ]
}

fn condition() -> impl Strategy<Value = Value> {
    let field = (0..FIELDS.len()).prop_map(|i| FIELDS[i]);
    (
        field,
        0..4u8,
        prop::collection::vec(scalar(), 1..3),
        -2i64..4,
    )
        .prop_map(|(f, kind, values, n)| match kind {
            0 => {
                let words: Vec<&str> = values
                    .iter()
                    .enumerate()
                    .map(|(i, _)| WORDS[(i + n.unsigned_abs() as usize) % WORDS.len()])
                    .collect();
                json!({"field": f, "contains_any": words})
            }
            1 => json!({"field": f, "in": values}),
            2 => json!({"field": f, "gte": n as f64 / 2.0}),
            _ => json!({"field": f, "lte": n}),
        })
}

fn filters() -> impl Strategy<Value = Vec<Filter>> {
    prop::collection::vec(prop::collection::vec(condition(), 1..4), 0..25).prop_map(|fs| {
        fs.into_iter()
            .enumerate()
            .map(|(i, all)| {
                Filter::parse(&json!({"filter_id": format!("f{i:02}"), "all": all})).unwrap()
            })
            .collect()
    })
}

fn document() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::vec(prop::option::of(field_value()), FIELDS.len()).prop_map(|vs| {
        FIELDS
            .iter()
            .zip(vs)
            .filter_map(|(f, v)| Some((f.to_string(), v?)))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn index_equals_brute_force(fs in filters(), docs in prop::collection::vec(document(), 1..8)) {
        let idx = FilterIndex::new(fs);
        for d in &docs {
            let got = idx.classify(d);
            prop_assert_eq!(&got, &idx.matches_brute_force(d), "{:?}", d);
            // And what each filter's own check says, word by word.
            let naive: Vec<String> = idx
                .filters()
                .iter()
                .filter(|f| f.matches(d))
                .map(|f| f.filter_id.clone())
                .collect();
            prop_assert_eq!(&got, &naive, "{:?}", d);
            prop_assert!(got.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
