//! Istio's secure-ingress and SNI-passthrough tasks through
//! `lumen proxy --gateway`, with the tasks' own Gateways and
//! VirtualServices (only the ports changed) and certificates made by the
//! tasks' own `openssl` commands: two hosts on one port, each served its
//! certificate by SNI; a request for the other server's host refused; an
//! unknown server name refused and counted; a certificate rotated in the
//! secret directory taken without a restart; MUTUAL refusing a client
//! without a certificate; a plaintext port redirecting to https; and TLS
//! passed through untouched to a backend chosen by SNI. Real TLS clients
//! (curl, `openssl s_client`) on the other side.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lumen_tests::upstream::start_app;
use lumen_tests::{Sidecar, SidecarPorts, UpPorts, free_port, peer_tool, start_up, wait_for_count};

fn istio_file(path: &str) -> PathBuf {
    lumen_tests::crate_dir()
        .join("data/istio/security")
        .join(path)
}

fn openssl(dir: &Path, args: &str) -> Result<()> {
    let openssl = peer_tool("openssl", "apt-get install -y openssl");
    // The task's commands, word for word; its subjects carry spaces.
    let words = shell_words(args);
    let out = Command::new(openssl)
        .args(&words)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Splits on spaces, keeping single- and double-quoted words whole.
fn shell_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    for c in s.chars() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, ' ') => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// The secure-ingress task's certificates: two CAs for example.com, server
/// certificates for httpbin and helloworld, a client certificate; and the
/// passthrough task's nginx certificate.
fn istio_certs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir.join("example_certs1"))?;
    std::fs::create_dir_all(dir.join("example_certs2"))?;
    for cmd in [
        "req -x509 -sha256 -nodes -days 365 -newkey rsa:2048 -subj '/O=example Inc./CN=example.com' -keyout example_certs1/example.com.key -out example_certs1/example.com.crt",
        "req -out example_certs1/httpbin.example.com.csr -newkey rsa:2048 -nodes -keyout example_certs1/httpbin.example.com.key -subj \"/CN=httpbin.example.com/O=httpbin organization\"",
        "x509 -req -sha256 -days 365 -CA example_certs1/example.com.crt -CAkey example_certs1/example.com.key -set_serial 0 -in example_certs1/httpbin.example.com.csr -out example_certs1/httpbin.example.com.crt",
        "req -x509 -sha256 -nodes -days 365 -newkey rsa:2048 -subj '/O=example Inc./CN=example.com' -keyout example_certs2/example.com.key -out example_certs2/example.com.crt",
        "req -out example_certs2/httpbin.example.com.csr -newkey rsa:2048 -nodes -keyout example_certs2/httpbin.example.com.key -subj \"/CN=httpbin.example.com/O=httpbin organization\"",
        "x509 -req -sha256 -days 365 -CA example_certs2/example.com.crt -CAkey example_certs2/example.com.key -set_serial 0 -in example_certs2/httpbin.example.com.csr -out example_certs2/httpbin.example.com.crt",
        "req -out example_certs1/helloworld.example.com.csr -newkey rsa:2048 -nodes -keyout example_certs1/helloworld.example.com.key -subj \"/CN=helloworld.example.com/O=helloworld organization\"",
        "x509 -req -sha256 -days 365 -CA example_certs1/example.com.crt -CAkey example_certs1/example.com.key -set_serial 1 -in example_certs1/helloworld.example.com.csr -out example_certs1/helloworld.example.com.crt",
        "req -out example_certs1/client.example.com.csr -newkey rsa:2048 -nodes -keyout example_certs1/client.example.com.key -subj \"/CN=client.example.com/O=client organization\"",
        "x509 -req -sha256 -days 365 -CA example_certs1/example.com.crt -CAkey example_certs1/example.com.key -set_serial 1 -in example_certs1/client.example.com.csr -out example_certs1/client.example.com.crt",
        "req -out example_certs1/nginx.example.com.csr -newkey rsa:2048 -nodes -keyout example_certs1/nginx.example.com.key -subj \"/CN=nginx.example.com/O=some organization\"",
        "x509 -req -sha256 -days 365 -CA example_certs1/example.com.crt -CAkey example_certs1/example.com.key -set_serial 0 -in example_certs1/nginx.example.com.csr -out example_certs1/nginx.example.com.crt",
    ] {
        openssl(dir, cmd)?;
    }
    Ok(())
}

/// `kubectl create secret tls NAME --cert --key` (and `ca.crt` for
/// MUTUAL), as a mounted secret: `<creds>/<name>` links to a directory of
/// files, and an update swaps the link at once, as the kubelet does.
fn secret(creds: &Path, name: &str, cert: &Path, key: &Path, ca: Option<&Path>) -> Result<()> {
    static VERSION: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let v = VERSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let data = creds.join(format!("..{name}-{v}"));
    std::fs::create_dir_all(&data)?;
    std::fs::copy(cert, data.join("tls.crt"))?;
    std::fs::copy(key, data.join("tls.key"))?;
    if let Some(ca) = ca {
        std::fs::copy(ca, data.join("ca.crt"))?;
    }
    let link = creds.join(format!("..{name}-{v}.link"));
    std::os::unix::fs::symlink(&data, &link)?;
    std::fs::rename(&link, creds.join(name))?;
    Ok(())
}

struct Reply {
    exit: i32,
    status: u16,
    body: String,
    headers: String,
}

/// curl as the task runs it: `--resolve host:port:127.0.0.1 --cacert`.
fn curl(url: &str, host: &str, port: u16, cacert: &Path, extra: &[&str]) -> Result<Reply> {
    let curl = peer_tool("curl", "apt-get install -y curl");
    let out = Command::new(curl)
        .args(["-s", "--max-time", "5", "-D", "-", "-w", "\n%{http_code}"])
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(cacert)
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (rest, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    Ok(Reply {
        exit: out.status.code().unwrap_or(-1),
        status: code.trim().parse().unwrap_or(0),
        body: body.to_string(),
        headers: headers.to_string(),
    })
}

/// The subject of the certificate a server shows for `servername`.
fn served_subject(port: u16, servername: &str) -> Result<String> {
    let openssl = peer_tool("openssl", "apt-get install -y openssl");
    let out = Command::new(&openssl)
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", servername, "-showcerts"])
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let subject = text
        .lines()
        .find(|l| l.trim_start().starts_with("0 s:"))
        .unwrap_or("")
        .to_string();
    Ok(subject)
}

/// Retries `f` until it holds (configuration reaching the gateway takes a
/// moment), for at most 30 s.
async fn eventually(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if f()? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{what}: not so after 30 s")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn refused(admin: u16, reason: &str) -> Result<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{admin}/stats/prometheus"))
        .await?
        .text()
        .await?;
    let series = format!("lumen_downstream_refused_total{{reason=\"{reason}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_secure_ingress_tasks_through_the_gateway() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    istio_certs(d)?;
    let c1 = d.join("example_certs1");
    let c2 = d.join("example_certs2");
    let creds = d.join("credentials");
    secret(
        &creds,
        "httpbin-credential",
        &c1.join("httpbin.example.com.crt"),
        &c1.join("httpbin.example.com.key"),
        None,
    )?;
    secret(
        &creds,
        "helloworld-credential",
        &c1.join("helloworld.example.com.crt"),
        &c1.join("helloworld.example.com.key"),
        None,
    )?;

    // The passthrough task's backend: a TLS server with its own certificate.
    let nginx_port = free_port();
    let nginx = Killed(
        Command::new(peer_tool("openssl", "apt-get install -y openssl"))
            .args([
                "s_server",
                "-accept",
                &format!("127.0.0.1:{nginx_port}"),
                "-www",
                "-quiet",
            ])
            .arg("-cert")
            .arg(c1.join("nginx.example.com.crt"))
            .arg("-key")
            .arg(c1.join("nginx.example.com.key"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("openssl s_server")?,
    );

    let httpbin = start_app("httpbin-v1").await;
    let helloworld = start_app("helloworld-v1").await;
    let gw = SidecarPorts::pick();
    let (https, http, passthrough) = (gw.outbound, free_port(), free_port());
    let config = d.join("config");
    std::fs::create_dir(&config)?;
    std::fs::write(
        config.join("mesh.yaml"),
        format!(
            "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata:\n  name: ingress\nspec:\n  services:\n    \
             - name: httpbin\n      port: 8000\n      endpoints: [{{address: \"{httpbin}\", version: v1}}]\n    \
             - name: helloworld\n      port: 5000\n      endpoints: [{{address: \"{helloworld}\", version: v1}}]\n    \
             - name: my-nginx\n      namespace: passthrough\n      port: 443\n      protocol: tcp\n      endpoints: [{{address: \"127.0.0.1:{nginx_port}\"}}]\n"
        ),
    )?;
    let with_port = |file: &str, port: u16| -> Result<String> {
        Ok(std::fs::read_to_string(istio_file(file))?
            .replace("number: 443", &format!("number: {port}")))
    };
    let gateway = config.join("gateway.yaml");
    std::fs::write(
        &gateway,
        with_port("secure-ingress/gateway-multiple-hosts.yaml", https)?,
    )?;
    for vs in [
        "httpbin-virtualservice.yaml",
        "helloworld-virtualservice.yaml",
    ] {
        std::fs::copy(istio_file(&format!("secure-ingress/{vs}")), config.join(vs))?;
    }
    // The passthrough task's resources, in a namespace of their own (both
    // tasks name their Gateway `mygateway`).
    let in_ns = |text: String, name: &str| {
        text.replace(
            &format!("  name: {name}\n"),
            &format!("  name: {name}\n  namespace: passthrough\n"),
        )
    };
    std::fs::write(
        config.join("passthrough-gateway.yaml"),
        in_ns(
            with_port("sni-passthrough/gateway.yaml", passthrough)?,
            "mygateway",
        ),
    )?;
    std::fs::write(
        config.join("nginx-virtualservice.yaml"),
        in_ns(
            std::fs::read_to_string(istio_file("sni-passthrough/nginx-virtualservice.yaml"))?
                .replace("- port: 443", &format!("- port: {passthrough}")),
            "nginx",
        ),
    )?;
    // A plaintext port that sends everyone to https (Istio's httpsRedirect).
    std::fs::write(
        config.join("redirect.yaml"),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: redirect\nspec:\n  selector:\n    istio: ingressgateway\n  servers:\n  \
             - port: {{number: {http}, name: http, protocol: HTTP}}\n    hosts: [httpbin.example.com]\n    tls: {{httpsRedirect: true}}\n"
        ),
    )?;

    let up = UpPorts::pick();
    let _up = start_up(d, &config, &d.join("data"), up, &[]).await?;
    let collector = up.grpc_endpoint();
    let control = up.control_addr();
    let creds_arg = creds.display().to_string();
    let gw_proc = Sidecar {
        service: "istio-ingressgateway",
        version: "v1",
        mesh: &config,
        ports: gw,
        app: None,
        collector: &collector,
        extra: &[
            "--control",
            &control,
            "--gateway",
            "--label",
            "istio=ingressgateway",
            "--credentials",
            &creds_arg,
        ],
    }
    .start(d)
    .await?;
    let ca1 = c1.join("example.com.crt");
    let ca2 = c2.join("example.com.crt");

    // Two hosts on one port: each gets its own certificate by SNI.
    let hello = format!("https://helloworld.example.com:{https}/hello");
    eventually("helloworld over https", || {
        Ok(curl(&hello, "helloworld.example.com", https, &ca1, &[])?.status == 200)
    })
    .await
    .with_context(|| gw_proc.logs())?;
    let r = curl(&hello, "helloworld.example.com", https, &ca1, &[])?;
    assert!(r.body.contains("\"app\":\"helloworld-v1\""), "{}", r.body);
    assert!(
        r.headers.starts_with("HTTP/2 200"),
        "ALPN h2 as Istio's task shows: {}",
        r.headers
    );
    let teapot = format!("https://httpbin.example.com:{https}/status/418");
    let r = curl(&teapot, "httpbin.example.com", https, &ca1, &[])?;
    // The echo app answers /status/N with N, as httpbin does.
    assert_eq!(r.status, 418, "{}", r.body);
    assert!(
        r.body.contains("\"app\":\"httpbin-v1\"") && r.body.contains("/status/418"),
        "{}",
        r.body
    );
    let subject = served_subject(https, "helloworld.example.com")?;
    assert!(subject.contains("helloworld.example.com"), "{subject}");
    let subject = served_subject(https, "httpbin.example.com")?;
    assert!(subject.contains("httpbin.example.com"), "{subject}");

    // httpbin's certificate, helloworld's Host: not that server's route.
    let r = curl(
        &teapot,
        "httpbin.example.com",
        https,
        &ca1,
        &["-H", "Host: helloworld.example.com"],
    )?;
    assert_eq!(r.status, 404, "{}", r.headers);
    assert!(
        r.headers.contains("x-lumen-response-flags: NR"),
        "{}",
        r.headers
    );
    // A server name no server has: no certificate, no handshake, counted.
    let before = refused(gw.admin, "gateway_tls").await?;
    let r = curl(
        &format!("https://other.example.com:{https}/"),
        "other.example.com",
        https,
        &ca1,
        &[],
    )?;
    assert_ne!(r.exit, 0, "a handshake for an unknown name must fail");
    assert!(refused(gw.admin, "gateway_tls").await? > before);

    // The plaintext port redirects.
    let r = curl(
        &format!("http://httpbin.example.com:{http}/status/200"),
        "httpbin.example.com",
        http,
        &ca1,
        &[],
    )?;
    assert_eq!(r.status, 301, "{}", r.headers);
    assert!(
        r.headers
            .to_ascii_lowercase()
            .contains("location: https://httpbin.example.com/status/200"),
        "{}",
        r.headers
    );

    // Passthrough: the backend's own certificate, by SNI, bytes untouched.
    let nginx_url = format!("https://nginx.example.com:{passthrough}/");
    eventually("nginx through the passthrough port", || {
        Ok(curl(&nginx_url, "nginx.example.com", passthrough, &ca1, &[])?.status == 200)
    })
    .await?;
    let subject = served_subject(passthrough, "nginx.example.com")?;
    assert!(subject.contains("nginx.example.com"), "{subject}");
    drop(nginx);

    // The task's rotation: the secret now holds the second CA's
    // certificate; the gateway serves it without a restart.
    secret(
        &creds,
        "httpbin-credential",
        &c2.join("httpbin.example.com.crt"),
        &c2.join("httpbin.example.com.key"),
        None,
    )?;
    eventually("the rotated certificate", || {
        Ok(curl(&teapot, "httpbin.example.com", https, &ca2, &[])?.status == 418)
    })
    .await?;
    assert_ne!(
        curl(&teapot, "httpbin.example.com", https, &ca1, &[])?.exit,
        0
    );

    // MUTUAL: the secret carries the CA of client certificates.
    secret(
        &creds,
        "httpbin-credential",
        &c1.join("httpbin.example.com.crt"),
        &c1.join("httpbin.example.com.key"),
        Some(&ca1),
    )?;
    std::fs::write(
        &gateway,
        with_port("secure-ingress/gateway-mutual.yaml", https)?,
    )?;
    let dump = format!("http://127.0.0.1:{}/config_dump", gw.admin);
    let start = Instant::now();
    loop {
        let config: serde_json::Value = reqwest::get(&dump).await?.json().await?;
        let on_port = config["gatewayPorts"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["port"] == https).cloned());
        if on_port
            .as_ref()
            .is_some_and(|p| p["servers"][0]["tls"] == "MUTUAL")
        {
            assert_eq!(
                on_port.unwrap_or_default()["servers"][0]["credential"],
                "loaded"
            );
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the MUTUAL Gateway did not reach the gateway: {config}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = curl(&teapot, "httpbin.example.com", https, &ca1, &[])?;
    assert_ne!(
        r.status, 418,
        "MUTUAL lets no client without a certificate in"
    );
    let path = |p: PathBuf| p.display().to_string();
    let (cert, key) = (
        path(c1.join("client.example.com.crt")),
        path(c1.join("client.example.com.key")),
    );
    let r = curl(
        &teapot,
        "httpbin.example.com",
        https,
        &ca1,
        &["--cert", &cert, "--key", &key],
    )?;
    assert_eq!(
        r.status,
        418,
        "with the client certificate: {} {}\n{}",
        r.exit,
        r.body,
        gw_proc.logs()
    );
    // A client certificate from another CA is refused too.
    let (cert, key) = (
        path(c2.join("httpbin.example.com.crt")),
        path(c2.join("httpbin.example.com.key")),
    );
    let other = ["--cert", cert.as_str(), "--key", key.as_str()];
    assert_ne!(
        curl(&teapot, "httpbin.example.com", https, &ca1, &other)?.status,
        418
    );

    // Every request is a row of the gateway's, TCP passthrough included.
    let url = up.sql_url();
    let q = "SELECT count(*) AS n FROM requests WHERE source_workload = 'istio-ingressgateway-v1' \
             AND destination_service = 'helloworld' AND route = 'helloworld/0' AND status = 200";
    assert!(wait_for_count(&url, q, 2).await? >= 2);
    let q = format!(
        "SELECT count(*) AS n FROM requests WHERE source_workload = 'istio-ingressgateway-v1' \
         AND destination_service = 'my-nginx' AND protocol = 'tcp' AND authority = 'nginx.example.com:{passthrough}'"
    );
    assert!(wait_for_count(&url, &q, 1).await? >= 1);
    Ok(())
}
