//! What a VirtualService and DestinationRule do to requests through a real
//! sidecar: redirects, direct responses, rewrites and header edits, mirrors
//! whose failures never reach the client, connection-pool overflow (`UO`),
//! outlier detection ejecting a failing endpoint and returning it, and
//! consistent hashing keeping a key on one endpoint.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use lumen_tests::upstream::{requests_seen, start_app};
use lumen_tests::{Sidecar, SidecarPorts, UpPorts, free_port, local, start_up};

struct Caller {
    outbound: SocketAddr,
    admin: u16,
    client: reqwest::Client,
}

impl Caller {
    async fn get(
        &self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<reqwest::Response> {
        let mut req = self
            .client
            .get(format!("http://{}{path}", self.outbound))
            .header("host", format!("{host}:8080"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Ok(req.send().await?)
    }

    async fn app(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Result<String> {
        let resp = self.get(host, path, headers).await?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await?;
        if !status.is_success() {
            bail!("{status}: {body}");
        }
        Ok(body["app"].as_str().unwrap_or_default().to_string())
    }
}

const RULES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http:
  - name: moved
    match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, redirectCode: 301}
  - name: teapot
    match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: "short and stout"}}
  - name: api
    match: [{uri: {prefix: /api}}]
    rewrite: {uri: /v2}
    headers:
      request:
        set: {x-added: "yes"}
        remove: [x-secret]
      response:
        set: {x-served-by: lumen}
    mirror: {host: mirror}
    mirrorPercentage: {value: 100}
    route: [{destination: {host: web, subset: v1}}]
  - name: lost-mirror
    match: [{uri: {prefix: /lost}}]
    mirror: {host: gone}
    route: [{destination: {host: web, subset: v1}}]
  - route: [{destination: {host: web, subset: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pool}
spec:
  host: pool
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: flaky}
spec:
  host: flaky
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection:
      consecutive5xxErrors: 2
      interval: 1s
      baseEjectionTime: 3s
      maxEjectionPercent: 50
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hash}
spec:
  host: hash
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: x-user}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_and_destination_policies_act_on_real_requests() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    std::fs::create_dir(&config)?;
    let apps: Vec<(&str, &str, SocketAddr)> = vec![
        ("web", "v1", start_app("web-v1").await),
        ("web", "v2", start_app("web-v2").await),
        ("mirror", "v1", start_app("mirror-v1").await),
        ("pool", "v1", start_app("pool-v1").await),
        ("flaky", "v1", start_app("flaky-a").await),
        ("flaky", "v2", start_app("flaky-b").await),
        ("flaky", "v3", start_app("flaky-failing").await),
        ("hash", "v1", start_app("hash-1").await),
        ("hash", "v2", start_app("hash-2").await),
        ("hash", "v3", start_app("hash-3").await),
        // Nothing listens here: the mirror that fails.
        ("gone", "v1", local(free_port())),
    ];
    let mut mesh = String::from(
        "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec:\n  services:\n",
    );
    for service in ["web", "mirror", "pool", "flaky", "hash", "gone"] {
        mesh.push_str(&format!(
            "    - name: {service}\n      port: 8080\n      endpoints:\n"
        ));
        for (_, v, a) in apps.iter().filter(|(s, _, _)| *s == service) {
            mesh.push_str(&format!("        - {{address: {a}, version: {v}}}\n"));
        }
    }
    std::fs::write(config.join("mesh.yaml"), mesh)?;
    std::fs::write(config.join("rules.yaml"), RULES)?;
    let up = UpPorts::pick();
    let _up = start_up(dir.path(), &config, &dir.path().join("data"), up, &[]).await?;
    let ports = SidecarPorts::pick();
    let collector = up.grpc_endpoint();
    let control = up.control_addr();
    let _caller = Sidecar {
        service: "client",
        version: "v1",
        mesh: &config,
        ports,
        app: None,
        collector: &collector,
        extra: &["--control", &control],
    }
    .start(dir.path())
    .await?;
    let c = Caller {
        outbound: local(ports.outbound),
        admin: ports.admin,
        client: reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()?,
    };

    // Redirect and direct response: answered by the sidecar itself.
    let resp = c.get("web", "/old/page?x=1", &[]).await?;
    assert_eq!(resp.status(), 301);
    assert_eq!(resp.headers()["location"], "http://web:8080/new?x=1");
    let resp = c.get("web", "/teapot", &[]).await?;
    assert_eq!(resp.status(), 418);
    assert_eq!(resp.text().await?, "short and stout");

    // Rewrite, header edits both ways, and a mirror that gets every copy.
    let mirrored_before = requests_seen("mirror-v1");
    for _ in 0..5 {
        let resp = c.get("web", "/api/items?q=1", &[("x-secret", "s")]).await?;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-served-by"], "lumen");
        let echo: serde_json::Value = resp.json().await?;
        assert_eq!(echo["app"], "web-v1");
        assert_eq!(echo["path"], "/v2/items");
        assert_eq!(echo["query"], "q=1");
        assert_eq!(echo["headers"]["x-added"], "yes");
        assert!(echo["headers"].get("x-secret").is_none(), "{echo}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while requests_seen("mirror-v1") < mirrored_before + 5 {
        assert!(
            Instant::now() < deadline,
            "the mirror got {} copies",
            requests_seen("mirror-v1") - mirrored_before
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A mirror that cannot be reached changes nothing for the client.
    assert_eq!(c.app("web", "/lost", &[]).await?, "web-v1");
    assert_eq!(c.app("web", "/", &[]).await?, "web-v2");

    // Connection pool: one connection, one waiting; the rest overflow.
    let sends = (0..6).map(|_| c.get("pool", "/slow?delay_ms=600", &[]));
    let answers = futures_util::future::join_all(sends).await;
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for a in answers {
        let resp = a?;
        let status = resp.status().as_u16();
        if status == 503 {
            assert_eq!(resp.headers()["x-lumen-response-flags"], "UO");
        }
        *statuses.entry(status).or_default() += 1;
    }
    assert!(
        statuses.get(&503).copied().unwrap_or(0) >= 1,
        "{statuses:?}"
    );
    assert!(
        statuses.get(&200).copied().unwrap_or(0) >= 2,
        "{statuses:?}"
    );

    // Outlier detection: the failing endpoint is ejected after two 5xx and
    // gets nothing while out; it returns once its ejection time is up.
    // (Istio's default retry on 503 hides its failures from the client.)
    for _ in 0..12 {
        c.get("flaky", "/", &[]).await?;
    }
    let dump: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{}/config_dump", c.admin))
        .await?
        .json()
        .await?;
    let flaky = dump["clusters"]
        .as_array()
        .and_then(|cs| {
            cs.iter()
                .find(|c| c["name"] == "outbound|8080||flaky.default.svc.cluster.local")
        })
        .cloned()
        .unwrap_or_default();
    let ejected: Vec<&serde_json::Value> = flaky["endpoints"]
        .as_array()
        .map(|e| e.iter().filter(|e| e["ejected"] == true).collect())
        .unwrap_or_default();
    assert_eq!(ejected.len(), 1, "{flaky}");
    assert_eq!(ejected[0]["version"], "v3");
    let failing_before = requests_seen("flaky-failing");
    for _ in 0..10 {
        assert_ne!(c.app("flaky", "/", &[]).await?, "flaky-failing");
    }
    assert_eq!(
        requests_seen("flaky-failing"),
        failing_before,
        "an ejected endpoint got requests"
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for _ in 0..6 {
        c.get("flaky", "/", &[]).await?;
    }
    assert!(
        requests_seen("flaky-failing") > failing_before,
        "the endpoint never returned"
    );

    // Consistent hash: each user stays on one endpoint; users spread.
    let mut homes = HashSet::new();
    for user in 0..12 {
        let u = format!("user-{user}");
        let first = c.app("hash", "/", &[("x-user", &u)]).await?;
        for _ in 0..4 {
            assert_eq!(
                c.app("hash", "/", &[("x-user", &u)]).await?,
                first,
                "{u} moved"
            );
        }
        homes.insert(first);
    }
    assert!(homes.len() >= 2, "every user on {homes:?}");
    Ok(())
}
