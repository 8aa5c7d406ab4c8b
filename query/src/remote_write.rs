//! Remote write sender: Lumen's series to any Prometheus remote-write
//! receiver (Prometheus with `--web.enable-remote-write-receiver`, Mimir,
//! Thanos, VictoriaMetrics).
//!
//! A reader follows the store every ten seconds, the rollups' resolution:
//! once a window has closed (and [`SETTLE`] more for late rows), it reads
//! Istio's series at that window's end ([`IstioExport`]: cumulative, as a
//! scrape every ten seconds would see them, staleness markers included)
//! and the apps' OTLP metrics by their Prometheus names
//! ([`OtlpSource::export`]), merges them so each series' samples are in
//! order, one per timestamp and never one already read, and puts them on
//! each destination's queue. The queue is bounded in samples; a read waits
//! a while for room, and what still does not fit is dropped and counted. Each
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

use std::collections::{BTreeMap, HashMap, VecDeque};
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
use crate::promql::istio::{IstioExport, IstioSource};
use crate::promql::otlp::OtlpSource;
use crate::promql::value::{Labels, RawSeries};

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
/// Longest a read waits for a receiver's queue to have room.
const ROOM_WAIT: Duration = Duration::from_secs(30);

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
    /// The URL without credentials or query values: for logs, metrics
    /// and the progress file.
    name: String,
    basic: UserInfo,
    queue: Queue,
    /// Reads through this time (ms) have gone out (or been dropped for
    /// good): a restart resumes after it.
    sent_through: AtomicI64,
    /// Newest sample time a receiver accepted (ms).
    highest_sent: AtomicI64,
}

/// Samples waiting for a destination, oldest read first.
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

/// A series' samples from the read that ended at `tick` (ms).
struct Item {
    series: TimeSeries,
    tick: i64,
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

/// A URL as given, with any `user:password@` hidden: for error messages.
fn redacted(raw: &str) -> String {
    if let Some(at) = raw.find("://") {
        let rest = &raw[at + 3..];
        let authority = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(creds) = rest[..authority].rfind('@') {
            return format!("{}://<credentials>@{}", &raw[..at], &rest[creds + 1..]);
        }
    }
    raw.to_string()
}

/// A URL with its credentials taken out, and its name for logs, metrics
/// and the progress file: without credentials, and query values (an API
/// key, often) hidden.
fn parse_url(raw: &str) -> Result<(reqwest::Url, UserInfo, String), RemoteWriteError> {
    let bad = |reason: String| RemoteWriteError::Url {
        url: redacted(raw),
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
    let mut named = url.clone();
    if url.query().is_some() {
        let hidden: Vec<(String, &str)> = url
            .query_pairs()
            .map(|(k, _)| (k.into_owned(), "hidden"))
            .collect();
        named.query_pairs_mut().clear().extend_pairs(hidden);
    }
    Ok((url, basic, named.to_string()))
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
            let (url, basic, name) = parse_url(raw)?;
            if destinations
                .iter()
                .any(|d: &Arc<Destination>| d.name == name)
            {
                return Err(RemoteWriteError::Url {
                    url: redacted(raw),
                    reason: "given twice (or differs from another only in its credentials or query values)".into(),
                });
            }
            destinations.push(Arc::new(Destination {
                url,
                name,
                basic,
                queue: Queue::default(),
                sent_through: AtomicI64::new(i64::MIN),
                highest_sent: AtomicI64::new(i64::MIN),
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
            .take(100)
            .collect();
        // Two URLs alike once made safe still get files of their own.
        let hash = twox_hash::XxHash64::oneshot(0, d.url.as_str().as_bytes());
        Some(
            self.state_dir
                .as_ref()?
                .join(format!("{safe}-{hash:016x}.json")),
        )
    }

    /// Reads the store and sends until `stop` turns true; then sends what
    /// is queued for a few more seconds.
    pub fn run(self, stop: watch::Receiver<bool>) -> lumen_core::BoxFuture<'static, ()> {
        Box::pin(self.send_until(stop))
    }

    async fn send_until(self, stop: watch::Receiver<bool>) {
        let this = Arc::new(self);
        if this.destinations.is_empty() {
            return;
        }
        let now = chrono::Utc::now().timestamp_millis();
        let start = closed_through(now);
        let oldest = start.saturating_sub(MAX_RESUME.as_millis() as i64);
        for d in &this.destinations {
            let resumed = this
                .state_file(d)
                .and_then(|f| std::fs::read_to_string(f).ok())
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .filter(|v| v["url"].as_str() == Some(d.name.as_str()))
                .and_then(|v| v["sent_through_ms"].as_i64())
                .filter(|t| (oldest..=start).contains(t));
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

    /// Whether every queue has room for a read's samples; waits up to
    /// [`ROOM_WAIT`] for it (a receiver that is down must not hold the
    /// others back for longer).
    async fn room(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let deadline = tokio::time::Instant::now() + ROOM_WAIT;
        loop {
            let full = self.destinations.iter().any(|d| {
                let q = d.queue.inner.lock().unwrap_or_else(|p| p.into_inner());
                q.samples > self.capacity / 2
            });
            if !full || tokio::time::Instant::now() >= deadline {
                return true;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.wait_for(|s| *s) => return false,
            }
        }
    }

    async fn read_loop(&self, mut stop: watch::Receiver<bool>) {
        let mut cursor = self
            .destinations
            .iter()
            .map(|d| d.sent_through.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        let mut state = ReadState::default();
        let step = INTERVAL.as_millis() as i64;
        let mut span = MAX_SPAN_MS;
        loop {
            let now = chrono::Utc::now().timestamp_millis();
            let through = closed_through(now);
            if through <= cursor {
                let next = cursor + step + SETTLE.as_millis() as i64;
                let wait = Duration::from_millis((next - now).clamp(100, 60_000) as u64);
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            if !self.room(&mut stop).await {
                return;
            }
            let to = through.min(cursor + span);
            let read = tokio::select! {
                r = state.read(&self.engine, cursor, to) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match read {
                Ok(series) => {
                    for d in &self.destinations {
                        self.enqueue(d, &series, cursor, to);
                    }
                    cursor = to;
                    span = MAX_SPAN_MS;
                }
                Err(e) => {
                    self.metrics.read_failures.inc();
                    // A read too big for the query limits is tried smaller.
                    span = (span / 2).max(step);
                    tracing::warn!(error = %e, "remote write: cannot read the store; trying again");
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
            q.items.push_back(Item {
                series: ts,
                tick: to,
            });
        }
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
        if n == 0 {
            return;
        }
        self.metrics
            .dropped
            .get_or_create(&DropLabels {
                remote: d.name.clone(),
                reason,
            })
            .inc_by(n);
    }

    /// Takes up to a request's worth of samples, and the newest read they
    /// come from.
    fn take(&self, d: &Destination) -> (Vec<TimeSeries>, Option<i64>) {
        let mut q = d.queue.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (mut batch, mut tick, mut n) = (Vec::new(), None, 0usize);
        while let Some(mut item) = q.items.pop_front() {
            let room = MAX_SAMPLES_PER_SEND - n;
            if item.series.samples.len() > room {
                // The rest of the series stays first in line.
                let rest = item.series.samples.split_off(room);
                q.items.push_front(Item {
                    series: TimeSeries {
                        labels: item.series.labels.clone(),
                        samples: rest,
                    },
                    tick: item.tick,
                });
            }
            n += item.series.samples.len();
            tick = tick.max(Some(item.tick));
            batch.push(item.series);
            if n == MAX_SAMPLES_PER_SEND {
                break;
            }
        }
        q.samples -= n;
        self.metrics
            .queued
            .get_or_create(&remote(d))
            .set(q.samples as i64);
        (batch, tick)
    }

    /// Counts everything still queued for `d` as dropped at shutdown.
    fn abandon_queue(&self, d: &Destination) {
        let mut q = d.queue.inner.lock().unwrap_or_else(|p| p.into_inner());
        let n = std::mem::take(&mut q.samples);
        q.items.clear();
        drop(q);
        self.metrics.queued.get_or_create(&remote(d)).set(0);
        if n > 0 {
            self.drop_samples(d, "shutdown", n as u64);
            tracing::warn!(remote = %d.name, samples = n, "shutting down: queued remote write samples not sent (a restart reads them again)");
        }
    }

    async fn send_loop(self: Arc<Self>, d: Arc<Destination>, mut stop: watch::Receiver<bool>) {
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            if deadline.is_some_and(|dl| tokio::time::Instant::now() >= dl) {
                self.abandon_queue(&d);
                return;
            }
            let (batch, tick) = self.take(&d);
            if batch.is_empty() {
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
            // A read whose samples have started going out is never read
            // again: after a crash its rest is skipped (one sample of some
            // series) rather than sent twice (refused as out of order).
            if let Some(t) = tick
                && t > d.sent_through.load(Ordering::Relaxed)
            {
                d.sent_through.store(t, Ordering::Relaxed);
                self.save(&d, t);
            }
            if self.send(&d, batch, &mut deadline, &mut stop).await == Sent::Abandoned {
                self.abandon_queue(&d);
                return;
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

    /// One request's samples, retried until accepted or refused for good
    /// — or, once shutting down, until `deadline`.
    async fn send(
        &self,
        d: &Destination,
        batch: Vec<TimeSeries>,
        deadline: &mut Option<tokio::time::Instant>,
        stop: &mut watch::Receiver<bool>,
    ) -> Sent {
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
                return Sent::Done;
            }
        };
        let mut backoff = MIN_BACKOFF;
        loop {
            let post = self.post(d, body.clone());
            tokio::pin!(post);
            let answer = loop {
                match *deadline {
                    Some(dl) => match tokio::time::timeout_at(dl, &mut post).await {
                        Ok(answer) => break answer,
                        Err(_) => {
                            self.drop_samples(d, "shutdown", samples as u64);
                            return Sent::Abandoned;
                        }
                    },
                    None => tokio::select! {
                        answer = &mut post => break answer,
                        _ = stop.wait_for(|s| *s) => {
                            *deadline = Some(tokio::time::Instant::now() + DRAIN);
                        }
                    },
                }
            };
            let wait = match answer {
                Ok(()) => {
                    self.metrics
                        .sent
                        .get_or_create(&remote(d))
                        .inc_by(samples as u64);
                    if let Some(t) = newest {
                        let highest = d.highest_sent.fetch_max(t, Ordering::Relaxed).max(t);
                        self.metrics
                            .highest_sent
                            .get_or_create(&remote(d))
                            .set(highest / 1000);
                    }
                    return Sent::Done;
                }
                Err(Failure::Fatal(message)) => {
                    tracing::warn!(remote = %d.name, samples, %message, "remote write refused a batch; dropped");
                    self.drop_samples(d, "rejected", samples as u64);
                    return Sent::Done;
                }
                Err(Failure::Retry(message, after)) => {
                    tracing::debug!(remote = %d.name, %message, "remote write failed; retrying");
                    // A `Retry-After: 0` is no reason to hammer the receiver.
                    after
                        .filter(|a| !a.is_zero())
                        .map_or(backoff, |a| a.max(backoff))
                }
            };
            self.metrics.retries.get_or_create(&remote(d)).inc();
            backoff = (backoff * 2).min(MAX_BACKOFF);
            let until = tokio::time::Instant::now() + wait;
            loop {
                if deadline.is_some_and(|dl| until > dl) {
                    self.drop_samples(d, "shutdown", samples as u64);
                    return Sent::Abandoned;
                }
                tokio::select! {
                    () = tokio::time::sleep_until(until) => break,
                    _ = stop.wait_for(|s| *s), if deadline.is_none() => {
                        *deadline = Some(tokio::time::Instant::now() + DRAIN);
                    }
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

/// How a batch's sending ended.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    /// Accepted, or refused for good (counted).
    Done,
    /// Shutting down: not sent (counted), nor anything queued after it.
    Abandoned,
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

/// What the reader carries from one read to the next.
#[derive(Default)]
struct ReadState {
    istio: IstioExport,
    /// Delta OTLP series' running totals.
    carry: BTreeMap<Labels, f64>,
    /// Each series' newest sample read: nothing at or before it is sent
    /// again (a receiver refuses a batch holding one).
    newest: HashMap<Labels, i64>,
}

impl ReadState {
    /// Every series Lumen sends, with its samples in `(from, to]` (and a
    /// series born at `from` its 0 there). What is carried changes only
    /// when the whole read succeeds, so a failed one can be tried again.
    async fn read(
        &mut self,
        engine: &QueryEngine,
        from: i64,
        to: i64,
    ) -> Result<Vec<TimeSeries>, PromError> {
        let origin = "remote write".to_string();
        let mut istio = self.istio.clone();
        let mut raw = istio
            .read(&IstioSource::new(engine.clone(), origin.clone()), from, to)
            .await?;
        let mut carry = if self.carry.len() > MAX_CARRIED {
            BTreeMap::new()
        } else {
            self.carry.clone()
        };
        raw.extend(
            OtlpSource::new(engine.clone(), origin)
                .export(from, to, &mut carry)
                .await?,
        );
        self.istio = istio;
        self.carry = carry;
        if self.newest.len() > MAX_CARRIED {
            self.newest.clear();
        }
        Ok(merge(raw, &mut self.newest))
    }
}

/// One entry per label set (two stored metrics may share a Prometheus
/// name), samples in time order, one per timestamp (the last), none at or
/// before what was read before; labels as the protocol wants them.
fn merge(raw: Vec<RawSeries>, newest: &mut HashMap<Labels, i64>) -> Vec<TimeSeries> {
    let mut merged: BTreeMap<Labels, Vec<(i64, f64)>> = BTreeMap::new();
    for s in raw {
        merged.entry(s.labels).or_default().extend(s.samples);
    }
    let mut out = Vec::with_capacity(merged.len());
    for (labels, mut samples) in merged {
        // Stable: of samples at one time, the last read stays last.
        samples.sort_by_key(|p| p.0);
        let mut unique: Vec<(i64, f64)> = Vec::with_capacity(samples.len());
        for p in samples {
            match unique.last_mut() {
                Some(last) if last.0 == p.0 => *last = p,
                _ => unique.push(p),
            }
        }
        let after = newest.get(&labels).copied().unwrap_or(i64::MIN);
        unique.retain(|p| p.0 > after);
        let Some(&(last, _)) = unique.last() else {
            continue;
        };
        newest.insert(labels.clone(), last);
        let mut labels: Vec<Label> = labels
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(name, value)| Label {
                // `:` is for metric names only.
                name: if name == "__name__" {
                    name
                } else {
                    name.replace(':', "_")
                },
                value,
            })
            .collect();
        labels.sort_by(|a, b| a.name.cmp(&b.name));
        out.push(TimeSeries {
            labels,
            samples: unique
                .into_iter()
                .map(|(timestamp, value)| Sample { value, timestamp })
                .collect(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_out_of_the_url() {
        let (url, basic, name) =
            parse_url("https://team:p%40ss@mimir.example:8080/api/v1/push?api_key=s3cret").unwrap();
        assert_eq!(
            url.as_str(),
            "https://mimir.example:8080/api/v1/push?api_key=s3cret"
        );
        assert_eq!(basic, Some(("team".into(), Some("p@ss".into()))));
        assert_eq!(
            name,
            "https://mimir.example:8080/api/v1/push?api_key=hidden"
        );
        let (url, basic, name) = parse_url("http://127.0.0.1:9090/api/v1/write").unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:9090/api/v1/write");
        assert_eq!(name, url.as_str());
        assert_eq!(basic, None);
        let e = parse_url("ftp://u:pw@x/").unwrap_err().to_string();
        assert!(e.contains("http or https") && !e.contains("pw"), "{e}");
        let e = parse_url("http://u:pw@ho st/").unwrap_err().to_string();
        assert!(
            e.contains("<credentials>@ho st") && !e.contains("pw"),
            "{e}"
        );
    }

    #[test]
    fn windows_are_read_once_closed_and_settled() {
        // 12 s after a window ends it is read.
        assert_eq!(closed_through(1_000_022_000), 1_000_010_000);
        assert_eq!(closed_through(1_000_021_999), 1_000_000_000);
    }

    #[test]
    fn merged_series_have_one_sample_per_time_in_order_and_none_twice() {
        let l = |n: &str| -> Labels {
            vec![
                ("__name__".into(), n.into()),
                ("a:b".into(), "x".into()),
                ("empty".into(), String::new()),
            ]
        };
        let mut newest = HashMap::new();
        let raw = vec![
            RawSeries {
                labels: l("up"),
                samples: vec![(20, 1.0), (10, 1.0)],
            },
            RawSeries {
                labels: l("up"),
                samples: vec![(20, 2.0), (30, 3.0)],
            },
        ];
        let got = merge(raw, &mut newest);
        assert_eq!(got.len(), 1);
        let times: Vec<(i64, f64)> = got[0]
            .samples
            .iter()
            .map(|s| (s.timestamp, s.value))
            .collect();
        assert_eq!(times, [(10, 1.0), (20, 2.0), (30, 3.0)]);
        let names: Vec<&str> = got[0].labels.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["__name__", "a_b"]);
        // Read again: only what is newer.
        let again = vec![RawSeries {
            labels: l("up"),
            samples: vec![(30, 9.0), (40, 4.0)],
        }];
        let got = merge(again, &mut newest);
        assert_eq!(got[0].samples.len(), 1);
        assert_eq!(got[0].samples[0].timestamp, 40);
    }
}
