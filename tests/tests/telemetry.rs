//! The two ways a sidecar exports — Arrow Flight (the default) and OTLP —
//! give the same rows for the same traffic, ids included.

use anyhow::Result;
use lumen_tests::upstream::start_app;
use lumen_tests::{
    Sidecar, SidecarPorts, UpPorts, local, sql, start_up, wait_for_count, write_mesh,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrow_and_otlp_exports_store_identical_rows() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let up_ports = UpPorts::pick();
    let app = start_app("backend").await;
    let (arrow, otlp, be) = (
        SidecarPorts::pick(),
        SidecarPorts::pick(),
        SidecarPorts::pick(),
    );
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("backend", 8080, &[(local(be.inbound), "v1")])])?;
    let _up = start_up(logs, &mesh, &dir.path().join("data"), up_ports, &[]).await?;
    let collector = up_ports.grpc_endpoint();
    let caller = |service, ports, protocol| Sidecar {
        service,
        version: "v1",
        mesh: &mesh,
        ports,
        app: None,
        collector: &collector,
        extra: protocol,
    };
    let _arrow = caller("caller", arrow, &["--telemetry-protocol", "arrow"])
        .start(logs)
        .await?;
    let _otlp = caller("caller", otlp, &["--telemetry-protocol", "otlp"])
        .start(logs)
        .await?;
    let _backend = Sidecar {
        service: "backend",
        version: "v1",
        mesh: &mesh,
        ports: be,
        app: Some(app),
        collector: &collector,
        extra: &[],
    }
    .start(logs)
    .await?;

    // The same requests through each caller sidecar, in the same order.
    let client = reqwest::Client::new();
    let n = rand::random_range(10..=30usize);
    let mut trace_ids = Vec::new();
    for ports in [arrow, otlp] {
        for i in 0..n {
            let status = [200u16, 201, 404, 503][i % 4];
            let resp = client
                .post(format!(
                    "http://127.0.0.1:{}/status/{status}/{i}",
                    ports.outbound
                ))
                .header("host", "backend:8080")
                .body("y".repeat(i))
                .send()
                .await?;
            assert_eq!(resp.status().as_u16(), status);
            let echo: serde_json::Value = resp.json().await?;
            let tp = echo["traceparent"]
                .as_str()
                .expect("traceparent")
                .to_string();
            trace_ids.push(tp.split('-').nth(1).expect("trace id").to_string());
        }
    }
    let url = up_ports.sql_url();
    let sources = "SELECT count(*) AS n FROM requests WHERE reporter = 'source'";
    assert_eq!(
        wait_for_count(&url, sources, 2 * n as i64).await?,
        2 * n as i64
    );

    // Everything but times, durations, ids and the address the call came
    // from must match row for row.
    let columns = "path, status, grpc_status, method, source_service, source_workload, \
         source_namespace, source_version, destination_service, destination_workload, \
         destination_version, destination_namespace, protocol, authority, route, \
         request_bytes, response_bytes, retries, upstream_address, response_flags, mtls";
    let all = sql(
        &url,
        &format!(
            "SELECT {columns}, trace_id, parent_span_id IS NULL AS root FROM requests \
             WHERE reporter = 'source' ORDER BY time"
        ),
    )
    .await?;
    assert_eq!(all.len(), 2 * n);
    let (by_arrow, by_otlp) = all.split_at(n);
    for (a, o) in by_arrow.iter().zip(by_otlp) {
        let strip = |r: &serde_json::Value| {
            let mut r = r.clone();
            r.as_object_mut().map(|m| m.remove("trace_id"));
            r
        };
        assert_eq!(strip(a), strip(o), "same request, same row");
    }
    // Ids went out as bytes and come back as the hex the app saw.
    let stored: Vec<&str> = all
        .iter()
        .map(|r| r["trace_id"].as_str().unwrap())
        .collect();
    assert_eq!(stored, trace_ids);
    Ok(())
}
