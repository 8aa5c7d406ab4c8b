//! Collector ingest by path: the same request records sent as Arrow Flight
//! batches and as OTLP spans (both encoded by the proxy's own exporters),
//! beside the rate at which this machine can merely decode those OTLP
//! payloads, all in one run.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use arrow_flight::FlightData;
use arrow_flight::flight_service_client::FlightServiceClient;
use bytes::Bytes;
use lumen_core::schema::RequestBatchBuilder;
use lumen_core::{RequestRecord, Workload};
use lumen_proxy::telemetry::export::Payload;
use lumen_proxy::telemetry::sink::Sink;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use prost::Message;

use crate::peers::{self, CollectorPorts, local};
use crate::procstat;

pub struct Settings {
    pub duration: Duration,
    pub senders: usize,
    pub batch: usize,
}

pub struct Phase {
    pub label: &'static str,
    pub records_per_s: f64,
    pub calls: u64,
    pub failed: u64,
    pub lumen_cores: f64,
}

fn workload(service: &str, version: &str) -> Workload {
    Workload {
        service: service.into(),
        workload: format!("{service}-{version}").into(),
        namespace: "default".into(),
        version: version.into(),
    }
}

/// A batch's worth of records as a Bookinfo sidecar makes them.
fn records(n: usize, offset: usize) -> Vec<RequestRecord> {
    let now = SystemTime::now();
    (0..n)
        .map(|i| {
            let k = offset + i;
            RequestRecord {
                start_time: now,
                duration: Duration::from_micros(300 + (k as u64 * 7919) % 20_000),
                source: workload("productpage", "v1"),
                destination: workload("reviews", ["v1", "v2", "v3"][k % 3]),
                path: format!("/reviews/{}", k % 100),
                authority: "reviews:9080".into(),
                status: if k.is_multiple_of(50) { 503 } else { 200 },
                response_bytes: 300 + (k as u64 % 700),
                upstream_address: Some("10.0.0.7:9080".into()),
                trace_id: rand::random(),
                span_id: rand::random(),
                parent_span_id: Some(rand::random()),
                ..RequestRecord::example()
            }
        })
        .collect()
}

/// The same records, encoded once by each of the proxy's exporters.
async fn payloads(endpoint: &str, set: &Settings) -> Result<(Vec<Vec<FlightData>>, Vec<Bytes>)> {
    let timeout = Duration::from_secs(5);
    let flight =
        Sink::flight(endpoint, timeout, &Default::default()).map_err(anyhow::Error::msg)?;
    let otlp = Sink::otlp(
        endpoint,
        timeout,
        &Default::default(),
        &workload("productpage", "v1"),
    )
    .map_err(anyhow::Error::msg)?;
    let (mut arrow, mut spans) = (Vec::new(), Vec::new());
    for k in 0..8 {
        let mut b = RequestBatchBuilder::with_capacity(set.batch);
        for r in records(set.batch, k * set.batch) {
            b.push(&r);
        }
        let batch = b.finish()?;
        let id = Bytes::from(vec![0u8; 24]);
        match flight
            .encode(&id, batch.clone())
            .await
            .map_err(anyhow::Error::msg)?
        {
            Payload::Flight(frames) => arrow.push(frames),
            Payload::Otlp(_) => bail!("the Flight sink encoded OTLP"),
        }
        match otlp.encode(&id, batch).await.map_err(anyhow::Error::msg)? {
            Payload::Otlp(bytes) => spans.push(bytes),
            Payload::Flight(_) => bail!("the OTLP sink encoded Flight"),
        }
    }
    Ok((arrow, spans))
}

pub fn run(lumen: &Path, dir: &Path, set: &Settings) -> Result<Vec<Phase>> {
    let ports = CollectorPorts::pick()?;
    let mesh = peers::write_mesh(dir, local(9), false)?;
    let args = [
        "--flush-interval",
        "1h",
        "--flush-rows",
        "1000000000",
        "--max-hot-mib",
        "16384",
    ];
    let mut up = peers::start_collector(lumen, dir, &mesh, &ports, &args)?;
    let clk_tck = procstat::clock_ticks_per_sec();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let endpoint = format!("http://{}", local(ports.otlp_grpc));
    let result = rt.block_on(async {
        let (arrow, otlp) = payloads(&endpoint, set).await?;
        let mut phases = Vec::new();
        for label in ["Arrow Flight", "OTLP/gRPC"] {
            eprintln!("  {label} ({} s)", set.duration.as_secs());
            let before = procstat::cpu_ticks(up.pid())?;
            let (records, calls, failed) = if label == "Arrow Flight" {
                send_arrow(&endpoint, set, &arrow).await?
            } else {
                send_otlp(&endpoint, set, &otlp).await?
            };
            let ticks = procstat::cpu_ticks(up.pid())? - before;
            phases.push(Phase {
                label,
                records_per_s: records as f64 / set.duration.as_secs_f64(),
                calls,
                failed,
                lumen_cores: ticks as f64 / clk_tck as f64 / set.duration.as_secs_f64(),
            });
        }
        anyhow::Ok((phases, otlp))
    });
    up.check_alive()?;
    let (mut phases, otlp) = result?;
    eprintln!("  decode only ({} s)", set.duration.as_secs());
    phases.push(decode_only(&otlp, set)?);
    Ok(phases)
}

/// What the senders of one phase did, counted across their tasks.
#[derive(Clone, Default)]
struct Tally {
    records: Arc<AtomicU64>,
    calls: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl Tally {
    fn acknowledged(&self, records: u64) {
        self.records.fetch_add(records, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed call and pauses before the next.
    async fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    /// Waits for the senders, then gives (records, calls, failed).
    async fn total(self, senders: Vec<tokio::task::JoinHandle<()>>) -> Result<(u64, u64, u64)> {
        for s in senders {
            s.await?;
        }
        Ok((
            self.records.load(Ordering::Relaxed),
            self.calls.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        ))
    }
}

async fn send_arrow(
    endpoint: &str,
    set: &Settings,
    payloads: &[Vec<FlightData>],
) -> Result<(u64, u64, u64)> {
    let tally = Tally::default();
    let deadline = Instant::now() + set.duration;
    let mut tasks = Vec::new();
    for _ in 0..set.senders {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
            .tcp_nodelay(true)
            .connect()
            .await
            .context("connecting to the collector")?;
        let mut client = FlightServiceClient::new(channel);
        let (payloads, tally, rows) = (payloads.to_vec(), tally.clone(), set.batch as u64);
        tasks.push(tokio::spawn(async move {
            let producer: [u8; 16] = rand::random();
            let mut seq = 0u64;
            while Instant::now() < deadline {
                seq += 1;
                let mut frames = payloads[seq as usize % payloads.len()].clone();
                let mut id = producer.to_vec();
                id.extend_from_slice(&seq.to_le_bytes());
                frames[0].app_metadata = Bytes::from(id);
                let put = async {
                    let mut acks = client
                        .do_put(futures_util::stream::iter(frames))
                        .await?
                        .into_inner();
                    acks.message().await
                };
                match put.await {
                    Ok(Some(_)) => tally.acknowledged(rows),
                    _ => tally.failed().await,
                }
            }
        }));
    }
    tally.total(tasks).await
}

async fn send_otlp(endpoint: &str, set: &Settings, payloads: &[Bytes]) -> Result<(u64, u64, u64)> {
    let requests: Vec<ExportTraceServiceRequest> = payloads
        .iter()
        .map(|b| ExportTraceServiceRequest::decode(b.as_ref()))
        .collect::<Result<_, _>>()?;
    let tally = Tally::default();
    let deadline = Instant::now() + set.duration;
    let mut tasks = Vec::new();
    for _ in 0..set.senders {
        let mut client = TraceServiceClient::connect(endpoint.to_string())
            .await
            .context("connecting to the collector")?;
        let (requests, tally, rows) = (requests.clone(), tally.clone(), set.batch as u64);
        tasks.push(tokio::spawn(async move {
            let mut k = 0;
            while Instant::now() < deadline {
                k += 1;
                match client.export(requests[k % requests.len()].clone()).await {
                    Ok(_) => tally.acknowledged(rows),
                    Err(_) => tally.failed().await,
                }
            }
        }));
    }
    tally.total(tasks).await
}

/// Protobuf decoding of the same OTLP payloads, on every core, and nothing
/// else: the ceiling any OTLP receiver on this machine works under.
fn decode_only(payloads: &[Bytes], set: &Settings) -> Result<Phase> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let deadline = Instant::now() + set.duration;
    let decoded = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for _ in 0..cores {
            let decoded = decoded.clone();
            s.spawn(move || {
                let mut k = 0;
                while Instant::now() < deadline {
                    k += 1;
                    if let Ok(r) =
                        ExportTraceServiceRequest::decode(payloads[k % payloads.len()].as_ref())
                    {
                        let spans: usize = r
                            .resource_spans
                            .iter()
                            .flat_map(|rs| &rs.scope_spans)
                            .map(|ss| ss.spans.len())
                            .sum();
                        decoded.fetch_add(spans as u64, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    Ok(Phase {
        label: "OTLP decode only (no collector)",
        records_per_s: decoded.load(Ordering::Relaxed) as f64 / set.duration.as_secs_f64(),
        calls: 0,
        failed: 0,
        lumen_cores: 0.0,
    })
}

pub fn render(command: &str, machine: &str, set: &Settings, phases: &[Phase]) -> String {
    let mut out = crate::report::header(
        "Lumen collector ingest by path",
        command,
        &crate::report::now(),
        machine,
    );
    let w = &mut out;
    let _ = writeln!(
        w,
        "- load: {} senders, {} request records per call (encoded by the proxy's own Arrow \
         and OTLP exporters), each sending when the last is acknowledged, {} s per phase; \
         decode only: prost decoding of the same OTLP payloads on every core\n",
        set.senders,
        set.batch,
        set.duration.as_secs()
    );
    let _ = writeln!(w, "| path | records/s | calls | failed | lumen cores |");
    let _ = writeln!(w, "|---|---:|---:|---:|---:|");
    for p in phases {
        let _ = writeln!(
            w,
            "| {} | {:.0} | {} | {} | {:.2} |",
            p.label, p.records_per_s, p.calls, p.failed, p.lumen_cores
        );
    }
    if let [arrow, otlp, decode] = phases {
        let _ = writeln!(
            w,
            "\nArrow path: **{:.0}** records/s (goal ≥ 1,000,000). OTLP path / decode only: \
             **{:.2}** (goal ≥ 0.25).",
            arrow.records_per_s,
            otlp.records_per_s / decode.records_per_s.max(1.0)
        );
    }
    out
}
