//! Rows the policy engine makes in this process — its events
//! (`policy_events`) and recording rules' results (`metrics`) — stored
//! like ingested rows: through the WAL, durably.

/// Writes the policy engine's events to `policy_events` through the WAL,
/// off the decision loop; a write that fails is logged, never retried
/// into an unbounded queue.
pub struct PolicyEventWriter {
    wal: crate::wal::WalHandle,
    table: usize,
}

impl PolicyEventWriter {
    pub fn new(wal: crate::wal::WalHandle) -> Self {
        let table = crate::store::table_index(lumen_core::schema::POLICY_EVENTS)
            .expect("policy_events is a table");
        PolicyEventWriter { wal, table }
    }

    pub fn write(&self, rows: Vec<lumen_core::schema::PolicyEvent>) {
        let batch = match lumen_core::schema::policy_events_batch(&rows) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot build policy_events rows");
                return;
            }
        };
        let (wal, table) = (self.wal.clone(), self.table);
        tokio::spawn(async move {
            if let Err(e) = wal.append(vec![(table, batch)]).await {
                tracing::warn!(error = %e, rows = rows.len(), "policy events not stored");
            }
        });
    }
}

/// One series a recording rule produced at one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedSample {
    /// The rule's `record` name.
    pub name: String,
    /// The series' labels, without `__name__`.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Writes recording rules' results to `metrics` as gauges of scope
/// [`RECORDING_SCOPE`](lumen_core::schema::RECORDING_SCOPE), through the
/// WAL, so PromQL reads them by their recorded names like any stored
/// series, and they survive a restart. Built the way ingested OTLP
/// metrics are, so the rows are exactly what the OTLP path would store.
#[derive(Clone)]
pub struct RecordingWriter {
    wal: crate::wal::WalHandle,
}

impl RecordingWriter {
    pub fn new(wal: crate::wal::WalHandle) -> Self {
        RecordingWriter { wal }
    }

    /// Stores `samples`, all taken at `at`; returns once they are durable
    /// (and readable), so a later rule of the same group reads them.
    pub async fn write(
        &self,
        at: std::time::SystemTime,
        samples: Vec<RecordedSample>,
    ) -> Result<(), String> {
        if samples.is_empty() {
            return Ok(());
        }
        let req = recorded_request(at, samples);
        let converted = crate::ingest::signals::convert_metrics(
            &req,
            crate::ingest::convert::TimeWindow::unbounded(),
        )
        .map_err(|e| format!("cannot build metrics rows: {e}"))?;
        if let Some(e) = converted.first_error {
            return Err(format!("a recorded sample was refused: {e}"));
        }
        self.wal
            .append(converted.batches)
            .await
            .map_err(|e| format!("not stored: {e}"))
    }
}

/// Recorded samples as the OTLP export a Prometheus-named gauge would come
/// in: one metric per recorded name.
fn recorded_request(
    at: std::time::SystemTime,
    samples: Vec<RecordedSample>,
) -> opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest {
    use opentelemetry_proto::tonic::metrics::v1::{NumberDataPoint, number_data_point};
    let nanos = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let points = samples.into_iter().map(|s| {
        let point = NumberDataPoint {
            attributes: s.labels.into_iter().map(|(k, v)| text(&k, v)).collect(),
            time_unix_nano: nanos,
            value: Some(number_data_point::Value::AsDouble(s.value)),
            ..Default::default()
        };
        (s.name, vec![point])
    });
    gauge_export("lumen", lumen_core::schema::RECORDING_SCOPE, points)
}

/// A string attribute.
pub(crate) fn text(key: &str, value: String) -> opentelemetry_proto::tonic::common::v1::KeyValue {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
        ..Default::default()
    }
}

/// Gauge points as the OTLP export that would carry them from `service`'s
/// instrumentation `scope`: one metric per name, points in the order given
/// — how series Lumen makes itself (recorded rules, a Prometheus's remote
/// write) enter through the same conversion as ingested OTLP.
pub(crate) fn gauge_export(
    service: &str,
    scope: &str,
    points: impl IntoIterator<
        Item = (
            String,
            Vec<opentelemetry_proto::tonic::metrics::v1::NumberDataPoint>,
        ),
    >,
) -> opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest {
    use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
    use opentelemetry_proto::tonic::metrics::v1::{
        Gauge, Metric, ResourceMetrics, ScopeMetrics, metric,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    let mut metrics: Vec<Metric> = Vec::new();
    let mut by_name: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (name, mut data_points) in points {
        let at = *by_name.entry(name.clone()).or_insert_with(|| {
            metrics.push(Metric {
                name,
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: Vec::new(),
                })),
                ..Default::default()
            });
            metrics.len() - 1
        });
        if let Some(metric::Data::Gauge(g)) = &mut metrics[at].data {
            g.data_points.append(&mut data_points);
        }
    }
    opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![text("service.name", service.into())],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: scope.into(),
                    ..Default::default()
                }),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}
