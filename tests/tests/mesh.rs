//! Requests through real sidecars end up as rows, exactly once per side.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use lumen_tests::upstream::start_app;
use lumen_tests::{
    Sidecar, SidecarPorts, UpPorts, h2_client_via, local, sql, start_sidecar, start_up,
    wait_for_count, write_mesh,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_through_the_mesh_is_recorded_once_per_side() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let up_ports = UpPorts::pick();
    let backend_app = start_app("backend").await;
    let other_app = start_app("other").await;
    let (fe, be, ot) = (
        SidecarPorts::pick(),
        SidecarPorts::pick(),
        SidecarPorts::pick(),
    );
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(
        &mesh,
        &[
            ("frontend", 8080, &[(local(fe.inbound), "v1")]),
            ("backend", 8080, &[(local(be.inbound), "v2")]),
            ("other", 8080, &[(local(ot.inbound), "v1")]),
        ],
    )?;
    let _up = start_up(logs, &mesh, &dir.path().join("data"), up_ports, &[]).await?;
    let collector = up_ports.grpc_endpoint();
    let _frontend = start_sidecar(logs, "frontend", "v1", &mesh, fe, None, &collector).await?;
    let _backend = start_sidecar(
        logs,
        "backend",
        "v2",
        &mesh,
        be,
        Some(backend_app),
        &collector,
    )
    .await?;
    let _other = start_sidecar(logs, "other", "v1", &mesh, ot, Some(other_app), &collector).await?;

    let client = reqwest::Client::new();
    let outbound = format!("http://127.0.0.1:{}", fe.outbound);
    let n = rand::random_range(20..=60usize);
    let m = rand::random_range(3..=10usize);
    // path → (status, delay ms, trace id the app saw)
    let mut sent: HashMap<String, (u16, u64, String)> = HashMap::new();
    for i in 0..n {
        let status = [200u16, 200, 201, 404, 503][i % 5];
        let delay = if i % 7 == 0 { 25 } else { 0 };
        let path = format!("/status/{status}/item-{i}");
        let resp = client
            .get(format!("{outbound}{path}?delay_ms={delay}"))
            .header("host", "backend:8080")
            .send()
            .await?;
        assert_eq!(resp.status().as_u16(), status, "{path}");
        let echo: serde_json::Value = resp.json().await?;
        assert_eq!(echo["app"], "backend");
        assert_eq!(
            echo["host"], "backend:8080",
            "the app sees the authority the caller used"
        );
        assert!(
            echo["x-lumen-source"].is_null(),
            "the inbound sidecar strips the peer-identity header"
        );
        let traceparent = echo["traceparent"]
            .as_str()
            .expect("traceparent propagated");
        let trace_id = traceparent.split('-').nth(1).expect("trace id").to_string();
        sent.insert(path, (status, delay, trace_id));
    }
    for i in 0..m {
        let resp = client
            .post(format!("{outbound}/other/{i}"))
            .header("host", "other")
            .body("x".repeat(100))
            .send()
            .await?;
        assert_eq!(resp.status(), 200);
    }
    // A client that gives up before the response headers still leaves a
    // record on both sides: status 0, flag DC, as Envoy logs it.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()?;
    let gave_up = impatient
        .get(format!("{outbound}/slow?delay_ms=3000"))
        .header("host", "other")
        .send()
        .await;
    assert!(gave_up.is_err(), "the app answers after 3 s");

    // An unknown service gets a clear 404 with Envoy's NR flag.
    let resp = client
        .get(format!("{outbound}/nope"))
        .header("host", "nosuch:8080")
        .send()
        .await?;
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-lumen-response-flags"], "NR");
    assert!(resp.text().await?.contains("nosuch:8080"));

    let url = up_ports.sql_url();
    // Istio's default policy retries a 503 twice: three tries, each a
    // destination row; one source row per request.
    let unavailable = sent.values().filter(|(s, _, _)| *s == 503).count();
    let tries = (n + 2 * unavailable) as i64;
    let dest = "SELECT count(*) AS n FROM requests WHERE reporter = 'destination' AND destination_service = 'backend'";
    let src = "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND destination_service = 'backend'";
    assert_eq!(wait_for_count(&url, dest, tries).await?, tries);
    assert_eq!(wait_for_count(&url, src, n as i64).await?, n as i64);
    let other_q = "SELECT count(*) AS n FROM requests WHERE reporter = 'destination' AND destination_service = 'other' AND request_bytes = 100";
    assert_eq!(wait_for_count(&url, other_q, m as i64).await?, m as i64);
    let nr = "SELECT count(*) AS n FROM requests WHERE response_flags = 'NR' AND destination_service = 'nosuch' AND status = 404";
    assert_eq!(wait_for_count(&url, nr, 1).await?, 1);
    let dc = "SELECT count(*) AS n FROM requests WHERE path = '/slow' AND status = 0 \
              AND response_flags = 'DC' AND destination_service = 'other'";
    assert_eq!(wait_for_count(&url, dc, 2).await?, 2);
    // Nothing arrives twice: the counts stay put.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(wait_for_count(&url, dest, tries).await?, tries);
    let retried = sql(
        &url,
        "SELECT status, retries, response_flags FROM requests \
         WHERE reporter = 'source' AND destination_service = 'backend'",
    )
    .await?;
    for r in &retried {
        let (retries, flags) = if r["status"] == 503 {
            (2, "URX")
        } else {
            (0, "-")
        };
        assert_eq!(
            (r["retries"].as_i64(), r["response_flags"].as_str()),
            (Some(retries), Some(flags)),
            "{r}"
        );
    }

    let rows = sql(
        &url,
        "SELECT path, status, duration_us, method, source_service, source_workload, \
         destination_workload, destination_version, destination_namespace, protocol, \
         authority, trace_id, upstream_address, response_flags, mtls \
         FROM requests WHERE reporter = 'destination' AND destination_service = 'backend'",
    )
    .await?;
    assert_eq!(rows.len() as i64, tries);
    for r in &rows {
        let path = r["path"].as_str().unwrap();
        let (status, delay, trace_id) = &sent[path];
        assert_eq!(r["status"], *status, "{r}");
        assert!(
            r["duration_us"].as_i64().unwrap() >= (*delay as i64) * 1000,
            "{r}"
        );
        assert_eq!(r["method"], "GET");
        assert_eq!(r["source_service"], "frontend");
        assert_eq!(r["source_workload"], "frontend-v1");
        assert_eq!(r["destination_workload"], "backend-v2");
        assert_eq!(r["destination_version"], "v2");
        assert_eq!(r["destination_namespace"], "default");
        assert_eq!(r["protocol"], "http/1.1");
        assert_eq!(r["authority"], "backend:8080");
        assert_eq!(
            r["trace_id"],
            trace_id.as_str(),
            "the app saw this request's trace"
        );
        assert_eq!(r["upstream_address"], backend_app.to_string());
        assert_eq!(r["response_flags"], "-");
        assert_eq!(r["mtls"], false);
    }
    // Each destination record's parent is the source record of the same request.
    let linked = "SELECT count(*) AS n FROM requests d JOIN requests s \
         ON d.parent_span_id = s.span_id AND d.trace_id = s.trace_id \
         WHERE d.reporter = 'destination' AND s.reporter = 'source' AND d.destination_service = 'backend'";
    assert_eq!(wait_for_count(&url, linked, tries).await?, tries);

    // The sidecar's Prometheus stats count the same requests.
    let stats = reqwest::get(format!("http://127.0.0.1:{}/stats/prometheus", fe.admin))
        .await?
        .text()
        .await?;
    let counted: f64 = stats
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("destination_service_name=\"backend\"")
                && l.contains("reporter=\"source\"")
                && l.contains("source_workload=\"frontend-v1\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted as usize, n, "{stats}");
    assert!(
        stats.contains("istio_request_duration_milliseconds_bucket{"),
        "{stats}"
    );
    assert!(
        stats.contains("lumen_telemetry_records_dropped_total{reason=\"queue_full\"} 0"),
        "{stats}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_stream_through_and_round_robin_over_endpoints() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let up_ports = UpPorts::pick();
    let (app1, app2) = (start_app("backend").await, start_app("backend").await);
    let (fe, b1, b2) = (
        SidecarPorts::pick(),
        SidecarPorts::pick(),
        SidecarPorts::pick(),
    );
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(
        &mesh,
        &[(
            "backend",
            80,
            &[(local(b1.inbound), "v1"), (local(b2.inbound), "v2")],
        )],
    )?;
    // Istio's default balancer is least request; this test asks for round robin.
    let mut text = std::fs::read_to_string(&mesh)?;
    text.push_str(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: backend\nspec:\n  host: backend\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n",
    );
    std::fs::write(&mesh, text)?;
    let _up = start_up(logs, &mesh, &dir.path().join("data"), up_ports, &[]).await?;
    let collector = up_ports.grpc_endpoint();
    let _fe = start_sidecar(logs, "frontend", "v1", &mesh, fe, None, &collector).await?;
    let _b1 = start_sidecar(logs, "backend", "v1", &mesh, b1, Some(app1), &collector).await?;
    let _b2 = start_sidecar(logs, "backend", "v2", &mesh, b2, Some(app2), &collector).await?;

    // HTTP/2 with prior knowledge (h2c) on both hops, the service named in
    // :authority; a large response body streams through.
    let client = h2_client_via(local(fe.outbound));
    let n = 2 * rand::random_range(5..=15usize);
    for _ in 0..n {
        let req =
            http::Request::get("http://backend/big?size=1000000").body(Full::new(Bytes::new()))?;
        let resp = client.request(req).await?;
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.into_body().collect().await?.to_bytes().len(),
            1_000_000
        );
    }
    let url = up_ports.sql_url();
    let q = "SELECT count(*) AS n FROM requests WHERE reporter = 'destination' AND protocol = 'h2' AND response_bytes = 1000000";
    assert_eq!(wait_for_count(&url, q, n as i64).await?, n as i64);
    let src = "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND protocol = 'h2'";
    assert_eq!(wait_for_count(&url, src, n as i64).await?, n as i64);
    let per_version = sql(
        &url,
        "SELECT destination_version AS v, count(*) AS n FROM requests \
         WHERE reporter = 'source' GROUP BY 1 ORDER BY 1",
    )
    .await?;
    let counts: Vec<(String, i64)> = per_version
        .iter()
        .map(|r| {
            (
                r["v"].as_str().unwrap().to_string(),
                r["n"].as_i64().unwrap(),
            )
        })
        .collect();
    let half = (n / 2) as i64;
    assert_eq!(
        counts,
        vec![("v1".to_string(), half), ("v2".to_string(), half)]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_trouble_never_fails_requests_and_config_reloads_live() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let app = start_app("backend").await;
    let (fe, be) = (SidecarPorts::pick(), SidecarPorts::pick());
    let mesh = dir.path().join("mesh.yaml");
    // The mesh starts without `backend`.
    write_mesh(&mesh, &[("frontend", 80, &[(local(fe.inbound), "v1")])])?;
    // No collector listens here: every export fails.
    let dead = format!("http://127.0.0.1:{}", lumen_tests::free_port());
    let sidecar = |service, ports, app| Sidecar {
        service,
        version: "v1",
        mesh: &mesh,
        ports,
        app,
        collector: &dead,
        extra: &["--telemetry-queue", "4"],
    };
    let mut frontend = sidecar("frontend", fe, None).start(logs).await?;
    let mut backend = sidecar("backend", be, Some(app)).start(logs).await?;

    let client = reqwest::Client::new();
    let get = || {
        client
            .get(format!("http://127.0.0.1:{}/x", fe.outbound))
            .header("host", "backend")
            .send()
    };
    assert_eq!(get().await?.status(), 404, "backend is not in the mesh yet");

    write_mesh(
        &mesh,
        &[
            ("frontend", 80, &[(local(fe.inbound), "v1")]),
            ("backend", 80, &[(local(be.inbound), "v1")]),
        ],
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while get().await?.status() != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "config change not applied:\n{}",
            frontend.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let n = 60;
    for _ in 0..n {
        assert_eq!(
            get().await?.status(),
            200,
            "a dead collector must not fail requests"
        );
    }
    let stats = reqwest::get(format!("http://127.0.0.1:{}/stats/prometheus", fe.admin))
        .await?
        .text()
        .await?;
    let metric = |name: &str| -> f64 {
        stats
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(-1.0)
    };
    let queue_full = metric("lumen_telemetry_records_dropped_total{reason=\"queue_full\"}");
    assert!(queue_full > 0.0, "a full queue drops and counts:\n{stats}");
    assert!(
        !stats.contains("lumen_telemetry_records_exported_total{"),
        "nothing reached a dead collector:\n{stats}"
    );
    // Shutdown stays prompt and clean even with records it cannot export.
    assert_eq!(frontend.terminate()?, 0, "{}", frontend.logs());
    assert_eq!(backend.terminate()?, 0, "{}", backend.logs());
    Ok(())
}

/// Two worker threads, many clients at once, the service named every way
/// Kubernetes DNS allows (and made-up names too): every request answered and
/// recorded once per side, connections taken by both workers (Envoy's
/// per-worker listener stat says so), and pools per endpoint, not per name
/// a caller wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_threaded_sidecar_serves_concurrent_clients_with_one_pool_per_endpoint()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let up_ports = UpPorts::pick();
    let app = start_app("backend").await;
    let (fe, be) = (SidecarPorts::pick(), SidecarPorts::pick());
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("backend", 8080, &[(local(be.inbound), "v1")])])?;
    let _up = start_up(logs, &mesh, &dir.path().join("data"), up_ports, &[]).await?;
    let collector = up_ports.grpc_endpoint();
    let sidecar = |service, ports, app| Sidecar {
        service,
        version: "v1",
        mesh: &mesh,
        ports,
        app,
        collector: &collector,
        extra: &["--workers", "2"],
    };
    let _fe = sidecar("frontend", fe, None).start(logs).await?;
    let _be = sidecar("backend", be, Some(app)).start(logs).await?;

    let hosts = [
        "backend",
        "backend:8080",
        "backend.default",
        "backend.default.svc",
        "backend.default.svc.cluster.local",
        "backend.default.svc.cluster.local:8080",
    ];
    let client = reqwest::Client::new();
    let outbound = format!("http://127.0.0.1:{}", fe.outbound);
    let n = 240;
    let calls = (0..n).map(|i| {
        let client = client.clone();
        let outbound = outbound.clone();
        async move {
            // Every fifth call names a service that does not exist.
            let host = if i % 5 == 4 {
                format!("made-up-{}", rand::random::<u32>())
            } else {
                hosts[i % hosts.len()].to_string()
            };
            let r = client
                .get(format!("{outbound}/concurrent/{i}"))
                .header("host", host)
                .send()
                .await?;
            anyhow::Ok(r.status().as_u16())
        }
    });
    let statuses = futures_util::future::join_all(calls).await;
    let mut ok = 0;
    for (i, s) in statuses.into_iter().enumerate() {
        let s = s?;
        if i % 5 == 4 {
            assert_eq!(s, 404, "call {i}");
        } else {
            assert_eq!(s, 200, "call {i}");
            ok += 1;
        }
    }

    let (accepted, stats) = lumen_tests::accepted_by_worker(fe.admin, fe.outbound).await?;
    let first = accepted.first().copied().unwrap_or(0);
    let second = accepted.get(1).copied().unwrap_or(0);
    assert!(
        first > 0 && second > 0,
        "both workers accept: {first}, {second}\n{stats}"
    );

    let dump: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{}/config_dump", fe.admin))
            .await?
            .json()
            .await?;
    assert_eq!(
        dump["upstream_pools"],
        serde_json::json!([local(be.inbound).to_string()]),
        "{dump}"
    );
    let url = up_ports.sql_url();
    for reporter in ["source", "destination"] {
        let q = format!(
            "SELECT count(*) AS n FROM requests WHERE reporter = '{reporter}' \
             AND destination_service = 'backend' AND status = 200 AND path LIKE '/concurrent/%'"
        );
        assert_eq!(wait_for_count(&url, &q, ok).await?, ok, "{reporter}");
    }
    let distinct = sql(
        &url,
        "SELECT count(DISTINCT path) AS n FROM requests WHERE reporter = 'source' AND status = 200 AND path LIKE '/concurrent/%'",
    )
    .await?;
    assert_eq!(distinct[0]["n"], ok, "each request once");
    let unknown = "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND status = 404 \
         AND response_flags = 'NR' AND path LIKE '/concurrent/%'";
    assert_eq!(
        wait_for_count(&url, unknown, (n - ok as usize) as i64).await?,
        (n - ok as usize) as i64
    );
    Ok(())
}
