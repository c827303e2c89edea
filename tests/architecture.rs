//! Architecture invariants, checked against the source tree:
//! * nothing under `src/actors/` names rdkafka, lapin, sled or axum (actors
//!   reach the outside only through the traits and stores of `src/io/`);
//! * nothing under `src/domain/` does IO or uses actors (no tokio, ractor,
//!   sled, rdkafka, lapin, axum, `crate::io`, `crate::actors`);
//! * every module opens with a `//!` line saying what it owns.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// Code without comments (so docs may mention what code must not use).
fn code_of(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn src(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(sub)
}

fn assert_absent(dir: &str, forbidden: &[&str]) {
    for f in rust_files(&src(dir)) {
        let code = code_of(&f);
        for word in forbidden {
            assert!(!code.contains(word), "{} names `{word}`", f.display());
        }
    }
}

#[test]
fn actors_reach_the_outside_only_through_io() {
    assert_absent("actors", &["sled", "rdkafka", "lapin", "axum"]);
}

#[test]
fn domain_is_pure() {
    assert_absent(
        "domain",
        &[
            "tokio",
            "ractor",
            "sled",
            "rdkafka",
            "lapin",
            "axum",
            "crate::io",
            "crate::actors",
            "std::fs",
            "std::net",
        ],
    );
}

#[test]
fn every_module_says_what_it_owns() {
    for f in rust_files(&src("")) {
        let text = std::fs::read_to_string(&f).unwrap();
        let first = text
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        assert!(
            first.starts_with("//!"),
            "{} lacks a //! module doc",
            f.display()
        );
    }
}
