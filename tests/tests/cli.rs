//! `lumen check` and `--help`, as a user runs them.

use std::process::Command;

use anyhow::Result;
use lumen_tests::lumen_bin;

#[test]
fn check_accepts_valid_config_and_names_file_field_and_reason_otherwise() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata:\n  name: m\nspec:\n  services:\n    - name: reviews\n      endpoints:\n        - address: 127.0.0.1:9080\n",
    )?;
    let out = Command::new(lumen_bin())
        .args(["check", "-f"])
        .arg(&good)
        .output()?;
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)?.contains("OK (1 services, 1 endpoints)"));

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&good)?.replace("127.0.0.1:9080", "reviews:80"),
    )?;
    let out = Command::new(lumen_bin())
        .args(["check", "-f"])
        .arg(&bad)
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(
        err.contains(&format!("{}: spec.services[0].endpoints[0].address: `reviews:80` is not an IP:port socket address", bad.display())),
        "{err}"
    );
    Ok(())
}

#[test]
fn every_command_has_help() -> Result<()> {
    for cmd in ["up", "proxy", "demo", "sql", "check"] {
        let out = Command::new(lumen_bin()).args([cmd, "--help"]).output()?;
        assert!(out.status.success(), "{cmd}");
        assert!(
            String::from_utf8(out.stdout)?.contains("Usage: lumen"),
            "{cmd}"
        );
    }
    Ok(())
}
