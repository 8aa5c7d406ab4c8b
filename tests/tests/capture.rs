//! Transparent outbound capture: inside a network namespace of its own,
//! iptables redirects the app's connections to service addresses
//! (cluster IPs) to the sidecar's outbound listener, which finds where
//! each was going from `SO_ORIGINAL_DST` — HTTP and opaque TCP alike;
//! under REGISTRY_ONLY only the registry's hosts are reachable.
//!
//! Needs root, `ip` (iproute2) and `iptables`, as CI has.

use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{Context, Result, bail};
use lumen_tests::upstream::start_app;
use lumen_tests::{
    SidecarPorts, UpPorts, local, peer_tool, sql, start_sidecar, start_up, wait_for_count,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A network namespace, deleted on drop.
struct Netns(String);

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Netns {
    fn create(what: &str) -> Result<Self> {
        let ip = peer_tool("ip", "apt-get install iproute2");
        let name = format!("lumen-{what}-{}", std::process::id());
        run(Command::new(&ip).args(["netns", "add", &name]))?;
        let ns = Netns(name);
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        // Service addresses live on no real network: make them local so
        // the kernel routes them, and iptables gets to rewrite them.
        ns.exec(&["ip", "addr", "add", "10.96.0.1/16", "dev", "lo"])?;
        Ok(ns)
    }

    fn exec(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args))
    }

    /// Redirects the app's connections to service addresses (10.96/16)
    /// to a sidecar's outbound port with `lumen-init`, the injected pod's
    /// init container — twice, as a restarted init container would: the
    /// second run replaces the rules.
    fn capture_to(&self, port: u16) -> Result<()> {
        let init = lumen_tests::lumen_proxy_bin().with_file_name("lumen-init");
        let port = port.to_string();
        let args = [
            init.to_str().context("lumen-init path")?,
            "--outbound-port",
            &port,
            "--include-outbound-cidr",
            "10.96.0.0/16",
            "--no-inbound",
        ];
        self.exec(&args)?;
        self.exec(&args)?;
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "iptables", "-t", "nat", "-S"])
            .output()?;
        let rules = String::from_utf8_lossy(&out.stdout);
        let jumps = rules
            .lines()
            .filter(|l| *l == "-A OUTPUT -p tcp -j LUMEN_OUTPUT")
            .count();
        assert_eq!(jumps, 1, "{rules}");
        Ok(())
    }

    /// Runs `f` on a thread inside the namespace; threads and processes it
    /// starts are inside too.
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = std::fs::File::open(format!("/var/run/netns/{}", self.0))?;
        std::thread::spawn(move || {
            // SAFETY: a valid namespace fd, for this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(anyhow::anyhow!(
                    "setns: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn captured_http_and_tcp_reach_their_services_through_the_sidecar() -> Result<()> {
    peer_tool("iptables", "apt-get install iptables");
    let ns = Netns::create("capture")?;
    let ports = ns.within(|| {
        (
            UpPorts::pick(),
            SidecarPorts::pick(),
            SidecarPorts::pick(),
            SidecarPorts::pick(),
        )
    })?;
    let (up_ports, caller, backend, echo) = ports;
    ns.capture_to(caller.outbound)?;
    ns.within(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(scenario(up_ports, caller, backend, echo))
    })?
}

async fn scenario(
    up_ports: UpPorts,
    caller: SidecarPorts,
    backend: SidecarPorts,
    echo: SidecarPorts,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let app = start_app("backend").await;
    let echo_app = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let echo_addr = echo_app.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo_app.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    // Two TLS servers in name only: each answers any bytes with its name,
    // so the test sees which one the ClientHello's server name reached.
    let mut named = Vec::new();
    for name in ["tls-a", "tls-b"] {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        named.push(l.local_addr()?);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(name.as_bytes()).await;
                });
            }
        });
    }
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "apiVersion: lumen.dev/v1alpha1
kind: Mesh
metadata:
  name: capture
spec:
  services:
    - name: backend
      clusterIP: 10.96.0.10
      port: 80
      endpoints: [{{address: {}}}]
    - name: echo
      clusterIP: 10.96.0.20
      port: 9000
      protocol: tcp
      endpoints: [{{address: {}}}]
    - name: edge
      clusterIP: 10.96.0.30
      port: 443
      protocol: tcp
    - {{name: tls-a, port: 443, protocol: tcp, endpoints: [{{address: {}}}]}}
    - {{name: tls-b, port: 443, protocol: tcp, endpoints: [{{address: {}}}]}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: edge}}
spec:
  hosts: [edge]
  tls:
  - match: [{{port: 443, sniHosts: [a.example.com]}}]
    route: [{{destination: {{host: tls-a}}}}]
  - match: [{{sniHosts: [\"*.example.com\"]}}]
    route: [{{destination: {{host: tls-b}}}}]
",
            local(backend.inbound),
            local(echo.inbound),
            named[0],
            named[1],
        ),
    )?;
    let _up = start_up(logs, &mesh, &dir.path().join("data"), up_ports, &[]).await?;
    let collector = up_ports.grpc_endpoint();
    let _caller = start_sidecar(logs, "caller", "v1", &mesh, caller, None, &collector).await?;
    let _backend =
        start_sidecar(logs, "backend", "v1", &mesh, backend, Some(app), &collector).await?;
    let _echo = start_sidecar(logs, "echo", "v1", &mesh, echo, Some(echo_addr), &collector).await?;

    // The app dials the service's address as if no proxy existed.
    let client = reqwest::Client::builder().no_proxy().build()?;
    let resp = client
        .get("http://10.96.0.10/status/201/captured")
        .send()
        .await?;
    assert_eq!(resp.status(), 201);
    let echoed: serde_json::Value = resp.json().await?;
    assert_eq!(echoed["app"], "backend");
    assert!(
        echoed["traceparent"].is_string(),
        "it went through the sidecars: {echoed}"
    );

    let mut s = tokio::net::TcpStream::connect("10.96.0.20:9000").await?;
    let payload = b"opaque bytes, captured";
    s.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).await?;
    assert_eq!(&back, payload);
    drop(s);

    // TLS by server name: the ClientHello alone picks the backend, and
    // every byte of it reaches that backend untouched.
    for (sni, expect) in [("a.example.com", "tls-a"), ("www.example.com", "tls-b")] {
        let mut s = tokio::net::TcpStream::connect("10.96.0.30:443").await?;
        s.write_all(&client_hello(sni)?).await?;
        let mut back = Vec::new();
        s.read_to_end(&mut back).await?;
        assert_eq!(String::from_utf8_lossy(&back), expect, "SNI {sni}");
    }
    // A name no route takes: refused, not sent anywhere.
    let mut s = tokio::net::TcpStream::connect("10.96.0.30:443").await?;
    s.write_all(&client_hello("other.org")?).await?;
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back).await;
    assert!(back.is_empty(), "{back:?}");

    let url = up_ports.sql_url();
    let http = "SELECT count(*) AS n FROM requests WHERE reporter = 'source' \
         AND destination_service = 'backend' AND status = 201 AND path = '/status/201/captured'";
    assert_eq!(wait_for_count(&url, http, 1).await?, 1);
    let n = payload.len();
    let tcp = format!(
        "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND protocol = 'tcp' \
         AND destination_service = 'echo' AND authority = 'echo:9000' \
         AND request_bytes = {n} AND response_bytes = {n}"
    );
    let got = wait_for_count(&url, &tcp, 1).await?;
    let rows = sql(&url, "SELECT reporter, protocol, destination_service, authority, request_bytes, response_bytes, response_flags FROM requests").await?;
    assert_eq!(got, 1, "{rows:?}");
    for (authority, service, route) in [
        ("a.example.com:443", "tls-a", "edge/tls-0"),
        ("www.example.com:443", "tls-b", "edge/tls-1"),
    ] {
        let q = format!(
            "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND protocol = 'tcp' \
             AND authority = '{authority}' AND destination_service = '{service}' \
             AND route = '{route}' AND response_flags = '-'"
        );
        assert_eq!(wait_for_count(&url, &q, 1).await?, 1, "{q}");
    }
    let nr = "SELECT count(*) AS n FROM requests WHERE authority = 'other.org:443' \
              AND response_flags = 'NR'";
    let got = wait_for_count(&url, nr, 1).await?;
    let rows = sql(&url, "SELECT reporter, authority, destination_service, route, response_flags FROM requests WHERE protocol = 'tcp'").await?;
    assert_eq!(got, 1, "{rows:?}");
    Ok(())
}

/// Istio's egress control: under `outboundTrafficPolicy: REGISTRY_ONLY`
/// (here a `Sidecar` in the root namespace, as `istioctl install --set
/// meshConfig.outboundTrafficPolicy.mode=REGISTRY_ONLY` would be
/// mesh-wide) a captured app reaches the ServiceEntry's host and nothing
/// else: other TLS names, bare addresses and unknown HTTP hosts are
/// refused, rowed as `BlackHoleCluster` and counted.
#[test]
fn registry_only_lets_apps_reach_only_what_the_registry_names() -> Result<()> {
    peer_tool("iptables", "apt-get install iptables");
    let ns = Netns::create("egress")?;
    let (up_ports, caller) = ns.within(|| (UpPorts::pick(), SidecarPorts::pick()))?;
    ns.capture_to(caller.outbound)?;
    ns.within(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(egress(up_ports, caller))
    })?
}

async fn egress(up_ports: UpPorts, caller: SidecarPorts) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    // The external API, in name only: it answers any bytes with its name.
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api_port = api.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = api.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"api.example.com").await;
            });
        }
    });
    let httpbin = start_app("httpbin-ext").await;
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: istio-system}}
spec:
  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api}}
spec:
  hosts: [api.example.com]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{tls: {api_port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: httpbin-ext}}
spec:
  hosts: [httpbin.example.org]
  addresses: [10.96.7.7]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {}}}}}]
",
            httpbin.port()
        ),
    )?;
    let _up = start_up(logs, &mesh, &dir.path().join("data"), up_ports, &[]).await?;
    let collector = up_ports.grpc_endpoint();
    let _caller = start_sidecar(logs, "crawler", "v1", &mesh, caller, None, &collector).await?;

    // In the registry: the ServiceEntry's TLS host (by SNI, at any address)…
    let mut s = tokio::net::TcpStream::connect("10.96.9.9:443").await?;
    s.write_all(&client_hello("api.example.com")?).await?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).await?;
    assert_eq!(String::from_utf8_lossy(&back), "api.example.com");
    // Its row is written when both sides have closed.
    drop(s);
    // …and its HTTP host at its address.
    let client = reqwest::Client::builder().no_proxy().build()?;
    let resp = client.get("http://10.96.7.7/get").send().await?;
    assert_eq!(resp.status(), 200);
    // Not in it: another TLS name, a bare address, an unknown HTTP host.
    let mut s = tokio::net::TcpStream::connect("10.96.9.9:443").await?;
    s.write_all(&client_hello("evil.example.net")?).await?;
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back).await;
    assert!(back.is_empty(), "{back:?}");
    let mut s = tokio::net::TcpStream::connect("10.96.9.10:9999").await?;
    s.write_all(b"hello?").await?;
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back).await;
    assert!(back.is_empty(), "{back:?}");
    let resp = client
        .get("http://10.96.9.11/")
        .header("host", "example.net")
        .send()
        .await?;
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-lumen-response-flags"], "NR");

    let url = up_ports.sql_url();
    let allowed = "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND response_flags = '-'                    AND destination_service IN ('api.example.com', 'httpbin.example.org')";
    let got = wait_for_count(&url, allowed, 2).await?;
    let rows = sql(&url, "SELECT reporter, protocol, authority, destination_service, status, response_flags FROM requests").await?;
    assert_eq!(got, 2, "{rows:?}");
    let refused = "SELECT count(*) AS n FROM requests WHERE destination_service = 'BlackHoleCluster'                    AND response_flags = 'NR'";
    let got = wait_for_count(&url, refused, 3).await?;
    let rows = sql(
        &url,
        "SELECT protocol, authority, destination_service, status, response_flags FROM requests",
    )
    .await?;
    assert_eq!(got, 3, "{rows:?}");
    let stats = reqwest::get(format!(
        "http://127.0.0.1:{}/stats/prometheus",
        caller.admin
    ))
    .await?
    .text()
    .await?;
    assert!(
        stats.contains("lumen_downstream_refused_total{reason=\"registry_only\"} 3"),
        "{stats}"
    );
    Ok(())
}

/// The first flight of a real TLS client (rustls) naming `name`.
fn client_hello(name: &str) -> Result<Vec<u8>> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(config.into(), name.to_owned().try_into()?)?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out)
}

/// An HTTP/1.1 app on `host`:`port` that answers every request with
/// `port <port>`.
async fn port_app(host: &str, port: u16) -> Result<()> {
    let l = tokio::net::TcpListener::bind((host, port)).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = format!("port {port}");
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    Ok(())
}

/// Inbound capture, as in a pod: a client in another namespace calls the
/// pod's address on each port its app listens on; `lumen-init` redirects
/// every connection to the sidecar's inbound listener, which hands each to
/// the app where it was sent (the pod's address and that port) — not all
/// to `--app`'s; a port the app binds on loopback only stays private.
#[test]
fn captured_inbound_reaches_the_app_on_the_port_it_was_sent_to() -> Result<()> {
    peer_tool("iptables", "apt-get install iptables");
    let pod = Netns::create("pod")?;
    let client = Netns::create("client")?;
    let id = std::process::id() % 100_000;
    let (pod_end, client_end) = (format!("lp{id}"), format!("lc{id}"));
    let ip = peer_tool("ip", "apt-get install iproute2");
    run(Command::new(&ip).args([
        "link",
        "add",
        &pod_end,
        "type",
        "veth",
        "peer",
        "name",
        &client_end,
    ]))?;
    run(Command::new(&ip).args(["link", "set", &pod_end, "netns", &pod.0]))?;
    run(Command::new(&ip).args(["link", "set", &client_end, "netns", &client.0]))?;
    pod.exec(&["ip", "addr", "add", "10.201.0.2/24", "dev", &pod_end])?;
    pod.exec(&["ip", "link", "set", &pod_end, "up"])?;
    client.exec(&["ip", "addr", "add", "10.201.0.1/24", "dev", &client_end])?;
    client.exec(&["ip", "link", "set", &client_end, "up"])?;

    let (sidecar, app_a, app_b, app_c) = pod.within(|| {
        (
            SidecarPorts::pick(),
            lumen_tests::free_port(),
            lumen_tests::free_port(),
            lumen_tests::free_port(),
        )
    })?;
    let init = lumen_tests::lumen_proxy_bin().with_file_name("lumen-init");
    pod.exec(&[
        init.to_str().context("lumen-init path")?,
        "--inbound-port",
        &sidecar.inbound.to_string(),
        "--admin-port",
        &sidecar.admin.to_string(),
        "--no-outbound",
    ])?;
    let dir = tempfile::tempdir()?;
    let logs = dir.path().to_path_buf();
    let mesh = logs.join("mesh.yaml");
    std::fs::write(
        &mesh,
        "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {name: pod}\nspec:\n  services:\n    - name: reviews\n",
    )?;
    // The pod: its app on two ports, its sidecar (started inside, so its
    // listeners are the pod's).
    let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let pod_logs = logs.clone();
    let pod_thread = std::thread::spawn({
        let file = std::fs::File::open(format!("/var/run/netns/{}", pod.0))?;
        move || {
            // SAFETY: a valid namespace fd, for this thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = tx.send(Err(anyhow::anyhow!(
                    "setns: {}",
                    std::io::Error::last_os_error()
                )));
                return;
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let started: Result<lumen_tests::LumenProcess> = rt.block_on(async {
                port_app("0.0.0.0", app_a).await?;
                port_app("0.0.0.0", app_b).await?;
                // Bound on loopback only: private to the pod.
                port_app("127.0.0.1", app_c).await?;
                let args: Vec<String> = [
                    "--service",
                    "reviews",
                    "--version",
                    "v1",
                    "-f",
                    mesh.to_str().unwrap(),
                    "--inbound",
                    &format!("0.0.0.0:{}", sidecar.inbound),
                    "--app",
                    &format!("127.0.0.1:{app_a}"),
                    "--admin",
                    &format!("127.0.0.1:{}", sidecar.admin),
                    "--no-outbound",
                    "--collector",
                    "http://127.0.0.1:1",
                    "--workers",
                    "1",
                ]
                .map(String::from)
                .to_vec();
                let mut p = lumen_tests::LumenProcess::spawn_bin(
                    &lumen_tests::lumen_proxy_bin(),
                    "sidecar-pod",
                    &pod_logs,
                    &args,
                )?;
                p.wait_ready(&format!("http://127.0.0.1:{}/ready", sidecar.admin))
                    .await?;
                Ok(p)
            });
            match started {
                Ok(p) => {
                    let _ = tx.send(Ok(()));
                    let _ = stop_rx.recv();
                    drop(p);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
            drop(rt);
        }
    });
    rx.recv()??;
    let answers = client.within(move || -> Result<Vec<String>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let http = reqwest::Client::builder()
                .no_proxy()
                .timeout(std::time::Duration::from_secs(10))
                .build()?;
            let mut out = Vec::new();
            for port in [app_b, app_a, app_b] {
                let r = http
                    .get(format!("http://10.201.0.2:{port}/"))
                    .send()
                    .await?;
                anyhow::ensure!(r.status() == 200, "port {port}: {}", r.status());
                out.push(r.text().await?);
            }
            // What the app binds on loopback only is not reachable from
            // outside the pod, through the sidecar or not.
            let private = http
                .get(format!("http://10.201.0.2:{app_c}/"))
                .send()
                .await?;
            anyhow::ensure!(
                private.status() == 503,
                "a loopback-only port answered {}",
                private.status()
            );
            Ok(out)
        })
    })?;
    let _ = stop_tx.send(());
    let _ = pod_thread.join();
    assert_eq!(
        answers?,
        [
            format!("port {app_b}"),
            format!("port {app_a}"),
            format!("port {app_b}")
        ],
        "{}",
        std::fs::read_to_string(logs.join("sidecar-pod.log")).unwrap_or_default()
    );
    Ok(())
}
