//! The collector under more than it may hold: past its memory bound it
//! answers RESOURCE_EXHAUSTED (with RetryInfo) and 429 (with Retry-After)
//! instead of growing; on a full disk it refuses with the reason, loses
//! nothing it acknowledged, and takes data again once there is space.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lumen_tests::otlp::export;
use lumen_tests::{UpPorts, metric, sql_count, start_up, write_mesh};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use prost::Message;
use tonic_types::StatusExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_memory_bound_ingest_says_resource_exhausted_and_does_not_grow() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    // Nothing is flushed during the test: hot rows only grow.
    let args = [
        "--max-hot-mib",
        "1",
        "--flush-interval",
        "1h",
        "--flush-rows",
        "100000000",
    ];
    let _up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, &args).await?;
    let mut client = TraceServiceClient::connect(ports.grpc_endpoint()).await?;
    let mut acknowledged = 0i64;
    let refused = loop {
        match client.export(export("flood", 500, 0)).await {
            Ok(_) => acknowledged += 500,
            Err(status) => break status,
        }
        if acknowledged > 1_000_000 {
            bail!("a 1 MiB bound took {acknowledged} spans without refusing");
        }
    };
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("flushed to Parquet"),
        "{refused:?}"
    );
    let retry = refused
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .context("RetryInfo tells OTLP clients when to retry")?;
    assert_eq!(retry, Duration::from_secs(1));

    let hot = "lumen_table_bytes{table=\"spans\",tier=\"hot\"}";
    let at_refusal = metric(&ports, hot).await?;
    // More of the same is refused, over gRPC and HTTP, and memory stays.
    for _ in 0..20 {
        let err = client
            .export(export("flood", 500, 0))
            .await
            .expect_err("still refused");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    }
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/v1/traces", ports.otlp_http))
        .header("content-type", "application/x-protobuf")
        .body(export("flood", 10, 0).encode_to_vec())
        .send()
        .await?;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(
        metric(&ports, hot).await?,
        at_refusal,
        "hot rows did not grow"
    );
    assert!(metric(&ports, "lumen_ingest_refused_total{reason=\"memory\"}").await? >= 22.0);
    // What was acknowledged is there, nothing more.
    let q = "SELECT count(*) AS n FROM spans WHERE service_name = 'flood'";
    assert_eq!(sql_count(&ports.sql_url(), q).await?, acknowledged);
    Ok(())
}

/// A tmpfs of `mib` MiB at `dir` (root only, as the netns tests).
fn mount_tmpfs(dir: &std::path::Path, mib: u32) -> Result<()> {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
        .arg(dir)
        .output()
        .context("running mount (the disk-full test needs root)")?;
    if !out.status.success() {
        bail!(
            "mount tmpfs failed (the disk-full test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_ingest_loses_nothing_and_recovers_when_space_returns() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    mount_tmpfs(&data, 4)?;
    let _unmount = Unmount(data.clone());
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let args = ["--flush-interval", "500ms"];
    let mut up = start_up(dir.path(), &mesh, &data, ports, &args).await?;
    let mut client = TraceServiceClient::connect(ports.grpc_endpoint()).await?;
    let mut acknowledged = 0i64;
    let refused = loop {
        match client.export(export("filler", 2000, 0)).await {
            Ok(_) => acknowledged += 2000,
            Err(status) => break status,
        }
        if acknowledged > 2_000_000 {
            bail!("4 MiB of disk took {acknowledged} spans");
        }
    };
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("No space left on device"),
        "the reason is named: {refused:?}"
    );
    // The process still serves; what it acknowledged is all there.
    let url = ports.sql_url();
    let q = "SELECT count(*) AS n FROM spans WHERE service_name = 'filler'";
    assert_eq!(sql_count(&url, q).await?, acknowledged);
    let ready = reqwest::get(format!("http://127.0.0.1:{}/ready", ports.otlp_http)).await?;
    assert_eq!(ready.status(), 503, "not ready while the disk is full");

    // Space returns: ingest resumes by itself.
    let out = Command::new("mount")
        .args(["-o", "remount,size=256m"])
        .arg(&data)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match client.export(export("filler", 100, 0)).await {
            Ok(_) => {
                acknowledged += 100;
                break;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let _ = e;
            }
            Err(e) => bail!(
                "ingest did not resume once space returned: {e:?}\n{}",
                up.logs()
            ),
        }
    }
    assert_eq!(sql_count(&url, q).await?, acknowledged);
    // And after a clean stop and a start, every acknowledged row is kept.
    assert_eq!(up.terminate()?, 0, "{}", up.logs());
    let up = start_up(dir.path(), &mesh, &data, ports, &args).await?;
    assert_eq!(sql_count(&url, q).await?, acknowledged, "{}", up.logs());
    Ok(())
}
