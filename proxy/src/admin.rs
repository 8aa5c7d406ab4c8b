//! Admin endpoint: `/ready`, `/stats/prometheus`, `/config_dump`, as on
//! Envoy's admin port, so the same probes and scrapers work.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/stats/prometheus", get(stats))
        .route("/config_dump", get(config_dump))
        .with_state(state)
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

async fn config_dump(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
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
