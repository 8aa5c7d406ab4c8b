//! The Bookinfo apps' own telemetry, sent with the OpenTelemetry Rust SDK
//! as an instrumented app sends it: a server span per request (child of
//! the inbound sidecar's span) and a client span per call (parent of the
//! outbound sidecar's), request metrics, and logs for what goes wrong —
//! straight to the collector over OTLP/gRPC, each app as its own resource.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::{SdkLogger, SdkLoggerProvider};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::bookinfo::App;

/// How often apps send their metrics.
const METRICS_INTERVAL: Duration = Duration::from_secs(10);

/// One app's tracer, instruments and logger.
pub struct AppTelemetry {
    tracer: SdkTracer,
    requests: Counter<u64>,
    duration: Histogram<f64>,
    logger: SdkLogger,
    propagator: TraceContextPropagator,
    traces: SdkTracerProvider,
    metrics: SdkMeterProvider,
    logs: SdkLoggerProvider,
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

impl AppTelemetry {
    /// Exporters to the collector at `endpoint` (`http://host:4317`). Must
    /// be called within the Tokio runtime: the gRPC channels live on it.
    pub fn start(app: App, endpoint: &str) -> Result<Self, String> {
        let resource = Resource::builder()
            .with_service_name(app.service())
            .with_attributes([
                KeyValue::new("service.namespace", crate::DEFAULT_NAMESPACE),
                KeyValue::new("service.version", app.version()),
                KeyValue::new(
                    "service.instance.id",
                    format!("{}-{}", app.service(), app.version()),
                ),
            ])
            .build();
        let err = |what: &str, e: &dyn std::fmt::Display| format!("{what} exporter: {e}");
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| err("span", &e))?;
        let traces = SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_batch_exporter(spans)
            .build();
        let metric_exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| err("metric", &e))?;
        let metrics = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(
                PeriodicReader::builder(metric_exporter)
                    .with_interval(METRICS_INTERVAL)
                    .build(),
            )
            .build();
        let log_exporter = opentelemetry_otlp::LogExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| err("log", &e))?;
        let logs = SdkLoggerProvider::builder()
            .with_resource(resource)
            .with_batch_exporter(log_exporter)
            .build();
        let meter = metrics.meter("bookinfo");
        Ok(AppTelemetry {
            tracer: traces.tracer("bookinfo"),
            requests: meter
                .u64_counter("bookinfo.requests")
                .with_description("Requests the app served, by route and status")
                .build(),
            duration: meter
                .f64_histogram("http.server.request.duration")
                .with_unit("s")
                .with_description("Time the app took to answer")
                .build(),
            logger: logs.logger("bookinfo"),
            propagator: TraceContextPropagator::new(),
            traces,
            metrics,
            logs,
        })
    }

    /// A server span for an incoming request, child of the caller's span
    /// (the inbound sidecar's) when the request carries one.
    pub fn server_span(&self, headers: &HeaderMap, method: &str, route: &str) -> Context {
        let parent = self.propagator.extract(&Headers(headers));
        let span = self
            .tracer
            .span_builder(format!("{method} {route}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("http.route", route.to_string()),
            ])
            .start_with_context(&self.tracer, &parent);
        parent.with_span(span)
    }

    /// A client span for a call to `service`, under `parent`; its context
    /// goes out in `headers` so the outbound sidecar's span is its child.
    pub fn client_span(&self, parent: &Context, service: &str, headers: &mut HeaderMap) -> Context {
        let span = self
            .tracer
            .span_builder(format!("GET {service}"))
            .with_kind(SpanKind::Client)
            .with_attributes([KeyValue::new("server.address", service.to_string())])
            .start_with_context(&self.tracer, parent);
        let cx = parent.with_span(span);
        self.propagator
            .inject_context(&cx, &mut HeadersMut(headers));
        cx
    }

    /// Ends a span with its outcome.
    pub fn end(&self, cx: &Context, status: u16, error: Option<&str>) {
        let span = cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(e) = error {
            span.set_status(Status::error(e.to_string()));
        }
        span.end();
    }

    /// Counts a served request.
    pub fn served(&self, route: &'static str, status: u16, started: std::time::Instant) {
        let attrs = [
            KeyValue::new("http.route", route),
            KeyValue::new("http.response.status_code", i64::from(status)),
        ];
        self.requests.add(1, &attrs);
        self.duration
            .record(started.elapsed().as_secs_f64(), &attrs);
    }

    /// A log record in the span's trace, as an app logs what went wrong.
    pub fn log(&self, cx: &Context, severity: Severity, text: &'static str, detail: String) {
        let mut rec = self.logger.create_log_record();
        rec.set_timestamp(SystemTime::now());
        rec.set_severity_number(severity);
        rec.set_severity_text(severity.name());
        rec.set_body(AnyValue::from(text));
        rec.add_attribute("detail", detail);
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            rec.set_trace_context(sc.trace_id(), sc.span_id(), Some(sc.trace_flags()));
        }
        self.logger.emit(rec);
    }

    /// Sends what is buffered and stops the exporters. Blocks (the SDK's
    /// exporters run on threads of their own): call it off the runtime's
    /// workers.
    pub fn shutdown(&self) {
        for (what, r) in [
            ("traces", self.traces.shutdown()),
            ("metrics", self.metrics.shutdown()),
            ("logs", self.logs.shutdown()),
        ] {
            if let Err(e) = r {
                tracing::warn!(signal = what, error = %e, "app telemetry did not shut down cleanly");
            }
        }
    }
}
