//! What Lumen links: the big stacks once each. Two majors of hyper, tonic,
//! prost, arrow or rustls in one binary would mean two HTTP stacks, two
//! protobuf runtimes or two TLS configurations to keep in step, and types
//! that do not pass between them. Licences and sources are checked by
//! `cargo deny` in scripts/test.sh (deny.toml).

use std::collections::{BTreeMap, BTreeSet};

/// The semver-compatible line of a version: `1` for 1.12.0, `0.14` for
/// 0.14.9 (before 1.0 the minor is the major).
fn line(version: &str) -> String {
    let mut parts = version.split('.');
    let major = parts.next().unwrap_or_default();
    if major == "0" {
        format!("0.{}", parts.next().unwrap_or_default())
    } else {
        major.to_string()
    }
}

/// Every package in Cargo.lock, with the lines of it that are locked.
fn locked() -> BTreeMap<String, BTreeSet<String>> {
    // The tests crate sits in the workspace root, beside Cargo.lock.
    let lock = lumen_tests::crate_dir().join("../Cargo.lock");
    let text = std::fs::read_to_string(&lock)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", lock.display()));
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut name = None;
    for l in text.lines() {
        if let Some(n) = l.strip_prefix("name = ") {
            name = Some(n.trim_matches('"').to_string());
        } else if let (Some(v), Some(n)) = (l.strip_prefix("version = "), name.take()) {
            found
                .entry(n)
                .or_default()
                .insert(line(v.trim_matches('"')));
        }
    }
    found
}

#[test]
fn the_big_stacks_are_each_linked_in_one_major_version() {
    let locked = locked();
    assert!(
        locked.len() > 100,
        "Cargo.lock read: {} packages",
        locked.len()
    );
    let stacks = [
        "tokio",
        "hyper",
        "h2",
        "http",
        "tonic",
        "prost",
        "arrow",
        "arrow-flight",
        "datafusion",
        "rustls",
        "opentelemetry",
        "opentelemetry-proto",
        "axum",
        "kube",
        "parquet",
    ];
    for stack in stacks {
        let lines = locked
            .get(stack)
            .unwrap_or_else(|| panic!("{stack} is not in Cargo.lock"));
        assert_eq!(lines.len(), 1, "{stack} is locked at {lines:?}");
    }
}

#[test]
fn version_lines_follow_semver() {
    assert_eq!(line("1.12.0"), "1");
    assert_eq!(line("0.14.9"), "0.14");
    assert_eq!(line("59.3.2"), "59");
}
