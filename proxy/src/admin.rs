//! Admin endpoint: `/ready`, `/stats/prometheus`, `/config_dump`, as on
//! Envoy's admin port, so the same probes and scrapers work; and, for an
//! injected pod, `/app-health/<container>/<livez|readyz|startupz>`: the
//! kubelet's probes of the app, rewritten by the injector to come here,
//! asked of the app from inside the pod (as Istio's agent does) — under
//! STRICT mTLS a plaintext probe from the kubelet could not reach it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;

use crate::context::Shared;

pub struct AdminState {
    pub shared: Arc<Shared>,
    pub ready: AtomicBool,
    /// The app's probes by the path the kubelet now asks here.
    pub app_probes: BTreeMap<String, AppProbe>,
}

/// One of the app's HTTP probes, as the injector found it in the pod spec.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct AppProbe {
    pub port: u16,
    #[serde(default = "root")]
    pub path: String,
    /// `HTTP` or `HTTPS`.
    #[serde(default = "http")]
    pub scheme: String,
    #[serde(default)]
    pub headers: Vec<ProbeHeader>,
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ProbeHeader {
    pub name: String,
    pub value: String,
}

fn root() -> String {
    "/".into()
}

fn http() -> String {
    "HTTP".into()
}

/// The injector's `LUMEN_APP_PROBES`: `{"/app-health/c/readyz": {port, path, scheme, headers}}`.
pub fn parse_app_probes(json: &str) -> Result<BTreeMap<String, AppProbe>, String> {
    let probes: BTreeMap<String, AppProbe> =
        serde_json::from_str(json).map_err(|e| format!("app probes: {e}"))?;
    match probes.keys().find(|k| !k.starts_with("/app-health/")) {
        Some(k) => Err(format!("app probes: `{k}` is not an /app-health/ path")),
        None => Ok(probes),
    }
}

/// How long an app probe may take: the kubelet's own timeout bounds it
/// anyway.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/stats/prometheus", get(stats))
        .route("/config_dump", get(config_dump))
        .route("/app-health/{container}/{kind}", get(app_health))
        .with_state(state)
}

/// Asks the app its probe: its status (2xx/3xx pass, as for the kubelet),
/// or 503 when it cannot be reached in time. An HTTPS probe is checked as
/// the kubelet checks a TCP one (the app accepts a connection): the
/// kubelet does not verify the app's certificate either.
async fn app_health(
    State(s): State<Arc<AdminState>>,
    uri: axum::http::Uri,
) -> axum::response::Response {
    ask_app(&s.app_probes, &uri).await
}

/// The admin port before the first configuration: not ready (no traffic
/// is served yet), but the app's probes answer — the kubelet's liveness
/// probe must not restart a healthy app because the control plane is away.
pub fn waiting_router(app_probes: Arc<BTreeMap<String, AppProbe>>) -> Router {
    Router::new()
        .route(
            "/ready",
            get(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "waiting for the first configuration\n",
                )
            }),
        )
        .route(
            "/app-health/{container}/{kind}",
            get(move |uri: axum::http::Uri| {
                let probes = app_probes.clone();
                async move { ask_app(&probes, &uri).await }
            }),
        )
}

async fn ask_app(
    app_probes: &BTreeMap<String, AppProbe>,
    uri: &axum::http::Uri,
) -> axum::response::Response {
    let Some(probe) = app_probes.get(uri.path()) else {
        return (StatusCode::NOT_FOUND, "no such app probe\n").into_response();
    };
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], probe.port));
    let asked = async {
        let stream = tokio::net::TcpStream::connect(target).await?;
        if probe.scheme.eq_ignore_ascii_case("HTTPS") {
            return Ok::<u16, Box<dyn std::error::Error + Send + Sync>>(200);
        }
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let request = http::Request::get(probe.path.as_str())
            .header(header::HOST, format!("127.0.0.1:{}", probe.port))
            .header(header::USER_AGENT, "kube-probe/lumen");
        let mut request = request.body(http_body_util::Empty::<bytes::Bytes>::new())?;
        // The probe's headers win over the defaults (a `Host` replaces ours).
        for h in &probe.headers {
            let name = http::HeaderName::from_bytes(h.name.as_bytes())?;
            request
                .headers_mut()
                .insert(name, http::HeaderValue::from_str(&h.value)?);
        }
        let response = sender.send_request(request).await?;
        Ok(response.status().as_u16())
    };
    match tokio::time::timeout(PROBE_TIMEOUT, asked).await {
        Ok(Ok(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, format!("app answered {code}\n")).into_response()
        }
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("app probe failed: {e}\n"),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "app probe timed out\n".to_string(),
        )
            .into_response(),
    }
}

async fn ready(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "LIVE\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n")
    }
}

async fn stats(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::stats::exposition(&s.shared),
    )
}

/// The mesh as this proxy sees it — for whoever is on the proxy's own
/// machine (or pod): an injected sidecar's admin port is open to the
/// cluster for probes and stats, not for its configuration.
async fn config_dump(
    State(s): State<Arc<AdminState>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
) -> axum::response::Response {
    if !peer.ip().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            "config_dump is served to loopback clients only\n",
        )
            .into_response();
    }
    config_dump_json(&s).into_response()
}

fn config_dump_json(s: &AdminState) -> impl IntoResponse + use<> {
    let routes = s.shared.routes.load();
    let mesh = routes.mesh();
    let services: Vec<_> = mesh
        .services
        .iter()
        .map(|svc| {
            json!({
                "name": &*svc.name,
                "namespace": &*svc.namespace,
                "port": svc.port,
                "clusterIP": svc.cluster_ip.map(|ip| ip.to_string()),
                "protocol": format!("{:?}", svc.protocol).to_lowercase(),
                "retries": {
                    "attempts": svc.retries.attempts,
                    "perTryTimeout": svc.retries.per_try_timeout.map(|t| format!("{t:?}")),
                },
                "endpoints": svc.endpoints.iter().map(|e| json!({
                    "address": &*e.address_str,
                    "workload": &*e.workload,
                    "version": &*e.version,
                    "labels": &*e.labels,
                    "locality": e.locality.as_deref(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let now = crate::endpoint::now_micros();
    let mut clusters: Vec<_> = routes
        .clusters()
        .map(|c| {
            json!({
                "name": &*c.name,
                "loadBalancer": format!("{:?}", c.algorithm),
                "outlierDetection": c.outlier.is_some(),
                "endpoints": c.endpoints.iter().map(|e| json!({
                    "address": &*e.state.address_str,
                    "version": &*e.version,
                    "priority": e.priority,
                    "inFlight": e.state.in_flight(),
                    "ejected": e.state.is_ejected(now),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    clusters.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let id = &s.shared.identity;
    axum::Json(json!({
        "identity": {
            "service": &*id.service,
            "workload": &*id.workload,
            "namespace": &*id.namespace,
            "version": &*id.version,
        },
        "version": s.shared.config_version.load().as_str(),
        "app": s.shared.app.as_ref().map(|a| &*a.address_str),
        "services": services,
        "virtualServices": mesh.virtual_services.iter().map(|v| format!("{}/{}", v.namespace, v.name)).collect::<Vec<_>>(),
        "destinationRules": mesh.destination_rules.iter().map(|d| format!("{}/{}", d.namespace, d.name)).collect::<Vec<_>>(),
        "clusters": clusters,
        // The certificate's serial, SPIFFE id and validity; never its bytes
        // or the key.
        "certificate": s.shared.registry.tls().info(),
        "inboundMtls": routes.inbound_mtls().as_str(),
        "peerAuthentications": mesh.peer_authentications.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect::<Vec<_>>(),
        "outboundTrafficPolicy": routes.outbound_mode().as_str(),
        "gatewayPorts": routes.gateway_ports().iter().map(|p| json!({
            "port": p.port,
            "servers": p.servers.iter().map(|ps| (&ps.gateway, &ps.server)).map(|(gateway, server)| json!({
                "gateway": gateway.as_ref(),
                "name": server.name,
                "hosts": server.hosts,
                "tls": server.tls.as_ref().map(|t| t.mode.as_str()),
                "httpsRedirect": server.https_redirect,
                // Whether its certificate could be read; never its bytes.
                "credential": match (&server.tls, &s.shared.gateway) {
                    (Some(t), Some(creds)) if t.credential.is_some() => Some(match creds.server_config(server) {
                        Ok(_) => "loaded".to_string(),
                        Err(e) => e,
                    }),
                    _ => None,
                },
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        // Pools are per resolved endpoint, never per Host the caller wrote.
        "upstream_pools": s.shared.registry.pooled(),
    }))
}
