//! `lumen-bench`: side-by-side benchmarks of Lumen against the peers its
//! users would otherwise run. See bench/README.md.

#![forbid(unsafe_code)]

mod dashboard;
mod grpc;
mod http;
mod ingest;
mod lb;
mod limits;
mod load;
mod otlp;
mod paths;
mod peers;
mod procstat;
mod push;
mod reaction;
mod report;
mod routes;
mod rules;
mod scenario;
mod storage;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use scenario::{Scenario, Settings, Stress};

#[derive(Parser)]
#[command(
    name = "lumen-bench",
    about = "Benchmarks Lumen against its peers on loopback",
    long_about = "Benchmarks Lumen against its peers on loopback.\n\n\
        Needs nginx, envoy, wrk and oha on PATH (bench/install-peers.sh installs them) \
        and the lumen release binary (built with `cargo build --release -p lumen` if missing)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Two-sidecar HTTP/1.1 data path: nginx direct, Lumen with telemetry on
    /// and off, and Envoy; max throughput (wrk), latency at a fixed rate (oha),
    /// proxy CPU per request and memory.
    #[command(
        long_about = "Two-sidecar HTTP/1.1 data path, one scenario at a time:\n\
        \n  a  load → nginx\
        \n  b  load → Lumen client sidecar → Lumen server sidecar → nginx, telemetry on (with `lumen up` as collector)\
        \n  c  as b, --telemetry off on both sidecars\
        \n  d  load → Envoy client → Envoy server → nginx (--concurrency 1, no access log)\
        \n  e  as b, the hop between the sidecars mutual TLS (mesh CA, STRICT)\
        \n  f  as d, the hop between the Envoys mutual TLS (TLS 1.3, client certificates)\
        \n\nEach scenario: warm-up, then wrk for max throughput, then oha at a fixed rate for \
        p50/p99 latency while the proxies' CPU time is read from /proc. Prints a Markdown table \
        and writes it to bench/results/latest.md. Defaults take about 6 minutes."
    )]
    Proxy(ProxyArgs),
    /// The gRPC app the proxy benchmark's `--grpc` case runs behind the proxies.
    #[command(hide = true)]
    GrpcUpstream(GrpcUpstreamArgs),
    /// Collector ingest rate alone and with a runaway query beside it, in
    /// one run; reports the ratio.
    #[command(
        long_about = "Collector ingest rate alone and beside a runaway query, in one run.\n\n\
        One `lumen up` (release build); OTLP/gRPC senders export request spans as fast as \
        they are acknowledged, first alone, then while a three-way self cross join runs \
        on the query service. Prints a Markdown table with the ratio and writes it to \
        bench/results/ingest.md. Defaults take about 30 seconds."
    )]
    Ingest(IngestArgs),
    /// Bytes on disk per `requests` row on the demo's traffic, per column.
    #[command(
        long_about = "Bytes on disk per `requests` row on the demo's traffic.\n\n\
        Runs `lumen demo` (release build) for a while with one flush at the end, then reads \
        the Parquet files' metadata: bytes per row in all, per column with its encodings, and \
        the floor set by the ids' entropy. Writes bench/results/storage.md. Defaults take \
        about a minute."
    )]
    Storage(StorageArgs),
    /// Mixed OTLP ingest (traces, metrics, logs) per core, and bytes per
    /// item on disk after compaction.
    #[command(
        long_about = "Mixed OTLP ingest per core, and bytes per item on disk after compaction.\n\n\
        One `lumen up` (release build); OTLP/gRPC senders cycle traces, metrics and logs from many \
        resources, each export sent when the last is acknowledged. Reports items per second per \
        core of `lumen up` beside the OpenTelemetry Collector's published sizing, then waits for \
        flush and compaction and reports bytes per span, data point and log record. Writes \
        bench/results/otlp.md. Defaults take about a minute."
    )]
    Otlp(OtlpArgs),
    /// Collector ingest of the same records by Arrow Flight and by OTLP,
    /// beside the rate of decoding those OTLP payloads alone.
    #[command(long_about = "Collector ingest by path, in one run.\n\n\
        One `lumen up` (release build). Request records, encoded once by the proxy's own \
        Arrow and OTLP exporters, are sent as fast as they are acknowledged: first as Arrow \
        Flight DoPut batches, then as OTLP/gRPC exports; then the same OTLP payloads are only \
        decoded (protobuf), on every core, as the ceiling of any OTLP receiver. Writes \
        bench/results/collector.md. Defaults take about 40 seconds.")]
    Collector(CollectorArgs),
    /// Dashboard queries over ≥ 20 M rows of Lumen's Parquet files: Lumen
    /// vs DuckDB vs chDB, and PromQL over rollups vs over raw rows.
    #[command(
        long_about = "Dashboard queries, in one run.\n\n        Generates request rows over the last hour, sends them to `lumen up` (release build) \
        over Arrow Flight, waits until all are in Parquet, restarts `lumen up` on the files, \
        then times nine dashboard queries through Lumen's HTTP SQL API and in DuckDB and chDB \
        (Python packages `duckdb`, `chdb`) reading the same files, and four PromQL panels \
        over an hour from rollups and from raw rows. Writes bench/results/dashboard.md. \
        Defaults take about 15 minutes and 4 GB of disk."
    )]
    Dashboard(DashboardArgs),
    /// Balancers around a slow endpoint: Lumen's round robin, least request
    /// and LEAST_LATENCY beside Envoy's LEAST_REQUEST, p99 at a fixed rate.
    #[command(long_about = "Balancers around a slow endpoint, in one run.\n\n\
        Three upstreams, one answering --slow-ms late; one proxy (one worker) in front: a Lumen \
        sidecar with each DestinationRule balancer (ROUND_ROBIN, LEAST_REQUEST, LEAST_LATENCY) \
        and Envoy with LEAST_REQUEST; oha at a fixed rate; p50/p99 and the slow endpoint's share. \
        Writes bench/results/balance.md. Defaults take about 3 minutes.")]
    Balance(BalanceArgs),
    /// Configuration push from `lumen control` to many proxies' streams:
    /// time until all have a change and acknowledged it, and memory.
    #[command(long_about = "Configuration push to many proxies, in one run.\n\n\
        `lumen control` (release build) with --services services (endpoints, DestinationRule, \
        VirtualService each); --proxies simulated proxies open a config stream each and \
        acknowledge every snapshot; --changes weight changes are applied. Reports the time \
        until every proxy has each change and until all acknowledged it, and the control \
        plane's RSS. Writes bench/results/push.md. Defaults take under a minute.")]
    Push(PushArgs),
    /// A large route table: CPU per request with 1 and with 1,000
    /// VirtualService routes (regex and header matches), beside Envoy.
    #[command(long_about = "A large route table, in one run.\n\n\
        One upstream behind one proxy (one worker) whose service has 1 route, then --routes \
        routes (URI regexes, half with a header match), every request taking the last one; \
        Lumen (an Istio VirtualService, every request recorded) and Envoy (the same routes); \
        oha at a fixed rate; the proxy's CPU per request, and what the large table adds. \
        Writes bench/results/routes.md. Defaults take about 3 minutes.")]
    Routes(RoutesArgs),
    /// The slow upstream of the balance benchmark.
    #[command(hide = true)]
    SlowUpstream(SlowUpstreamArgs),
    /// The policy loop's reaction time: breach in traffic → first 429.
    #[command(long_about = "Policy reaction time, in one run.\n\n\
        `lumen up` (release build) with a rule over the last 5 s of Istio's series and a \
        conditional RateLimit; one calling sidecar following its control plane; nginx behind. \
        A steady load; each trial makes half the calls fail until the first 429, then stops. \
        Reports p50 / p99 of first 503 → first 429 over --trials, beside Prometheus + \
        Alertmanager's default intervals (computed). Writes bench/results/reaction.md. \
        Defaults take about 5 minutes.")]
    Reaction(ReactionArgs),
    /// The cost of enforcing RateLimits at the sidecar: CPU per request
    /// with none, and with 100 (one applying, and all applying).
    #[command(long_about = "The cost of enforcement at the sidecar, in one run.\n\n\
        One upstream behind one Lumen sidecar (one worker, telemetry on): no RateLimit, then \
        --limits RateLimits each on a path of its own (one applies to a request), then \
        --limits all applying. Limits far above the load; oha at a fixed rate; CPU per request \
        and latency. Writes bench/results/limits.md. Defaults take about 2 minutes.")]
    Limits(LimitsArgs),
    /// Rule evaluation: `lumen demo`'s CPU with its shipped rules and with
    /// 1,000 more alerting rules at a 1 s interval.
    #[command(long_about = "Rule evaluation cost, in one run.\n\n\
        `lumen demo` (release build) with Lumen's shipped rules, then with --rules more alerting \
        rules over the demo's series, every group each second; the process's CPU over a window, \
        and the groups' evaluation times. Writes bench/results/rules.md. Defaults take about \
        2 minutes.")]
    Rules(RulesArgs),
}

#[derive(Args)]
struct RulesArgs {
    #[arg(long, default_value_t = 1000)]
    rules: usize,
    /// Seconds of traffic before measuring.
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 30)]
    measure: u64,
    /// The lumen binary [default: <workspace>/target/release/lumen].
    #[arg(long)]
    lumen: Option<PathBuf>,
    #[arg(long, default_value_os_t = peers::workspace_root().join("bench/results/rules.md"))]
    out: PathBuf,
    #[arg(long)]
    keep_temp: bool,
}

#[derive(Args)]
struct LimitsArgs {
    /// Requests per second (fixed rate).
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// oha connections.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Rounds, interleaved; the report shows medians.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// RateLimits on the service.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    limits: u64,
    /// The lumen binary [default: <workspace>/target/release/lumen].
    #[arg(long)]
    lumen: Option<PathBuf>,
    #[arg(long, default_value_os_t = peers::workspace_root().join("bench/results/limits.md"))]
    out: PathBuf,
    #[arg(long)]
    keep_temp: bool,
}

#[derive(Args)]
struct ReactionArgs {
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Calls per second of the steady load.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// `lumen up --evaluation-interval`.
    #[arg(long, default_value = "1s")]
    evaluation_interval: String,
    /// The lumen binary [default: <workspace>/target/release/lumen].
    #[arg(long)]
    lumen: Option<PathBuf>,
    #[arg(long, default_value_os_t = peers::workspace_root().join("bench/results/reaction.md"))]
    out: PathBuf,
    #[arg(long)]
    keep_temp: bool,
}

#[derive(Args)]
struct BalanceArgs {
    /// Requests per second (fixed rate).
    #[arg(long, default_value_t = 300)]
    rate: u32,
    /// oha connections.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Rounds, interleaved; the report shows medians.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// How late the slow endpoint answers.
    #[arg(long, default_value_t = 50)]
    slow_ms: u64,
    /// The lumen binary [default: <workspace>/target/release/lumen].
    #[arg(long)]
    lumen: Option<PathBuf>,
    #[arg(long, default_value_os_t = peers::workspace_root().join("bench/results/balance.md"))]
    out: PathBuf,
    #[arg(long)]
    keep_temp: bool,
}

#[derive(Args)]
struct PushArgs {
    #[arg(long, default_value_t = 1000)]
    proxies: usize,
    #[arg(long, default_value_t = 100)]
    services: usize,
    #[arg(long, default_value_t = 5)]
    changes: usize,
    /// The lumen binary [default: <workspace>/target/release/lumen].
    #[arg(long)]
    lumen: Option<PathBuf>,
    #[arg(long, default_value_os_t = peers::workspace_root().join("bench/results/push.md"))]
    out: PathBuf,
    #[arg(long)]
    keep_temp: bool,
}

#[derive(Args)]
struct RoutesArgs {
    /// Requests per second (fixed rate).
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// oha connections.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Rounds, interleaved; the report shows medians.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Routes in the large table.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(2..))]
    routes: u64,
    /// The lumen binary [default: <workspace>/target/release/lumen].
    #[arg(long)]
    lumen: Option<PathBuf>,
    #[arg(long, default_value_os_t = peers::workspace_root().join("bench/results/routes.md"))]
    out: PathBuf,
    #[arg(long)]
    keep_temp: bool,
}

#[derive(Args)]
struct SlowUpstreamArgs {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

#[derive(Args)]
struct DashboardArgs {
    /// Request rows to generate.
    #[arg(long, default_value_t = 20_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    rows: u64,
    /// Timed runs of each query (after one warm-up); the report shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// The lumen binary [default: <workspace>/target/release/lumen].
    #[arg(long)]
    lumen: Option<PathBuf>,
    /// Where the Markdown report is written.
    #[arg(long, default_value_os_t = peers::workspace_root().join("bench/results/dashboard.md"))]
    out: PathBuf,
    /// Keep the temporary directory (collector data and logs).
    #[arg(long)]
    keep_temp: bool,
}

#[derive(Args)]
struct CollectorArgs {
    /// Seconds of each phase.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    duration: u64,
    /// Concurrent senders.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    senders: u32,
    /// Request records per call.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// The lumen binary [default: <workspace>/target/release/lumen].
    #[arg(long)]
    lumen: Option<PathBuf>,
    /// Where the Markdown report is written.
    #[arg(long, default_value_os_t = peers::workspace_root().join("bench/results/collector.md"))]
    out: PathBuf,
    /// Keep the temporary directory (collector log and data).
    #[arg(long)]
    keep_temp: bool,
}

#[derive(Args)]
struct StorageArgs {
    /// Seconds of demo traffic.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    duration: u64,
    /// Requests per second into the demo's productpage.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    rps: u32,
    /// The lumen binary [default: <workspace>/target/release/lumen].
    #[arg(long)]
    lumen: Option<PathBuf>,
    /// Where the Markdown report is written.
    #[arg(long, default_value_os_t = peers::workspace_root().join("bench/results/storage.md"))]
    out: PathBuf,
    /// Keep the temporary directory (demo log and data).
    #[arg(long)]
    keep_temp: bool,
}

#[derive(Args)]
struct IngestArgs {
    /// Seconds of each phase.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    duration: u64,
    /// Concurrent OTLP senders.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    senders: u32,
    /// Request spans per export.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// More flags for `lumen up` (repeat for each), e.g. `--up-arg=--query-threads=1`.
    #[arg(long = "up-arg", value_name = "FLAG", allow_hyphen_values = true)]
    up_args: Vec<String>,
    /// Rows stored before the run, which the runaway joins three ways.
    #[arg(long, default_value_t = 1500)]
    seed_rows: usize,
    /// The lumen binary [default: <workspace>/target/release/lumen].
    #[arg(long)]
    lumen: Option<PathBuf>,
    /// Where the Markdown report is written.
    #[arg(long, default_value_os_t = peers::workspace_root().join("bench/results/ingest.md"))]
    out: PathBuf,
    /// Keep the temporary directory (process logs, collector data).
    #[arg(long)]
    keep_temp: bool,
}

#[derive(Args)]
struct ProxyArgs {
    /// Seconds of each measurement (the wrk run and the oha run).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    duration: u64,
    /// Seconds of wrk load before measuring, to open connections and warm caches.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Requests per second of the fixed-rate latency run.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    /// Concurrent connections of both load generators [default: 32 for wrk, 16 for oha].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    connections: Option<u32>,
    /// Times each scenario is measured; the report shows medians. Rounds
    /// interleave the scenarios so that a slow minute of a shared machine
    /// does not land on one of them only.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Scenarios to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "a,b,c,d")]
    scenario: Vec<Scenario>,
    /// The lumen binary [default: <workspace>/target/release/lumen].
    #[arg(long)]
    lumen: Option<PathBuf>,
    /// Where the Markdown report is written.
    #[arg(long, default_value_os_t = peers::workspace_root().join("bench/results/latest.md"))]
    out: PathBuf,
    /// Keep the temporary directory (configs, process logs, collector data).
    #[arg(long)]
    keep_temp: bool,
    /// POST a body of this many bytes with every request (e.g. 65536)
    /// instead of a GET.
    #[arg(long, conflicts_with = "grpc")]
    body_bytes: Option<usize>,
    /// gRPC unary calls over HTTP/2 to a gRPC app instead of HTTP/1.1 GETs
    /// to nginx; oha measures throughput too (wrk has no HTTP/2).
    #[arg(long)]
    grpc: bool,
    /// gRPC server-streaming calls over HTTP/2 instead: Arrow Flight
    /// `DoGet`, each answered with 16 messages of 1 KiB.
    #[arg(long, conflicts_with_all = ["grpc", "body_bytes"])]
    grpc_stream: bool,
    /// Stresses beside the latency run, comma-separated: each scenario that
    /// records telemetry runs once per stress, the others with none.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "none")]
    stress: Vec<Stress>,
    /// Worker threads of every proxy (Lumen `--workers`, Envoy `--concurrency`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    workers: u16,
    /// Every request between the two sidecars on a connection of its own
    /// (Lumen: DestinationRule `maxRequestsPerConnection: 1`; Envoy:
    /// `max_requests_per_connection: 1`): with (e) and (f), throughput is
    /// new mTLS handshakes per second and CPU per request is per handshake.
    #[arg(long, conflicts_with = "grpc")]
    fresh_connections: bool,
}

#[derive(Args)]
struct GrpcUpstreamArgs {
    #[arg(long)]
    port: u16,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Proxy(a) => proxy(a),
        Command::Ingest(a) => ingest_bench(a),
        Command::Storage(a) => storage_bench(a),
        Command::Otlp(a) => otlp_bench(a),
        Command::Collector(a) => collector_bench(a),
        Command::Dashboard(a) => dashboard_bench(a),
        Command::GrpcUpstream(a) => grpc::serve(a.port),
        Command::Balance(a) => balance_bench(a),
        Command::Push(a) => push_bench(a),
        Command::Routes(a) => routes_bench(a),
        Command::Reaction(a) => reaction_bench(a),
        Command::Limits(a) => limits_bench(a),
        Command::Rules(a) => rules_bench(a),
        Command::SlowUpstream(a) => {
            lb::serve_upstream(a.port, std::time::Duration::from_millis(a.delay_ms))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn proxy(mut a: ProxyArgs) -> Result<()> {
    a.scenario.sort();
    a.scenario.dedup();
    let mut needed = vec!["nginx", "wrk", "oha", "perf"];
    if a.scenario.iter().any(|s| s.is_envoy()) {
        needed.push("envoy");
    }
    peers::check_installed(&needed)?;
    // Building lumen takes minutes; an nginx- or Envoy-only run should not.
    let lumen = if a.scenario.iter().any(|s| s.is_lumen()) {
        Some(peers::lumen_binary(a.lumen.as_deref())?)
    } else {
        None
    };

    let tmp = TempDir::create(a.keep_temp)?;
    let set = Settings {
        lumen: lumen.clone().unwrap_or_default(),
        tmp: tmp.path.clone(),
        duration: a.duration,
        warmup: a.warmup,
        rate: a.rate,
        wrk_connections: a.connections.unwrap_or(32),
        oha_connections: a.connections.unwrap_or(16),
        clk_tck: procstat::clock_ticks_per_sec(),
        body: match (a.body_bytes, a.grpc, a.grpc_stream) {
            (_, true, _) => {
                let path = tmp.path.join("grpc-request.bin");
                fs::write(&path, grpc::request_body())?;
                Some(path)
            }
            (_, _, true) => {
                let path = tmp.path.join("grpc-stream-request.bin");
                fs::write(&path, grpc::stream_request_body())?;
                Some(path)
            }
            (Some(n), false, false) => {
                let path = tmp.path.join(format!("body-{n}.bin"));
                fs::write(&path, vec![b'x'; n])?;
                Some(path)
            }
            (None, false, false) => None,
        },
        grpc: match (a.grpc, a.grpc_stream) {
            (true, _) => Some(grpc::PATH),
            (_, true) => Some(grpc::STREAM_PATH),
            _ => None,
        },
        workers: a.workers,
        fresh_connections: a.fresh_connections,
    };
    let ctx = report::Context {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        date: report::now(),
        machine: machine(),
        versions: peers::versions(lumen.as_deref()),
        duration: set.duration,
        warmup: set.warmup,
        rate: set.rate,
        wrk_connections: set.wrk_connections,
        oha_connections: set.oha_connections,
        rounds: a.rounds,
        body_bytes: a.body_bytes,
        grpc: set.grpc,
        workers: a.workers,
        fresh_connections: a.fresh_connections,
    };

    a.stress.sort();
    a.stress.dedup();
    let cases: Vec<(Scenario, Stress)> = a
        .scenario
        .iter()
        .flat_map(|&s| {
            let stresses: &[Stress] = if s.records() {
                &a.stress
            } else {
                &[Stress::None]
            };
            stresses.iter().map(move |&t| (s, t))
        })
        .collect();
    let mut runs: Vec<Vec<_>> = cases.iter().map(|_| Vec::new()).collect();
    for (round, i) in (1..=a.rounds).flat_map(|r| (0..cases.len()).map(move |i| (r, i))) {
        let (s, stress) = cases[i];
        let label = format!("{}{}", s.label(), stress.label());
        eprintln!("{label} (round {round} of {})", a.rounds);
        let m =
            scenario::run(s, stress, round, &set).with_context(|| format!("scenario {label}"))?;
        if !m.oha.clean() {
            eprintln!(
                "  warning: not every fixed-rate request succeeded: {:.2}% success, \
                 statuses {:?}, errors {:?}",
                m.oha.success_rate * 100.0,
                m.oha.bad_statuses,
                m.oha.errors
            );
        }
        if m.wrk.socket_errors + m.wrk.non_2xx_3xx > 0 {
            eprintln!(
                "  warning: wrk saw {} socket errors and {} non-2xx/3xx responses",
                m.wrk.socket_errors, m.wrk.non_2xx_3xx
            );
        }
        if let Some(t) = m
            .telemetry
            .as_ref()
            .filter(|t| t.missing() != 0 || t.dropped > 0)
        {
            eprintln!("  warning: telemetry: {}", t.summary());
        }
        if m.noisy() {
            let [w, o] = m.background;
            eprintln!(
                "  warning: other processes used {:.0}% / {:.0}% of the machine during wrk / oha \
                 (steal {:.0}% / {:.0}%); numbers are suspect, rerun on a quiet machine",
                w.other * 100.0,
                o.other * 100.0,
                w.steal * 100.0,
                o.steal * 100.0
            );
        }
        runs[i].push(m);
    }

    let text = report::render(&ctx, &runs);
    write_report(&a.out, &text)?;
    if a.keep_temp {
        eprintln!("kept {}", tmp.path.display());
    }
    Ok(())
}

#[derive(Args)]
struct OtlpArgs {
    /// Seconds of load.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    duration: u64,
    /// Concurrent OTLP senders.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    senders: u32,
    /// Resources (service instances) per export.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    resources: u32,
    /// Items per resource per export.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    per_resource: u32,
    /// The lumen binary [default: <workspace>/target/release/lumen].
    #[arg(long)]
    lumen: Option<PathBuf>,
    /// Where the Markdown report is written.
    #[arg(long, default_value_os_t = peers::workspace_root().join("bench/results/otlp.md"))]
    out: PathBuf,
    /// Keep the temporary directory (process logs, collector data).
    #[arg(long)]
    keep_temp: bool,
}

fn otlp_bench(a: OtlpArgs) -> Result<()> {
    let lumen = peers::lumen_binary(a.lumen.as_deref())?;
    let tmp = TempDir::create(a.keep_temp)?;
    let set = otlp::Settings {
        duration: std::time::Duration::from_secs(a.duration),
        senders: a.senders as usize,
        resources: a.resources as usize,
        per_resource: a.per_resource as usize,
    };
    let outcome = otlp::run(&lumen, &tmp.path, &set)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let text = otlp::render(&command, &machine(), &set, &outcome);
    write_report(&a.out, &text)?;
    if a.keep_temp {
        eprintln!("kept {}", tmp.path.display());
    }
    Ok(())
}

fn push_bench(a: PushArgs) -> Result<()> {
    let lumen = peers::lumen_binary(a.lumen.as_deref())?;
    let tmp = TempDir::create(a.keep_temp)?;
    let set = push::Settings {
        proxies: a.proxies,
        services: a.services,
        changes: a.changes,
    };
    let outcome = push::run(&lumen, &tmp.path, &set)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    write_report(&a.out, &push::render(&command, &machine(), &set, &outcome))?;
    Ok(())
}

fn rules_bench(a: RulesArgs) -> Result<()> {
    let lumen = peers::lumen_binary(a.lumen.as_deref())?;
    let tmp = TempDir::create(a.keep_temp)?;
    let set = rules::Settings {
        rules: a.rules,
        warmup: std::time::Duration::from_secs(a.warmup),
        measure: std::time::Duration::from_secs(a.measure),
    };
    let runs = rules::run(&lumen, &tmp.path, &set)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    write_report(&a.out, &rules::render(&command, &machine(), &set, &runs))?;
    Ok(())
}

fn limits_bench(a: LimitsArgs) -> Result<()> {
    peers::check_installed(&["oha"])?;
    let lumen = peers::lumen_binary(a.lumen.as_deref())?;
    let tmp = TempDir::create(a.keep_temp)?;
    let set = limits::Settings {
        rate: a.rate,
        connections: a.connections,
        secs: a.duration,
        rounds: a.rounds,
        limits: a.limits as usize,
    };
    let cases = limits::run(&lumen, &tmp.path, &set)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    write_report(&a.out, &limits::render(&command, &machine(), &set, &cases))?;
    Ok(())
}

fn reaction_bench(a: ReactionArgs) -> Result<()> {
    let lumen = peers::lumen_binary(a.lumen.as_deref())?;
    let tmp = TempDir::create(a.keep_temp)?;
    let set = reaction::Settings {
        trials: a.trials,
        rate: a.rate,
        evaluation_interval: a.evaluation_interval,
    };
    let outcome = reaction::run(&lumen, &tmp.path, &set)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    write_report(
        &a.out,
        &reaction::render(&command, &machine(), &set, &outcome),
    )?;
    Ok(())
}

fn routes_bench(a: RoutesArgs) -> Result<()> {
    peers::check_installed(&["envoy", "oha"])?;
    let lumen = peers::lumen_binary(a.lumen.as_deref())?;
    let tmp = TempDir::create(a.keep_temp)?;
    let set = routes::Settings {
        rate: a.rate,
        connections: a.connections,
        secs: a.duration,
        rounds: a.rounds,
        routes: a.routes as usize,
    };
    let cases = routes::run(&lumen, &tmp.path, &set)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    write_report(&a.out, &routes::render(&command, &machine(), &set, &cases))?;
    Ok(())
}

fn balance_bench(a: BalanceArgs) -> Result<()> {
    peers::check_installed(&["envoy", "oha"])?;
    let lumen = peers::lumen_binary(a.lumen.as_deref())?;
    let tmp = TempDir::create(a.keep_temp)?;
    let set = lb::Settings {
        rate: a.rate,
        connections: a.connections,
        secs: a.duration,
        rounds: a.rounds,
        slow_ms: a.slow_ms,
    };
    let results = lb::run(&lumen, &tmp.path, &set)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    write_report(&a.out, &lb::render(&command, &machine(), &set, &results))?;
    Ok(())
}

fn ingest_bench(a: IngestArgs) -> Result<()> {
    let lumen = peers::lumen_binary(a.lumen.as_deref())?;
    let tmp = TempDir::create(a.keep_temp)?;
    let set = ingest::Settings {
        duration: std::time::Duration::from_secs(a.duration),
        senders: a.senders as usize,
        batch: a.batch as usize,
        seed_rows: a.seed_rows,
        up_args: a.up_args.clone(),
    };
    let phases = ingest::run(&lumen, &tmp.path, &set)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let text = ingest::render(&command, &machine(), &set, &phases);
    write_report(&a.out, &text)?;
    if a.keep_temp {
        eprintln!("kept {}", tmp.path.display());
    }
    Ok(())
}

fn collector_bench(a: CollectorArgs) -> Result<()> {
    let lumen = peers::lumen_binary(a.lumen.as_deref())?;
    let tmp = TempDir::create(a.keep_temp)?;
    let set = paths::Settings {
        duration: std::time::Duration::from_secs(a.duration),
        senders: a.senders as usize,
        batch: a.batch as usize,
    };
    let phases = paths::run(&lumen, &tmp.path, &set)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    write_report(&a.out, &paths::render(&command, &machine(), &set, &phases))?;
    if a.keep_temp {
        eprintln!("kept {}", tmp.path.display());
    }
    Ok(())
}

fn dashboard_bench(a: DashboardArgs) -> Result<()> {
    let lumen = peers::lumen_binary(a.lumen.as_deref())?;
    let tmp = TempDir::create(a.keep_temp)?;
    let set = dashboard::Settings {
        rows: a.rows,
        runs: a.runs as usize,
    };
    let measured = dashboard::run(&lumen, &tmp.path, &set)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    write_report(
        &a.out,
        &dashboard::render(&command, &machine(), &set, &measured),
    )?;
    if a.keep_temp {
        eprintln!("kept {}", tmp.path.display());
    }
    Ok(())
}

fn storage_bench(a: StorageArgs) -> Result<()> {
    let lumen = peers::lumen_binary(a.lumen.as_deref())?;
    let tmp = TempDir::create(a.keep_temp)?;
    let set = storage::Settings {
        duration: std::time::Duration::from_secs(a.duration),
        rps: a.rps,
    };
    let measured = storage::run(&lumen, &tmp.path, &set)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let text = storage::render(&command, &machine(), &set, &measured);
    write_report(&a.out, &text)?;
    if a.keep_temp {
        eprintln!("kept {}", tmp.path.display());
    }
    Ok(())
}

/// Prints a report and writes it to `out`.
fn write_report(out: &Path, text: &str) -> Result<()> {
    println!("\n{text}");
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs ({model}), Linux {}", kernel.trim())
}

/// `$TMPDIR/lumen-bench-<pid>`, removed when dropped unless kept.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn create(keep: bool) -> Result<TempDir> {
        let base = std::env::temp_dir();
        remove_stale(&base);
        let path = base.join(format!("lumen-bench-{}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        if keep {
            fs::write(path.join(KEEP_MARKER), "kept by --keep-temp\n")?;
        }
        Ok(TempDir { path, keep })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Marks a temp dir the user asked to keep, so later runs leave it alone.
const KEEP_MARKER: &str = "KEEP";

/// Removes the temp dirs of earlier runs whose process is gone (interrupted
/// with Ctrl-C, which skips our cleanup), so aborted runs do not pile up.
fn remove_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("lumen-bench-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() && !e.path().join(KEEP_MARKER).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}
