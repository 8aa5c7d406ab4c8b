//! `lumen`: one binary for the whole mesh. Parses flags, wires the
//! component crates together, waits for Ctrl-C or SIGTERM.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use lumen_collector::{Collector, CollectorConfig, FlushPolicy};
use lumen_core::process::Counted;
use lumen_query::flight_sql::FlightSqlServer;
use lumen_query::pg::PgServer;
use lumen_query::{QueryConfig, QueryEngine, QueryServer, QuerySettings};
use lumen_sidecar::{
    CONFIG_POLL, ProxyArgs, fmt_addr, init_logging, parse_duration, shutdown_signal, until,
};
use tokio::sync::watch;

mod configure;
mod install;
mod mesh_control;

/// Every request allocates a handful of small objects on one thread and
/// frees some on another (the telemetry exporter); mimalloc keeps both cheap.
/// Counted, so `/metrics` can tell the live heap from what the allocator
/// keeps (`lumen_memory_allocated_bytes`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: Counted<mimalloc::MiMalloc> = Counted(mimalloc::MiMalloc);

/// The system allocator, which heap profilers follow, counted the same way.
#[cfg(not(feature = "mimalloc"))]
#[global_allocator]
static ALLOCATOR: Counted<std::alloc::System> = Counted(std::alloc::System);

#[derive(Parser)]
#[command(
    name = "lumen",
    version,
    about = "Lumen: an observability-first service mesh",
    long_about = "Lumen: an observability-first service mesh.\n\n\
        Sidecar proxies route every request between services and record it; the collector \
        keeps every record as Arrow/Parquet; the query service answers SQL over them.\n\n\
        Start with `lumen demo`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane, collector and query service in one process.
    Up(UpArgs),
    /// Run the query service alone over a store shared by collectors (no
    /// ingest): SQL, PromQL, Jaeger, Postgres wire and Flight SQL over every
    /// collector's flushed files.
    Query(QueryServiceArgs),
    /// Run one sidecar proxy beside an application.
    Proxy(ProxyArgs),
    /// Run the whole mesh with a Bookinfo sample and steady traffic.
    Demo(DemoArgs),
    /// Run a SQL query against the query service.
    Sql(SqlArgs),
    /// The policy engine: what is on and why.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Validate mesh configuration files.
    Check(CheckArgs),
    /// Run the control plane alone: it streams configuration to proxies
    /// started with `--control`.
    Control(configure::ControlArgs),
    /// Create or replace resources in the running control plane.
    Apply(configure::ApplyArgs),
    /// Delete resources from the running control plane.
    Delete(configure::DeleteArgs),
    /// List the control plane's resources.
    Get(configure::GetArgs),
    /// Which proxy runs which configuration version (as `istioctl proxy-status`).
    ProxyStatus(configure::ProxyStatusArgs),
    /// Install Lumen on the Kubernetes cluster of KUBECONFIG
    /// (deploy/overlays/default, applied server-side), or print it.
    Install(install::InstallArgs),
}

#[derive(Args, Clone)]
struct StoreArgs {
    /// OTLP/gRPC listen address of the collector.
    #[arg(long, default_value = "127.0.0.1:4317")]
    otlp_grpc: SocketAddr,
    /// OTLP/HTTP listen address of the collector.
    #[arg(long, default_value = "127.0.0.1:4318")]
    otlp_http: SocketAddr,
    /// Largest OTLP payload accepted, in bytes.
    #[arg(long, default_value_t = lumen_collector::DEFAULT_MAX_REQUEST_BYTES)]
    max_request_bytes: usize,
    /// Spans, data points, log records or Arrow rows one payload may hold;
    /// more are refused whole (INVALID_ARGUMENT, HTTP 400).
    #[arg(long, default_value_t = lumen_collector::ingest::shape::DEFAULT_MAX_ITEMS)]
    max_items_per_request: usize,
    /// Attributes one resource, scope, span, event, link, data point or
    /// log record may have (remote write: labels per series, 128).
    #[arg(long, default_value_t = lumen_collector::ingest::shape::DEFAULT_MAX_ATTRIBUTES)]
    max_attributes: usize,
    /// Encoded bytes of one attribute value (keys: 1024 bytes).
    #[arg(long, default_value_t = lumen_collector::ingest::shape::DEFAULT_MAX_VALUE_BYTES)]
    max_attribute_bytes: usize,
    /// Rows kept in memory before a flush to Parquet.
    #[arg(long, default_value_t = 1_000_000)]
    flush_rows: usize,
    /// Memory of rows not yet in Parquet (MiB) past which OTLP payloads are
    /// refused as unavailable, so failing flushes cannot exhaust memory.
    #[arg(long, default_value_t = lumen_collector::DEFAULT_MAX_HOT_BYTES >> 20)]
    max_hot_mib: usize,
    /// How long a table's rows are kept, as TABLE=DURATION (`off` keeps
    /// them forever); repeat for several tables. Whole hour partitions
    /// past it are deleted. Defaults: requests, spans, logs 7d; metrics
    /// 30d; rollups 90d.
    #[arg(long = "retention", value_name = "TABLE=DURATION", value_parser = parse_retention)]
    retention: Vec<(String, Option<Duration>)>,
    /// How often small Parquet files of a partition are merged (0 turns
    /// compaction off); once its hour is over, a partition's become one.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    compaction_interval: Duration,
    /// While its hour is still being written, this many files of a
    /// partition of about one size are merged into one (flushes' files
    /// with each other, merged files with merged files of their size).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..))]
    compaction_min_files: u32,
    /// Distinct values a rollup label (service, workload, route …) keeps
    /// per hour; requests with further values count under `other`
    /// (lumen_rollup_folded_requests_total says how many).
    #[arg(long, default_value_t = lumen_collector::rollup::DEFAULT_MAX_VALUES)]
    rollup_max_values: usize,
    /// Forward what the collector stores — traces (proxies' records as
    /// spans, and apps' spans), metrics and logs — to this OTLP/gRPC
    /// endpoint (Jaeger, Tempo, an OpenTelemetry Collector); repeat for
    /// several. Never slows ingest: past the queue, items are dropped and
    /// counted in lumen_export_items_total.
    #[arg(long = "export-otlp", value_name = "URL", value_parser = parse_export_url)]
    export_otlp: Vec<String>,
    /// Memory (MiB) of items queued per export endpoint.
    #[arg(long, default_value_t = 64)]
    export_queue_mib: usize,
    /// How long a batch an export endpoint does not take is retried before
    /// it is dropped.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    export_retry_for: Duration,
    /// This collector's prefix in the --store; keep it stable across
    /// restarts (a StatefulSet's pod name), and give each collector its own.
    /// [default: the host name]
    #[arg(long, env = "LUMEN_COLLECTOR_ID")]
    collector_id: Option<String>,
    #[command(flatten)]
    location: StoreLocationArgs,
    #[command(flatten)]
    query: QueryArgs,
}

/// The query service's listeners and limits.
#[derive(Args, Clone)]
struct QueryArgs {
    /// Query HTTP listen address (SQL API at /api/v1/sql, Prometheus API,
    /// /metrics).
    #[arg(long, default_value = "127.0.0.1:9900")]
    query_addr: SocketAddr,
    /// Postgres wire listen address, for psql, Grafana and Postgres drivers.
    #[arg(long, default_value = "127.0.0.1:5433")]
    pg_addr: SocketAddr,
    /// Arrow Flight SQL listen address, for ADBC / JDBC Flight SQL drivers.
    #[arg(long, default_value = "127.0.0.1:8815")]
    flight_sql_addr: SocketAddr,
    /// A password Postgres clients may give under any user name (checked
    /// with SCRAM-SHA-256); users of --token-file give their token.
    #[arg(long, env = "LUMEN_PG_PASSWORD", hide_env_values = true)]
    pg_password: Option<String>,
    /// Query service settings: a YAML file with a `kind: QueryService`
    /// resource (see docs/query.md); the --query-* flags override it.
    #[arg(long = "query-config", value_name = "FILE")]
    query_config: Option<PathBuf>,
    /// Threads that execute queries, apart from those serving ingest; they
    /// run at a lower priority [default: --query-concurrency].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    query_threads: Option<u16>,
    /// Cores one query may keep busy [default: half the cores, at least 1].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    query_parallelism: Option<u16>,
    /// Time limit of one query, from its turn to its last row [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    query_timeout: Option<Duration>,
    /// Memory one query's operators and result may hold, in MiB [default: 512].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    query_memory_mib: Option<u32>,
    /// Memory all running queries may hold together, in MiB [default: 1024].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    query_memory_budget_mib: Option<u32>,
    /// Most rows one query result may hold [default: 1000000].
    #[arg(long)]
    query_max_rows: Option<usize>,
    /// Most memory one query result may hold, in MiB [default: 256].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    query_max_result_mib: Option<u32>,
    /// Queries executing at once [default: 4].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    query_concurrency: Option<u16>,
    /// Queries waiting for a turn; more are answered 429 with Retry-After [default: 16].
    #[arg(long)]
    query_queue: Option<u16>,
    /// Longest wait for a turn; then 503 with Retry-After [default: 10s].
    #[arg(long, value_parser = parse_duration)]
    query_queue_timeout: Option<Duration>,
    /// Disk one query may spill sorts and aggregations to, in MiB; 0 turns
    /// spilling off [default: 2048].
    #[arg(long)]
    query_spill_mib: Option<u64>,
    /// Where queries spill [default: <data-dir>/query-spill].
    #[arg(long, value_name = "DIR")]
    query_spill_dir: Option<PathBuf>,
    /// Log queries that take at least this long [default: 5s].
    #[arg(long, value_parser = parse_duration)]
    query_slow: Option<Duration>,
    /// Percent of the query threads' time queries keep while ingest has
    /// payloads in progress; 100 never steps aside [default: 25].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    query_ingest_share: Option<u32>,
}

/// Who may use the listeners that take data or config: TLS on all of
/// them, and the credentials each request must bring (docs/security.md).
#[derive(Args, Clone, Default)]
struct AccessArgs {
    /// Serve every data and config listener over TLS with this
    /// certificate chain (PEM; re-read when it changes), with
    /// --tls-key-file. Needed to listen beyond loopback.
    #[arg(long, value_name = "FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// The private key of --tls-cert-file (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Accept client certificates issued under these roots (PEM: the
    /// mesh's trust bundle) as workload credentials: proxies and
    /// collectors may then send telemetry with their own certificate.
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    tls_client_ca_file: Option<PathBuf>,
    /// Bearer tokens of people and tools, in kube-apiserver's
    /// --token-auth-file form: `token,user[,uid[,"groups"]]` per line
    /// (re-read when it changes). Once given, every request on every
    /// listener must bring one: `Authorization: Bearer <token>`, Basic
    /// with the token as password (Grafana, Prometheus), or the token as
    /// the Postgres / Flight SQL password.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl AccessArgs {
    fn load(&self) -> Result<Arc<lumen_listen::Access>> {
        Ok(lumen_listen::Access::load(&lumen_listen::AccessFiles {
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
            client_ca_file: self.tls_client_ca_file.clone(),
            token_file: self.token_file.clone(),
        })?)
    }
}

/// Where the Parquet files are shared (for collectors and the query service).
#[derive(Args, Clone)]
struct StoreLocationArgs {
    /// Where Parquet files go, shared by several collectors: a directory or
    /// an object store URL (s3://bucket/prefix, gs://bucket/prefix,
    /// az://container/prefix, file:///path). Each collector writes under
    /// <store>/<collector-id>/ and its queries read every collector's files.
    /// Credentials and settings come from the environment (AWS_*, GOOGLE_*,
    /// AZURE_*) and --store-option. Required by `lumen query`, which reads
    /// every collector's files. [default: <data-dir>/tables, this
    /// collector's alone]
    #[arg(long, env = "LUMEN_STORE", value_name = "URL")]
    store: Option<String>,
    /// A setting of the --store's client as KEY=VALUE, with object_store's
    /// key names (aws_endpoint=http://minio:9000, aws_allow_http=true,
    /// aws_region=eu-west-1, google_service_account=…,
    /// azure_storage_account_name=…); repeat for several.
    #[arg(long = "store-option", value_name = "KEY=VALUE", value_parser = parse_store_option)]
    store_option: Vec<(String, String)>,
    /// How often other collectors' files in the --store are listed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    store_refresh: Duration,
    /// How long files a collector compacted or expired stay in the
    /// --store, so other collectors' running queries can finish reading
    /// them (and how long a failing listing is borne before queries are
    /// said to miss rows).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    store_delete_grace: Duration,
}

fn parse_store_option(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE, like aws_endpoint=http://minio:9000"))
}

fn parse_export_url(s: &str) -> Result<String, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("`{s}` is not a URL like http://jaeger:4317: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(s.to_string()),
        _ => Err(format!(
            "`{s}` is not an http:// or https:// URL with a host, like http://jaeger:4317"
        )),
    }
}

fn parse_retention(s: &str) -> Result<(String, Option<Duration>), String> {
    let (table, keep) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not TABLE=DURATION, like requests=7d"))?;
    let keep = match keep {
        "off" | "forever" => None,
        d => Some(parse_duration(d)?),
    };
    // The table is checked against the store's when the config is built.
    Ok((table.to_string(), keep))
}

impl StoreArgs {
    fn collector_config(
        &self,
        data_dir: PathBuf,
        flush_interval: Duration,
    ) -> Result<CollectorConfig> {
        let mut c = CollectorConfig::new(data_dir);
        c.otlp_grpc = Some(self.otlp_grpc);
        c.otlp_http = Some(self.otlp_http);
        c.max_request_bytes = self.max_request_bytes;
        c.shape = lumen_collector::ingest::shape::Shape {
            max_items: self.max_items_per_request,
            max_attributes: self.max_attributes,
            max_value_bytes: self.max_attribute_bytes,
            ..Default::default()
        };
        c.max_hot_bytes = self.max_hot_mib.saturating_mul(1 << 20);
        c.flush = FlushPolicy {
            interval: flush_interval,
            max_rows: self.flush_rows,
            ..FlushPolicy::default()
        };
        c.rollup_max_values = self.rollup_max_values;
        c.compaction.interval = self.compaction_interval;
        c.compaction.min_files = self.compaction_min_files as usize;
        c.storage = self.location.storage_config(
            self.collector_id
                .clone()
                .unwrap_or_else(lumen_collector::storage::default_collector_id),
        );
        c.export = self
            .export_otlp
            .iter()
            .map(|url| {
                let mut t = lumen_collector::export::ExportTarget::new(url.clone());
                t.queue_bytes = self.export_queue_mib.saturating_mul(1 << 20);
                t.retry_for = self.export_retry_for;
                t
            })
            .collect();
        for (table, keep) in &self.retention {
            c.retention
                .set(table, *keep)
                .map_err(|e| anyhow::anyhow!("--retention {table}=…: {e}"))?;
        }
        Ok(c)
    }
}

impl QueryArgs {
    /// Query settings: defaults, then the --query-config file, then flags.
    fn query_config(&self, data_dir: Option<&std::path::Path>) -> Result<QueryConfig> {
        let file = match &self.query_config {
            Some(path) => QuerySettings::load(path)?,
            None => QuerySettings::default(),
        };
        let mib = |v: Option<u32>| v.map(|m| m as usize);
        let flags = QuerySettings {
            threads: self.query_threads.map(usize::from),
            parallelism: self.query_parallelism.map(usize::from),
            timeout: self.query_timeout,
            memory_mib: mib(self.query_memory_mib),
            memory_budget_mib: mib(self.query_memory_budget_mib),
            concurrency: self.query_concurrency.map(usize::from),
            queue: self.query_queue.map(usize::from),
            queue_timeout: self.query_queue_timeout,
            max_rows: self.query_max_rows,
            max_result_mib: mib(self.query_max_result_mib),
            slow_query: self.query_slow,
            spill_mib: self.query_spill_mib,
            spill_dir: self.query_spill_dir.clone(),
            ingest_share: self.query_ingest_share,
        };
        let defaults = QuerySettings {
            // Without a data directory, the system's temporary directory.
            spill_dir: data_dir.map(|d| d.join("query-spill")),
            ..QuerySettings::default()
        };
        let settings = flags.or(file).or(defaults);
        if let Err((field, reason)) = settings.validate() {
            bail!("query settings: {field}: {reason}");
        }
        Ok(settings.config())
    }
}

impl StoreLocationArgs {
    fn storage_config(&self, collector_id: String) -> lumen_collector::storage::StorageConfig {
        lumen_collector::storage::StorageConfig {
            url: self.store.clone(),
            collector_id,
            options: self.store_option.clone(),
            refresh: self.store_refresh,
            delete_grace: self.store_delete_grace,
        }
    }
}

#[derive(Args)]
struct QueryServiceArgs {
    #[command(flatten)]
    location: StoreLocationArgs,
    #[command(flatten)]
    query: QueryArgs,
    #[command(flatten)]
    access: AccessArgs,
}

/// The policy engine's flags, as `lumen up` and `lumen demo` take them.
/// Prometheus remote write: where Lumen sends its series.
#[derive(Args, Clone)]
struct RemoteWriteArgs {
    /// Send Istio's series (every 10 s, from rollups) and the apps' OTLP
    /// metrics (by their Prometheus names) to this remote-write receiver:
    /// Prometheus (--web.enable-remote-write-receiver, its /api/v1/write),
    /// Mimir, Thanos, VictoriaMetrics. Repeatable. `user:password@` in the
    /// URL is basic auth for it.
    #[arg(long = "remote-write", value_name = "URL")]
    urls: Vec<String>,
    /// Basic auth user for every --remote-write URL.
    #[arg(long = "remote-write-username", value_name = "USER")]
    username: Option<String>,
    /// The basic auth password, read from this file at each send.
    #[arg(long = "remote-write-password-file", value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// A bearer token, read from this file at each send (so rotation
    /// needs no restart).
    #[arg(long = "remote-write-bearer-token-file", value_name = "FILE")]
    bearer_token_file: Option<PathBuf>,
    /// PEM certificates to trust for https receivers, instead of the
    /// system's.
    #[arg(long = "remote-write-ca-file", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for receivers that ask for one, with
    /// --remote-write-key-file.
    #[arg(long = "remote-write-cert-file", value_name = "FILE")]
    cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long = "remote-write-key-file", value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Do not check the receiver's certificate (tests only).
    #[arg(long = "remote-write-insecure-skip-verify")]
    insecure_skip_verify: bool,
    /// Samples each receiver's queue holds (at least 2000); more are
    /// dropped (counted in
    /// lumen_remote_write_samples_dropped_total{reason="queue_full"}).
    #[arg(long = "remote-write-queue-capacity", default_value_t = lumen_query::remote_write::DEFAULT_CAPACITY)]
    capacity: usize,
}

impl RemoteWriteArgs {
    /// The sender's configuration, when any URL is given; its progress is
    /// kept in `data_dir`.
    fn config(
        &self,
        data_dir: &std::path::Path,
    ) -> Option<lumen_query::remote_write::RemoteWriteConfig> {
        (!self.urls.is_empty()).then(|| lumen_query::remote_write::RemoteWriteConfig {
            urls: self.urls.clone(),
            credentials: lumen_query::remote_write::Credentials {
                username: self.username.clone(),
                password_file: self.password_file.clone(),
                bearer_token_file: self.bearer_token_file.clone(),
                ca_file: self.ca_file.clone(),
                cert_file: self.cert_file.clone(),
                key_file: self.key_file.clone(),
                insecure_skip_verify: self.insecure_skip_verify,
            },
            capacity: self.capacity,
            state_dir: Some(data_dir.join("remote-write")),
        })
    }
}

#[derive(Args)]
struct PolicyArgs {
    /// Prometheus rule files (alerting and recording rules, Prometheus's
    /// format), or directories of them; repeatable. Served at
    /// /api/v1/rules and /api/v1/alerts on the query port.
    #[arg(long = "rules")]
    rules: Vec<PathBuf>,
    /// How often rule groups that name no `interval` are evaluated.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    evaluation_interval: Duration,
    /// An Alertmanager to send firing alerts to (its base URL, e.g.
    /// http://127.0.0.1:9093; Alertmanager's v2 API); repeatable.
    #[arg(long = "alertmanager")]
    alertmanagers: Vec<String>,
}

#[derive(Args)]
struct UpArgs {
    /// Mesh configuration: files or directories of YAML resources (Lumen's
    /// Mesh, Istio's VirtualService, DestinationRule, ServiceEntry,
    /// Gateway); repeatable; watched, changes reach proxies within a second.
    /// Resources can also be applied later with `lumen apply`.
    #[arg(short = 'f', long = "file")]
    file: Vec<PathBuf>,
    #[command(flatten)]
    control: configure::ControlPlaneArgs,
    /// Where the WAL lives, and the Parquet files unless --store says.
    #[arg(long, default_value = "lumen-data")]
    data_dir: PathBuf,
    /// Flush hot rows to Parquet at least this often.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    flush_interval: Duration,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    access: AccessArgs,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    remote_write: RemoteWriteArgs,
    /// Serve Envoy's global rate-limit service and ext_authz here (gRPC),
    /// backed by the RateLimits, Quotas (with an `envoy:` descriptor) and
    /// AccessPolicies, for a fleet of plain Envoys (e.g. 127.0.0.1:8081,
    /// envoyproxy/ratelimit's port). Off unless given.
    #[arg(long)]
    envoy_addr: Option<SocketAddr>,
    /// The mesh's control plane, when it runs apart (on Kubernetes,
    /// lumen-control): the policy engine takes the RateLimits and
    /// AccessPolicies from it and sends it its decisions, which reach every
    /// sidecar following it (`host:port`, or `https://` with
    /// --mesh-control-ca).
    #[arg(long)]
    mesh_control: Option<String>,
    /// The roots an `https://` --mesh-control is checked against (PEM).
    #[arg(long, requires = "mesh_control")]
    mesh_control_ca: Option<PathBuf>,
    /// A file holding the token the policy engine's decisions carry to
    /// --mesh-control (one of its --token-file's tokens).
    #[arg(long, value_name = "FILE", requires = "mesh_control")]
    mesh_control_token_file: Option<PathBuf>,
}

#[derive(Args)]
struct DemoArgs {
    /// Stop after this many seconds [default: run until Ctrl-C].
    #[arg(long)]
    duration: Option<u64>,
    /// Where the WAL lives, and the Parquet files unless --store says.
    #[arg(long, default_value = "lumen-demo-data")]
    data_dir: PathBuf,
    /// Requests per second into productpage.
    #[arg(long, default_value_t = 50.0)]
    rps: f64,
    /// Flush hot rows to Parquet at least this often.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    flush_interval: Duration,
    /// Where productpage answers your own requests (an ingress gateway
    /// routed by Istio's Bookinfo Gateway and VirtualService).
    #[arg(long, default_value = "127.0.0.1:8080")]
    ingress: SocketAddr,
    /// More resources to apply at start (Istio networking kinds), watched.
    #[arg(short = 'f', long = "file")]
    file: Vec<PathBuf>,
    #[command(flatten)]
    control: configure::ControlPlaneArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    remote_write: RemoteWriteArgs,
    /// Start a ratings incident (20 s of 503s) right away, rather than
    /// after the first --incident-every.
    #[arg(long)]
    incident: bool,
    /// How often ratings has an incident: its error-rate alert fires and
    /// the demo's conditional RateLimit switches on, then off.
    #[arg(long, default_value = "3m", value_parser = parse_duration)]
    incident_every: Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Table,
    Csv,
    Json,
}

/// How a client reaches the query service.
#[derive(Args)]
struct QueryClientArgs {
    /// Query service base URL (`https://` when it serves TLS).
    #[arg(long, default_value = "http://127.0.0.1:9900")]
    url: String,
    /// Your token, when the query service was started with --token-file.
    #[arg(long, env = "LUMEN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Roots (PEM) an `https://` --url is checked against, besides the
    /// system's (the mesh's trust bundle, or your own CA).
    #[arg(long, value_name = "FILE")]
    cacert: Option<PathBuf>,
}

impl QueryClientArgs {
    /// A request to `path` under --url, with the token.
    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<(String, reqwest::RequestBuilder)> {
        let mut builder = reqwest::Client::builder();
        if let Some(file) = &self.cacert {
            let pem = std::fs::read(file)
                .with_context(|| format!("reading --cacert {}", file.display()))?;
            builder =
                builder.add_root_certificate(reqwest::Certificate::from_pem(&pem).with_context(
                    || format!("--cacert {}: not a PEM certificate", file.display()),
                )?);
        }
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let mut request = builder.build()?.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.trim());
        }
        Ok((url, request))
    }
}

#[derive(Args)]
struct SqlArgs {
    /// The SQL to run; `-` reads it from standard input.
    query: String,
    #[command(flatten)]
    client: QueryClientArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Every policy (RateLimit), whether proxies enforce it now, and why:
    /// always on, its alert fires, cooling down, or its alert is quiet.
    Status {
        /// Where `lumen up` serves its API.
        #[command(flatten)]
        client: QueryClientArgs,
    },
}

#[derive(Args)]
struct CheckArgs {
    /// Configuration files or directories to validate (Mesh, Istio
    /// networking kinds, or QueryService); the mesh's files are checked
    /// together, as `lumen up -f` loads them.
    #[arg(short = 'f', long = "file", required = true)]
    files: Vec<PathBuf>,
}

/// A panic inside [`lumen_core::ipc::guarded`] (arrow's IPC decoder on a
/// malformed batch from a client) is answered as a bad request; it is
/// logged as one, not printed to stderr as a crash would be.
fn quiet_guarded_panics() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if lumen_core::ipc::decoding() {
            tracing::debug!(panic = %info, "malformed Arrow IPC refused");
        } else {
            report(info);
        }
    }));
}

fn main() -> ExitCode {
    lumen_sidecar::no_huge_pages();
    quiet_guarded_panics();
    let cli = Cli::parse();
    // Not for a proxy, as in `lumen-proxy` (sidecar/src/main.rs says why).
    if !matches!(cli.command, Command::Proxy(_)) {
        lumen_sidecar::keep_freed_memory();
        #[cfg(feature = "mimalloc")]
        lumen_core::process::set_release(lumen_sidecar::release_free_memory);
    }
    // A proxy starts its own workers (thread per core); everything else
    // runs on tokio's work-stealing pool.
    let rt = if matches!(cli.command, Command::Proxy(_)) {
        lumen_sidecar::runtime()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Up(a) => up(a).await,
            Command::Query(a) => query_service(a).await,
            Command::Proxy(a) => lumen_sidecar::run(a).await,
            Command::Demo(a) => demo(a).await,
            Command::Sql(a) => sql(a).await,
            Command::Policy(PolicyCommand::Status { client }) => policy_status(&client).await,
            Command::Check(a) => check(a),
            Command::Control(a) => control(a).await,
            Command::Apply(a) => configure::apply(a).await,
            Command::Delete(a) => configure::delete(a).await,
            Command::Get(a) => configure::get(a).await,
            Command::ProxyStatus(a) => configure::proxy_status(a).await,
            Command::Install(a) => install::install(a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves once the flag turns true (or its sender is gone).
async fn up(a: UpArgs) -> Result<()> {
    init_logging("info");
    let query_config = a.store.query.query_config(Some(&a.data_dir))?;
    // The configuration is read (and refused when invalid) before anything
    // binds; the control plane serves it once the rest is up.
    let files = lumen_control::discovery::load_resources(&a.file)?;
    let rule_groups = load_rules(&a.policy.rules)?;
    let access = a.access.load()?;
    let mut collector_config = a
        .store
        .collector_config(a.data_dir.clone(), a.flush_interval)?;
    collector_config.access = access.clone();
    let collector = Collector::open(collector_config)
        .await
        .context("starting the collector")?;
    if collector.replayed_rows() > 0 {
        tracing::info!(
            rows = collector.replayed_rows(),
            "recovered acknowledged rows from the WAL"
        );
    }
    let rules = Arc::new(
        lumen_policy::RuleEngine::new(rule_groups, a.policy.evaluation_interval).recording_to(
            lumen_collector::events::RecordingWriter::new(collector.writer()),
        ),
    );
    let query_config = QueryConfig {
        ingest: collector.ingest_pressure(),
        ..query_config
    };
    let engine =
        QueryEngine::new(collector.store(), query_config).context("starting the query executor")?;
    let remote_writer = a
        .remote_write
        .config(&a.data_dir)
        .map(|c| lumen_query::remote_write::RemoteWriter::new(engine.clone(), c))
        .transpose()?;
    let mut servers = QueryServers::bind(&a.store.query, engine.clone(), &access).await?;
    let board = Arc::new(lumen_policy::decide::Board::default());
    servers.query = servers
        .query
        .with_routes(lumen_policy::http::router(rules.clone(), board.clone()))
        // Prometheus's remote write, where Prometheus's API is.
        .with_routes(lumen_collector::ingest::remote_write::router(
            collector.writer(),
        ));
    let (stop, stop_rx) = watch::channel(false);
    let (_, store, control_service, control_tasks) = configure::start(
        files,
        &a.file,
        Some(a.data_dir.join("control").join("resources.json")),
        configure::Serving {
            addr: a.control.control_addr,
            security: a.control.security(&a.data_dir.join("control").join("ca"))?,
            operators: access.clone(),
        },
        CONFIG_POLL,
        &stop_rx,
    )
    .await?;
    tracing::info!(
        otlp_grpc = %fmt_addr(collector.otlp_grpc_addr()),
        otlp_http = %fmt_addr(collector.otlp_http_addr()),
        query = %fmt_addr(servers.query.local_addr()),
        postgres = %fmt_addr(servers.pg.local_addr()),
        flight_sql = %fmt_addr(servers.flight_sql.local_addr()),
        data_dir = %a.data_dir.display(),
        "lumen is up"
    );
    // Which proxies run which config, on /metrics (and so recorded).
    engine.add_metrics(Arc::new(move || control_service.metrics_text()));
    let writer = collector.writer();
    let self_writer = collector.writer();
    let collector_task = tokio::spawn(collector.run(until(stop_rx.clone())));
    let servers_query_addr = servers.query.local_addr();
    let serving = servers.spawn(&stop_rx);
    let notify_task = (!a.policy.alertmanagers.is_empty()).then(|| {
        let generator = format!("http://{}/api/v1/alerts", fmt_addr(servers_query_addr));
        let notifier = Arc::new(lumen_policy::notify::Notifier::new(
            a.policy.alertmanagers.clone(),
            generator,
        ));
        let counted = notifier.clone();
        engine.add_metrics(Arc::new(move || counted.metrics_text()));
        tokio::spawn(notifier.run(rules.clone(), stop_rx.clone()))
    });
    let envoy_policies: lumen_policy::envoy::Policies = {
        let store = store.clone();
        let decisions = store.active_policies();
        Arc::new(move || {
            let active = (**decisions.borrow()).clone();
            (store.current().mesh.clone(), active)
        })
    };
    // Alerts switch conditional policies on and off at every proxy; every
    // change is a `policy_events` row, logged like ingested rows. The
    // policies and the proxies are this process's control plane's, or the
    // mesh's when it runs apart.
    let events = lumen_collector::events::PolicyEventWriter::new(writer);
    let mut mesh_control_tasks = Vec::new();
    let decide_task = match &a.mesh_control {
        Some(control) => {
            let endpoint = lumen_proxy::controlplane::ControlEndpoint::open(
                lumen_sidecar::endpoint_url(control),
                a.mesh_control_ca.as_deref(),
                "--mesh-control-ca",
            )
            .map_err(anyhow::Error::msg)?;
            tracing::info!(control = %endpoint, "policy decisions go to the mesh's control plane");
            let token = a
                .mesh_control_token_file
                .as_ref()
                .map(|f| {
                    std::fs::read_to_string(f)
                        .map(|t| t.trim().to_string())
                        .with_context(|| {
                            format!("reading --mesh-control-token-file {}", f.display())
                        })
                })
                .transpose()?;
            let remote = mesh_control::start(endpoint, token, stop_rx.clone());
            mesh_control_tasks = remote.tasks;
            let (mesh, publish) = (remote.mesh, remote.decisions);
            tokio::spawn(lumen_policy::decide::run(
                rules.clone(),
                board,
                move || lumen_policy::decide::Policies::of(&mesh.borrow()),
                move |on| {
                    publish.send_replace(on);
                },
                move |rows| events.write(rows),
                stop_rx.clone(),
            ))
        }
        None => {
            let (config, publish) = (store.clone(), store);
            tokio::spawn(lumen_policy::decide::run(
                rules.clone(),
                board,
                move || lumen_policy::decide::Policies::of(&config.current().mesh),
                move |on| publish.set_active_policies(on),
                move |rows| events.write(rows),
                stop_rx.clone(),
            ))
        }
    };
    let envoy_task = match a.envoy_addr {
        Some(addr) => Some(serve_envoy(addr, envoy_policies, &access, stop_rx.clone()).await?),
        None => None,
    };
    let remote_write_task = remote_writer.map(|w| tokio::spawn(w.run(stop_rx.clone())));
    let self_metrics_task = tokio::spawn(lumen_query::self_metrics::record(
        engine.clone(),
        lumen_collector::events::RecordingWriter::new(self_writer),
        fmt_addr(servers_query_addr),
        stop_rx.clone(),
    ));
    let rules_task = tokio::spawn(rules.run(engine, stop_rx.clone()));
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
    for t in mesh_control_tasks {
        let _ = t.await;
    }
    for t in control_tasks {
        let _ = t.await;
    }
    let _ = rules_task.await;
    let _ = decide_task.await;
    if let Some(t) = envoy_task {
        let _ = t.await;
    }
    if let Some(t) = notify_task {
        let _ = t.await;
    }
    if let Some(t) = remote_write_task {
        let _ = t.await;
    }
    let _ = self_metrics_task.await;
    let collected = collector_task.await.context("collector task")?;
    let served = serving.join().await;
    collected?;
    served?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Serves Envoy's rate-limit and ext_authz services on `addr` until `stop`.
async fn serve_envoy(
    addr: SocketAddr,
    policies: lumen_policy::envoy::Policies,
    access: &Arc<lumen_listen::Access>,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = access
        .bind(
            "Envoy's rate-limit / ext_authz service",
            addr,
            lumen_listen::ALPN_GRPC,
        )
        .await?;
    tracing::info!(addr = %listener.local_addr(), "serving Envoy's rate-limit and ext_authz services");
    let services = lumen_policy::envoy::EnvoyServices::new(policies);
    // Envoys are workloads: their mesh certificate or a token.
    let server = tonic::transport::Server::builder()
        .layer(lumen_listen::GrpcGuard::new(
            access.clone(),
            lumen_listen::Grant::Ingest,
        ))
        .add_service(services.rate_limit_server())
        .add_service(services.authorization_server());
    Ok(tokio::spawn(async move {
        if let Err(e) = server
            .serve_with_incoming_shutdown(listener.incoming(), until(stop))
            .await
        {
            tracing::error!(error = %e, "Envoy's rate-limit / ext_authz service failed");
        }
    }))
}

/// Every rule group of `paths` (files, or directories of `.yml` /
/// `.yaml` files), refused whole if any file is invalid.
fn load_rules(paths: &[PathBuf]) -> Result<Vec<lumen_policy::RuleGroup>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading rule directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "yml" || x == "yaml"))
                .collect();
            inside.sort();
            files.extend(inside);
        } else {
            files.push(p.clone());
        }
    }
    let mut groups = Vec::new();
    for f in &files {
        groups.extend(lumen_policy::rules::load(f)?);
    }
    if !files.is_empty() {
        let rules: usize = groups.iter().map(|g| g.rules.len()).sum();
        tracing::info!(
            files = files.len(),
            groups = groups.len(),
            rules,
            "rules loaded"
        );
    }
    Ok(groups)
}

async fn control(a: configure::ControlArgs) -> Result<()> {
    init_logging("info");
    let (stop, stop_rx) = watch::channel(false);
    let files = lumen_control::discovery::load_resources(&a.file)?;
    let ca_dir = a.data_dir.join("ca");
    let kube_client = if a.inject.token_review || a.kube.kubernetes {
        Some(kube::Client::try_default().await.context(
            "--kubernetes and --token-review need the Kubernetes API (an in-cluster service account, or KUBECONFIG)",
        )?)
    } else {
        None
    };
    if let (Some(name), Some(client)) = (&a.kube.ca_secret, &kube_client) {
        lumen_control::casecret::sync(
            client.clone(),
            &a.kube.lease_namespace,
            name,
            &ca_dir,
            &a.listen.trust_domain,
        )
        .await
        .context("sharing the mesh CA through its Secret")?;
    }
    let webhook = match a.inject.webhook_addr {
        Some(addr) => {
            let ca = std::sync::Arc::new(a.listen.ca(&ca_dir)?);
            let hook = lumen_control::webhook::Webhook::bind(
                addr,
                ca,
                a.inject.webhook_dns.clone(),
                a.inject.injector(),
            )
            .await?;
            tracing::info!(
                webhook = %fmt_addr(hook.local_addr()),
                dns = ?a.inject.webhook_dns,
                ca_bundle = %ca_dir.join("trust-bundle.pem").display(),
                "sidecar injector serving"
            );
            Some(tokio::spawn(hook.run(stop_rx.clone())))
        }
        None => None,
    };
    let mut security = a.listen.security(&ca_dir)?;
    if a.inject.token_review
        && let Some(client) = kube_client.clone()
    {
        security.reviewer = Some(std::sync::Arc::new(
            lumen_control::tokenreview::KubeTokenReviewer::new(
                client,
                lumen_control::inject::TOKEN_AUDIENCE,
            ),
        ));
    }
    let (_, store, service, mut tasks) = configure::start(
        files,
        &a.file,
        Some(a.data_dir.join("resources.json")),
        configure::Serving {
            addr: a.listen.control_addr,
            security,
            operators: lumen_listen::Access::load(&lumen_listen::AccessFiles {
                token_file: a.token_file.clone(),
                ..Default::default()
            })?,
        },
        CONFIG_POLL,
        &stop_rx,
    )
    .await?;
    tasks.extend(webhook);
    if let Some(addr) = a.control_tls_addr {
        let ca = std::sync::Arc::new(a.listen.ca(&ca_dir)?);
        let cert = lumen_control::serving::ServingCert::issue(ca, a.control_tls_dns.clone())?;
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} (TLS control plane; --control-tls-addr to change)")
        })?;
        tracing::info!(
            control_tls = %fmt_addr(listener.local_addr().ok()),
            dns = ?a.control_tls_dns,
            "control plane serving over TLS"
        );
        tasks.push(cert.renew("control plane (TLS)", stop_rx.clone()));
        let (service, mut stop) = (service.clone(), stop_rx.clone());
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        tasks.push(tokio::spawn(async move {
            if let Err(e) =
                lumen_control::server::serve_tls(listener, service, &cert, shutdown).await
            {
                tracing::error!(error = %e, "TLS control plane failed");
            }
        }));
    }
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(!a.kube.kubernetes));
    let monitoring = tokio::net::TcpListener::bind(a.monitoring_addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (monitoring; --monitoring-addr to change)",
                a.monitoring_addr
            )
        })?;
    tracing::info!(monitoring = %fmt_addr(monitoring.local_addr().ok()), "serving /ready, /healthz and /metrics");
    tasks.push(tokio::spawn(serve_monitoring(
        monitoring,
        service,
        ready.clone(),
        stop_rx.clone(),
    )));
    if a.kube.kubernetes
        && let Some(client) = kube_client
    {
        tasks.extend(start_controller(&a, client, &ca_dir, store, &stop_rx).await?);
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

/// `lumen control`'s monitoring port: readiness (serving, and the cluster
/// listed when it watches one), liveness, and its metrics.
async fn serve_monitoring(
    listener: tokio::net::TcpListener,
    service: lumen_control::ControlService,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/ready",
            get(move || {
                let ready = ready.load(std::sync::atomic::Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "listing the cluster\n")
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let text = service.metrics_text();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        text,
                    )
                }
            }),
        );
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "monitoring server failed");
    }
}

/// The Kubernetes controller feeding `store`, and its leader election.
async fn start_controller(
    a: &configure::ControlArgs,
    client: kube::Client,
    ca_dir: &std::path::Path,
    store: std::sync::Arc<lumen_control::ConfigStore>,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    use lumen_control::controller::{Controller, Options};
    let bundle_path = ca_dir.join("trust-bundle.pem");
    let ca_bundle = std::fs::read_to_string(&bundle_path)
        .with_context(|| format!("reading the trust bundle {}", bundle_path.display()))?;
    let options = Options {
        discovery_selectors: a.kube.discovery_selectors.clone(),
        webhook_configuration: a
            .inject
            .webhook_addr
            .map(|_| a.kube.webhook_configuration.clone()),
        ca_bundle,
        ..Default::default()
    };
    let controller = Controller::start(client.clone(), options);
    tracing::info!("listing the cluster's objects");
    controller
        .wait_ready(std::time::Duration::from_secs(10))
        .await
        .context("watching the cluster")?;
    let identity = a.kube.pod_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| format!("lumen-control-{}", std::process::id()))
    });
    let lease = lumen_control::lease::LeaseConfig::new(
        &a.kube.lease_namespace,
        &a.kube.lease_name,
        &identity,
    );
    tracing::info!(
        lease = %format!("{}/{}", lease.namespace, lease.name),
        %identity,
        "controller running; campaigning for leadership"
    );
    let (leading_tx, leading) = watch::channel(false);
    let elector = lumen_control::lease::Elector::new(client, lease);
    Ok(vec![
        tokio::spawn(elector.run(leading_tx, stop.clone())),
        tokio::spawn(controller.run(store, leading, stop.clone())),
    ])
}

async fn query_service(a: QueryServiceArgs) -> Result<()> {
    init_logging("info");
    let query_config = a.query.query_config(None)?;
    // The reader owns no prefix: the id is not used.
    let storage = a.location.storage_config(String::new());
    let reader = lumen_collector::StoreReader::open(&storage)
        .await
        .context("opening the store")?;
    let engine =
        QueryEngine::new(reader.store(), query_config).context("starting the query executor")?;
    let servers = QueryServers::bind(&a.query, engine, &a.access.load()?).await?;
    let (stop, stop_rx) = watch::channel(false);
    tracing::info!(
        query = %fmt_addr(servers.query.local_addr()),
        postgres = %fmt_addr(servers.pg.local_addr()),
        flight_sql = %fmt_addr(servers.flight_sql.local_addr()),
        store = storage.url.as_deref().unwrap_or_default(),
        "lumen query is up"
    );
    let reader_task = tokio::spawn(reader.run(until(stop_rx.clone())));
    let serving = servers.spawn(&stop_rx);
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
    let _ = reader_task.await;
    serving.join().await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// The query service's listeners: SQL/Prometheus/Jaeger HTTP, Postgres
/// wire and Flight SQL over one engine.
struct QueryServers {
    query: QueryServer,
    pg: PgServer,
    flight_sql: FlightSqlServer,
}

/// The query listeners running until their stop signal.
struct QueryTasks {
    query: tokio::task::JoinHandle<Result<(), lumen_query::ServeError>>,
    pg: tokio::task::JoinHandle<std::io::Result<()>>,
    flight_sql: tokio::task::JoinHandle<Result<(), lumen_query::flight_sql::FlightSqlError>>,
}

impl QueryServers {
    async fn bind(
        a: &QueryArgs,
        engine: QueryEngine,
        access: &Arc<lumen_listen::Access>,
    ) -> Result<QueryServers> {
        Ok(QueryServers {
            pg: PgServer::bind(a.pg_addr, engine.clone(), a.pg_password.clone(), access).await?,
            flight_sql: FlightSqlServer::bind(a.flight_sql_addr, engine.clone(), access).await?,
            query: QueryServer::bind(a.query_addr, engine, access).await?,
        })
    }

    fn spawn(self, stop: &watch::Receiver<bool>) -> QueryTasks {
        QueryTasks {
            query: tokio::spawn(self.query.run(until(stop.clone()))),
            pg: tokio::spawn(self.pg.run(until(stop.clone()))),
            flight_sql: tokio::spawn(self.flight_sql.run(until(stop.clone()))),
        }
    }
}

impl QueryTasks {
    /// Waits for every listener to stop; the first failure is the answer.
    async fn join(self) -> Result<()> {
        let queried = self.query.await.context("query task")?;
        let served = self.pg.await.context("postgres task")?;
        let flown = self.flight_sql.await.context("flight sql task")?;
        queried?;
        served.context("postgres wire")?;
        flown?;
        Ok(())
    }
}

const EXAMPLES: [(&str, &str); 4] = [
    (
        "Requests per service, as the destination saw them",
        "SELECT destination_service, count(*) AS requests, avg(duration_us) AS avg_us \
         FROM requests WHERE reporter = 'destination' GROUP BY 1 ORDER BY 2 DESC",
    ),
    (
        "Error rate and p99 latency per source → destination",
        "SELECT source_service, destination_service, \
         avg(CASE WHEN status >= 500 THEN 1.0 ELSE 0.0 END) AS error_rate, \
         approx_percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_us) AS p99_us \
         FROM requests WHERE reporter = 'source' GROUP BY 1, 2 ORDER BY 1, 2",
    ),
    (
        "The slowest traces of the last minute",
        "SELECT trace_id, max(duration_us) AS us, count(*) AS hops FROM requests \
         WHERE time > now() - INTERVAL '1 minute' GROUP BY trace_id ORDER BY us DESC LIMIT 5",
    ),
    (
        "Requests, errors and p99 per destination from the 10 s rollups (no row scan)",
        "SELECT destination_service, sum(requests) AS requests, sum(errors) AS errors, \
         round(sketch_quantile(sketch_merge(duration_sketch), 0.99)) AS p99_us FROM rollups \
         WHERE window_seconds = 10 AND reporter = 'destination' GROUP BY 1 ORDER BY 2 DESC",
    ),
];

async fn demo(a: DemoArgs) -> Result<()> {
    init_logging("warn");
    let data_dir = std::path::absolute(&a.data_dir).unwrap_or(a.data_dir.clone());
    let config = lumen_demo::DemoConfig {
        collector: a
            .store
            .collector_config(data_dir.clone(), a.flush_interval)?,
        rps: a.rps,
        query: a.store.query.query_addr,
        pg: a.store.query.pg_addr,
        flight_sql: a.store.query.flight_sql_addr,
        query_config: a.store.query.query_config(Some(&data_dir))?,
        control: a.control.control_addr,
        ingress: a.ingress,
        files: a.file.clone(),
        rules: {
            let mut groups = lumen_policy::rules::parse(
                "mesh.rules.yaml (shipped)",
                lumen_policy::rules::SHIPPED,
            )?;
            groups.extend(load_rules(&a.policy.rules)?);
            groups
        },
        evaluation_interval: a.policy.evaluation_interval,
        alertmanagers: a.policy.alertmanagers.clone(),
        remote_write: a.remote_write.config(&data_dir),
        incident_first: if a.incident {
            Duration::from_secs(2)
        } else {
            a.incident_every
        },
        incident_every: a.incident_every,
    };
    let running = lumen_demo::start(config)
        .await
        .context("starting the demo (are other Lumen processes using the ports? see --help)")?;
    let base = running
        .query_url
        .trim_end_matches("/api/v1/sql")
        .to_string();
    let me = invocation();
    println!(
        "Lumen demo is running: Bookinfo (productpage → details, reviews v1/v2/v3 → ratings),"
    );
    println!(
        "one sidecar per app, {} requests/s into productpage.",
        a.rps
    );
    println!();
    println!("  Web UI:     {base}/   (service graph, services, live tail, traces, SQL, policy)");
    println!("  SQL API:    POST {}", running.query_url);
    println!(
        "  PromQL:     {base}/api/v1/query (Prometheus API, Istio's metric names; Grafana: a Prometheus data source at {base})"
    );
    // Grafana on the provisioning files: Istio's dashboards and Lumen's,
    // with their data sources (which name the default ports).
    let dashboards = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|repo| repo.join("dashboards"))
        .filter(|d| d.join("provisioning").is_dir())
        .map_or_else(
            || "<lumen>/dashboards".to_string(),
            |d| d.display().to_string(),
        );
    println!(
        "  Grafana:    LUMEN_DASHBOARDS={dashboards} grafana-server --homepath /usr/share/grafana cfg:default.paths.provisioning={dashboards}/provisioning"
    );
    println!(
        "  Postgres:   psql -h {} -p {} -U lumen lumen",
        running.pg_addr.ip(),
        running.pg_addr.port()
    );
    println!(
        "  Flight SQL: grpc://{} (ADBC / JDBC Flight SQL drivers)",
        running.flight_sql_addr
    );
    println!(
        "  Queries:    GET {base}/api/v1/queries (running now; DELETE …/<id> cancels), {base}/metrics"
    );
    println!(
        "  OTLP:       grpc://{}  http://{}/v1/traces",
        running.otlp_grpc, running.otlp_http
    );
    println!(
        "  Data:       {} (WAL + Parquet, partitioned by table/date/hour)",
        data_dir.display()
    );
    if let Some((name, admin)) = running.sidecars.first() {
        println!(
            "  Sidecar:    http://{admin}/stats/prometheus ({name}; {} sidecars)",
            running.sidecars.len()
        );
    }
    let control = running.control_addr;
    let control_flag = if control.to_string() == lumen_core::control::DEFAULT_ADDR {
        String::new()
    } else {
        format!(" --control {control}")
    };
    println!(
        "  Ingress:    curl http://{}/productpage   (as jason: curl -H 'end-user: jason' …)",
        running.ingress_addr
    );
    println!(
        "  Routing:    {} (Istio's VirtualService / DestinationRule: edit it live)",
        running
            .config_dir
            .join(lumen_demo::mesh::ROUTING_FILE)
            .display()
    );
    println!(
        "              {me} get vs{control_flag}   {me} apply -f FILE{control_flag}   {me} proxy-status{control_flag}"
    );
    println!(
        "  Security:   {} (STRICT mTLS from the demo's mesh CA; only productpage calls details and reviews, only reviews ratings)",
        running
            .config_dir
            .join(lumen_demo::mesh::SECURITY_FILE)
            .display()
    );
    println!(
        "  Policy:     {} (a RateLimit on ratings while its error-rate alert fires); ratings fails for 20 s {}",
        running
            .config_dir
            .join(lumen_demo::mesh::POLICY_FILE)
            .display(),
        if a.incident {
            "now, then every ".to_string()
                + &humantime::format_duration(a.incident_every).to_string()
        } else {
            "every ".to_string() + &humantime::format_duration(a.incident_every).to_string()
        }
    );
    println!(
        "              {me} policy status --url {base}   {base}/api/v1/alerts   SELECT * FROM policy_events"
    );
    println!();
    println!("Try:");
    for (title, q) in EXAMPLES {
        println!("  # {title}");
        println!("  {me} sql --url {base} \"{q}\"");
        println!();
    }
    println!(
        "  curl -s {} -d \"SELECT count(*) FROM requests\"",
        running.query_url
    );
    println!();
    match a.duration {
        Some(s) => println!("Running for {s}s (Ctrl-C stops early)."),
        None => println!("Press Ctrl-C to stop."),
    }
    let deadline = async {
        match a.duration {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut progress = tokio::time::interval(Duration::from_secs(10));
    progress.tick().await;
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = &mut signal => break,
            _ = progress.tick() => {
                let sent = running.load.sent.load(std::sync::atomic::Ordering::Relaxed);
                let tables: Vec<String> = running
                    .tables()
                    .iter()
                    .map(|t| format!("{} {} rows ({} Parquet files)", t.table, t.hot_rows as u64 + t.file_rows, t.files))
                    .collect();
                println!("[demo] {sent} requests sent; stored: {}", tables.join(", "));
            }
        }
    }
    println!("Stopping: draining sidecars, flushing to Parquet…");
    let report = running.stop().await?;
    println!(
        "Stopped cleanly. {} requests sent ({} ok, {} failed).",
        report.sent, report.ok, report.failed
    );
    for t in report.tables {
        println!(
            "  {}: {} rows in {} Parquet files ({} bytes), {} rows still in the WAL",
            t.table, t.file_rows, t.files, t.file_bytes, t.hot_rows
        );
    }
    println!("Data kept in {}", data_dir.display());
    Ok(())
}

/// How to run this binary again from the current directory: `lumen` when it
/// is the one on PATH, else its path (e.g. `./target/release/lumen` under cargo).
fn invocation() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "lumen".into();
    };
    let on_path = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("lumen") == exe));
    if on_path {
        return "lumen".into();
    }
    match std::env::current_dir()
        .ok()
        .and_then(|cwd| exe.strip_prefix(cwd).ok().map(PathBuf::from))
    {
        Some(rel) => format!("./{}", rel.display()),
        None => exe.display().to_string(),
    }
}

async fn policy_status(client: &QueryClientArgs) -> Result<()> {
    init_logging("warn");
    let (url, request) = client.request(reqwest::Method::GET, "/api/v1/policies")?;
    let resp = request
        .send()
        .await
        .with_context(|| format!("cannot reach lumen up's API at {url} (--url to change)"))?;
    let status = resp.status();
    if !status.is_success() {
        bail!(
            "{url} answered {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    let body: serde_json::Value = resp.json().await.context("reading the policies")?;
    let policies = body["data"]["policies"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if policies.is_empty() {
        println!("no policies");
        return Ok(());
    }
    let rows: Vec<[String; 5]> = policies
        .iter()
        .map(|p| {
            let text = |k: &str| p[k].as_str().unwrap_or("").to_string();
            let state = match (p["on"].as_bool(), p["dry_run"].as_bool()) {
                (Some(true), Some(true)) => "ON (dry run)",
                (Some(true), _) => "ON",
                _ => "off",
            };
            [
                text("policy"),
                text("kind"),
                text("target"),
                state.into(),
                text("why"),
            ]
        })
        .collect();
    let header = ["POLICY", "KIND", "TARGET", "STATE", "WHY"];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].len())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..4).map(width).collect();
    let line = |cells: [&str; 5]| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate().take(4) {
            out.push_str(&format!("{c:<w$}  ", w = widths[i]));
        }
        out.push_str(cells[4]);
        out
    };
    println!("{}", line(header));
    for r in &rows {
        println!("{}", line([&r[0], &r[1], &r[2], &r[3], &r[4]]));
    }
    Ok(())
}

async fn sql(a: SqlArgs) -> Result<()> {
    init_logging("warn");
    let query = if a.query == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("reading SQL from stdin")?;
        s
    } else {
        a.query.clone()
    };
    let accept = match a.format {
        OutputFormat::Table => "application/vnd.apache.arrow.stream",
        OutputFormat::Csv => "text/csv",
        OutputFormat::Json => "application/json",
    };
    let (url, request) = a.client.request(reqwest::Method::POST, "/api/v1/sql")?;
    let resp = request
        .header("accept", accept)
        .body(query)
        .send()
        .await
        .with_context(|| format!("cannot reach the query service at {url}"))?;
    let status = resp.status();
    let body = resp.bytes().await.context("reading the response")?;
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("query failed ({status}): {message}");
    }
    match a.format {
        OutputFormat::Table => {
            let reader =
                arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None)
                    .context("decoding the Arrow result")?;
            let batches = reader
                .collect::<Result<Vec<_>, _>>()
                .context("decoding the Arrow result")?;
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            println!("{}", arrow::util::pretty::pretty_format_batches(&batches)?);
            println!("({rows} row{})", if rows == 1 { "" } else { "s" });
        }
        OutputFormat::Csv | OutputFormat::Json => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(&body)?;
            if !body.ends_with(b"\n") {
                out.write_all(b"\n")?;
            }
        }
    }
    Ok(())
}

fn check(a: CheckArgs) -> Result<()> {
    let mut failed = 0;
    let mut mesh_files = Vec::new();
    for file in lumen_control::discovery::config_files(&a.files)? {
        if is_query_settings(&file) {
            match QuerySettings::load(&file) {
                Ok(_) => println!("{}: OK (QueryService settings)", file.display()),
                Err(e) => {
                    eprintln!("{e}");
                    failed += 1;
                }
            }
        } else {
            mesh_files.push(file);
        }
    }
    if !mesh_files.is_empty() {
        match lumen_control::load(&mesh_files) {
            Ok(mesh) => {
                let endpoints: usize = mesh.services.iter().map(|s| s.endpoints.len()).sum();
                let names: Vec<String> =
                    mesh_files.iter().map(|f| f.display().to_string()).collect();
                println!(
                    "{}: OK ({} services, {} endpoints, {} virtual services, {} destination rules, {} gateways)",
                    names.join(", "),
                    mesh.services.len(),
                    endpoints,
                    mesh.virtual_services.len(),
                    mesh.destination_rules.len(),
                    mesh.gateways.len()
                );
            }
            Err(e) => {
                eprintln!("{e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    Ok(())
}

/// Whether a file holds a `QueryService` resource rather than a mesh: its
/// first `kind:` line says. Anything else is checked as a mesh file, whose
/// errors then name the problem.
fn is_query_settings(file: &std::path::Path) -> bool {
    std::fs::read_to_string(file).is_ok_and(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix("kind:"))
            .is_some_and(|k| k.trim() == lumen_query::settings::KIND)
    })
}
