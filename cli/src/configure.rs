//! The control plane's commands: `lumen control` (the control plane alone),
//! and its clients `lumen apply`, `delete`, `get` and `proxy-status`, which
//! find it at 127.0.0.1:15010 unless `--control` says otherwise — so they
//! work against `lumen up` and `lumen demo` with no flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use lumen_control::{ConfigStore, ControlService};
use lumen_core::control::v1::control_plane_client::ControlPlaneClient;
use lumen_core::control::{self, v1};
use lumen_core::resource::{Kind, Resource, parse_resources};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Where the control plane listens, and its mesh CA, for the servers that
/// run one.
#[derive(Args, Clone)]
pub struct ControlPlaneArgs {
    /// The control plane's gRPC port: proxies' config streams, `lumen apply`,
    /// certificates.
    #[arg(long, default_value = control::DEFAULT_ADDR)]
    pub control_addr: SocketAddr,
    /// The mesh's trust domain: workload identities are
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    #[arg(long, default_value = lumen_core::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The mesh CA's certificate (PEM, followed by its chain up to the
    /// root) [default: a self-signed root made on first start and kept in
    /// the data directory].
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The private key of --ca-cert (PEM).
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// How long workload certificates last; proxies renew at half.
    #[arg(long, default_value = "24h", value_parser = crate::parse_duration)]
    pub workload_cert_ttl: std::time::Duration,
    /// The token local proxies prove themselves with to get a certificate
    /// (`lumen proxy --join-token-file`) [default: made on first start,
    /// kept as `join-token` in the data directory's CA folder].
    #[arg(long)]
    pub join_token_file: Option<PathBuf>,
}

impl ControlPlaneArgs {
    /// The mesh CA, its files under `dir` (made there on first start).
    pub fn ca(&self, dir: &std::path::Path) -> Result<lumen_control::ca::MeshCa> {
        use lumen_control::ca::{CaSource, MeshCa};
        if !lumen_core::identity::valid_segment(&self.trust_domain) {
            bail!(
                "--trust-domain {:?} is not a valid trust domain (lowercase letters, digits, '-', '.')",
                self.trust_domain
            );
        }
        let source = match (&self.ca_cert, &self.ca_key) {
            (Some(cert), Some(key)) => CaSource::Files {
                cert: cert.clone(),
                key: key.clone(),
                dir: dir.to_path_buf(),
            },
            _ => CaSource::Generated(dir.to_path_buf()),
        };
        Ok(MeshCa::open(&source, &self.trust_domain)
            .context("starting the mesh CA")?
            .with_lifetime(self.workload_cert_ttl))
    }

    /// The mesh CA and the join tokens it takes, files under `dir`.
    pub fn security(&self, dir: &std::path::Path) -> Result<lumen_control::server::Security> {
        let ca = self.ca(dir)?;
        let token_file = self
            .join_token_file
            .clone()
            .unwrap_or_else(|| dir.join("join-token"));
        let token = lumen_control::ca::join_token(&token_file)
            .with_context(|| format!("reading the join token {}", token_file.display()))?;
        tracing::info!(
            trust_domain = %self.trust_domain,
            join_token = %token_file.display(),
            "mesh CA ready"
        );
        Ok(lumen_control::server::Security {
            ca,
            join_tokens: vec![token],
            reviewer: None,
        })
    }
}

/// `lumen control`.
#[derive(Args)]
pub struct ControlArgs {
    /// Configuration files or directories (Mesh, Istio networking kinds);
    /// repeatable; watched.
    #[arg(short = 'f', long = "file")]
    pub file: Vec<PathBuf>,
    #[command(flatten)]
    pub listen: ControlPlaneArgs,
    /// Where the configuration applied with `lumen apply` is kept across
    /// restarts.
    #[arg(long, default_value = "lumen-control-data")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub inject: InjectArgs,
    #[command(flatten)]
    pub kube: KubernetesArgs,
    /// Also serve the control plane over TLS here (Istio's 15012), with a
    /// certificate from the mesh CA for --control-tls-dns: sidecars given
    /// `--control https://…` and the trust bundle check it, and their
    /// tokens travel encrypted.
    #[arg(long)]
    pub control_tls_addr: Option<SocketAddr>,
    /// DNS names of the TLS port's certificate (repeatable).
    #[arg(
        long = "control-tls-dns",
        default_value = "lumen-control.lumen-system.svc"
    )]
    pub control_tls_dns: Vec<String>,
    /// Serve `/ready`, `/healthz` and `/metrics` (Prometheus text) here.
    #[arg(long, default_value = "127.0.0.1:15014")]
    pub monitoring_addr: SocketAddr,
    /// Operators' bearer tokens (kube-apiserver's --token-auth-file form:
    /// `token,user[,uid[,"groups"]]` per line): once given, apply, delete,
    /// get, proxy-status and policy decisions need one (`lumen apply
    /// --token`, LUMEN_TOKEN). Needed to listen beyond loopback.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

/// The cluster as a source of configuration.
#[derive(Args, Clone)]
pub struct KubernetesArgs {
    /// Watch the Kubernetes API (in-cluster, or KUBECONFIG): Services,
    /// EndpointSlices, Pods, Nodes and Namespaces make the mesh's services;
    /// Istio's networking and security resources and Lumen's policy
    /// resources are read from the cluster and each gets a status.
    #[arg(long)]
    pub kubernetes: bool,
    /// Only namespaces with these labels are in the mesh, as Istio's
    /// discoverySelectors (`key=value[,key=value]`; repeatable: any
    /// selector matching is enough) [default: every namespace].
    #[arg(long = "discovery-selector", value_parser = lumen_control::controller::parse_selector)]
    pub discovery_selectors: Vec<std::collections::BTreeMap<String, String>>,
    /// The namespace of the leader-election Lease (only the leader writes
    /// statuses and the webhook's caBundle; every replica serves proxies).
    #[arg(long, env = "POD_NAMESPACE", default_value = "lumen-system")]
    pub lease_namespace: String,
    /// The leader-election Lease's name.
    #[arg(long, default_value = "lumen-control")]
    pub lease_name: String,
    /// This replica's identity in the Lease [default: the host name].
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Keep the mesh CA in this Secret (in --lease-namespace), shared by
    /// every replica: the first one makes the root, the others and every
    /// restart take it from there. A Secret you made (`ca-cert.pem` with
    /// its chain, `ca-key.pem`) is used as it is.
    #[arg(long, requires = "kubernetes", conflicts_with = "ca_cert")]
    pub ca_secret: Option<String>,
    /// The MutatingWebhookConfiguration given the mesh CA's bundle (with
    /// --webhook-addr and --kubernetes).
    #[arg(long, default_value = "lumen-sidecar-injector")]
    pub webhook_configuration: String,
}

/// The sidecar injector (a mutating admission webhook), when the control
/// plane serves one.
#[derive(Args, Clone)]
pub struct InjectArgs {
    /// Serve the sidecar injector's webhook here over HTTPS (`POST
    /// /inject`), with a certificate from the mesh CA for --webhook-dns.
    #[arg(long)]
    pub webhook_addr: Option<SocketAddr>,
    /// DNS names of the webhook's certificate: its Service's, as the API
    /// server calls it (repeatable).
    #[arg(long = "webhook-dns", default_value = "lumen-control.lumen-system.svc")]
    pub webhook_dns: Vec<String>,
    /// The sidecar image injected pods run (it holds lumen-proxy and
    /// lumen-init).
    #[arg(long, default_value = "ghcr.io/lumen-mesh/lumen-proxy:latest")]
    pub proxy_image: String,
    /// The control plane as injected sidecars reach it: its TLS port
    /// (checked against the mesh root each meshed namespace gets in the
    /// lumen-ca-root-cert ConfigMap), or `host:port` for plaintext.
    #[arg(long, default_value = "https://lumen-control.lumen-system.svc:15012")]
    pub injected_control: String,
    /// The collector's OTLP gRPC endpoint as injected sidecars reach it.
    #[arg(long, default_value = "http://lumen-collector.lumen-system.svc:4317")]
    pub injected_collector: String,
    /// Take a pod's projected service-account token (audience `lumen`) as
    /// a sidecar's proof of identity, checked with a TokenReview against
    /// the Kubernetes API (in-cluster, or KUBECONFIG).
    #[arg(long)]
    pub token_review: bool,
}

impl InjectArgs {
    pub fn injector(&self) -> lumen_control::inject::Injector {
        lumen_control::inject::Injector {
            image: self.proxy_image.clone(),
            control: self.injected_control.clone(),
            collector: self.injected_collector.clone(),
            ..Default::default()
        }
    }
}

/// How a client finds the control plane.
#[derive(Args, Clone)]
pub struct ControlClientArgs {
    /// The control plane (`host:port`, `http://host:port`, or
    /// `https://host:port` with --control-ca).
    #[arg(long, default_value = control::DEFAULT_ADDR)]
    pub control: String,
    /// The roots (PEM: the mesh's trust bundle) an `https://` --control
    /// is checked against.
    #[arg(long, value_name = "FILE")]
    pub control_ca: Option<PathBuf>,
    /// Your token, when the control plane was started with --token-file.
    #[arg(long, env = "LUMEN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Sends a bearer token with every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer> {
        token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse()
                    .context("the token is not printable ASCII")
            })
            .transpose()
            .map(Bearer)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

pub type Client = ControlPlaneClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

impl ControlClientArgs {
    async fn connect(&self) -> Result<Client> {
        let url = endpoint_url(&self.control);
        let bearer = Bearer::new(self.token.as_deref())?;
        let channel = lumen_proxy::controlplane::ControlEndpoint::open(
            url.clone(),
            self.control_ca.as_deref(),
            "--control-ca",
        )
        .and_then(|e| e.endpoint())
        .map_err(anyhow::Error::msg)?
        .connect()
            .await
            .with_context(|| format!("cannot reach the control plane at {url} (is `lumen up`, `lumen demo` or `lumen control` running? --control to change)"))?;
        Ok(ControlPlaneClient::with_interceptor(channel, bearer))
    }
}

/// `host:port` as the `http://` URL gRPC dials.
pub use lumen_sidecar::endpoint_url;

#[derive(Args)]
pub struct ApplyArgs {
    /// Files or directories of resources to create or replace.
    #[arg(short = 'f', long = "file", required = true)]
    pub file: Vec<PathBuf>,
    /// Validate against the running configuration without applying.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub client: ControlClientArgs,
}

#[derive(Args)]
pub struct DeleteArgs {
    /// Files or directories naming the resources to delete.
    #[arg(short = 'f', long = "file", conflicts_with_all = ["kind", "name"])]
    pub file: Vec<PathBuf>,
    /// A kind (`vs`, `virtualservice`, `dr`, …), with NAME.
    pub kind: Option<String>,
    pub name: Option<String>,
    #[arg(short = 'n', long, default_value = lumen_core::config::DEFAULT_NAMESPACE)]
    pub namespace: String,
    #[command(flatten)]
    pub client: ControlClientArgs,
}

#[derive(Args)]
pub struct GetArgs {
    /// A kind (`vs`, `dr`, `se`, `gw`, `mesh`, or `all`).
    #[arg(default_value = "all")]
    pub kind: String,
    /// Only this namespace [default: all].
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// `table`, `yaml` or `json`.
    #[arg(short = 'o', long, default_value = "table")]
    pub output: String,
    #[command(flatten)]
    pub client: ControlClientArgs,
}

#[derive(Args)]
pub struct ProxyStatusArgs {
    #[command(flatten)]
    pub client: ControlClientArgs,
}

/// Where a control plane listens and whom it trusts.
pub struct Serving {
    pub addr: SocketAddr,
    /// The mesh CA and the join tokens certificates are issued against.
    pub security: lumen_control::server::Security,
    /// Operators' tokens: changes and reads of the configuration.
    pub operators: Arc<lumen_listen::Access>,
}

/// A control plane serving `resources`, read from `files` and watched there
/// (and what was applied before, kept in `persist`) as `serving` says until
/// `stop`: the listener's address and the serving and file-watching tasks,
/// and the service (for its metrics).
pub async fn start(
    resources: Vec<Resource>,
    files: &[PathBuf],
    persist: Option<PathBuf>,
    serving: Serving,
    poll: std::time::Duration,
    stop: &watch::Receiver<bool>,
) -> Result<(
    SocketAddr,
    Arc<ConfigStore>,
    ControlService,
    Vec<JoinHandle<()>>,
)> {
    let Serving {
        addr,
        security,
        operators,
    } = serving;
    if let Some(dir) = persist.as_ref().and_then(|p| p.parent()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Istio's 15010: config streams in cleartext (the TLS port is
    // --control-tls-addr), but changes need an operator's token.
    if !addr.ip().is_loopback() && !operators.requires_credentials() {
        bail!(
            "the control plane on {addr} would let anyone who reaches it change the mesh: \
             give --token-file (operators' tokens for apply, delete, get, proxy-status and \
             policy decisions), or listen on 127.0.0.1"
        );
    }
    let store = Arc::new(ConfigStore::open(resources, persist)?);
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (control plane; --control-addr to change)")
    })?;
    let local = listener.local_addr()?;
    let mut tasks = Vec::new();
    let mut s = stop.clone();
    let service = ControlService::new(store.clone())
        .with_security(security)
        .with_operators(operators);
    let handle = service.clone();
    tasks.push(tokio::spawn(async move {
        let shutdown = async move {
            let _ = s.wait_for(|s| *s).await;
        };
        if let Err(e) = lumen_control::server::serve(listener, service, shutdown).await {
            tracing::error!(error = %e, "control plane server failed");
        }
    }));
    if !files.is_empty() {
        tasks.push(tokio::spawn(lumen_control::feed_store(
            files.to_vec(),
            store.clone(),
            poll,
            stop.clone(),
        )));
    }
    let current = store.current();
    tracing::info!(
        control = %local,
        version = %current.version,
        services = current.mesh.services.len(),
        virtual_services = current.mesh.virtual_services.len(),
        destination_rules = current.mesh.destination_rules.len(),
        "control plane serving"
    );
    Ok((local, store, handle, tasks))
}

fn read_resources(paths: &[PathBuf]) -> Result<Vec<Resource>> {
    let mut out = Vec::new();
    for file in lumen_control::discovery::config_files(paths)? {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        out.extend(parse_resources(&file.display().to_string(), &text)?);
    }
    if out.is_empty() {
        bail!("no resources in {paths:?}");
    }
    Ok(out)
}

fn refused(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

pub async fn apply(a: ApplyArgs) -> Result<()> {
    let resources = read_resources(&a.file)?;
    let mut client = a.client.connect().await?;
    let reply = client
        .apply(v1::ApplyRequest {
            resources: resources.iter().map(v1::Resource::from).collect(),
            dry_run: a.dry_run,
        })
        .await
        .map_err(refused)?
        .into_inner();
    for line in reply.results {
        println!("{line}");
    }
    eprintln!("configuration version {}", reply.version);
    Ok(())
}

pub async fn delete(a: DeleteArgs) -> Result<()> {
    let keys: Vec<v1::ResourceKey> = match (&a.kind, &a.name) {
        (Some(kind), Some(name)) => {
            let kind = Kind::parse(kind).with_context(|| format!("unknown kind `{kind}`"))?;
            vec![v1::ResourceKey {
                kind: kind.as_str().into(),
                namespace: a.namespace.clone(),
                name: name.clone(),
            }]
        }
        (None, None) if !a.file.is_empty() => read_resources(&a.file)?
            .iter()
            .map(|r| v1::ResourceKey::from(&r.key()))
            .collect(),
        _ => bail!("name what to delete: -f FILE…, or KIND NAME"),
    };
    let mut client = a.client.connect().await?;
    let reply = client
        .delete(v1::DeleteRequest { keys })
        .await
        .map_err(refused)?
        .into_inner();
    for line in reply.results {
        println!("{line}");
    }
    eprintln!("configuration version {}", reply.version);
    Ok(())
}

pub async fn get(a: GetArgs) -> Result<()> {
    let mut client = a.client.connect().await?;
    let reply = client
        .get(v1::GetRequest {
            kind: a.kind.clone(),
            namespace: a.namespace.clone().unwrap_or_default(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    let resources: Vec<Resource> = reply
        .resources
        .iter()
        .map(Resource::try_from)
        .collect::<Result<_, _>>()?;
    let documents: Vec<serde_json::Value> = resources
        .iter()
        .map(|r| {
            let mut metadata = serde_json::json!({"name": r.name, "namespace": r.namespace});
            if !r.labels.is_empty() {
                metadata["labels"] = serde_json::json!(r.labels);
            }
            serde_json::json!({
                "apiVersion": r.api_version,
                "kind": r.kind.as_str(),
                "metadata": metadata,
                "spec": r.spec,
            })
        })
        .collect();
    match a.output.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(&documents)?),
        "yaml" => {
            for d in &documents {
                print!("---\n{}", serde_yaml_ng::to_string(d)?);
            }
        }
        "table" => {
            println!("{:<16} {:<12} {:<28} ORIGIN", "KIND", "NAMESPACE", "NAME");
            for r in &resources {
                println!(
                    "{:<16} {:<12} {:<28} {}",
                    r.kind.as_str(),
                    r.namespace,
                    r.name,
                    r.origin
                );
            }
        }
        other => bail!("unknown output `{other}`: table, yaml or json"),
    }
    eprintln!("configuration version {}", reply.version);
    Ok(())
}

pub async fn proxy_status(a: ProxyStatusArgs) -> Result<()> {
    let mut client = a.client.connect().await?;
    let reply = client
        .proxy_status(v1::ProxyStatusRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    println!("{:<36} {:<18} {:<18} STATUS", "PROXY", "SENT", "ACKED");
    for p in &reply.proxies {
        let id = p.node.as_ref().map_or("", |n| n.id.as_str());
        let status = if !p.nack_error.is_empty() {
            format!("NACK: {}", p.nack_error)
        } else if p.acked_version == reply.version {
            "SYNCED".to_string()
        } else {
            "STALE".to_string()
        };
        println!(
            "{id:<36} {:<18} {:<18} {status}",
            p.sent_version, p.acked_version
        );
    }
    eprintln!(
        "control plane version {}, {} proxies",
        reply.version,
        reply.proxies.len()
    );
    Ok(())
}
