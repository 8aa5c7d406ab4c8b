//! What one payload may hold: items per request, attributes per item, the
//! length of an attribute's key and value. Checked on the decoded request
//! before any row is built, so a payload within the byte limit that would
//! still explode into rows or columns (a million empty spans, a span with
//! a hundred thousand attributes, a 4 MiB attribute value) is refused
//! whole, with the protocol's own error (`INVALID_ARGUMENT`, HTTP 400)
//! naming the item and the limit.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use prost::Message;

/// Spans, data points or log records (or Arrow rows) in one payload.
pub const DEFAULT_MAX_ITEMS: usize = 100_000;
/// Attributes of one resource, scope, span, event, link, data point or log
/// record: the OpenTelemetry SDKs' own default count limit.
pub const DEFAULT_MAX_ATTRIBUTES: usize = 128;
/// Bytes of one attribute key (a Prometheus label name).
pub const DEFAULT_MAX_KEY_BYTES: usize = 1024;
/// Encoded bytes of one attribute value (a Prometheus label value).
pub const DEFAULT_MAX_VALUE_BYTES: usize = 64 << 10;

/// The limits, as `--max-items-per-request`, `--max-attributes` and
/// `--max-attribute-bytes` (values; keys stay at
/// [`DEFAULT_MAX_KEY_BYTES`]) set them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub max_items: usize,
    pub max_attributes: usize,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            max_items: DEFAULT_MAX_ITEMS,
            max_attributes: DEFAULT_MAX_ATTRIBUTES,
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
        }
    }
}

impl Shape {
    /// `attributes` of `what` (said lazily: only a refusal needs it).
    fn attributes(&self, attributes: &[KeyValue], what: impl Fn() -> String) -> Result<(), String> {
        if attributes.len() > self.max_attributes {
            return Err(format!(
                "{} has {} attributes; at most {} are taken (--max-attributes)",
                what(),
                attributes.len(),
                self.max_attributes
            ));
        }
        for kv in attributes {
            if kv.key.len() > self.max_key_bytes {
                return Err(format!(
                    "{} has an attribute key of {} bytes ({}…); at most {}",
                    what(),
                    kv.key.len(),
                    prefix(&kv.key),
                    self.max_key_bytes
                ));
            }
            let value = kv.value.as_ref().map_or(0, Message::encoded_len);
            if value > self.max_value_bytes {
                return Err(format!(
                    "{}: attribute {:?} has a value of {value} bytes; at most {} (--max-attribute-bytes)",
                    what(),
                    prefix(&kv.key),
                    self.max_value_bytes
                ));
            }
        }
        Ok(())
    }

    fn items(&self, items: usize, what: &str) -> Result<(), String> {
        if items > self.max_items {
            return Err(format!(
                "{items} {what} in one request; at most {} are taken (--max-items-per-request): send smaller batches",
                self.max_items
            ));
        }
        Ok(())
    }

    pub fn traces(&self, req: &ExportTraceServiceRequest) -> Result<(), String> {
        let spans: usize = req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.items(spans, "spans")?;
        for (r, rs) in req.resource_spans.iter().enumerate() {
            if let Some(res) = &rs.resource {
                self.attributes(&res.attributes, || format!("resource_spans[{r}].resource"))?;
            }
            for (s, ss) in rs.scope_spans.iter().enumerate() {
                if let Some(scope) = &ss.scope {
                    self.attributes(&scope.attributes, || {
                        format!("resource_spans[{r}].scope_spans[{s}].scope")
                    })?;
                }
                for (i, span) in ss.spans.iter().enumerate() {
                    let at = || format!("resource_spans[{r}].scope_spans[{s}].spans[{i}]");
                    self.attributes(&span.attributes, at)?;
                    for (e, event) in span.events.iter().enumerate() {
                        self.attributes(&event.attributes, || format!("{}.events[{e}]", at()))?;
                    }
                    for (l, link) in span.links.iter().enumerate() {
                        self.attributes(&link.attributes, || format!("{}.links[{l}]", at()))?;
                    }
                }
            }
        }
        Ok(())
    }

    pub fn metrics(&self, req: &ExportMetricsServiceRequest) -> Result<(), String> {
        let mut points = 0usize;
        for rm in &req.resource_metrics {
            for sm in &rm.scope_metrics {
                for m in &sm.metrics {
                    points = points.saturating_add(match &m.data {
                        Some(Data::Gauge(g)) => g.data_points.len(),
                        Some(Data::Sum(s)) => s.data_points.len(),
                        Some(Data::Histogram(h)) => h.data_points.len(),
                        Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
                        Some(Data::Summary(s)) => s.data_points.len(),
                        None => 0,
                    });
                }
            }
        }
        self.items(points, "data points")?;
        for (r, rm) in req.resource_metrics.iter().enumerate() {
            if let Some(res) = &rm.resource {
                self.attributes(&res.attributes, || {
                    format!("resource_metrics[{r}].resource")
                })?;
            }
            for (s, sm) in rm.scope_metrics.iter().enumerate() {
                if let Some(scope) = &sm.scope {
                    self.attributes(&scope.attributes, || {
                        format!("resource_metrics[{r}].scope_metrics[{s}].scope")
                    })?;
                }
                for (i, m) in sm.metrics.iter().enumerate() {
                    let at = |p: usize| {
                        format!(
                            "resource_metrics[{r}].scope_metrics[{s}].metrics[{i}] ({}) data point {p}",
                            m.name
                        )
                    };
                    let sets: Vec<&[KeyValue]> = match &m.data {
                        Some(Data::Gauge(g)) => {
                            g.data_points.iter().map(|p| &p.attributes[..]).collect()
                        }
                        Some(Data::Sum(s)) => {
                            s.data_points.iter().map(|p| &p.attributes[..]).collect()
                        }
                        Some(Data::Histogram(h)) => {
                            h.data_points.iter().map(|p| &p.attributes[..]).collect()
                        }
                        Some(Data::ExponentialHistogram(h)) => {
                            h.data_points.iter().map(|p| &p.attributes[..]).collect()
                        }
                        Some(Data::Summary(s)) => {
                            s.data_points.iter().map(|p| &p.attributes[..]).collect()
                        }
                        None => Vec::new(),
                    };
                    for (p, attributes) in sets.into_iter().enumerate() {
                        self.attributes(attributes, || at(p))?;
                    }
                }
            }
        }
        Ok(())
    }

    pub fn logs(&self, req: &ExportLogsServiceRequest) -> Result<(), String> {
        let records: usize = req
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .map(|s| s.log_records.len())
            .sum();
        self.items(records, "log records")?;
        for (r, rl) in req.resource_logs.iter().enumerate() {
            if let Some(res) = &rl.resource {
                self.attributes(&res.attributes, || format!("resource_logs[{r}].resource"))?;
            }
            for (s, sl) in rl.scope_logs.iter().enumerate() {
                if let Some(scope) = &sl.scope {
                    self.attributes(&scope.attributes, || {
                        format!("resource_logs[{r}].scope_logs[{s}].scope")
                    })?;
                }
                for (i, log) in sl.log_records.iter().enumerate() {
                    self.attributes(&log.attributes, || {
                        format!("resource_logs[{r}].scope_logs[{s}].log_records[{i}]")
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Arrow rows of one `DoPut`.
    pub fn rows(&self, rows: usize, table: &str) -> Result<(), String> {
        self.items(rows, &format!("`{table}` rows"))
    }
}

/// The start of a long key, for a message that must not echo all of it.
fn prefix(s: &str) -> &str {
    let mut end = s.len().min(40);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
            ..Default::default()
        }
    }

    fn traces(spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn too_many_items_attributes_or_bytes_are_refused_naming_the_item() {
        let shape = Shape {
            max_items: 3,
            max_attributes: 2,
            max_key_bytes: 8,
            max_value_bytes: 16,
        };
        let ok = Span {
            attributes: vec![kv("a", "b"), kv("c", "d")],
            ..Default::default()
        };
        assert_eq!(shape.traces(&traces(vec![ok.clone(); 3])), Ok(()));
        let err = shape.traces(&traces(vec![ok.clone(); 4])).unwrap_err();
        assert!(err.contains("4 spans in one request; at most 3"), "{err}");
        let mut many = ok.clone();
        many.attributes.push(kv("e", "f"));
        let err = shape.traces(&traces(vec![ok.clone(), many])).unwrap_err();
        assert!(
            err.contains("resource_spans[0].scope_spans[0].spans[1] has 3 attributes; at most 2"),
            "{err}"
        );
        let mut long_key = ok.clone();
        long_key.attributes[0].key = "k".repeat(9);
        let err = shape.traces(&traces(vec![long_key])).unwrap_err();
        assert!(err.contains("attribute key of 9 bytes"), "{err}");
        let mut long_value = ok.clone();
        long_value.events.push(Default::default());
        long_value.events[0].attributes = vec![kv("big", &"x".repeat(100))];
        let err = shape.traces(&traces(vec![long_value])).unwrap_err();
        assert!(
            err.contains("spans[0].events[0]: attribute \"big\" has a value of"),
            "{err}"
        );
    }
}
