//! The proxy's stats: its counters ([`crate::telemetry::Metrics`]) and,
//! read at the moment they are asked for, the state of its config and
//! clusters — under Envoy's stat names where Envoy has one, so fleet
//! dashboards read the same either way:
//!
//! - `lumen_proxy_config_info{version}`: the mesh config version served;
//! - per `cluster_name`: `envoy_cluster_upstream_rq_active` (requests in
//!   flight), `envoy_cluster_upstream_rq_pending_active` (waiting for an
//!   HTTP/1.1 connection under `maxConnections`),
//!   `envoy_cluster_upstream_cx_active` (open TCP-proxied connections),
//!   `envoy_cluster_membership_total` / `_healthy` (endpoints, and those
//!   not ejected) and `envoy_cluster_outlier_detection_ejections_active`.
//!
//! They are served on the admin port (`/stats/prometheus`) and, like
//! Envoy's OpenTelemetry stats sink, pushed to the collector as OTLP
//! metrics every interval ([`push`]), so the fleet's stats are in the
//! store without a scraper. Istio's `istio_*` families are not pushed: the
//! collector builds them from every request's record already.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge as PromGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::sync::watch;

use crate::context::Shared;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster_name: String,
}

/// The proxy's whole exposition, as `/stats/prometheus` serves it.
pub fn exposition(shared: &Shared) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode_registry(
        &mut out,
        shared.telemetry.metrics().registry(),
    );
    let _ = prometheus_client::encoding::text::encode_registry(&mut out, &now(shared));
    // The process's figures, as Envoy's `server.*` stats beside its clusters'.
    let process = lumen_core::process::exposition();
    out.push_str(process.trim_end().trim_end_matches("# EOF"));
    let _ = prometheus_client::encoding::text::encode_eof(&mut out);
    out
}

/// The config and clusters as they are now.
fn now(shared: &Shared) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "lumen_proxy_config",
        "The mesh config version this proxy serves",
        Info::new(vec![(
            "version".to_string(),
            shared.config_version.load().to_string(),
        )]),
    );
    let gauges: [(&str, &str); 6] = [
        (
            "envoy_cluster_upstream_rq_active",
            "Requests sent to the cluster and not yet finished",
        ),
        (
            "envoy_cluster_upstream_rq_pending_active",
            "Requests waiting for a connection under the cluster's maxConnections",
        ),
        (
            "envoy_cluster_upstream_cx_active",
            "TCP-proxied connections open to the cluster",
        ),
        ("envoy_cluster_membership_total", "Endpoints of the cluster"),
        (
            "envoy_cluster_membership_healthy",
            "Endpoints of the cluster not ejected by outlier detection",
        ),
        (
            "envoy_cluster_outlier_detection_ejections_active",
            "Endpoints of the cluster ejected by outlier detection now",
        ),
    ];
    let families: Vec<Family<ClusterLabels, PromGauge>> =
        gauges.iter().map(|_| Family::default()).collect();
    let routes = shared.routes.load();
    let now = crate::endpoint::now_micros();
    for c in routes.clusters() {
        let labels = ClusterLabels {
            cluster_name: c.name.to_string(),
        };
        let (requests, pending, connections) = c.state.active();
        let total = c.endpoints.len() as i64;
        let ejected = c
            .endpoints
            .iter()
            .filter(|e| e.state.is_ejected(now))
            .count() as i64;
        let values = [
            i64::from(requests),
            i64::from(pending),
            i64::from(connections),
            total,
            total - ejected,
            ejected,
        ];
        for (family, v) in families.iter().zip(values) {
            family.get_or_create(&labels).set(v);
        }
    }
    for ((name, help), family) in gauges.iter().zip(families) {
        registry.register(*name, *help, family);
    }
    registry
}

/// Where and how often the stats go.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// The collector's OTLP gRPC endpoint (`http://host:4317`).
    pub endpoint: String,
    pub tls: crate::telemetry::channel::CollectorTls,
    pub interval: Duration,
    pub timeout: Duration,
    /// Names this proxy among its workload's (`service.instance.id`).
    pub instance: String,
}

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// Pushes the stats every interval until `stop` turns true. A push that
/// fails is logged and counted, never retried: the next one carries the
/// counters' new totals.
pub async fn push(shared: Arc<Shared>, config: PushConfig, mut stop: watch::Receiver<bool>) {
    let channel = match crate::telemetry::channel::channel(
        &config.endpoint,
        config.timeout,
        &config.tls,
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(endpoint = %config.endpoint, error = %e, "stats are not pushed: bad collector endpoint");
            return;
        }
    };
    let mut grpc = tonic::client::Grpc::new(channel);
    let resource = resource(&shared.identity, &config.instance);
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let body = request(&exposition(&shared), &resource, SystemTime::now()).encode_to_vec();
        let sent = async {
            grpc.ready().await.map_err(|e| e.to_string())?;
            grpc.unary(
                tonic::Request::new(bytes::Bytes::from(body)),
                http::uri::PathAndQuery::from_static(EXPORT_PATH),
                lumen_core::otlp::PassThrough,
            )
            .await
            .map_err(|e| e.message().to_string())
        };
        match tokio::time::timeout(config.timeout, sent).await {
            Ok(Ok(_)) => shared.telemetry.metrics().stats_pushed(true),
            Ok(Err(e)) => {
                shared.telemetry.metrics().stats_pushed(false);
                tracing::debug!(error = %e, "stats push failed");
            }
            Err(_) => {
                shared.telemetry.metrics().stats_pushed(false);
                tracing::debug!("stats push timed out");
            }
        }
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// The proxy's resource, as its spans carry it, and which proxy it is.
fn resource(identity: &lumen_core::Workload, instance: &str) -> Resource {
    Resource {
        attributes: vec![
            text("service.name", &identity.service),
            text("service.namespace", &identity.namespace),
            text("service.version", &identity.version),
            text("service.instance.id", instance),
            text("lumen.workload", &identity.workload),
        ],
        ..Default::default()
    }
}

/// The exposition's samples as OTLP gauges taken at `at`, one metric per
/// name, Istio's families left out.
pub fn request(
    text_format: &str,
    resource: &Resource,
    at: SystemTime,
) -> ExportMetricsServiceRequest {
    let nanos = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut metrics: Vec<Metric> = Vec::new();
    for s in lumen_core::exposition::parse(text_format) {
        if s.name.starts_with("istio_") {
            continue;
        }
        let point = NumberDataPoint {
            attributes: s.labels.iter().map(|(k, v)| text(k, v)).collect(),
            time_unix_nano: nanos,
            value: Some(number_data_point::Value::AsDouble(s.value)),
            ..Default::default()
        };
        // Samples of one name are adjacent in an exposition.
        match metrics.last_mut() {
            Some(Metric {
                name,
                data: Some(metric::Data::Gauge(g)),
                ..
            }) if *name == s.name => g.data_points.push(point),
            _ => metrics.push(Metric {
                name: s.name,
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: vec![point],
                })),
                ..Default::default()
            }),
        }
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource.clone()),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "lumen-proxy".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_become_otlp_gauges_without_istios_families() {
        let text = "# TYPE istio_requests counter\nistio_requests_total{a=\"b\"} 5\n\
                    # TYPE lumen_upstream_retries counter\nlumen_upstream_retries_total 2\n\
                    lumen_upstream_retries_created 1.7e9\n\
                    # TYPE envoy_cluster_upstream_rq_active gauge\n\
                    envoy_cluster_upstream_rq_active{cluster_name=\"outbound|9080||reviews\"} 3\n\
                    envoy_cluster_upstream_rq_active{cluster_name=\"outbound|9080||details\"} 0\n# EOF\n";
        let identity = lumen_core::Workload {
            service: "productpage".into(),
            workload: "productpage-v1".into(),
            namespace: "default".into(),
            version: "v1".into(),
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let req = request(text, &resource(&identity, "productpage-v1-1"), at);
        let rm = &req.resource_metrics[0];
        let attrs: Vec<&str> = rm
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .map(|a| a.key.as_str())
            .collect();
        assert!(attrs.contains(&"service.instance.id"), "{attrs:?}");
        let metrics = &rm.scope_metrics[0].metrics;
        let names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "lumen_upstream_retries_total",
                "envoy_cluster_upstream_rq_active"
            ]
        );
        let Some(metric::Data::Gauge(g)) = &metrics[1].data else {
            panic!("not a gauge");
        };
        assert_eq!(g.data_points.len(), 2);
        assert_eq!(g.data_points[0].time_unix_nano, 100_000_000_000);
        assert_eq!(g.data_points[0].attributes[0].key, "cluster_name");
        assert_eq!(
            g.data_points[0].value,
            Some(number_data_point::Value::AsDouble(3.0))
        );
    }
}
