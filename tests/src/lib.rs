//! Harness for Lumen's end-to-end tests: start the real `lumen` binary on
//! 127.0.0.1 with ports picked at run time, wait until it is ready, talk to
//! it as users and peers do, and stop it (SIGTERM, or SIGKILL to simulate a
//! crash). Test upstream apps run in-process.

#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod alertmanager;
pub mod flight;
pub mod otlp;
pub mod relay;
pub mod s3;
pub mod upstream;

/// What a process costs now — CPU time, resident memory, threads, open
/// files — read from /proc as its own `/metrics` reads them.
pub fn figures_of(pid: u32) -> Result<lumen_core::process::Figures> {
    lumen_core::process::Figures::of(pid).with_context(|| format!("reading /proc/{pid}"))
}

/// This crate's directory (`tests/`), where its fixtures live.
///
/// Read at run time: `cargo test` sets `CARGO_MANIFEST_DIR` for the checkout
/// it runs in, while `env!` would keep the path of whichever checkout first
/// compiled the test into a shared `CARGO_TARGET_DIR`.
pub fn crate_dir() -> PathBuf {
    manifest_dir(env!("CARGO_MANIFEST_DIR"))
}

/// `CARGO_MANIFEST_DIR` of the running `cargo test`, or `built_in` (the
/// compile-time value) when the test binary runs on its own.
pub fn manifest_dir(built_in: &str) -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(built_in))
}

/// The `lumen` binary built beside this test (`target/<profile>/lumen`).
pub fn lumen_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LUMEN_BIN") {
        return PathBuf::from(p);
    }
    built_bin("lumen")
}

/// The sidecar's own binary, `lumen-proxy`, built beside this test: what
/// [`Sidecar`] starts, as the injector runs it beside every pod.
pub fn lumen_proxy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LUMEN_PROXY_BIN") {
        return PathBuf::from(p);
    }
    built_bin("lumen-proxy")
}

fn built_bin(name: &str) -> PathBuf {
    // Test binaries live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary is in target/<profile>/deps");
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build --workspace --all-targets`",
        bin.display()
    );
    bin
}

/// A port on 127.0.0.1 that is free now, for a process started next.
///
/// Ports come from below the kernel's ephemeral range (32768–60999 by
/// default): a port the OS hands out for `:0` is also the kind it uses as
/// the source port of outgoing connections, and one of those may take it
/// before the process under test binds it. Each port is handed out once
/// per test binary, so tests running side by side never share one.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..10_000 {
        let port = rand::random_range(20_000..32_000u16);
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 between 20000 and 32000");
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A running `lumen` process; killed when dropped.
/// A peer process (Prometheus, …) killed when the test ends, however it
/// ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct LumenProcess {
    child: Option<Child>,
    name: String,
    log: PathBuf,
}

impl LumenProcess {
    /// Starts `lumen <args>`, logging to `<log_dir>/<name>.log`.
    pub fn spawn(name: &str, log_dir: &Path, args: &[String]) -> Result<Self> {
        Self::spawn_bin(&lumen_bin(), name, log_dir, args)
    }

    /// Starts `bin` (`lumen` or `lumen-proxy`) with `args`.
    pub fn spawn_bin(bin: &Path, name: &str, log_dir: &Path, args: &[String]) -> Result<Self> {
        Self::spawn_bin_env(bin, name, log_dir, args, &[])
    }

    /// As [`spawn_bin`](Self::spawn_bin), with more environment variables
    /// (an `LD_PRELOAD` shim, …).
    pub fn spawn_bin_env(
        bin: &Path,
        name: &str,
        log_dir: &Path,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {} {}", bin.display(), args.join(" ")))?;
        Ok(LumenProcess {
            child: Some(child),
            name: name.to_string(),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The process's output so far, for failure messages.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `url` until it answers 200; fails early if the process exits.
    pub async fn wait_ready(&mut self, url: &str) -> Result<()> {
        self.wait_ready_with(&reqwest::Client::new(), url).await
    }

    /// As [`wait_ready`](Self::wait_ready), through `client` (one that
    /// trusts a test CA, for an `https://` URL).
    pub async fn wait_ready_with(&mut self, client: &reqwest::Client, url: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{} exited with {status} before ready:\n{}",
                    self.name,
                    self.logs()
                );
            }
            if let Ok(r) = client.get(url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready at {url} after 60s:\n{}",
                    self.name,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit; returns the exit status code.
    pub fn terminate(&mut self) -> Result<i32> {
        Ok(self.stop_with("TERM", Duration::from_secs(60))?.0)
    }

    /// Sends `signal` (e.g. `INT`) and waits up to `within` for the process
    /// to exit; returns its exit code and how long it took.
    pub fn stop_with(&mut self, signal: &str, within: Duration) -> Result<(i32, Duration)> {
        let Some(mut child) = self.child.take() else {
            bail!("{} already stopped", self.name);
        };
        let sent = Instant::now();
        // The shell's builtin `kill`: no procps needed on a bare machine.
        Command::new("sh")
            .args(["-c", &format!("kill -{signal} {}", child.id())])
            .status()?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status.code().unwrap_or(-1), sent.elapsed()));
            }
            if sent.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not stop within {within:?} of SIG{signal}:\n{}",
                    self.name,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the process gets no chance to flush anything.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for LumenProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Ports of a `lumen up` instance.
#[derive(Debug, Clone, Copy)]
pub struct UpPorts {
    pub otlp_grpc: u16,
    pub otlp_http: u16,
    pub query: u16,
    pub pg: u16,
    pub flight_sql: u16,
    /// The control plane (proxies' `--control`, `lumen apply --control`).
    pub control: u16,
}

impl UpPorts {
    pub fn pick() -> Self {
        UpPorts {
            otlp_grpc: free_port(),
            otlp_http: free_port(),
            query: free_port(),
            pg: free_port(),
            flight_sql: free_port(),
            control: free_port(),
        }
    }

    /// `--control` for proxies and `lumen apply`.
    pub fn control_addr(&self) -> String {
        local(self.control).to_string()
    }

    pub fn sql_url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v1/sql", self.query)
    }

    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_grpc)
    }

    /// The data directory and listen flags `lumen up` and `lumen demo` take.
    pub fn flags(&self, data_dir: &Path) -> Vec<String> {
        let mut out = vec!["--data-dir".to_string(), data_dir.display().to_string()];
        for (flag, port) in [
            ("--otlp-grpc", self.otlp_grpc),
            ("--otlp-http", self.otlp_http),
            ("--query-addr", self.query),
            ("--pg-addr", self.pg),
            ("--flight-sql-addr", self.flight_sql),
            ("--control-addr", self.control),
        ] {
            out.extend([flag.to_string(), local(port).to_string()]);
        }
        out
    }
}

/// Starts `lumen up` (collector + query) and waits until it is ready.
pub async fn start_up(
    log_dir: &Path,
    mesh: &Path,
    data_dir: &Path,
    ports: UpPorts,
    extra: &[&str],
) -> Result<LumenProcess> {
    let mut args: Vec<String> = vec!["up".into(), "-f".into(), mesh.display().to_string()];
    args.extend(ports.flags(data_dir));
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut p = LumenProcess::spawn("lumen-up", log_dir, &args)?;
    p.wait_ready(&format!("http://127.0.0.1:{}/ready", ports.query))
        .await?;
    Ok(p)
}

/// Starts `lumen demo` on `ports` (its ingress on a port of its own), for
/// ten minutes unless `extra` says `--duration`, and waits until its query
/// service is ready.
pub async fn start_demo(
    log_dir: &Path,
    data_dir: &Path,
    ports: UpPorts,
    extra: &[&str],
) -> Result<LumenProcess> {
    let mut args: Vec<String> = vec!["demo".into()];
    if !extra.contains(&"--duration") {
        args.extend(["--duration".into(), "600".into()]);
    }
    args.extend(ports.flags(data_dir));
    args.extend(["--ingress".into(), local(free_port()).to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut p = LumenProcess::spawn("lumen-demo", log_dir, &args)?;
    p.wait_ready(&format!("http://127.0.0.1:{}/ready", ports.query))
        .await?;
    Ok(p)
}

/// Runs SQL through the HTTP API; returns JSON rows, or the error body.
pub async fn sql(url: &str, query: &str) -> Result<Vec<serde_json::Value>> {
    let resp = reqwest::Client::new()
        .post(url)
        .body(query.to_string())
        .send()
        .await?;
    let status = resp.status();
    let body = resp.text().await?;
    if !status.is_success() {
        bail!("SQL `{query}` failed with {status}: {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

/// The single integer a `SELECT count(*) AS n …` query returns.
pub async fn sql_count(url: &str, query: &str) -> Result<i64> {
    let rows = sql(url, query).await?;
    rows.first()
        .and_then(|r| r.get("n"))
        .and_then(|v| v.as_i64())
        .with_context(|| format!("no `n` in {rows:?}"))
}

/// Polls a count query until it reaches `want` (or 60 s pass); returns the
/// last value, so the caller asserts equality and sees overshoot too.
pub async fn wait_for_count(url: &str, query: &str, want: i64) -> Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = sql_count(url, query).await?;
        if n >= want || Instant::now() > deadline {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A service of a test mesh: name, port, and endpoints as (address, version).
pub type TestService<'a> = (&'a str, u16, &'a [(SocketAddr, &'a str)]);

/// Writes a mesh file of services → endpoint addresses.
pub fn write_mesh(path: &Path, services: &[TestService<'_>]) -> Result<()> {
    let mut y = String::from(
        "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata:\n  name: e2e\nspec:\n  services:\n",
    );
    for (name, port, endpoints) in services {
        y.push_str(&format!(
            "    - name: {name}\n      port: {port}\n      endpoints:\n"
        ));
        for (addr, version) in *endpoints {
            y.push_str(&format!(
                "        - address: {addr}\n          version: {version}\n"
            ));
        }
    }
    std::fs::write(path, y)?;
    Ok(())
}

/// Ports of one sidecar.
#[derive(Debug, Clone, Copy)]
pub struct SidecarPorts {
    pub outbound: u16,
    pub inbound: u16,
    pub admin: u16,
}

impl SidecarPorts {
    pub fn pick() -> Self {
        SidecarPorts {
            outbound: free_port(),
            inbound: free_port(),
            admin: free_port(),
        }
    }
}

/// One sidecar (`lumen-proxy`, the flags of `lumen proxy`) to start: who
/// it stands beside and where it listens.
pub struct Sidecar<'a> {
    pub service: &'a str,
    pub version: &'a str,
    /// Its configuration files; unused when `extra` has `--control`.
    pub mesh: &'a Path,
    pub ports: SidecarPorts,
    /// The local app; `None` runs the sidecar without an inbound listener.
    pub app: Option<SocketAddr>,
    /// OTLP/gRPC endpoint for its records.
    pub collector: &'a str,
    /// More flags for `lumen proxy`.
    pub extra: &'a [&'a str],
}

impl Sidecar<'_> {
    /// Starts it and waits for its admin `/ready`.
    pub async fn start(&self, log_dir: &Path) -> Result<LumenProcess> {
        self.start_env(log_dir, &[]).await
    }

    /// As [`start`](Self::start), with more environment variables.
    pub async fn start_env(
        &self,
        log_dir: &Path,
        env: &[(String, String)],
    ) -> Result<LumenProcess> {
        let mut args: Vec<String> = vec![
            "--service".into(),
            self.service.into(),
            "--version".into(),
            self.version.into(),
            "--outbound".into(),
            local(self.ports.outbound).to_string(),
            "--admin".into(),
            local(self.ports.admin).to_string(),
            "--collector".into(),
            self.collector.into(),
        ];
        // A sidecar of a control plane gets its config from it, not a file.
        if !self.extra.contains(&"--control") {
            args.extend(["-f".into(), self.mesh.display().to_string()]);
        }
        // One worker, as the benchmarks run Envoy, unless the test asks.
        if !self.extra.contains(&"--workers") {
            args.extend(["--workers".into(), "1".into()]);
        }
        match self.app {
            Some(a) => args.extend([
                "--inbound".into(),
                local(self.ports.inbound).to_string(),
                "--app".into(),
                a.to_string(),
            ]),
            None => args.push("--no-inbound".into()),
        }
        args.extend(self.extra.iter().map(|s| s.to_string()));
        let name = format!("sidecar-{}-{}", self.service, self.version);
        let mut p = LumenProcess::spawn_bin_env(&lumen_proxy_bin(), &name, log_dir, &args, env)?;
        p.wait_ready(&format!("http://127.0.0.1:{}/ready", self.ports.admin))
            .await?;
        Ok(p)
    }
}

/// Starts `lumen proxy` for one workload and waits for its admin `/ready`.
pub async fn start_sidecar(
    log_dir: &Path,
    service: &str,
    version: &str,
    mesh: &Path,
    ports: SidecarPorts,
    app: Option<SocketAddr>,
    collector: &str,
) -> Result<LumenProcess> {
    Sidecar {
        service,
        version,
        mesh,
        ports,
        app,
        collector,
        extra: &[],
    }
    .start(log_dir)
    .await
}

/// A peer tool on PATH (promtool, prometheus, psql…). The README's test
/// command installs them, so a missing tool fails the test, with the fix.
pub fn peer_tool(name: &str, install: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => p,
        None => panic!("{name} is not installed: {install} (./scripts/test.sh does it)"),
    }
}

/// Connections each worker of a sidecar accepted on its listener at
/// `127.0.0.1:listener`, by worker id, from Envoy's per-worker stat on the
/// admin port; with the whole exposition, for assertion messages.
pub async fn accepted_by_worker(admin: u16, listener: u16) -> Result<(Vec<u64>, String)> {
    let stats = reqwest::get(format!("http://127.0.0.1:{admin}/stats/prometheus"))
        .await?
        .text()
        .await?;
    let address = format!("envoy_listener_address=\"127.0.0.1_{listener}\"");
    let mut by_worker = Vec::new();
    for l in stats.lines() {
        let Some(labels) = l.strip_prefix("envoy_listener_worker_downstream_cx_total{") else {
            continue;
        };
        if !labels.contains(&address) {
            continue;
        }
        let worker = labels
            .split("envoy_worker_id=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next()?.parse::<usize>().ok());
        let count = l.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok());
        if let (Some(w), Some(n)) = (worker, count) {
            if by_worker.len() <= w {
                by_worker.resize(w + 1, 0);
            }
            by_worker[w] += n;
        }
    }
    Ok((by_worker, stats))
}

/// One sample of a `lumen up`'s own metrics on the query port's
/// `/metrics` (`series` is the name with its labels), or 0 if absent.
pub async fn metric(ports: &UpPorts, series: &str) -> Result<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", ports.query))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0))
}

/// Polls [`metric`] until `done` holds (or 60 s pass); returns the last value.
pub async fn wait_metric(ports: &UpPorts, series: &str, done: impl Fn(f64) -> bool) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = metric(ports, series).await?;
        if done(v) || Instant::now() > deadline {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `payloads` OTLP exports of `service`'s spans (1–40 each), each
/// flushed to a Parquet file of its own before the next; returns how many
/// spans.
pub async fn send_flushed(ports: &UpPorts, service: &str, payloads: usize) -> Result<i64> {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    let mut client = TraceServiceClient::connect(ports.grpc_endpoint()).await?;
    let mut sent = 0;
    for _ in 0..payloads {
        let n = rand::random_range(1..=40usize);
        let flushes = metric(ports, "lumen_flushes_total{outcome=\"ok\"}").await?;
        client.export(otlp::export(service, n, 0)).await?;
        sent += n as i64;
        wait_metric(ports, "lumen_flushes_total{outcome=\"ok\"}", |v| {
            v > flushes
        })
        .await?;
    }
    Ok(sent)
}

/// Waits past the top of the hour if it is less than `margin` away, for
/// tests whose files must all land in one hour partition.
pub async fn clear_of_hour_boundary(margin: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let left = Duration::from_secs(3600 - now.as_secs() % 3600);
    if left < margin {
        tokio::time::sleep(left + Duration::from_secs(1)).await;
    }
}

/// Rows DuckDB reads from the Parquet files `glob` matches.
pub fn duckdb_count(glob: &str) -> Result<i64> {
    let out = run_python(
        "import sys, duckdb\nprint(duckdb.connect().execute(f\"SELECT count(*) FROM read_parquet('{sys.argv[1]}')\").fetchone()[0])",
        &[glob],
    )?;
    Ok(out.trim().parse()?)
}

/// The Python interpreter used for peer clients (OpenTelemetry SDK, DuckDB).
pub fn python() -> String {
    std::env::var("LUMEN_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs a Python script; fails with its output if it fails. Peers are
/// installed by the README's test command, so a missing module is a failure.
pub fn run_python(script: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .with_context(|| format!("running {}", python()))?;
    if !out.status.success() {
        bail!(
            "python failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A connector that dials one address whatever the URI says, as an app does
/// when it sends every call to its sidecar while naming the service in the
/// authority (what `grpc.WithAuthority` does).
#[derive(Clone, Debug)]
pub struct DialSidecar(pub SocketAddr);

impl tower::Service<http::Uri> for DialSidecar {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(s))
        })
    }
}

/// An HTTP/2 (h2c, prior knowledge) client whose connections all go to `sidecar`.
pub fn h2_client_via(
    sidecar: SocketAddr,
) -> hyper_util::client::legacy::Client<DialSidecar, http_body_util::Full<bytes::Bytes>> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build(DialSidecar(sidecar))
}

/// Sum of a counter's series in a Prometheus exposition (a sidecar's
/// `/stats/prometheus`, say).
pub fn counter_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs a command to completion; its stdout, or an error with both
/// outputs when it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
