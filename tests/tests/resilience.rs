//! Retries through real sidecars: what the client gets, and what the rows
//! say about each try.

use std::time::Duration;

use anyhow::Result;
use lumen_tests::upstream::start_app;
use lumen_tests::{
    SidecarPorts, UpPorts, free_port, local, sql, start_sidecar, start_up, wait_for_count,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_get_past_failures_within_policy_and_budget() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let up_ports = UpPorts::pick();
    let app = start_app("backend").await;
    let (caller, backend) = (SidecarPorts::pick(), SidecarPorts::pick());
    let dead = local(free_port());
    let be = local(backend.inbound);
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "apiVersion: lumen.dev/v1alpha1
kind: Mesh
metadata:
  name: retries
spec:
  services:
    - name: backend
      port: 8080
      endpoints:
        - {{address: {be}, version: v1}}
    # One endpoint nobody listens on: connect failures, retried elsewhere.
    - name: split
      endpoints:
        - {{address: {dead}, version: v0}}
        - {{address: {be}, version: v1}}
    - name: strict
      retries: {{attempts: 1, retryOn: 5xx}}
      endpoints:
        - {{address: {be}, version: v1}}
    - name: hasty
      retries: {{attempts: 1, perTryTimeout: 100ms, retryOn: reset}}
      endpoints:
        - {{address: {be}, version: v1}}
"
        ),
    )?;
    let _up = start_up(logs, &mesh, &dir.path().join("data"), up_ports, &[]).await?;
    let collector = up_ports.grpc_endpoint();
    let _caller = start_sidecar(logs, "caller", "v1", &mesh, caller, None, &collector).await?;
    let _backend =
        start_sidecar(logs, "backend", "v1", &mesh, backend, Some(app), &collector).await?;

    let client = reqwest::Client::new();
    let outbound = format!("http://127.0.0.1:{}", caller.outbound);
    let get = |host: &'static str, path: String| {
        client
            .get(format!("{outbound}{path}"))
            .header("host", host)
            .send()
    };

    // A 503 once, then fine: the client sees only the 200.
    let r = get("backend:8080", "/flaky/once/1".into()).await?;
    assert_eq!(r.status(), 200);
    // A small body is sent again, whole, by the retry.
    let r = client
        .post(format!("{outbound}/flaky/body/1"))
        .header("host", "backend")
        .body("b".repeat(1000))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let echo: serde_json::Value = r.json().await?;
    assert_eq!(echo["body_bytes"], 1000);
    // A body over the replay limit (64 KiB) is streamed once: no retry.
    let r = client
        .post(format!("{outbound}/flaky/big/1"))
        .header("host", "backend")
        .body("b".repeat(100_000))
        .send()
        .await?;
    assert_eq!(r.status(), 503);
    // Failing every time: Istio's two retries, then the 503 with URX.
    let r = get("backend", "/status/503/always".into()).await?;
    assert_eq!(r.status(), 503);
    // Not retried by default: a 500.
    let r = get("backend", "/status/500/plain".into()).await?;
    assert_eq!(r.status(), 500);
    // `retryOn: 5xx` with one retry does retry it.
    let r = get("strict", "/status/500/strict".into()).await?;
    assert_eq!(r.status(), 500);
    // A dead endpoint: every request still answered, by the live one.
    for i in 0..10 {
        let r = get("split", format!("/split/{i}")).await?;
        assert_eq!(r.status(), 200, "split {i}");
    }
    // Each try waits 100 ms at most; two tries, then 504.
    let r = get("hasty", "/slow?delay_ms=1000".into()).await?;
    assert_eq!(r.status(), 504);

    let url = up_ports.sql_url();
    let source_row = |path: &str| {
        format!(
            "SELECT status, retries, response_flags, upstream_address FROM requests \
             WHERE reporter = 'source' AND path = '{path}'"
        )
    };
    let tries = |path: &str| {
        format!(
            "SELECT count(*) AS n FROM requests WHERE reporter = 'destination' AND path = '{path}'"
        )
    };
    let one = |path: &'static str| {
        let url = url.clone();
        async move {
            wait_for_count(
                &url,
                &format!(
                    "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND path = '{path}'"
                ),
                1,
            )
            .await?;
            let rows = sql(&url, &source_row(path)).await?;
            anyhow::ensure!(rows.len() == 1, "{path}: {rows:?}");
            Ok::<_, anyhow::Error>(rows[0].clone())
        }
    };

    let row = one("/flaky/once/1").await?;
    assert_eq!(
        (row["status"].as_i64(), row["retries"].as_i64()),
        (Some(200), Some(1)),
        "{row}"
    );
    assert_eq!(row["response_flags"], "-", "{row}");
    assert_eq!(wait_for_count(&url, &tries("/flaky/once/1"), 2).await?, 2);

    let row = one("/flaky/body/1").await?;
    assert_eq!(
        (row["status"].as_i64(), row["retries"].as_i64()),
        (Some(200), Some(1)),
        "{row}"
    );

    let row = one("/flaky/big/1").await?;
    assert_eq!(
        (row["status"].as_i64(), row["retries"].as_i64()),
        (Some(503), Some(0)),
        "{row}"
    );
    assert_eq!(wait_for_count(&url, &tries("/flaky/big/1"), 1).await?, 1);

    let row = one("/status/503/always").await?;
    assert_eq!(
        (row["status"].as_i64(), row["retries"].as_i64()),
        (Some(503), Some(2)),
        "{row}"
    );
    assert_eq!(row["response_flags"], "URX", "{row}");
    assert_eq!(
        wait_for_count(&url, &tries("/status/503/always"), 3).await?,
        3
    );

    let row = one("/status/500/plain").await?;
    assert_eq!(
        (row["status"].as_i64(), row["retries"].as_i64()),
        (Some(500), Some(0)),
        "{row}"
    );

    let row = one("/status/500/strict").await?;
    assert_eq!(
        (row["status"].as_i64(), row["retries"].as_i64()),
        (Some(500), Some(1)),
        "{row}"
    );
    assert_eq!(row["response_flags"], "URX", "{row}");

    let split =
        "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND path LIKE '/split/%'";
    assert_eq!(wait_for_count(&url, split, 10).await?, 10);
    let rows = sql(
        &url,
        "SELECT status, retries, upstream_address FROM requests \
         WHERE reporter = 'source' AND path LIKE '/split/%'",
    )
    .await?;
    for r in &rows {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(
            r["upstream_address"],
            be.to_string(),
            "the answer came from the live endpoint: {r}"
        );
    }
    // Round robin sends about half to the dead endpoint first; those retry.
    let retried = rows.iter().filter(|r| r["retries"] == 1).count();
    assert!((1..=10).contains(&retried), "{rows:?}");

    let row = one("/slow").await?;
    assert_eq!(
        (row["status"].as_i64(), row["retries"].as_i64()),
        (Some(504), Some(1)),
        "{row}"
    );
    assert_eq!(row["response_flags"], "UT,URX", "{row}");
    Ok(())
}

/// Forty requests at once to an upstream failing every one: with no
/// budget they would cost 120 upstream tries; the budget (20 % of requests
/// in flight) keeps retries a small share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_stops_a_retry_storm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let up_ports = UpPorts::pick();
    let app = start_app("backend").await;
    let (caller, backend) = (SidecarPorts::pick(), SidecarPorts::pick());
    let mesh = dir.path().join("mesh.yaml");
    lumen_tests::write_mesh(
        &mesh,
        &[("backend", 8080, &[(local(backend.inbound), "v1")])],
    )?;
    let _up = start_up(logs, &mesh, &dir.path().join("data"), up_ports, &[]).await?;
    let collector = up_ports.grpc_endpoint();
    let _caller = start_sidecar(logs, "caller", "v1", &mesh, caller, None, &collector).await?;
    let _backend =
        start_sidecar(logs, "backend", "v1", &mesh, backend, Some(app), &collector).await?;

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let n = 40;
    let calls = (0..n).map(|i| {
        client
            .get(format!(
                "http://127.0.0.1:{}/status/503/storm-{i}?delay_ms=300",
                caller.outbound
            ))
            .header("host", "backend")
            .send()
    });
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r?.status(), 503);
    }
    let url = up_ports.sql_url();
    let sources = "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND path LIKE '/status/503/storm-%'";
    assert_eq!(wait_for_count(&url, sources, n).await?, n);
    // Every try the app answered is a destination row, written before the
    // source row of its request.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tries = sql(
        &url,
        "SELECT count(*) AS n FROM requests \
         WHERE reporter = 'destination' AND path LIKE '/status/503/storm-%'",
    )
    .await?;
    let upstream_tries = tries[0]["n"].as_i64().unwrap_or(0);
    assert!(
        upstream_tries > n && upstream_tries <= 70,
        "{upstream_tries} upstream tries for {n} requests (no budget: {})",
        3 * n
    );
    let retried = sql(
        &url,
        "SELECT sum(retries) AS r FROM requests WHERE reporter = 'source' AND path LIKE '/status/503/storm-%'",
    )
    .await?;
    assert_eq!(
        retried[0]["r"].as_i64().unwrap_or(-1),
        upstream_tries - n,
        "each source row counts its retries"
    );
    Ok(())
}
