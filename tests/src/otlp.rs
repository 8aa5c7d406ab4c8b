//! OTLP payloads as an independent sender builds them: an app's own spans,
//! and spans in the shape a Lumen proxy exports (which become `requests` rows).

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

pub fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

pub fn s(v: &str) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

/// A 1.5 ms span that started now, with fresh ids.
pub fn span(name: &str, attrs: Vec<KeyValue>) -> Span {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Span {
        trace_id: rand::random::<[u8; 16]>().to_vec(),
        span_id: rand::random::<[u8; 8]>().to_vec(),
        name: name.into(),
        kind: 2,
        start_time_unix_nano: now,
        end_time_unix_nano: now + 1_500_000,
        attributes: attrs,
        ..Default::default()
    }
}

/// A span as a Lumen proxy reports a request to `reviews` for `path`.
pub fn proxy_span(path: &str) -> Span {
    span(
        "GET reviews",
        vec![
            kv("lumen.reporter", s("destination")),
            kv("lumen.destination.service", s("reviews")),
            kv("http.request.method", s("GET")),
            kv("url.path", s(path)),
            kv("http.response.status_code", any_value::Value::IntValue(200)),
        ],
    )
}

/// `app_spans` spans of an app's SDK plus `proxy_spans` spans as a Lumen proxy sends them.
pub fn export(service: &str, app_spans: usize, proxy_spans: usize) -> ExportTraceServiceRequest {
    let app: Vec<Span> = (0..app_spans)
        .map(|i| {
            span(
                &format!("op-{i}"),
                vec![kv("i", any_value::Value::IntValue(i as i64))],
            )
        })
        .collect();
    let proxy: Vec<Span> = (0..proxy_spans).map(|_| proxy_span("/reviews/1")).collect();
    request(service, app, proxy)
}

/// One payload of app spans and proxy spans from `service`.
pub fn request(service: &str, app: Vec<Span>, proxy: Vec<Span>) -> ExportTraceServiceRequest {
    let scope = |name: &str, spans: Vec<Span>| ScopeSpans {
        scope: Some(InstrumentationScope {
            name: name.into(),
            ..Default::default()
        }),
        spans,
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", s(service))],
                ..Default::default()
            }),
            scope_spans: vec![scope("test-app", app), scope("lumen-proxy", proxy)],
            ..Default::default()
        }],
    }
}
