//! Exactly once under faults: requests keep flowing through two sidecars
//! while the collector is `kill -9`ed and restarted twice; afterwards every
//! request the client made appears exactly once per reporter — nothing lost
//! of what the sidecars had, nothing stored twice by their retries.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use lumen_tests::upstream::start_app;
use lumen_tests::{
    Sidecar, SidecarPorts, UpPorts, counter_sum, local, sql, sql_count, start_up, write_mesh,
};

async fn stats(admin: u16) -> Result<String> {
    Ok(
        reqwest::get(format!("http://127.0.0.1:{admin}/stats/prometheus"))
            .await?
            .text()
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_stored_once_per_side_across_collector_crashes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let data = dir.path().join("data");
    let ports = UpPorts::pick();
    let app = start_app("backend").await;
    let (caller, backend) = (SidecarPorts::pick(), SidecarPorts::pick());
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(
        &mesh,
        &[("backend", 8080, &[(local(backend.inbound), "v1")])],
    )?;
    let mut up = start_up(logs, &mesh, &data, ports, &[]).await?;
    let collector = ports.grpc_endpoint();
    let sidecar = |service, ports, app| Sidecar {
        service,
        version: "v1",
        mesh: &mesh,
        ports,
        app,
        collector: &collector,
        // Short flushes: many batches, so crashes land between and inside exports.
        extra: &["--telemetry-flush", "20ms"],
    };
    let _caller = sidecar("caller", caller, None).start(logs).await?;
    let _backend = sidecar("backend", backend, Some(app)).start(logs).await?;

    let client = reqwest::Client::new();
    let n = rand::random_range(240..=360usize);
    let crashes = [n / 3, 2 * n / 3];
    for i in 0..n {
        if crashes.contains(&i) {
            up.kill9()?;
            tokio::time::sleep(Duration::from_millis(rand::random_range(100..800))).await;
            up = start_up(logs, &mesh, &data, ports, &[]).await?;
        }
        let status = [200u16, 200, 201, 404, 500][rand::random_range(0..5)];
        let resp = client
            .get(format!(
                "http://127.0.0.1:{}/status/{status}/req-{i}",
                caller.outbound
            ))
            .header("host", "backend:8080")
            .send()
            .await?;
        assert_eq!(
            resp.status().as_u16(),
            status,
            "requests never wait for telemetry"
        );
        if rand::random_bool(0.3) {
            tokio::time::sleep(Duration::from_millis(rand::random_range(1..15))).await;
        }
    }

    // Every record the sidecars made is acknowledged (retries included).
    let deadline = Instant::now() + Duration::from_secs(90);
    for admin in [caller.admin, backend.admin] {
        loop {
            let s = stats(admin).await?;
            let made = counter_sum(&s, "istio_requests_total");
            let exported = counter_sum(&s, "lumen_telemetry_records_exported_total");
            let dropped = counter_sum(&s, "lumen_telemetry_records_dropped_total");
            assert_eq!(dropped, 0.0, "no record was given up:\n{s}");
            if made == n as f64 && exported == made {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "records not all exported after 90 s (made {made}, exported {exported}):\n{s}"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let url = ports.sql_url();
    let twice = sql(
        &url,
        "SELECT path, reporter, count(*) AS n FROM requests GROUP BY 1, 2 HAVING count(*) > 1",
    )
    .await?;
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    for reporter in ["source", "destination"] {
        let q = format!(
            "SELECT count(DISTINCT path) AS n FROM requests WHERE reporter = '{reporter}' \
             AND path LIKE '/status/%/req-%'"
        );
        assert_eq!(sql_count(&url, &q).await?, n as i64, "{reporter} rows");
    }
    assert_eq!(
        sql_count(&url, "SELECT count(*) AS n FROM requests").await?,
        2 * n as i64
    );
    // The rollups agree, once their windows have closed.
    let rolled = "SELECT sum(requests) AS n FROM rollups WHERE window_seconds = 10";
    let deadline = Instant::now() + Duration::from_secs(30);
    while sql_count(&url, rolled).await.unwrap_or(0) != 2 * n as i64 {
        if Instant::now() > deadline {
            bail!(
                "rollups hold {} of {} requests",
                sql_count(&url, rolled).await?,
                2 * n
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    up.terminate()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_acknowledgement_was_lost_is_retried_and_stored_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let ports = UpPorts::pick();
    let app = start_app("backend").await;
    let (caller, backend) = (SidecarPorts::pick(), SidecarPorts::pick());
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(
        &mesh,
        &[("backend", 8080, &[(local(backend.inbound), "v1")])],
    )?;
    let up = start_up(logs, &mesh, &dir.path().join("data"), ports, &[]).await?;
    // The caller's exports go through a relay that loses the first answer.
    let relay = lumen_tests::relay::Relay::start(local(ports.otlp_grpc)).await?;
    relay.lose_answers();
    let through_relay = format!("http://{}", relay.addr);
    let _caller = Sidecar {
        service: "caller",
        version: "v1",
        mesh: &mesh,
        ports: caller,
        app: None,
        collector: &through_relay,
        // Only the records' export goes through the relay: the sidecar's
        // stats pushes (their own calls, never retried) would be cut too.
        extra: &["--stats-interval", "0s"],
    }
    .start(logs)
    .await?;
    let direct = ports.grpc_endpoint();
    let _backend = Sidecar {
        service: "backend",
        version: "v1",
        mesh: &mesh,
        ports: backend,
        app: Some(app),
        collector: &direct,
        extra: &[],
    }
    .start(logs)
    .await?;

    let n = rand::random_range(3..=20usize);
    let client = reqwest::Client::new();
    for i in 0..n {
        let resp = client
            .get(format!("http://127.0.0.1:{}/lost-ack/{i}", caller.outbound))
            .header("host", "backend:8080")
            .send()
            .await?;
        assert_eq!(resp.status(), 200);
    }
    // The collector stored the batch (its rows are queryable), but the
    // answer never reached the sidecar; now the connection breaks.
    let stored =
        "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND path LIKE '/lost-ack/%'";
    assert_eq!(
        lumen_tests::wait_for_count(&ports.sql_url(), stored, n as i64).await?,
        n as i64
    );
    let s = stats(caller.admin).await?;
    assert_eq!(
        counter_sum(&s, "lumen_telemetry_records_exported_total"),
        0.0,
        "{s}"
    );
    relay.cut_losing();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = stats(caller.admin).await?;
        if counter_sum(&s, "lumen_telemetry_records_exported_total") == n as f64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("caller records never acknowledged:\n{s}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(relay.cut(), 1, "the first export's answer was lost");
    let q =
        "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND path LIKE '/lost-ack/%'";
    assert_eq!(sql_count(&ports.sql_url(), q).await?, n as i64);
    assert!(
        up.logs()
            .contains("acknowledged again without storing it twice"),
        "the retry reached the collector as a batch it had stored:\n{}",
        up.logs()
    );
    Ok(())
}
