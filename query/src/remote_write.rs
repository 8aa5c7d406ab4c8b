//! Remote write sender: Lumen's series to any Prometheus remote-write
//! receiver (Prometheus with `--web.enable-remote-write-receiver`, Mimir,
//! Thanos, VictoriaMetrics).
//!
//! A reader follows the store every ten seconds, the rollups' resolution:
//! once a window has closed (and [`SETTLE`] more for late rows), it reads
//! Istio's series at that window's end — cumulative, as a scrape every ten
//! seconds would see them, staleness markers included — and the apps'
//! OTLP metrics by their Prometheus names ([`crate::promql`]'s sources in
//! export mode), and puts them on each destination's queue. The queue is
//! bounded in samples; what does not fit is dropped and counted. Each
//! destination's sender takes batches of up to [`MAX_SAMPLES_PER_SEND`]
//! samples in order, one request at a time (so a series' samples arrive in
//! order), as the protocol asks: snappy-compressed protobuf, retried with
//! exponential backoff on network errors, 5xx and 429 (honouring
//! `Retry-After`), dropped and counted on any other 4xx. Where each
//! destination has got to is kept in the data directory, so a restart
//! resumes there (within [`MAX_RESUME`]).
//!
//! Nothing here is on the request path: a slow or dead receiver only fills
//! its own queue.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lumen_collector::ingest::remote_write::{Label, Sample, TimeSeries, WriteRequest};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::sync::{Notify, watch};

use crate::engine::QueryEngine;
use crate::promql::PromError;
use crate::promql::eval::Source;
use crate::promql::istio::IstioSource;
use crate::promql::otlp::OtlpSource;
use crate::promql::value::Labels;

/// The rollups' window: one sample per series per window.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// How long after a window ends it is read: its rows have arrived and been
/// rolled up by then.
pub const SETTLE: Duration = Duration::from_secs(12);
/// Samples per request, as Prometheus's `max_samples_per_send`.
pub const MAX_SAMPLES_PER_SEND: usize = 2000;
/// Samples a destination's queue holds by default.
pub const DEFAULT_CAPACITY: usize = 100_000;
/// Prometheus's `min_backoff` and `max_backoff`.
const MIN_BACKOFF: Duration = Duration::from_millis(30);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest `Retry-After` waited for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Prometheus's `remote_timeout`.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How far back a restart resumes; older samples a receiver would refuse
/// as out of bounds anyway.
pub const MAX_RESUME: Duration = Duration::from_secs(3600);
/// Most of the store read at once while catching up.
const MAX_SPAN_MS: i64 = 5 * 60_000;
/// Delta series whose running totals are carried; past this they start
/// over (a counter reset, which `rate` handles).
const MAX_CARRIED: usize = 1_000_000;
/// How long shutdown keeps sending what is queued.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RemoteWriteError {
    #[error("--remote-write {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("{what} {path}: {error}")]
    File {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("remote write TLS: {0}")]
    Tls(String),
}

/// Authentication and TLS for every destination.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// Basic auth; a URL's own `user:password@` is used for that URL.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// `Authorization: Bearer` with the file's contents, read at each send
    /// so a rotated token is picked up.
    pub bearer_token_file: Option<PathBuf>,
    /// PEM roots to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), for receivers that ask for one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
}

/// Every destination and how to reach it.
#[derive(Debug, Clone)]
pub struct RemoteWriteConfig {
    pub urls: Vec<String>,
    pub credentials: Credentials,
    /// Samples each destination's queue holds.
    pub capacity: usize,
    /// Where each destination's progress is kept.
    pub state_dir: Option<PathBuf>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RemoteLabels {
    remote: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    remote: String,
    reason: &'static str,
}

#[derive(Default)]
struct Metrics {
    sent: Family<RemoteLabels, Counter>,
    dropped: Family<DropLabels, Counter>,
    retries: Family<RemoteLabels, Counter>,
    queued: Family<RemoteLabels, Gauge>,
    highest_sent: Family<RemoteLabels, Gauge>,
    read_failures: Counter,
}

/// One `--remote-write` destination.
struct Destination {
    url: reqwest::Url,
    /// The URL without credentials: for logs, metrics and the state file.
    name: String,
    basic: UserInfo,
    queue: Queue,
    /// Samples through this time (ms) are sent (or dropped for good).
    sent_through: AtomicI64,
}

/// Samples waiting for a destination, with the tick ends they complete.
#[derive(Default)]
struct Queue {
    inner: Mutex<QueueInner>,
    ready: Notify,
}

#[derive(Default)]
struct QueueInner {
    items: VecDeque<Item>,
    samples: usize,
}

enum Item {
    Series(TimeSeries),
    /// Everything read through this time (ms) is before it in the queue.
    Through(i64),
}

/// Sends Lumen's series to every configured destination.
pub struct RemoteWriter {
    engine: QueryEngine,
    destinations: Vec<Arc<Destination>>,
    client: reqwest::Client,
    credentials: Credentials,
    capacity: usize,
    state_dir: Option<PathBuf>,
    metrics: Arc<Metrics>,
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, RemoteWriteError> {
    std::fs::read(path).map_err(|error| RemoteWriteError::File {
        what,
        path: path.to_path_buf(),
        error,
    })
}

fn client(c: &Credentials) -> Result<reqwest::Client, RemoteWriteError> {
    let mut b = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .user_agent(concat!("Lumen/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &c.ca_file {
        let pem = read_file("--remote-write-ca-file", ca)?;
        let roots = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| RemoteWriteError::Tls(format!("{}: {e}", ca.display())))?;
        if roots.is_empty() {
            return Err(RemoteWriteError::Tls(format!(
                "{}: no PEM certificate in it",
                ca.display()
            )));
        }
        b = b.tls_built_in_root_certs(false);
        for r in roots {
            b = b.add_root_certificate(r);
        }
    }
    match (&c.cert_file, &c.key_file) {
        (Some(cert), Some(key)) => {
            let mut pem = read_file("--remote-write-cert-file", cert)?;
            pem.push(b'\n');
            pem.extend(read_file("--remote-write-key-file", key)?);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                RemoteWriteError::Tls(format!("{} and {}: {e}", cert.display(), key.display()))
            })?;
            b = b.identity(identity);
        }
        (None, None) => {}
        _ => {
            return Err(RemoteWriteError::Tls(
                "--remote-write-cert-file and --remote-write-key-file go together".into(),
            ));
        }
    }
    if c.insecure_skip_verify {
        b = b.danger_accept_invalid_certs(true);
    }
    b.build()
        .map_err(|e| RemoteWriteError::Tls(format!("cannot build the HTTP client: {e}")))
}

/// A URL's `user:password@`.
type UserInfo = Option<(String, Option<String>)>;

/// A URL with its credentials taken out.
fn parse_url(raw: &str) -> Result<(reqwest::Url, UserInfo), RemoteWriteError> {
    let bad = |reason: String| RemoteWriteError::Url {
        url: raw.to_string(),
        reason,
    };
    let mut url = reqwest::Url::parse(raw).map_err(|e| bad(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!(
            "scheme {:?}: remote write is over http or https",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host".into()));
    }
    let basic = (!url.username().is_empty()).then(|| {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        (decode(url.username()), url.password().map(decode))
    });
    // Cannot fail on an http(s) URL with a host.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Ok((url, basic))
}

impl RemoteWriter {
    /// Checks every URL and credential file, and adds the sender's metrics
    /// to the engine's `/metrics`; nothing is sent until [`run`](Self::run).
    pub fn new(engine: QueryEngine, config: RemoteWriteConfig) -> Result<Self, RemoteWriteError> {
        let c = &config.credentials;
        if c.bearer_token_file.is_some() && (c.username.is_some() || c.password_file.is_some()) {
            return Err(RemoteWriteError::Tls(
                "basic auth and a bearer token cannot both be set".into(),
            ));
        }
        for (what, path) in [
            ("--remote-write-password-file", &c.password_file),
            ("--remote-write-bearer-token-file", &c.bearer_token_file),
        ] {
            if let Some(p) = path {
                read_file(what, p)?;
            }
        }
        let client = client(c)?;
        let mut destinations = Vec::new();
        for raw in &config.urls {
            let (url, basic) = parse_url(raw)?;
            let name = url.to_string();
            if destinations
                .iter()
                .any(|d: &Arc<Destination>| d.name == name)
            {
                return Err(RemoteWriteError::Url {
                    url: raw.clone(),
                    reason: "given twice".into(),
                });
            }
            destinations.push(Arc::new(Destination {
                url,
                name,
                basic,
                queue: Queue::default(),
                sent_through: AtomicI64::new(i64::MIN),
            }));
        }
        let metrics = Arc::new(Metrics::default());
        let mut registry = Registry::with_prefix("lumen_remote_write");
        registry.register(
            "samples_sent",
            "Samples a remote-write receiver accepted",
            metrics.sent.clone(),
        );
        registry.register(
            "samples_dropped",
            "Samples not sent: queue_full (the receiver is behind), rejected (a 4xx answer), shutdown",
            metrics.dropped.clone(),
        );
        registry.register(
            "retries",
            "Requests retried after a network error, 5xx or 429",
            metrics.retries.clone(),
        );
        registry.register(
            "queue_samples",
            "Samples waiting to be sent",
            metrics.queued.clone(),
        );
        registry.register(
            "highest_sent_timestamp_seconds",
            "Newest sample time a receiver accepted",
            metrics.highest_sent.clone(),
        );
        registry.register(
            "read_failures",
            "Reads of the store for remote write that failed (retried at the next tick)",
            metrics.read_failures.clone(),
        );
        for d in &destinations {
            let remote = RemoteLabels {
                remote: d.name.clone(),
            };
            // Every series from the start, at 0, so rates have a base.
            let _ = metrics.sent.get_or_create(&remote);
            let _ = metrics.queued.get_or_create(&remote);
            for reason in ["queue_full", "rejected", "shutdown"] {
                let _ = metrics.dropped.get_or_create(&DropLabels {
                    remote: d.name.clone(),
                    reason,
                });
            }
        }
        let registry = Arc::new(registry);
        // On the query port's `/metrics`, beside the rest of the process's.
        let text = registry.clone();
        engine.add_metrics(Arc::new(move || {
            let mut out = String::new();
            let _ = prometheus_client::encoding::text::encode(&mut out, &text);
            out
        }));
        Ok(RemoteWriter {
            engine,
            destinations,
            client,
            credentials: config.credentials,
            capacity: config.capacity.max(MAX_SAMPLES_PER_SEND),
            state_dir: config.state_dir,
            metrics,
        })
    }

    fn state_file(&self, d: &Destination) -> Option<PathBuf> {
        let safe: String = d
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(120)
            .collect();
        Some(self.state_dir.as_ref()?.join(format!("{safe}.json")))
    }

    /// Reads the store and sends until `stop` turns true; then sends what
    /// is queued for a few more seconds.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        let this = Arc::new(self);
        if this.destinations.is_empty() {
            return;
        }
        let now = chrono::Utc::now().timestamp_millis();
        let start = closed_through(now);
        for d in &this.destinations {
            let resumed = this
                .state_file(d)
                .and_then(|f| std::fs::read_to_string(f).ok())
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v["sent_through_ms"].as_i64())
                .filter(|t| *t <= start && start - t <= MAX_RESUME.as_millis() as i64);
            if let Some(t) = resumed {
                tracing::info!(remote = %d.name, from = t, "remote write resumes where it stopped");
            }
            d.sent_through
                .store(resumed.unwrap_or(start), Ordering::Relaxed);
            tracing::info!(remote = %d.name, "remote write on");
        }
        let senders: Vec<_> = this
            .destinations
            .iter()
            .map(|d| tokio::spawn(this.clone().send_loop(d.clone(), stop.clone())))
            .collect();
        this.read_loop(stop).await;
        for s in senders {
            let _ = s.await;
        }
    }

    async fn read_loop(&self, mut stop: watch::Receiver<bool>) {
        let mut cursor = self
            .destinations
            .iter()
            .map(|d| d.sent_through.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        let mut carry: BTreeMap<Labels, f64> = BTreeMap::new();
        loop {
            let now = chrono::Utc::now().timestamp_millis();
            let through = closed_through(now);
            if through <= cursor {
                let next = cursor + INTERVAL.as_millis() as i64 + SETTLE.as_millis() as i64;
                let wait = Duration::from_millis((next - now).clamp(100, 60_000) as u64);
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            let to = through.min(cursor + MAX_SPAN_MS);
            let read = tokio::select! {
                r = read(&self.engine, cursor, to, &mut carry) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match read {
                Ok(series) => {
                    for d in &self.destinations {
                        self.enqueue(d, &series, cursor, to);
                    }
                    cursor = to;
                }
                Err(e) => {
                    self.metrics.read_failures.inc();
                    tracing::warn!(error = %e, "remote write: cannot read the store; trying again at the next window");
                    tokio::select! {
                        () = tokio::time::sleep(INTERVAL) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            }
        }
    }

    /// Queues `series` read over `(from, to]` for `d`, past what it has
    /// already sent.
    fn enqueue(&self, d: &Destination, series: &[TimeSeries], from: i64, to: i64) {
        let done = d.sent_through.load(Ordering::Relaxed);
        if done >= to {
            return;
        }
        let mut q = d.queue.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut dropped = 0u64;
        for ts in series {
            let mut ts = ts.clone();
            if done > from {
                ts.samples.retain(|s| s.timestamp > done);
            }
            let n = ts.samples.len();
            if n == 0 {
                continue;
            }
            if q.samples + n > self.capacity {
                dropped += n as u64;
                continue;
            }
            q.samples += n;
            q.items.push_back(Item::Series(ts));
        }
        q.items.push_back(Item::Through(to));
        self.metrics
            .queued
            .get_or_create(&remote(d))
            .set(q.samples as i64);
        drop(q);
        if dropped > 0 {
            self.drop_samples(d, "queue_full", dropped);
            tracing::warn!(remote = %d.name, dropped, "remote write queue full: the receiver is behind; samples dropped");
        }
        d.queue.ready.notify_one();
    }

    fn drop_samples(&self, d: &Destination, reason: &'static str, n: u64) {
        self.metrics
            .dropped
            .get_or_create(&DropLabels {
                remote: d.name.clone(),
                reason,
            })
            .inc_by(n);
    }

    /// Takes up to a request's worth of samples, and the newest tick end
    /// everything taken completes.
    fn take(&self, d: &Destination) -> (Vec<TimeSeries>, Option<i64>) {
        let mut q = d.queue.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (mut batch, mut through, mut n) = (Vec::new(), None, 0usize);
        while let Some(item) = q.items.pop_front() {
            match item {
                Item::Through(t) => through = Some(t),
                Item::Series(mut ts) => {
                    let room = MAX_SAMPLES_PER_SEND - n;
                    if ts.samples.len() > room {
                        // The rest of the series stays first in line.
                        let rest = ts.samples.split_off(room);
                        q.items.push_front(Item::Series(TimeSeries {
                            labels: ts.labels.clone(),
                            samples: rest,
                        }));
                    }
                    n += ts.samples.len();
                    batch.push(ts);
                    if n == MAX_SAMPLES_PER_SEND {
                        break;
                    }
                }
            }
        }
        q.samples -= n;
        self.metrics
            .queued
            .get_or_create(&remote(d))
            .set(q.samples as i64);
        (batch, through)
    }

    async fn send_loop(self: Arc<Self>, d: Arc<Destination>, mut stop: watch::Receiver<bool>) {
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let (batch, through) = self.take(&d);
            if batch.is_empty() && through.is_none() {
                if deadline.is_some() {
                    return;
                }
                tokio::select! {
                    () = d.queue.ready.notified() => {}
                    _ = stop.wait_for(|s| *s) => {
                        deadline = Some(tokio::time::Instant::now() + DRAIN);
                    }
                }
                continue;
            }
            if !batch.is_empty() {
                if deadline.is_none() && *stop.borrow() {
                    deadline = Some(tokio::time::Instant::now() + DRAIN);
                }
                self.send(&d, batch, deadline, &mut stop).await;
            }
            if let Some(t) = through {
                d.sent_through.store(t, Ordering::Relaxed);
                self.save(&d, t);
            }
        }
    }

    fn save(&self, d: &Destination, through: i64) {
        let Some(file) = self.state_file(d) else {
            return;
        };
        let body = serde_json::json!({ "url": d.name, "sent_through_ms": through }).to_string();
        let tmp = file.with_extension("json.tmp");
        let written = file
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, body))
            .and_then(|()| std::fs::rename(&tmp, &file));
        if let Err(e) = written {
            tracing::debug!(error = %e, file = %file.display(), "cannot keep remote write progress");
        }
    }

    /// One request's samples, retried until accepted, refused for good, or
    /// (shutting down) past `deadline`.
    async fn send(
        &self,
        d: &Destination,
        batch: Vec<TimeSeries>,
        mut deadline: Option<tokio::time::Instant>,
        stop: &mut watch::Receiver<bool>,
    ) {
        let samples: usize = batch.iter().map(|t| t.samples.len()).sum();
        let newest = batch
            .iter()
            .filter_map(|t| t.samples.iter().map(|s| s.timestamp).max())
            .max();
        let body = snap::raw::Encoder::new()
            .compress_vec(&WriteRequest { timeseries: batch }.encode_to_vec());
        let body = match body {
            Ok(b) => bytes::Bytes::from(b),
            Err(e) => {
                tracing::warn!(remote = %d.name, error = %e, "remote write: cannot compress a batch");
                self.drop_samples(d, "rejected", samples as u64);
                return;
            }
        };
        let mut backoff = MIN_BACKOFF;
        loop {
            let wait = match self.post(d, body.clone()).await {
                Ok(()) => {
                    self.metrics
                        .sent
                        .get_or_create(&remote(d))
                        .inc_by(samples as u64);
                    if let Some(t) = newest {
                        self.metrics
                            .highest_sent
                            .get_or_create(&remote(d))
                            .set(t / 1000);
                    }
                    return;
                }
                Err(Failure::Fatal(message)) => {
                    tracing::warn!(remote = %d.name, samples, %message, "remote write refused a batch; dropped");
                    self.drop_samples(d, "rejected", samples as u64);
                    return;
                }
                Err(Failure::Retry(message, after)) => {
                    tracing::debug!(remote = %d.name, %message, "remote write failed; retrying");
                    after.unwrap_or(backoff)
                }
            };
            self.metrics.retries.get_or_create(&remote(d)).inc();
            backoff = (backoff * 2).min(MAX_BACKOFF);
            if deadline.is_none() && *stop.borrow() {
                deadline = Some(tokio::time::Instant::now() + DRAIN);
            }
            let until = tokio::time::Instant::now() + wait;
            if let Some(dl) = deadline
                && until > dl
            {
                self.drop_samples(d, "shutdown", samples as u64);
                tracing::warn!(remote = %d.name, samples, "shutting down: remote write batch not sent");
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                _ = stop.wait_for(|s| *s), if deadline.is_none() => {
                    deadline = Some(tokio::time::Instant::now() + DRAIN);
                }
            }
        }
    }

    async fn post(&self, d: &Destination, body: bytes::Bytes) -> Result<(), Failure> {
        let c = &self.credentials;
        let mut req = self
            .client
            .post(d.url.clone())
            .header(http::header::CONTENT_ENCODING, "snappy")
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .header("X-Prometheus-Remote-Write-Version", "0.1.0")
            .body(body);
        let file = |what, p: &PathBuf| {
            read_file(what, p)
                .map(|b| String::from_utf8_lossy(&b).trim().to_string())
                .map_err(|e| Failure::Retry(e.to_string(), None))
        };
        if let Some((user, password)) = &d.basic {
            req = req.basic_auth(user, password.as_deref());
        } else if let Some(user) = &c.username {
            let password = match &c.password_file {
                Some(p) => Some(file("--remote-write-password-file", p)?),
                None => None,
            };
            req = req.basic_auth(user, password);
        } else if let Some(p) = &c.bearer_token_file {
            req = req.bearer_auth(file("--remote-write-bearer-token-file", p)?);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Failure::Retry(e.to_string(), None))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
        let text = resp.text().await.unwrap_or_default();
        let message = format!(
            "{status}: {}",
            text.chars().take(256).collect::<String>().trim()
        );
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            Err(Failure::Retry(message, after))
        } else {
            Err(Failure::Fatal(message))
        }
    }
}

enum Failure {
    /// Worth trying again, after the receiver's `Retry-After` if it gave one.
    Retry(String, Option<Duration>),
    Fatal(String),
}

fn remote(d: &Destination) -> RemoteLabels {
    RemoteLabels {
        remote: d.name.clone(),
    }
}

/// The end of the newest ten-second window that has closed and settled.
fn closed_through(now_ms: i64) -> i64 {
    let w = INTERVAL.as_millis() as i64;
    (now_ms - SETTLE.as_millis() as i64).div_euclid(w) * w
}

/// Every series Lumen sends, with its samples in `(from, to]` (and a
/// series born at `from` its 0 there).
async fn read(
    engine: &QueryEngine,
    from: i64,
    to: i64,
    carry: &mut BTreeMap<Labels, f64>,
) -> Result<Vec<TimeSeries>, PromError> {
    let origin = "remote write".to_string();
    let every = match crate::promql::parse("{__name__=~\".+\"}")? {
        promql_parser::parser::Expr::VectorSelector(vs) => vs,
        other => {
            return Err(PromError::Execution(format!(
                "every series' selector parsed as {other}"
            )));
        }
    };
    let istio = IstioSource::new(engine.clone(), origin.clone()).exporting();
    let mut raw = istio.select(&every, from, to, None).await?;
    if carry.len() > MAX_CARRIED {
        carry.clear();
    }
    raw.extend(
        OtlpSource::new(engine.clone(), origin)
            .export(from, to, carry)
            .await?,
    );
    Ok(raw
        .into_iter()
        .filter(|s| !s.samples.is_empty())
        .map(|s| TimeSeries {
            labels: s
                .labels
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(name, value)| Label { name, value })
                .collect(),
            samples: s
                .samples
                .into_iter()
                .map(|(timestamp, value)| Sample { value, timestamp })
                .collect(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_out_of_the_url() {
        let (url, basic) = parse_url("https://team:p%40ss@mimir.example:8080/api/v1/push").unwrap();
        assert_eq!(url.as_str(), "https://mimir.example:8080/api/v1/push");
        assert_eq!(basic, Some(("team".into(), Some("p@ss".into()))));
        let (url, basic) = parse_url("http://127.0.0.1:9090/api/v1/write").unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:9090/api/v1/write");
        assert_eq!(basic, None);
        let e = parse_url("ftp://x/").unwrap_err().to_string();
        assert!(e.contains("http or https"), "{e}");
        assert!(parse_url("not a url").is_err());
    }

    #[test]
    fn windows_are_read_once_closed_and_settled() {
        // 12 s after a window ends it is read.
        assert_eq!(closed_through(1_000_022_000), 1_000_010_000);
        assert_eq!(closed_through(1_000_021_999), 1_000_000_000);
    }
}
