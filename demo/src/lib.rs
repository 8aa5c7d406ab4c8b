//! `lumen demo`: the whole mesh on one machine, with traffic.
//!
//! Starts the collector and query service, the Bookinfo sample
//! ([`bookinfo`]) with one sidecar per app instance, an ingress gateway in
//! front of `productpage`, and a load generator ([`load`]) with its own
//! sidecar sending steady traffic to `productpage`. Everything listens on
//! 127.0.0.1; sidecar ports are picked at run time and written, with
//! Istio-form routing ([`mesh`]), into files in the data directory that a
//! control plane watches and streams to every sidecar.

#![forbid(unsafe_code)]

pub mod bookinfo;
pub mod load;
pub mod mesh;
pub mod otel;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use lumen_collector::{Collector, CollectorConfig, Store};
use lumen_core::config::DEFAULT_NAMESPACE;
use lumen_core::{MeshConfig, Workload};
use lumen_proxy::{Proxy, ProxyConfig};
use lumen_query::flight_sql::FlightSqlServer;
use lumen_query::pg::PgServer;
use lumen_query::{QueryConfig, QueryEngine, QueryServer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bookinfo::App;
use crate::load::LoadStats;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Collector(#[from] lumen_collector::CollectorError),
    #[error(transparent)]
    Query(#[from] lumen_query::ServeError),
    #[error(transparent)]
    Postgres(#[from] lumen_query::pg::PgError),
    #[error(transparent)]
    FlightSql(#[from] lumen_query::flight_sql::FlightSqlError),
    #[error(transparent)]
    Proxy(#[from] lumen_proxy::ProxyError),
    #[error("cannot listen on 127.0.0.1 for a demo app: {0}")]
    Bind(std::io::Error),
    #[error("demo mesh: {0}")]
    Config(#[from] lumen_core::ConfigError),
    #[error("demo setup: {0}")]
    Setup(String),
    #[error(transparent)]
    Control(#[from] lumen_control::ControlError),
    #[error(transparent)]
    Store(#[from] lumen_control::StoreError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Where the collector keeps data, and its listeners and limits.
    pub collector: CollectorConfig,
    /// Requests per second into `productpage`.
    pub rps: f64,
    pub query: SocketAddr,
    /// Postgres wire (loopback: the demo asks for no password).
    pub pg: SocketAddr,
    pub flight_sql: SocketAddr,
    pub query_config: QueryConfig,
    /// The control plane (`lumen apply`, `get`, `proxy-status` reach it).
    pub control: SocketAddr,
    /// The ingress gateway in front of productpage.
    pub ingress: SocketAddr,
    /// More resources to apply at start (`lumen demo -f`), watched too.
    pub files: Vec<PathBuf>,
    /// Prometheus rule groups the policy engine evaluates (Lumen's
    /// shipped rules, and the user's).
    pub rules: Vec<lumen_policy::RuleGroup>,
    pub evaluation_interval: std::time::Duration,
    /// Alertmanagers to send firing alerts to.
    pub alertmanagers: Vec<String>,
    /// Remote-write receivers to send the mesh's series to.
    pub remote_write: Option<lumen_query::remote_write::RemoteWriteConfig>,
    /// When ratings fails for [`INCIDENT`]: first after `incident_first`,
    /// then every `incident_every`.
    pub incident_first: std::time::Duration,
    pub incident_every: std::time::Duration,
}

/// How long one ratings incident lasts.
pub const INCIDENT: std::time::Duration = std::time::Duration::from_secs(20);

/// Makes ratings fail for [`INCIDENT`] after `first`, then every `every`,
/// until `stop`.
async fn incidents(
    incident: bookinfo::Incident,
    first: std::time::Duration,
    every: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut wait = first;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        tracing::warn!(
            "incident: ratings answers 503 for {}s — watch `lumen policy status` and policy_events",
            INCIDENT.as_secs()
        );
        incident.store(true, Ordering::Relaxed);
        tokio::select! {
            () = tokio::time::sleep(INCIDENT) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        incident.store(false, Ordering::Relaxed);
        tracing::warn!("incident over: ratings recovered");
        wait = every;
    }
}

/// A running demo; [`stop`](RunningDemo::stop) shuts it down in order.
pub struct RunningDemo {
    pub query_url: String,
    pub pg_addr: SocketAddr,
    pub flight_sql_addr: SocketAddr,
    pub otlp_grpc: SocketAddr,
    pub otlp_http: SocketAddr,
    pub data_dir: PathBuf,
    /// The files the demo's configuration lives in (edit them live).
    pub config_dir: PathBuf,
    pub control_addr: SocketAddr,
    pub ingress_addr: SocketAddr,
    /// `(workload, admin address)` of every sidecar.
    pub sidecars: Vec<(String, SocketAddr)>,
    pub load: Arc<LoadStats>,
    store: Arc<Store>,
    stop_load: watch::Sender<bool>,
    load_tasks: Vec<JoinHandle<()>>,
    stop_proxies: watch::Sender<bool>,
    proxy_tasks: Vec<JoinHandle<Result<(), lumen_proxy::ProxyError>>>,
    stop_apps: watch::Sender<bool>,
    app_tasks: Vec<JoinHandle<()>>,
    app_telemetry: Vec<Arc<otel::AppTelemetry>>,
    stop_control: watch::Sender<bool>,
    control_tasks: Vec<JoinHandle<()>>,
    stop_collector: watch::Sender<bool>,
    collector_task: JoinHandle<Result<(), lumen_collector::CollectorError>>,
    stop_query: watch::Sender<bool>,
    query_task: JoinHandle<Result<(), lumen_query::ServeError>>,
    pg_task: JoinHandle<std::io::Result<()>>,
    flight_sql_task: JoinHandle<Result<(), lumen_query::flight_sql::FlightSqlError>>,
}

/// What the demo did, for the closing summary.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub tables: Vec<lumen_collector::TableStats>,
}

/// Resolves once the flag turns true (or its sender is gone).
async fn until(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn local_listener() -> Result<TcpListener, DemoError> {
    TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(DemoError::Bind)
}

fn workload(service: &str, version: &str) -> Workload {
    Workload {
        service: service.into(),
        workload: format!("{service}-{version}").into(),
        namespace: DEFAULT_NAMESPACE.into(),
        version: version.into(),
    }
}

/// A sidecar before it follows the control plane: who it is, what it
/// shares with its stream, and where other sidecars reach it.
struct Follower {
    identity: Workload,
    quotas: Arc<lumen_proxy::quota::QuotaLedger>,
    tls: Arc<lumen_proxy::mtls::MeshTls>,
    service_account: String,
    inbound: Option<SocketAddr>,
    tx: watch::Sender<Arc<MeshConfig>>,
}

impl Follower {
    fn of(pc: &ProxyConfig, service_account: String, tx: watch::Sender<Arc<MeshConfig>>) -> Self {
        Follower {
            identity: pc.identity.clone(),
            quotas: pc.quotas.clone(),
            tls: pc.tls.clone(),
            service_account,
            inbound: None,
            tx,
        }
    }

    fn at(mut self, inbound: Option<SocketAddr>) -> Self {
        self.inbound = inbound;
        self
    }
}

/// Starts everything; returns once traffic is flowing.
pub fn start(config: DemoConfig) -> lumen_core::BoxFuture<'static, Result<RunningDemo, DemoError>> {
    Box::pin(start_inner(config))
}

async fn start_inner(config: DemoConfig) -> Result<RunningDemo, DemoError> {
    // Storage and query first, so the first request is recorded.
    let data_dir = config.collector.data_dir.clone();
    let collector = Collector::open(config.collector).await?;
    let store = collector.store();
    let (Some(otlp_grpc), Some(otlp_http)) =
        (collector.otlp_grpc_addr(), collector.otlp_http_addr())
    else {
        return Err(DemoError::Setup(
            "the demo needs both OTLP listeners (gRPC for the sidecars, HTTP for apps)".into(),
        ));
    };
    let query_config = QueryConfig {
        ingest: collector.ingest_pressure(),
        ..config.query_config
    };
    let engine = QueryEngine::new(store.clone(), query_config)
        .map_err(|e| DemoError::Setup(format!("cannot start the query executor: {e}")))?;
    let remote_writer = config
        .remote_write
        .clone()
        .map(|c| lumen_query::remote_write::RemoteWriter::new(engine.clone(), c))
        .transpose()
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    // The demo's listeners are for this machine only (loopback, no
    // credentials); `lumen up` takes TLS and tokens.
    let open = lumen_listen::Access::open();
    let pg = PgServer::bind(config.pg, engine.clone(), None, &open).await?;
    let pg_addr = pg.local_addr().unwrap_or(config.pg);
    let flight_sql = FlightSqlServer::bind(config.flight_sql, engine.clone(), &open).await?;
    let flight_sql_addr = flight_sql.local_addr().unwrap_or(config.flight_sql);
    let rules = Arc::new(
        lumen_policy::RuleEngine::new(config.rules.clone(), config.evaluation_interval)
            .recording_to(lumen_collector::events::RecordingWriter::new(
                collector.writer(),
            )),
    );
    let board = Arc::new(lumen_policy::decide::Board::default());
    let query = QueryServer::bind(config.query, engine.clone(), &open)
        .await?
        .with_routes(lumen_policy::http::router(rules.clone(), board.clone()))
        .with_routes(lumen_collector::ingest::remote_write::router(
            collector.writer(),
        ));
    let query_addr = query.local_addr().unwrap_or(config.query);
    let events = lumen_collector::events::PolicyEventWriter::new(collector.writer());
    let self_writer = collector.writer();
    let (stop_collector, rx) = watch::channel(false);
    let collector_task = tokio::spawn(collector.run(until(rx)));
    let (stop_query, rx) = watch::channel(false);
    let pg_task = tokio::spawn(pg.run(until(rx.clone())));
    let flight_sql_task = tokio::spawn(flight_sql.run(until(rx.clone())));
    let query_task = tokio::spawn(query.run(until(rx)));

    // One sidecar per app instance, bound before the mesh config exists:
    // the config lists their inbound addresses. Each follows the control
    // plane on a channel of its own, as a sidecar process would.
    let collector_endpoint = format!("http://{otlp_grpc}");
    let mut instances = Vec::new();
    let mut followers = Vec::new();
    let sidecar = |identity: Workload| {
        let mut pc = ProxyConfig::new(identity);
        pc.outbound = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        pc.admin = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        pc.telemetry.collector_endpoint = collector_endpoint.clone();
        pc
    };
    for app in App::all() {
        let listener = local_listener().await?;
        let app_addr = listener.local_addr().map_err(DemoError::Bind)?;
        let mut pc = sidecar(workload(app.service(), &app.version()));
        // The name the control plane knows it by (see the nodes below).
        pc.telemetry.instance = Some(format!("{}-{}", pc.identity.workload, followers.len()));
        pc.inbound = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        pc.app = Some(app_addr);
        let (tx, rx) = watch::channel(Arc::new(MeshConfig::default()));
        let follower = Follower::of(&pc, format!("bookinfo-{}", app.service()), tx);
        let proxy = Proxy::bind(pc, rx).await?;
        followers.push(follower.at(proxy.inbound_addr()));
        instances.push((app, listener, proxy));
    }
    let mut loadgen_config = sidecar(workload("loadgen", "v1"));
    loadgen_config.telemetry.collector_endpoint = collector_endpoint.clone();
    loadgen_config.telemetry.instance = Some(format!(
        "{}-{}",
        loadgen_config.identity.workload,
        followers.len()
    ));
    let (tx, rx) = watch::channel(Arc::new(MeshConfig::default()));
    followers.push(Follower::of(&loadgen_config, "loadgen".into(), tx));
    let loadgen_proxy = Proxy::bind(loadgen_config, rx).await?;
    let loadgen_outbound = loadgen_proxy
        .outbound_addr()
        .expect("loadgen sidecar has an outbound listener");
    // Istio's ingress gateway: productpage for your own requests.
    let mut ingress_config = sidecar(workload("istio-ingressgateway", "v1"));
    ingress_config.outbound = Some(config.ingress);
    ingress_config.gateway = true;
    ingress_config
        .labels
        .insert("istio".into(), "ingressgateway".into());
    let (tx, rx) = watch::channel(Arc::new(MeshConfig::default()));
    followers.push(Follower::of(
        &ingress_config,
        "istio-ingressgateway-service-account".into(),
        tx,
    ));
    let ingress_proxy = Proxy::bind(ingress_config, rx).await?;
    let ingress_addr = ingress_proxy.outbound_addr().unwrap_or(config.ingress);

    // The configuration, as files in the data directory, served by the
    // control plane.
    let config_dir = data_dir.join("config");
    let endpoints: Vec<(App, SocketAddr)> = instances
        .iter()
        .map(|(app, _, proxy)| {
            let inbound = proxy
                .inbound_addr()
                .expect("sidecar has an inbound listener");
            (*app, inbound)
        })
        .collect();
    mesh::write(&config_dir, &endpoints, ingress_addr.port())
        .map_err(|e| DemoError::Setup(format!("cannot write {}: {e}", config_dir.display())))?;
    let mut watched = vec![config_dir.clone()];
    watched.extend(config.files.iter().cloned());
    let resources = Arc::new(lumen_control::ConfigStore::open(
        lumen_control::discovery::load_resources(&watched)?,
        None,
    )?);
    // Changes to the demo's mesh need no credentials: this machine only.
    if !config.control.ip().is_loopback() {
        return Err(DemoError::Setup(format!(
            "the demo's control plane on {} would let anyone who reaches it change the mesh: \
             listen on 127.0.0.1 (lumen up takes --token-file)",
            config.control
        )));
    }
    let control_listener =
        TcpListener::bind(config.control)
            .await
            .map_err(|source| DemoError::Listen {
                what: "control plane",
                addr: config.control,
                source,
            })?;
    let control_addr = control_listener.local_addr().unwrap_or(config.control);
    // The mesh CA, its root kept in the data directory.
    let ca_dir = data_dir.join("ca");
    let ca = lumen_control::ca::MeshCa::open(
        &lumen_control::ca::CaSource::Generated(ca_dir.clone()),
        lumen_core::identity::DEFAULT_TRUST_DOMAIN,
    )
    .map_err(|e| DemoError::Setup(e.to_string()))?;
    let join_token = lumen_control::ca::join_token(&ca_dir.join("join-token"))
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let security = lumen_control::server::Security {
        ca,
        join_tokens: vec![join_token.clone()],
        reviewer: None,
    };
    let (stop_control, control_rx) = watch::channel(false);
    let control_service =
        lumen_control::ControlService::new(resources.clone()).with_security(security);
    {
        // Which proxies run which config, on /metrics (and so recorded).
        let service = control_service.clone();
        engine.add_metrics(Arc::new(move || service.metrics_text()));
    }
    let control_tasks = vec![
        tokio::spawn({
            let service = control_service.clone();
            let rx = control_rx.clone();
            async move {
                if let Err(e) =
                    lumen_control::server::serve(control_listener, service, until(rx)).await
                {
                    tracing::error!(error = %e, "control plane stopped");
                }
            }
        }),
        tokio::spawn(lumen_control::feed_store(
            watched,
            resources.clone(),
            std::time::Duration::from_millis(250),
            control_rx.clone(),
        )),
    ];
    // The policy engine, as in `lumen up`: rules over the live series,
    // decisions streamed to every sidecar, changes into `policy_events`.
    let mut control_tasks = control_tasks;
    if let Some(w) = remote_writer {
        control_tasks.push(tokio::spawn(w.run(control_rx.clone())));
    }
    control_tasks.push(tokio::spawn(lumen_query::self_metrics::record(
        engine.clone(),
        lumen_collector::events::RecordingWriter::new(self_writer),
        query_addr.to_string(),
        control_rx.clone(),
    )));
    control_tasks.push(tokio::spawn(
        rules.clone().run(engine.clone(), control_rx.clone()),
    ));
    control_tasks.push(tokio::spawn({
        let (config_of, publish) = (resources.clone(), resources.clone());
        lumen_policy::decide::run(
            rules.clone(),
            board,
            move || lumen_policy::decide::Policies::of(&config_of.current().mesh),
            move |on| publish.set_active_policies(on),
            move |rows| events.write(rows),
            control_rx.clone(),
        )
    }));
    if !config.alertmanagers.is_empty() {
        let notifier = Arc::new(lumen_policy::notify::Notifier::new(
            config.alertmanagers.clone(),
            format!("http://{query_addr}/api/v1/alerts"),
        ));
        let counted = notifier.clone();
        engine.add_metrics(Arc::new(move || counted.metrics_text()));
        control_tasks.push(tokio::spawn(notifier.run(rules.clone(), control_rx)));
    }
    let (stop_proxies, proxies_rx) = watch::channel(false);
    let control_url = format!("http://{control_addr}");
    let mut proxy_tasks = Vec::new();
    let mut first_configs = Vec::new();
    let mut identities = Vec::new();
    for (n, f) in followers.into_iter().enumerate() {
        let Follower {
            identity,
            quotas,
            tls,
            service_account,
            inbound,
            tx,
        } = f;
        let rx = tx.subscribe();
        let node = lumen_core::control::v1::Node {
            id: format!("{}-{n}", identity.workload),
            service: identity.service.to_string(),
            namespace: identity.namespace.to_string(),
            workload: identity.workload.to_string(),
            version: identity.version.to_string(),
            inbound_address: inbound.map(|a| a.to_string()).unwrap_or_default(),
            spiffe_id: String::new(),
        };
        // Every sidecar certified by the demo's mesh CA, as with a join
        // token in `lumen proxy`.
        let certifier = lumen_proxy::mtls::Certifier {
            endpoint: lumen_proxy::controlplane::ControlEndpoint::plain(control_url.clone()),
            join_token: join_token.clone(),
            token_file: None,
            namespace: identity.namespace.to_string(),
            service_account,
            lifetime: None,
        };
        proxy_tasks.push(tokio::spawn({
            let certified =
                lumen_proxy::mtls::keep_certified(tls.clone(), certifier, proxies_rx.clone());
            async move {
                certified.await;
                Ok(())
            }
        }));
        identities.push(tls.clone());
        proxy_tasks.push(tokio::spawn({
            let follow = lumen_proxy::subscribe::follow(
                lumen_proxy::controlplane::ControlEndpoint::plain(control_url.clone()),
                node,
                tx,
                lumen_proxy::subscribe::DEFAULT_POLICY_STALENESS,
                quotas,
                tls,
                proxies_rx.clone(),
            );
            async move {
                follow.await;
                Ok(())
            }
        }));
        first_configs.push(rx);
    }
    // Every sidecar has its routes before any traffic starts.
    for mut rx in first_configs {
        let waited = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            rx.wait_for(|m| !m.version.is_empty()),
        )
        .await;
        if !matches!(waited, Ok(Ok(_))) {
            return Err(DemoError::Setup(
                "a sidecar got no configuration from the demo's control plane within 10 s".into(),
            ));
        }
    }
    // …and its certificate, and knows every app's sidecar takes mTLS: the
    // mesh is STRICT.
    let certified = async {
        loop {
            let ready = identities.iter().all(|t| {
                t.ready()
                    && endpoints
                        .iter()
                        .all(|(_, address)| t.peer(*address).is_some())
            });
            if ready {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(std::time::Duration::from_secs(10), certified)
        .await
        .is_err()
    {
        return Err(DemoError::Setup(
            "the sidecars got no certificates from the demo's mesh CA within 10 s".into(),
        ));
    }

    let (stop_apps, apps_rx) = watch::channel(false);
    let incident = bookinfo::Incident::default();
    let mut sidecars = Vec::new();
    let mut app_tasks = Vec::new();
    let mut app_telemetry = Vec::new();
    let apps_endpoint = format!("http://{otlp_grpc}");
    for (app, listener, proxy) in instances {
        let outbound = proxy
            .outbound_addr()
            .expect("sidecar has an outbound listener");
        if let Some(admin) = proxy.admin_addr() {
            sidecars.push((format!("{}-{}", app.service(), app.version()), admin));
        }
        // The apps' own spans, metrics and logs, as instrumented apps send
        // them; without them the demo still runs on the sidecars' records.
        // The database is not instrumented, as Bookinfo's MongoDB is not.
        let telemetry = if app == bookinfo::App::MongoDb {
            None
        } else {
            match otel::AppTelemetry::start(app, &apps_endpoint) {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    tracing::warn!(app = app.service(), error = %e, "app telemetry off");
                    None
                }
            }
        };
        app_telemetry.extend(telemetry.clone());
        app_tasks.push(tokio::spawn(bookinfo::serve(
            app,
            listener,
            outbound,
            telemetry,
            incident.clone(),
            apps_rx.clone(),
        )));
        proxy_tasks.push(tokio::spawn(proxy.run(until(proxies_rx.clone()))));
    }
    if let Some(admin) = loadgen_proxy.admin_addr() {
        sidecars.push(("loadgen-v1".to_string(), admin));
    }
    proxy_tasks.push(tokio::spawn(loadgen_proxy.run(until(proxies_rx.clone()))));
    if let Some(admin) = ingress_proxy.admin_addr() {
        sidecars.push(("istio-ingressgateway-v1".to_string(), admin));
    }
    proxy_tasks.push(tokio::spawn(ingress_proxy.run(until(proxies_rx))));

    app_tasks.push(tokio::spawn(incidents(
        incident,
        config.incident_first,
        config.incident_every,
        apps_rx.clone(),
    )));
    let load = Arc::new(LoadStats::default());
    let (stop_load, load_rx) = watch::channel(false);
    let load_task = tokio::spawn(load::run(
        loadgen_outbound,
        format!("productpage:{}", bookinfo::PORT),
        "/productpage?id=".to_string(),
        config.rps,
        load.clone(),
        load_rx.clone(),
    ));
    // Once a second the load generator tries ratings directly, which only
    // reviews may call: denied rows to find.
    let probe_task = tokio::spawn(load::run(
        loadgen_outbound,
        format!("ratings:{}", bookinfo::PORT),
        "/ratings/".to_string(),
        1.0,
        Arc::new(LoadStats::default()),
        load_rx,
    ));

    Ok(RunningDemo {
        query_url: format!("http://{query_addr}/api/v1/sql"),
        pg_addr,
        flight_sql_addr,
        otlp_grpc,
        otlp_http,
        data_dir,
        config_dir,
        control_addr,
        ingress_addr,
        sidecars,
        load,
        store,
        stop_load,
        load_tasks: vec![load_task, probe_task],
        stop_proxies,
        proxy_tasks,
        stop_apps,
        app_tasks,
        app_telemetry,
        stop_control,
        control_tasks,
        stop_collector,
        collector_task,
        stop_query,
        query_task,
        pg_task,
        flight_sql_task,
    })
}

impl RunningDemo {
    /// Rows stored per table so far.
    pub fn tables(&self) -> Vec<lumen_collector::TableStats> {
        self.store.stats()
    }

    /// Stops queries (reads: nothing is lost, and a runaway must not slow
    /// the rest), traffic, then sidecars (which export what they hold), then
    /// the apps, then the collector (which flushes to Parquet).
    pub fn stop(self) -> lumen_core::BoxFuture<'static, Result<DemoReport, DemoError>> {
        Box::pin(self.stop_inner())
    }

    async fn stop_inner(self) -> Result<DemoReport, DemoError> {
        let _ = self.stop_query.send(true);
        let _ = self.stop_load.send(true);
        for t in self.load_tasks {
            let _ = t.await;
        }
        let _ = self.stop_proxies.send(true);
        for t in self.proxy_tasks {
            if let Ok(Err(e)) = t.await {
                tracing::warn!(error = %e, "sidecar stopped with an error");
            }
        }
        let _ = self.stop_control.send(true);
        for t in self.control_tasks {
            let _ = t.await;
        }
        let _ = self.stop_apps.send(true);
        for t in self.app_tasks {
            let _ = t.await;
        }
        // The apps send what their SDKs still hold, while the collector runs.
        let telemetry = self.app_telemetry;
        let _ = tokio::task::spawn_blocking(move || {
            for t in &telemetry {
                t.shutdown();
            }
        })
        .await;
        let _ = self.stop_collector.send(true);
        let collector = self.collector_task.await;
        let _ = self.query_task.await;
        let _ = self.pg_task.await;
        let _ = self.flight_sql_task.await;
        if let Ok(Err(e)) = collector {
            return Err(e.into());
        }
        Ok(DemoReport {
            sent: self.load.sent.load(Ordering::Relaxed),
            ok: self.load.ok.load(Ordering::Relaxed),
            failed: self.load.failed.load(Ordering::Relaxed),
            tables: self.store.stats(),
        })
    }
}
