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
    assert!(
        String::from_utf8(out.stdout)?.contains("OK (1 services, 1 endpoints, 0 virtual services")
    );

    // Istio's own files are checked with the mesh they route; what Lumen
    // does not implement is refused naming file, resource and field.
    let istio = lumen_tests::crate_dir().join("data/istio/bookinfo/networking");
    let vs = dir.path().join("vs.yaml");
    std::fs::write(
        &vs,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n",
    )?;
    let out = Command::new(lumen_bin())
        .args(["check", "-f"])
        .arg(&good)
        .arg("-f")
        .arg(&vs)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8(out.stdout)?.contains("1 virtual services"));
    let mtls = istio.join("destination-rule-all-mtls.yaml");
    let bookinfo = dir.path().join("bookinfo.yaml");
    let mut mesh = String::from(
        "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata:\n  name: bookinfo\nspec:\n  services:\n",
    );
    for (i, name) in ["productpage", "reviews", "ratings", "details"]
        .iter()
        .enumerate()
    {
        mesh.push_str(&format!(
            "    - name: {name}\n      endpoints:\n        - {{address: 127.0.0.1:{}, version: v1}}\n        - {{address: 127.0.0.1:{}, version: v2}}\n        - {{address: 127.0.0.1:{}, version: v3}}\n",
            9000 + 10 * i,
            9001 + 10 * i,
            9002 + 10 * i
        ));
    }
    std::fs::write(&bookinfo, mesh)?;
    let out = Command::new(lumen_bin())
        .args(["check", "-f"])
        .arg(&bookinfo)
        .arg("-f")
        .arg(&mtls)
        .output()?;
    // Istio's mTLS task's DestinationRules (ISTIO_MUTUAL) are taken as is.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8(out.stdout)?.contains("destination rules"));

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
        err.contains(&format!("{}: Mesh default/m: spec.services[0].endpoints[0].address: `reviews:80` is not an IP:port socket address", bad.display())),
        "{err}"
    );
    Ok(())
}

#[test]
fn every_command_has_help() -> Result<()> {
    for cmd in [
        "up",
        "query",
        "proxy",
        "demo",
        "sql",
        "check",
        "control",
        "apply",
        "delete",
        "get",
        "proxy-status",
        "policy status",
        "install",
    ] {
        let out = Command::new(lumen_bin())
            .args(cmd.split(' '))
            .arg("--help")
            .output()?;
        assert!(out.status.success(), "{cmd}");
        assert!(
            String::from_utf8(out.stdout)?.contains("Usage: lumen"),
            "{cmd}"
        );
    }
    Ok(())
}

#[test]
fn query_settings_files_are_checked_and_a_bad_one_stops_lumen_up_with_file_field_and_reason()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let good = dir.path().join("query.yaml");
    let text = "apiVersion: lumen.dev/v1alpha1\nkind: QueryService\nmetadata:\n  name: q\nspec:\n  timeout: 5s\n  concurrency: 2\n";
    std::fs::write(&good, text)?;
    let out = Command::new(lumen_bin())
        .args(["check", "-f"])
        .arg(&good)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8(out.stdout)?.contains("OK (QueryService settings)"));

    let bad = dir.path().join("bad-query.yaml");
    std::fs::write(&bad, text.replace("5s", "soon"))?;
    let mesh = dir.path().join("mesh.yaml");
    lumen_tests::write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let want = format!(
        "{}: QueryService default/q: spec.timeout: `soon` is not a duration",
        bad.display()
    );
    let out = Command::new(lumen_bin())
        .args(["check", "-f"])
        .arg(&bad)
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)?.contains(&want));
    // lumen up refuses to start on it, before binding anything.
    let out = Command::new(lumen_bin())
        .arg("up")
        .arg("-f")
        .arg(&mesh)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--query-config")
        .arg(&bad)
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(err.contains(&want), "{err}");
    Ok(())
}

#[test]
fn a_bad_store_stops_lumen_up_naming_the_url_option_or_id() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    lumen_tests::write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let any_port = "127.0.0.1:0";
    let up = |store: &[&str]| -> Result<String> {
        let mut child = Command::new(lumen_bin())
            .args(["up", "-f"])
            .arg(&mesh)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--otlp-grpc", any_port, "--otlp-http", any_port])
            .args(["--query-addr", any_port, "--pg-addr", any_port])
            .args(["--flight-sql-addr", any_port, "--control-addr", any_port])
            .args(store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        // It must refuse at once; one that starts is killed and fails here.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while child.try_wait()?.is_none() {
            if std::time::Instant::now() > deadline {
                child.kill()?;
                anyhow::bail!("lumen up {store:?} started instead of refusing");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let out = child.wait_with_output()?;
        assert!(!out.status.success(), "lumen up {store:?} exited 0");
        Ok(String::from_utf8(out.stderr)?)
    };
    let err = up(&[
        "--store",
        "s3://bucket/p",
        "--store-option",
        "aws_endpiont=http://x",
    ])?;
    assert!(err.contains("store option `aws_endpiont`"), "{err}");
    let err = up(&["--store", "https://example.com/p"])?;
    assert!(err.contains("store URL `https://example.com/p`"), "{err}");
    let err = up(&["--store", "s3://bucket/p", "--collector-id", "a/b"])?;
    assert!(err.contains("collector id `a/b`"), "{err}");
    let err = up(&["--store-option", "no-equals-sign"])?;
    assert!(err.contains("is not KEY=VALUE"), "{err}");
    // The query service alone needs the shared store.
    let out = Command::new(lumen_bin())
        .args(["query", "--query-addr", any_port, "--pg-addr", any_port])
        .args(["--flight-sql-addr", any_port])
        .env_remove("LUMEN_STORE")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(err.contains("give it --store"), "{err}");
    let err = up(&["--store", "s3://bucket/p", "--store-refresh", "2m"])?;
    assert!(
        err.contains("must be shorter than --store-delete-grace"),
        "{err}"
    );
    Ok(())
}

/// The sidecar's own binary takes exactly the flags of `lumen proxy`: the
/// injector's manifests and a hand-run sidecar say the same thing.
#[test]
fn lumen_proxy_takes_the_flags_of_lumen_proxy() -> Result<()> {
    let flags = |out: std::process::Output| -> Result<Vec<String>> {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut flags: Vec<String> = String::from_utf8(out.stdout)?
            .split_whitespace()
            .filter(|w| w.starts_with("--"))
            .map(|w| w.trim_end_matches([',', '.']).to_string())
            .collect();
        flags.sort();
        flags.dedup();
        Ok(flags)
    };
    let sub = flags(
        Command::new(lumen_bin())
            .args(["proxy", "--help"])
            .output()?,
    )?;
    let own = flags(
        Command::new(lumen_tests::lumen_proxy_bin())
            .arg("--help")
            .output()?,
    )?;
    assert!(sub.contains(&"--control".to_string()), "{sub:?}");
    assert!(sub.contains(&"--stats-interval".to_string()), "{sub:?}");
    assert_eq!(sub, own);
    Ok(())
}
