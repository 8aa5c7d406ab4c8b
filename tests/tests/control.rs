//! The control plane: sidecars started with `--control` get their
//! configuration from it, `lumen apply / get / delete / proxy-status` change
//! and show it, a change under load fails no request, and a control plane
//! killed with SIGKILL leaves proxies serving their last configuration until
//! it returns and they resync.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use lumen_tests::upstream::start_app;
use lumen_tests::{LumenProcess, Sidecar, SidecarPorts, free_port, local, lumen_bin};

const V2_ONLY: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v2}\n";

fn istio_file(name: &str) -> PathBuf {
    lumen_tests::crate_dir()
        .join("data/istio/bookinfo/networking")
        .join(name)
}

/// Runs `lumen <args> --control ADDR`; its stdout, or its stderr as the error.
fn lumen(control: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(lumen_bin())
        .args(args)
        .args(["--control", control])
        .output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// reviews v1 and v2 behind sidecars and a caller sidecar, all following
/// the control plane at `control`; the mesh and Istio's reviews rule in
/// `config`.
struct Mesh {
    caller: SocketAddr,
    _sidecars: Vec<LumenProcess>,
}

fn write_config(config: &Path, v1: u16, v2: u16, caller: u16) -> Result<()> {
    std::fs::create_dir_all(config)?;
    std::fs::write(
        config.join("mesh.yaml"),
        format!(
            "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata:\n  name: m\nspec:\n  services:\n    - name: reviews\n      port: 9080\n      endpoints:\n        - {{address: {}, version: v1}}\n        - {{address: {}, version: v2}}\n    - name: productpage\n      port: 9080\n      endpoints:\n        - {{address: {}, version: v1}}\n",
            local(v1),
            local(v2),
            local(caller)
        ),
    )?;
    std::fs::copy(
        istio_file("destination-rule-reviews.yaml"),
        config.join("destination-rule-reviews.yaml"),
    )?;
    Ok(())
}

impl Mesh {
    async fn start(dir: &Path, control: &str, ports: [SidecarPorts; 3]) -> Result<Self> {
        let apps = [start_app("reviews-v1").await, start_app("reviews-v2").await];
        let collector = format!("http://{}", local(free_port()));
        let extra = ["--control", control];
        let mut sidecars = Vec::new();
        for ((version, app), p) in ["v1", "v2"].iter().zip(apps).zip(&ports) {
            sidecars.push(
                Sidecar {
                    service: "reviews",
                    version,
                    mesh: dir,
                    ports: *p,
                    app: Some(app),
                    collector: &collector,
                    extra: &extra,
                }
                .start(dir)
                .await?,
            );
        }
        sidecars.push(
            Sidecar {
                service: "productpage",
                version: "v1",
                mesh: dir,
                ports: ports[2],
                app: None,
                collector: &collector,
                extra: &extra,
            }
            .start(dir)
            .await?,
        );
        Ok(Mesh {
            caller: local(ports[2].outbound),
            _sidecars: sidecars,
        })
    }
}

async fn reviews(client: &reqwest::Client, caller: SocketAddr) -> Result<String> {
    let resp = client
        .get(format!("http://{caller}/"))
        .header("host", "reviews:9080")
        .send()
        .await?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{status}: {body}");
    }
    Ok(body["app"].as_str().unwrap_or_default().to_string())
}

/// Requests in a loop from 4 clients until stopped: answers per app, failures.
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    seen: Arc<std::sync::Mutex<HashMap<String, u64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(caller: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let seen: Arc<std::sync::Mutex<HashMap<String, u64>>> = Default::default();
        let tasks = (0..4)
            .map(|_| {
                let (stop, failed, seen) = (stop.clone(), failed.clone(), seen.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    while !stop.load(Ordering::Relaxed) {
                        match reviews(&client, caller).await {
                            Ok(app) => *seen.lock().unwrap().entry(app).or_default() += 1,
                            Err(e) => {
                                eprintln!("failed: {e}");
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            failed,
            seen,
            tasks,
        }
    }

    fn take_seen(&self) -> HashMap<String, u64> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.failed.load(Ordering::Relaxed)
    }
}

/// Waits until every answer is from `app` (a new config has reached the caller).
async fn until_only(load: &Load, app: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    load.take_seen();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = load.take_seen();
        if !seen.is_empty() && seen.keys().all(|k| k == app) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("still not only {app}: {seen:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_get_delete_and_proxy_status_with_a_weight_change_under_load() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ports = [
        SidecarPorts::pick(),
        SidecarPorts::pick(),
        SidecarPorts::pick(),
    ];
    let config = dir.path().join("config");
    write_config(
        &config,
        ports[0].inbound,
        ports[1].inbound,
        ports[2].inbound,
    )?;
    let up_ports = lumen_tests::UpPorts::pick();
    let _up =
        lumen_tests::start_up(dir.path(), &config, &dir.path().join("data"), up_ports, &[]).await?;
    let control = up_ports.control_addr();
    let mesh = Mesh::start(dir.path(), &control, ports).await?;

    let status = lumen(&control, &["proxy-status"])?;
    assert_eq!(status.matches("SYNCED").count(), 3, "{status}");

    // Istio's 80/20 file, then everything to v2, while requests run.
    let load = Load::start(mesh.caller);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let applied = lumen(
        &control,
        &[
            "apply",
            "-f",
            istio_file("virtual-service-reviews-80-20.yaml")
                .to_str()
                .unwrap(),
        ],
    )?;
    assert_eq!(applied.trim(), "VirtualService default/reviews created");
    let v2_only = dir.path().join("v2-only.yaml");
    std::fs::write(&v2_only, V2_ONLY)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let applied = lumen(&control, &["apply", "-f", v2_only.to_str().unwrap()])?;
    assert_eq!(applied.trim(), "VirtualService default/reviews configured");
    until_only(&load, "reviews-v2").await?;
    assert_eq!(load.finish().await, 0, "requests failed during the change");

    // get shows it; proxy-status shows every proxy on the new version.
    let got = lumen(&control, &["get", "vs"])?;
    assert!(
        got.contains("VirtualService") && got.contains("reviews") && got.contains("v2-only.yaml"),
        "{got}"
    );
    let yaml = lumen(&control, &["get", "virtualservices", "-o", "yaml"])?;
    assert!(
        yaml.contains("subset: v2") && !yaml.contains("subset: v1"),
        "{yaml}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while lumen(&control, &["proxy-status"])?
        .matches("SYNCED")
        .count()
        != 3
    {
        assert!(Instant::now() < deadline, "proxies did not ack");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An invalid resource is refused with file, resource, field and reason;
    // what runs stays.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        V2_ONLY.replace("host: reviews, subset: v2", "host: nowhere"),
    )?;
    let err = lumen(&control, &["apply", "-f", bad.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("{}: VirtualService default/reviews: spec.http[0].route[0].destination.host: `nowhere` is not a service", bad.display())),
        "{err}"
    );
    let client = reqwest::Client::new();
    assert_eq!(reviews(&client, mesh.caller).await?, "reviews-v2");

    // Deleted: back to the whole service.
    let deleted = lumen(&control, &["delete", "vs", "reviews"])?;
    assert_eq!(deleted.trim(), "VirtualService default/reviews deleted");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if reviews(&client, mesh.caller).await? == "reviews-v1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "v1 never answered after the delete"
        );
    }
    let err = lumen(&control, &["delete", "vs", "reviews"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("VirtualService default/reviews not found"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_outlive_a_killed_control_plane_and_resync_when_it_returns() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ports = [
        SidecarPorts::pick(),
        SidecarPorts::pick(),
        SidecarPorts::pick(),
    ];
    let config = dir.path().join("config");
    write_config(
        &config,
        ports[0].inbound,
        ports[1].inbound,
        ports[2].inbound,
    )?;
    let control = local(free_port()).to_string();
    let monitoring = local(free_port()).to_string();
    let start_control = || -> Result<LumenProcess> {
        let args: Vec<String> = [
            "control",
            "-f",
            config.to_str().unwrap(),
            "--control-addr",
            &control,
            "--data-dir",
            dir.path().join("control").to_str().unwrap(),
            "--monitoring-addr",
            &monitoring,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        LumenProcess::spawn("lumen-control", dir.path(), &args)
    };
    let mut cp = start_control()?;
    let mesh = Mesh::start(dir.path(), &control, ports).await?;
    let v2_only = dir.path().join("v2-only.yaml");
    std::fs::write(&v2_only, V2_ONLY)?;
    lumen(&control, &["apply", "-f", v2_only.to_str().unwrap()])?;

    let load = Load::start(mesh.caller);
    until_only(&load, "reviews-v2").await?;
    cp.kill9()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The control plane comes back with what was applied (kept on disk).
    let _cp = start_control()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = lumen(&control, &["proxy-status"]).unwrap_or_default();
        if status.matches("SYNCED").count() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "proxies did not resync: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = load.take_seen();
    assert!(seen.keys().all(|k| k == "reviews-v2"), "{seen:?}");
    assert_eq!(
        load.finish().await,
        0,
        "requests failed while the control plane was gone"
    );
    Ok(())
}

/// The TLS control port: a sidecar given the mesh's trust bundle gets its
/// configuration over TLS; one trusting another root gets nothing (and
/// says why); `https://` without a root to check it is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_follow_the_control_plane_over_tls_checked_against_the_mesh_root() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    let ports = SidecarPorts::pick();
    write_config(&config, free_port(), free_port(), ports.inbound)?;
    let (plain, tls, monitoring) = (free_port(), free_port(), free_port());
    let data = dir.path().join("control");
    let args: Vec<String> = [
        "control",
        "-f",
        config.to_str().unwrap(),
        "--control-addr",
        &local(plain).to_string(),
        "--control-tls-addr",
        &local(tls).to_string(),
        "--control-tls-dns",
        "localhost",
        "--monitoring-addr",
        &local(monitoring).to_string(),
        "--data-dir",
        data.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let mut cp = LumenProcess::spawn("lumen-control", dir.path(), &args)?;
    cp.wait_ready(&format!("http://127.0.0.1:{monitoring}/ready"))
        .await?;
    let bundle = data.join("ca/trust-bundle.pem");
    let url = format!("https://localhost:{tls}");
    let mesh = config.join("mesh.yaml");
    let collector = format!("http://127.0.0.1:{}", free_port());
    let sidecar = Sidecar {
        service: "productpage",
        version: "v1",
        mesh: &mesh,
        ports,
        app: None,
        collector: &collector,
        extra: &["--control", &url, "--control-ca", bundle.to_str().unwrap()],
    };
    // Ready only once its first configuration came: over TLS.
    let _follower = sidecar.start(dir.path()).await?;
    let status = lumen(&local(plain).to_string(), &["proxy-status"])?;
    assert!(
        status.contains("productpage") && status.contains("SYNCED"),
        "{status}"
    );

    // Another root: the handshake fails, no configuration, never ready.
    let other = dir.path().join("other-root.pem");
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other, params.self_signed(&key)?.pem())?;
    let stranger_ports = SidecarPorts::pick();
    let args: Vec<String> = [
        "--service",
        "ratings",
        "--version",
        "v1",
        "--no-inbound",
        "--outbound",
        &local(stranger_ports.outbound).to_string(),
        "--admin",
        &local(stranger_ports.admin).to_string(),
        "--collector",
        &collector,
        "--control",
        &url,
        "--control-ca",
        other.to_str().unwrap(),
        // Cut off past this, it must still not pass for configured.
        "--policy-staleness",
        "1s",
    ]
    .map(String::from)
    .to_vec();
    let stranger = LumenProcess::spawn_bin(
        &lumen_tests::lumen_proxy_bin(),
        "stranger",
        dir.path(),
        &args,
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = stranger.logs();
        if logs.contains("UnknownIssuer") || logs.contains("invalid peer certificate") {
            break;
        }
        assert!(Instant::now() < deadline, "no TLS failure said:\n{logs}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = reqwest::get(format!("http://127.0.0.1:{}/ready", stranger_ports.admin)).await;
    assert!(
        ready.map(|r| r.status() != 200).unwrap_or(true),
        "a sidecar trusting another root got ready"
    );

    // https:// with no root to check it: refused at start, saying so.
    let out = Command::new(lumen_tests::lumen_proxy_bin())
        .args([
            "--service",
            "x",
            "--no-inbound",
            "--no-outbound",
            "--control",
            &url,
        ])
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--control-ca"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
