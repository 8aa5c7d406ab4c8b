//! Prometheus remote write 1.0 receiver: `POST /api/v1/write` with a
//! snappy-compressed protobuf `WriteRequest`, as Prometheus, Grafana Agent
//! and others send it. Each sample becomes a `metrics` row — a gauge point
//! named by its `__name__`, its other labels as attributes, at its own
//! timestamp — through the same conversion and WAL as OTLP metrics, so it
//! is durable when acknowledged and PromQL reads it back by the same name
//! and labels. Bad payloads get 400 (the sender drops them); a store that
//! cannot take them gets 500 (the sender retries), as the protocol says.
//!
//! Samples follow Prometheus's TSDB rules per series: one older than the
//! series' latest is out of order, and one at the latest's timestamp with
//! another value is a duplicate — either refuses the whole request with
//! 400, nothing of it stored, as Prometheus does; the latest sample again
//! (a sender retrying a request whose answer it lost) is taken and not
//! stored twice. The latest sample of each series is remembered from what this
//! process received, for up to [`MAX_TRACKED`] series.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{NumberDataPoint, number_data_point};
use prost::Message;

use crate::events::{gauge_export, text};
use crate::wal::WalHandle;

/// Largest compressed body taken (Prometheus sends batches of a few
/// thousand samples, well under a MiB).
const MAX_BODY: usize = 8 << 20;
/// Largest body once decompressed.
const MAX_DECODED: usize = 32 << 20;
/// Most samples, and most label copies (each sample carries its series'
/// labels into its row), one request may hold.
const MAX_SAMPLES: usize = 1_000_000;
const MAX_LABEL_COPIES: usize = 10_000_000;
/// Most labels one series may have.
const MAX_LABELS: usize = 128;
/// Requests decoded and stored at once; more are told to retry (429).
const MAX_INFLIGHT: usize = 4;
/// Series whose latest sample is remembered for the ordering rules
/// (about 40 bytes each); past this, what is remembered starts over.
pub const MAX_TRACKED: usize = 1_000_000;

/// `prometheus.WriteRequest` (remote write 1.0): the fields Lumen reads;
/// exemplars and native histograms are skipped as unknown fields.
#[derive(Clone, PartialEq, Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// The receiver's routes, for the query port (where Prometheus's API is).
pub fn router(wal: WalHandle) -> Router {
    let receiver = Arc::new(Receiver {
        wal,
        inflight: tokio::sync::Semaphore::new(MAX_INFLIGHT),
        latest: Latest::default(),
    });
    Router::new()
        .route("/api/v1/write", post(write))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(receiver)
}

struct Receiver {
    wal: WalHandle,
    inflight: tokio::sync::Semaphore,
    latest: Latest,
}

/// Each series' latest sample (time, value bits), by a hash of its labels.
#[derive(Default)]
struct Latest(Mutex<HashMap<u64, (i64, u64)>>);

/// A series' identity: its labels in name order, as Prometheus sorts them.
fn series_key(labels: &[Label]) -> u64 {
    let mut sorted: Vec<&Label> = labels.iter().collect();
    sorted.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for l in sorted {
        l.name.hash(&mut h);
        l.value.hash(&mut h);
    }
    h.finish()
}

/// Renders a series' labels for an error message.
fn describe(labels: &[Label]) -> String {
    let mut sorted: Vec<&Label> = labels.iter().collect();
    sorted.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    let parts: Vec<String> = sorted
        .iter()
        .map(|l| format!("{}={:?}", l.name, l.value))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// A series' latest sample: time (ms) and value bits.
type Last = (i64, u64);

/// What admitting a request changed for one series: its latest sample
/// before (if any) and after.
type Advance = (u64, Option<Last>, Last);

impl Latest {
    /// Checks `req` against each series' latest sample and Prometheus's
    /// rules; drops samples the store already has, and remembers the new
    /// latest ones. On error nothing is remembered: the request is refused
    /// whole. Returns what it advanced, to [`Latest::undo`] should the
    /// samples not be stored after all.
    fn admit(&self, req: &mut WriteRequest) -> Result<Vec<Advance>, String> {
        // Hashing is the costly part: outside the lock.
        let keys: Vec<u64> = req
            .timeseries
            .iter()
            .map(|t| series_key(&t.labels))
            .collect();
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut advanced: HashMap<u64, (Option<Last>, Last)> = HashMap::new();
        for (i, (ts, key)) in req.timeseries.iter_mut().zip(keys).enumerate() {
            let before = map.get(&key).copied();
            let mut last = advanced.get(&key).map(|a| a.1).or(before);
            let mut error = None;
            let mut moved = false;
            ts.samples.retain(|s| {
                if error.is_some() {
                    return false;
                }
                let bits = s.value.to_bits();
                match last {
                    Some((t, _)) if s.timestamp < t => {
                        error = Some(format!(
                            "out of order sample: timeseries[{i}] {} has a sample at {} ms, older than its latest at {t} ms",
                            describe(&ts.labels),
                            s.timestamp
                        ));
                        false
                    }
                    Some((t, v)) if s.timestamp == t && v == bits => false,
                    Some((t, _)) if s.timestamp == t => {
                        error = Some(format!(
                            "duplicate sample for timestamp: timeseries[{i}] {} has another value at {t} ms",
                            describe(&ts.labels)
                        ));
                        false
                    }
                    _ => {
                        last = Some((s.timestamp, bits));
                        moved = true;
                        true
                    }
                }
            });
            if let Some(e) = error {
                return Err(e);
            }
            if let (true, Some(l)) = (moved, last) {
                advanced.entry(key).or_insert((before, l)).1 = l;
            }
        }
        let new = advanced.values().filter(|a| a.0.is_none()).count();
        if map.len() + new > MAX_TRACKED {
            tracing::warn!(
                tracked = map.len(),
                "remote write: more series than are tracked for ordering; starting over"
            );
            map.clear();
        }
        let mut out = Vec::with_capacity(advanced.len());
        for (key, (before, after)) in advanced {
            map.insert(key, after);
            out.push((key, before, after));
        }
        Ok(out)
    }

    /// Puts back what [`Latest::admit`] advanced for samples that were not
    /// stored after all — where no other request has moved it since — so
    /// a retry of them is neither a duplicate nor out of order.
    fn undo(&self, advanced: &[Advance]) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (key, before, after) in advanced {
            if map.get(key) == Some(after) {
                match before {
                    Some(b) => map.insert(*key, *b),
                    None => map.remove(key),
                };
            }
        }
    }
}

fn refuse(status: StatusCode, message: String) -> Response {
    tracing::debug!(%status, %message, "remote write refused");
    (status, message).into_response()
}

async fn write(State(receiver): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> Response {
    // Bounded work at once: a sender told 429 backs off and retries.
    let Ok(_permit) = receiver.inflight.try_acquire() else {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "too many remote write requests at once; retry".into(),
        );
    };
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !encoding.eq_ignore_ascii_case("snappy") {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding {encoding:?}: remote write bodies are snappy-compressed"),
        );
    }
    let decoded = match snap::raw::decompress_len(&body) {
        Ok(n) if n > MAX_DECODED => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body decompresses to {n} bytes, over {MAX_DECODED}"),
            );
        }
        Ok(_) => snap::raw::Decoder::new().decompress_vec(&body),
        Err(e) => Err(e),
    };
    let decoded = match decoded {
        Ok(d) => d,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("snappy: {e}")),
    };
    let mut req = match WriteRequest::decode(decoded.as_slice()) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("not a remote write WriteRequest: {e}"),
            );
        }
    };
    if let Err(m) = check(&req) {
        return refuse(StatusCode::BAD_REQUEST, m);
    }
    let admitted = match receiver.latest.admit(&mut req) {
        Ok(keys) => keys,
        Err(m) => return refuse(StatusCode::BAD_REQUEST, m),
    };
    let stored = store(&receiver.wal, req).await;
    if stored.status() != StatusCode::NO_CONTENT {
        receiver.latest.undo(&admitted);
    }
    stored
}

/// Converts and appends admitted samples: 204 once durable.
async fn store(wal: &WalHandle, req: WriteRequest) -> Response {
    if req.timeseries.iter().all(|ts| ts.samples.is_empty()) {
        return StatusCode::NO_CONTENT.into_response();
    }
    let export = match to_otlp(req) {
        Ok(e) => e,
        Err(m) => return refuse(StatusCode::BAD_REQUEST, m),
    };
    let converted =
        match super::signals::convert_metrics(&export, super::convert::TimeWindow::around_now()) {
            Ok(c) => c,
            Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
        };
    if let Some(e) = converted.first_error {
        return refuse(StatusCode::BAD_REQUEST, e.to_string());
    }
    match wal.append(converted.batches).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        // Retried by the sender.
        Err(e) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("not stored: {e}"),
        ),
    }
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, Prometheus's label names.
fn valid_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Limits and label names, before anything is remembered or built.
fn check(req: &WriteRequest) -> Result<(), String> {
    let (mut samples, mut copies) = (0usize, 0usize);
    for (i, ts) in req.timeseries.iter().enumerate() {
        if ts.labels.len() > MAX_LABELS {
            return Err(format!(
                "timeseries[{i}] has {} labels, over {MAX_LABELS}",
                ts.labels.len()
            ));
        }
        if let Some(l) = ts.labels.iter().find(|l| {
            l.name.len() > super::shape::DEFAULT_MAX_KEY_BYTES
                || l.value.len() > super::shape::DEFAULT_MAX_VALUE_BYTES
        }) {
            return Err(format!(
                "timeseries[{i}] has a label of {} + {} bytes ({:.40}…): names take at most {} bytes, values {}",
                l.name.len(),
                l.value.len(),
                l.name,
                super::shape::DEFAULT_MAX_KEY_BYTES,
                super::shape::DEFAULT_MAX_VALUE_BYTES
            ));
        }
        if let Some(l) = ts.labels.iter().find(|l| !valid_label_name(&l.name)) {
            return Err(format!(
                "timeseries[{i}] has a label named {:?}, not a Prometheus label name",
                l.name
            ));
        }
        if !ts
            .labels
            .iter()
            .any(|l| l.name == "__name__" && !l.value.is_empty())
        {
            return Err(format!("timeseries[{i}] has no __name__ label"));
        }
        if let Some(s) = ts.samples.iter().find(|s| s.timestamp < 0) {
            return Err(format!(
                "timeseries[{i}] has a sample at {} ms, before 1970",
                s.timestamp
            ));
        }
        samples += ts.samples.len();
        copies = copies.saturating_add(ts.samples.len().saturating_mul(ts.labels.len()));
    }
    if samples > MAX_SAMPLES || copies > MAX_LABEL_COPIES {
        return Err(format!(
            "{samples} samples ({copies} label copies) in one request; send at most {MAX_SAMPLES} samples"
        ));
    }
    Ok(())
}

/// The samples as OTLP gauges, one metric per name.
fn to_otlp(req: WriteRequest) -> Result<ExportMetricsServiceRequest, String> {
    let mut series = Vec::with_capacity(req.timeseries.len());
    for (i, ts) in req.timeseries.into_iter().enumerate() {
        let mut name = None;
        let mut attributes = Vec::with_capacity(ts.labels.len());
        for l in ts.labels {
            if l.name == "__name__" {
                name = Some(l.value);
            } else if !l.value.is_empty() {
                attributes.push(text(&l.name, l.value));
            }
        }
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return Err(format!("timeseries[{i}] has no __name__ label"));
        };
        let points = ts.samples.into_iter().map(|s| {
            Ok(NumberDataPoint {
                attributes: attributes.clone(),
                time_unix_nano: u64::try_from(s.timestamp)
                    .ok()
                    .and_then(|ms| ms.checked_mul(1_000_000))
                    .ok_or_else(|| {
                        format!(
                            "timeseries[{i}] has a sample at {} ms, before 1970",
                            s.timestamp
                        )
                    })?,
                value: Some(number_data_point::Value::AsDouble(s.value)),
                ..Default::default()
            })
        });
        let points = points.collect::<Result<Vec<_>, String>>()?;
        // Every sample already stored (a retried request).
        if !points.is_empty() {
            series.push((name, points));
        }
    }
    Ok(gauge_export(
        "prometheus",
        lumen_core::schema::REMOTE_WRITE_SCOPE,
        series,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::metrics::v1::metric;

    #[test]
    fn samples_become_gauges_named_by_their_name_label() {
        let req = WriteRequest {
            timeseries: vec![TimeSeries {
                labels: vec![
                    Label {
                        name: "__name__".into(),
                        value: "up".into(),
                    },
                    Label {
                        name: "job".into(),
                        value: "prometheus".into(),
                    },
                ],
                samples: vec![Sample {
                    value: 1.0,
                    timestamp: 1_700_000_000_000,
                }],
            }],
        };
        let export = to_otlp(req).unwrap();
        let m = &export.resource_metrics[0].scope_metrics[0].metrics[0];
        assert_eq!(m.name, "up");
        let Some(metric::Data::Gauge(g)) = &m.data else {
            panic!("a gauge")
        };
        assert_eq!(g.data_points[0].time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(g.data_points[0].attributes[0].key, "job");

        let nameless = WriteRequest {
            timeseries: vec![TimeSeries {
                labels: vec![],
                samples: vec![],
            }],
        };
        assert!(check(&nameless).unwrap_err().contains("__name__"));
        let bad_name = WriteRequest {
            timeseries: vec![TimeSeries {
                labels: vec![Label {
                    name: "".into(),
                    value: "x".into(),
                }],
                samples: vec![],
            }],
        };
        assert!(check(&bad_name).unwrap_err().contains("label named"));
        // Many labels on many samples: refused before anything is built.
        let wide = WriteRequest {
            timeseries: vec![TimeSeries {
                labels: (0..100)
                    .map(|i| Label {
                        name: if i == 0 {
                            "__name__".into()
                        } else {
                            format!("l{i}")
                        },
                        value: "v".into(),
                    })
                    .collect(),
                samples: vec![
                    Sample {
                        value: 1.0,
                        timestamp: 1
                    };
                    200_000
                ],
            }],
        };
        assert!(check(&wide).unwrap_err().contains("at most"));
        // A label value past 64 KiB.
        let mut long = one("up", &[(1, 1.0)]);
        long.labels.push(Label {
            name: "blob".into(),
            value: "x".repeat(super::super::shape::DEFAULT_MAX_VALUE_BYTES + 1),
        });
        let err = check(&WriteRequest {
            timeseries: vec![long],
        })
        .unwrap_err();
        assert!(
            err.contains("timeseries[0] has a label of 4 + 65537 bytes (blob"),
            "{err}"
        );
    }

    fn one(name: &str, samples: &[(i64, f64)]) -> TimeSeries {
        TimeSeries {
            labels: vec![
                Label {
                    name: "job".into(),
                    value: "node".into(),
                },
                Label {
                    name: "__name__".into(),
                    value: name.into(),
                },
            ],
            samples: samples
                .iter()
                .map(|&(timestamp, value)| Sample { value, timestamp })
                .collect(),
        }
    }

    #[test]
    fn samples_follow_prometheus_ordering_rules_per_series() {
        let latest = Latest::default();
        let mut first = WriteRequest {
            timeseries: vec![
                one("up", &[(1000, 1.0), (2000, 1.0)]),
                one("x", &[(5000, 3.0)]),
            ],
        };
        latest.admit(&mut first).unwrap();
        assert_eq!(first.timeseries[0].samples.len(), 2);

        // The latest samples again (a retry): taken, nothing new to store.
        let mut retry = WriteRequest {
            timeseries: vec![one("up", &[(2000, 1.0)]), one("x", &[(5000, 3.0)])],
        };
        latest.admit(&mut retry).unwrap();
        assert!(retry.timeseries.iter().all(|t| t.samples.is_empty()));
        // A retry holding older samples too is out of order, as in
        // Prometheus: refused, and its samples are stored already.
        let mut whole = first.clone();
        assert!(latest.admit(&mut whole).is_err());

        // Older than the latest: the whole request is refused and nothing
        // of it remembered (x at 6000 stays new).
        let mut late = WriteRequest {
            timeseries: vec![one("x", &[(6000, 4.0)]), one("up", &[(1500, 1.0)])],
        };
        let e = latest.admit(&mut late).unwrap_err();
        assert!(e.starts_with("out of order sample"), "{e}");
        assert!(e.contains("__name__=\"up\""), "{e}");
        let mut again = WriteRequest {
            timeseries: vec![one("x", &[(6000, 4.0)])],
        };
        latest.admit(&mut again).unwrap();
        assert_eq!(again.timeseries[0].samples.len(), 1);

        // Another value at the latest timestamp.
        let mut dup = WriteRequest {
            timeseries: vec![one("up", &[(2000, 0.0)])],
        };
        let e = latest.admit(&mut dup).unwrap_err();
        assert!(e.starts_with("duplicate sample for timestamp"), "{e}");

        // Within one request, out of order too; labels in any order are
        // one series.
        let mut within = WriteRequest {
            timeseries: vec![one("y", &[(3000, 1.0), (2500, 1.0)])],
        };
        assert!(latest.admit(&mut within).is_err());
        let mut swapped = one("up", &[(1000, 1.0)]);
        swapped.labels.reverse();
        let mut req = WriteRequest {
            timeseries: vec![swapped],
        };
        assert!(
            latest
                .admit(&mut req)
                .unwrap_err()
                .starts_with("out of order")
        );

        // Not stored after all: forgotten, so its retry is new.
        let mut lost = WriteRequest {
            timeseries: vec![one("z", &[(1000, 1.0)])],
        };
        let advanced = latest.admit(&mut lost).unwrap();
        latest.undo(&advanced);
        let mut lost_again = lost.clone();
        latest.admit(&mut lost_again).unwrap();
        assert_eq!(lost_again.timeseries[0].samples.len(), 1);

        // Two requests at once: undoing the first leaves what the second
        // advanced, and a series the first only repeated is untouched.
        let mut a = WriteRequest {
            timeseries: vec![one("s", &[(100, 1.0)]), one("x", &[(6000, 4.0)])],
        };
        let mut b = WriteRequest {
            timeseries: vec![one("s", &[(110, 1.0)])],
        };
        let advanced_a = latest.admit(&mut a).unwrap();
        assert_eq!(advanced_a.len(), 1, "x at its latest is not an advance");
        latest.admit(&mut b).unwrap();
        latest.undo(&advanced_a);
        let mut older = WriteRequest {
            timeseries: vec![one("s", &[(105, 1.0)])],
        };
        assert!(latest.admit(&mut older).is_err(), "s is still at 110");
    }
}
