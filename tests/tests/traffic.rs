//! Traffic management with Istio's own files: Istio's Bookinfo routing
//! tasks (`tests/data/istio/bookinfo/networking/`, unchanged) applied to
//! real sidecars by editing the configuration directory they watch, and
//! what each route did visible in the sidecars' records.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use lumen_tests::upstream::start_app;
use lumen_tests::{LumenProcess, Sidecar, SidecarPorts, UpPorts, local, sql, start_up};

fn istio_file(name: &str) -> PathBuf {
    lumen_tests::crate_dir()
        .join("data/istio/bookinfo/networking")
        .join(name)
}

/// Bookinfo's reviews (v1, v2, v3) and ratings (v1) behind sidecars, a
/// caller sidecar for `productpage`, all watching one config directory.
struct Bookinfo {
    config: PathBuf,
    caller: SocketAddr,
    caller_admin: u16,
    up: UpPorts,
    _procs: Vec<LumenProcess>,
    _up: LumenProcess,
    _dir: tempfile::TempDir,
}

impl Bookinfo {
    async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("config");
        std::fs::create_dir(&config)?;
        let up = UpPorts::pick();
        let apps = [
            ("reviews", "v1", start_app("reviews-v1").await),
            ("reviews", "v2", start_app("reviews-v2").await),
            ("reviews", "v3", start_app("reviews-v3").await),
            ("ratings", "v1", start_app("ratings-v1").await),
        ];
        let ports: Vec<SidecarPorts> = apps.iter().map(|_| SidecarPorts::pick()).collect();
        let caller = SidecarPorts::pick();
        let mut mesh = String::from(
            "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata:\n  name: bookinfo\nspec:\n  services:\n",
        );
        for service in ["reviews", "ratings"] {
            mesh.push_str(&format!(
                "    - name: {service}\n      port: 9080\n      endpoints:\n"
            ));
            for ((s, v, _), p) in apps.iter().zip(&ports) {
                if *s == service {
                    mesh.push_str(&format!(
                        "        - address: {}\n          version: {v}\n",
                        local(p.inbound)
                    ));
                }
            }
        }
        mesh.push_str(&format!(
            "    - name: productpage\n      port: 9080\n      endpoints:\n        - address: {}\n          version: v1\n",
            local(caller.inbound)
        ));
        // Istio's rules name details too; nothing here calls it.
        mesh.push_str("    - name: details\n      port: 9080\n");
        std::fs::write(config.join("mesh.yaml"), mesh)?;
        std::fs::copy(
            istio_file("destination-rule-all.yaml"),
            config.join("destination-rule-all.yaml"),
        )?;
        let up_proc = start_up(dir.path(), &config, &dir.path().join("data"), up, &[]).await?;
        let collector = up.grpc_endpoint();
        let mut procs = Vec::new();
        for ((service, version, app), p) in apps.iter().zip(&ports) {
            procs.push(
                Sidecar {
                    service,
                    version,
                    mesh: &config,
                    ports: *p,
                    app: Some(*app),
                    collector: &collector,
                    extra: &[],
                }
                .start(dir.path())
                .await?,
            );
        }
        procs.push(
            Sidecar {
                service: "productpage",
                version: "v1",
                mesh: &config,
                ports: caller,
                app: None,
                collector: &collector,
                extra: &[],
            }
            .start(dir.path())
            .await?,
        );
        Ok(Bookinfo {
            config,
            caller: local(caller.outbound),
            caller_admin: caller.admin,
            up,
            _procs: procs,
            _up: up_proc,
            _dir: dir,
        })
    }

    async fn version(&self) -> Result<String> {
        let dump: serde_json::Value = reqwest::get(format!(
            "http://127.0.0.1:{}/config_dump",
            self.caller_admin
        ))
        .await?
        .json()
        .await?;
        Ok(dump["version"].as_str().unwrap_or_default().to_string())
    }

    /// Applies Istio's file (replacing the VirtualServices of the previous
    /// task) and waits until the caller's sidecar runs the new config.
    async fn apply(&self, istio: &str) -> Result<()> {
        let before = self.version().await?;
        for e in std::fs::read_dir(&self.config)? {
            let p = e?.path();
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("virtual-service"))
            {
                std::fs::remove_file(p)?;
            }
        }
        std::fs::copy(istio_file(istio), self.config.join(istio))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.version().await? == before {
            if Instant::now() > deadline {
                bail!("{istio} not applied within 10 s (version {before})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Sends GET `http://<service>:9080/` through the caller's sidecar.
    async fn get(
        &self,
        service: &str,
        user: Option<&str>,
    ) -> Result<(u16, String, Option<String>)> {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let mut req = client
            .get(format!("http://{}/", self.caller))
            .header("host", format!("{service}:9080"));
        if let Some(u) = user {
            req = req.header("end-user", u);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let flags = resp
            .headers()
            .get("x-lumen-response-flags")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp.text().await?;
        let app = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["app"].as_str().map(str::to_string))
            .unwrap_or(body);
        Ok((status, app, flags))
    }

    async fn versions(
        &self,
        service: &str,
        user: Option<&str>,
        n: usize,
    ) -> Result<HashMap<String, usize>> {
        let mut seen = HashMap::new();
        for _ in 0..n {
            let (status, app, _) = self.get(service, user).await?;
            assert_eq!(status, 200, "{app}");
            *seen.entry(app).or_default() += 1;
        }
        Ok(seen)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_bookinfo_routing_tasks_work_as_written() -> Result<()> {
    let b = Bookinfo::start().await?;

    // Request routing: everything to v1.
    b.apply("virtual-service-all-v1.yaml").await?;
    let seen = b.versions("reviews", None, 30).await?;
    assert_eq!(seen.get("reviews-v1"), Some(&30), "{seen:?}");

    // Jason sees v2, everyone else v1.
    b.apply("virtual-service-reviews-test-v2.yaml").await?;
    let seen = b.versions("reviews", Some("jason"), 20).await?;
    assert_eq!(seen.get("reviews-v2"), Some(&20), "{seen:?}");
    let seen = b.versions("reviews", Some("someone"), 20).await?;
    assert_eq!(seen.get("reviews-v1"), Some(&20), "{seen:?}");

    // Traffic shifting: 80/20 within ±4 points over 2000 requests.
    b.apply("virtual-service-reviews-80-20.yaml").await?;
    let n = 2000;
    let seen = b.versions("reviews", None, n).await?;
    let v2 = *seen.get("reviews-v2").unwrap_or(&0) as f64 / n as f64 * 100.0;
    assert_eq!(seen.get("reviews-v3"), None, "{seen:?}");
    assert!(
        (16.0..=24.0).contains(&v2),
        "v2 took {v2:.1} % (want 20 ± 4): {seen:?}"
    );

    // Fault injection: jason's calls to ratings abort with 500 and FI.
    b.apply("virtual-service-ratings-test-abort.yaml").await?;
    let (status, body, flags) = b.get("ratings", Some("jason")).await?;
    assert_eq!(status, 500, "{body}");
    assert_eq!(flags.as_deref(), Some("FI"));
    let (status, app, _) = b.get("ratings", Some("someone")).await?;
    assert_eq!((status, app.as_str()), (200, "ratings-v1"));

    // Delay: jason's call waits Istio's 7 s, then is answered, flagged DI.
    b.apply("virtual-service-ratings-test-delay.yaml").await?;
    let started = Instant::now();
    let (status, app, _) = b.get("ratings", Some("jason")).await?;
    assert_eq!((status, app.as_str()), (200, "ratings-v1"));
    assert!(
        started.elapsed() >= Duration::from_secs(7),
        "not delayed: {:?}",
        started.elapsed()
    );

    // Every decision is in the caller's rows.
    let url = b.up.sql_url();
    let deadline = Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows = sql(
            &url,
            "SELECT route, destination_version, response_flags, count(*) AS n FROM requests \
             WHERE reporter = 'source' AND source_workload = 'productpage-v1' \
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        )
        .await?;
        let delayed = rows.iter().any(|r| r["response_flags"] == "DI");
        if delayed || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let has = |route: &str, version: &str, flags: &str| {
        rows.iter().any(|r| {
            r["route"] == route
                && r["destination_version"] == version
                && r["response_flags"] == flags
        })
    };
    assert!(has("reviews/0", "v1", "-"), "{rows:?}");
    assert!(has("reviews/0", "v2", "-"), "{rows:?}");
    assert!(has("ratings/0", "unknown", "FI"), "{rows:?}");
    assert!(has("ratings/0", "v1", "DI"), "{rows:?}");
    assert!(has("ratings/1", "v1", "-"), "{rows:?}");
    Ok(())
}

/// Istio's Bookinfo ingress (`bookinfo-gateway.yaml`: its Gateway and the
/// VirtualService bound to it, unchanged but for the listener's port, which
/// a test picks) served by `lumen proxy --gateway`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_bookinfo_gateway_routes_ingress_traffic() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    std::fs::create_dir(&config)?;
    let up = UpPorts::pick();
    let app = start_app("productpage-v1").await;
    let pp = SidecarPorts::pick();
    let gw = SidecarPorts::pick();
    std::fs::write(
        config.join("mesh.yaml"),
        format!(
            "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata:\n  name: bookinfo\nspec:\n  services:\n    - name: productpage\n      port: 9080\n      endpoints:\n        - address: {}\n          version: v1\n",
            local(pp.inbound)
        ),
    )?;
    let gateway = std::fs::read_to_string(istio_file("bookinfo-gateway.yaml"))?
        .replace("number: 8080", &format!("number: {}", gw.outbound));
    std::fs::write(config.join("bookinfo-gateway.yaml"), gateway)?;
    let _up = start_up(dir.path(), &config, &dir.path().join("data"), up, &[]).await?;
    let collector = up.grpc_endpoint();
    let control = up.control_addr();
    let _pp = Sidecar {
        service: "productpage",
        version: "v1",
        mesh: &config,
        ports: pp,
        app: Some(app),
        collector: &collector,
        extra: &["--control", &control],
    }
    .start(dir.path())
    .await?;
    let _gw = Sidecar {
        service: "istio-ingressgateway",
        version: "v1",
        mesh: &config,
        ports: gw,
        app: None,
        collector: &collector,
        extra: &[
            "--control",
            &control,
            "--gateway",
            "--label",
            "istio=ingressgateway",
        ],
    }
    .start(dir.path())
    .await?;

    let client = reqwest::Client::builder().no_proxy().build()?;
    let base = format!("http://127.0.0.1:{}", gw.outbound);
    for path in [
        "/productpage",
        "/static/app.js",
        "/api/v1/products/1",
        "/login",
    ] {
        let resp = client.get(format!("{base}{path}")).send().await?;
        assert_eq!(resp.status(), 200, "{path}");
        let echo: serde_json::Value = resp.json().await?;
        assert_eq!(echo["app"], "productpage-v1", "{path}");
        assert_eq!(echo["path"], path);
    }
    // Not among the gateway's routes.
    let resp = client.get(format!("{base}/admin")).send().await?;
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-lumen-response-flags"], "NR");

    let url = up.sql_url();
    let q = "SELECT count(*) AS n FROM requests WHERE reporter = 'source' \
             AND source_workload = 'istio-ingressgateway-v1' AND route = 'bookinfo/0' \
             AND destination_service = 'productpage' AND status = 200";
    assert_eq!(lumen_tests::wait_for_count(&url, q, 4).await?, 4);
    Ok(())
}
