//! Mesh mTLS between real `lumen proxy` processes, with certificates from
//! `lumen up`'s mesh CA: every hop carries SPIFFE identities into the
//! rows and Istio's labels; a STRICT inbound port refuses everything that
//! is not a sidecar of the mesh — plaintext, another CA's certificate, an
//! expired one, no certificate, TLS 1.2 — told apart by real TLS clients
//! (curl, `openssl s_client`); a caller refuses a server that holds the
//! wrong identity; PERMISSIVE takes both and the row says which; and
//! certificates rotate under load without a failed request.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use lumen_tests::upstream::start_app;
use lumen_tests::{
    LumenProcess, Sidecar, SidecarPorts, UpPorts, free_port, peer_tool, sql, start_up,
    wait_for_count,
};
use serde_json::Value;

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews";
/// The SNI a sidecar's mTLS carries (Istio's form).
const MESH_SNI: &str = "outbound_.9080_._.reviews.default.svc.cluster.local";

/// `lumen up` and two sidecars: productpage (calls out) and reviews (an
/// app behind its inbound port), both certified by the mesh CA.
struct Mesh {
    dir: tempfile::TempDir,
    ports: UpPorts,
    reviews: SidecarPorts,
    productpage: SidecarPorts,
    _up: LumenProcess,
    _sidecars: Vec<LumenProcess>,
}

impl Mesh {
    /// `resources` go beside the Mesh (a PeerAuthentication, …); `services`
    /// are more Mesh services as YAML list items.
    async fn start(resources: &str, services: &str, up_extra: &[&str]) -> Result<Mesh> {
        let dir = tempfile::tempdir()?;
        let (reviews, productpage) = (SidecarPorts::pick(), SidecarPorts::pick());
        let mesh = dir.path().join("mesh.yaml");
        std::fs::write(
            &mesh,
            format!(
                "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: bookinfo}}\nspec:\n  services:\n  - name: reviews\n    port: 9080\n    endpoints:\n    - {{address: 127.0.0.1:{}, version: v1}}\n{services}{resources}",
                reviews.inbound
            ),
        )?;
        let ports = UpPorts::pick();
        let up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, up_extra).await?;
        let token = dir.path().join("data/control/ca/join-token");
        let control = format!("127.0.0.1:{}", ports.control);
        let collector = format!("http://127.0.0.1:{}", ports.otlp_grpc);
        let app = start_app("reviews").await;
        let token_arg = token.display().to_string();
        let mut sidecars = Vec::new();
        for (service, sa, sp, app) in [
            ("reviews", "bookinfo-reviews", reviews, Some(app)),
            ("productpage", "bookinfo-productpage", productpage, None),
        ] {
            let extra = [
                "--control",
                &control,
                "--join-token-file",
                &token_arg,
                "--service-account",
                sa,
            ];
            let sidecar = Sidecar {
                service,
                version: "v1",
                mesh: &mesh,
                ports: sp,
                app,
                collector: &collector,
                extra: &extra,
            };
            sidecars.push(sidecar.start(dir.path()).await?);
        }
        Ok(Mesh {
            dir,
            ports,
            reviews,
            productpage,
            _up: up,
            _sidecars: sidecars,
        })
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("data/control/ca")
    }

    async fn call(&self, host: &str) -> Result<reqwest::Response> {
        Ok(reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/", self.productpage.outbound))
            .header("host", host)
            .send()
            .await?)
    }

    /// Waits until productpage reaches reviews (its certificate issued and
    /// the control plane has told it reviews takes mTLS).
    async fn wait_routed(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.call("reviews:9080").await?;
            if r.status() == 200 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("productpage never reached reviews: {}", r.status());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn sql_url(&self) -> String {
        self.ports.sql_url()
    }
}

async fn admin(port: u16, path: &str) -> Result<String> {
    Ok(reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await?
        .text()
        .await?)
}

/// A sidecar's count of downstream connections refused for `reason`.
async fn refused(port: u16, reason: &str) -> Result<f64> {
    let text = admin(port, "/stats/prometheus").await?;
    let series = format!("lumen_downstream_refused_total{{reason=\"{reason}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// A certificate for `spiffe` valid from `from` to `to`, signed by
/// `issuer` (PEM cert and key): (cert, key) files in `dir`.
fn leaf(
    dir: &Path,
    name: &str,
    issuer: (&str, &str),
    spiffe: &str,
    from: SystemTime,
    to: SystemTime,
) -> Result<(PathBuf, PathBuf)> {
    let ca_key = rcgen::KeyPair::from_pem(issuer.1)?;
    let ca = rcgen::Issuer::from_ca_cert_pem(issuer.0, ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(spiffe.to_string().try_into()?)];
    params.not_before = from.into();
    params.not_after = to.into();
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let cert = params.signed_by(&key, &ca)?;
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&c, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    Ok((c, k))
}

/// A self-signed CA of its own: (cert, key) PEM.
fn foreign_ca() -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// `curl` over mesh SNI to `port` with a client certificate: its exit code
/// and the HTTP status it got (0 for none).
fn curl(port: u16, cert: Option<&(PathBuf, PathBuf)>) -> Result<(i32, u16)> {
    let curl = peer_tool("curl", "apt-get install -y curl");
    let mut cmd = Command::new(curl);
    cmd.args([
        "-sk",
        "--max-time",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--resolve",
        &format!("{MESH_SNI}:{port}:127.0.0.1"),
    ]);
    if let Some((c, k)) = cert {
        cmd.arg("--cert").arg(c).arg("--key").arg(k);
    }
    let out = cmd
        .arg(format!("https://{MESH_SNI}:{port}/"))
        .stdin(Stdio::null())
        .output()?;
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    Ok((out.status.code().unwrap_or(-1), code))
}

/// `openssl s_client` over mesh SNI to `port` with `args`; what it printed.
fn s_client(port: u16, args: &[&str]) -> Result<String> {
    let openssl = peer_tool("openssl", "apt-get install -y openssl");
    let mut child = Command::new(openssl)
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", MESH_SNI, "-ign_eof"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n")?;
    }
    let out = child.wait_with_output()?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mtls_carries_spiffe_identities_and_refuses_everything_else() -> Result<()> {
    let strict = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec:\n  mtls: {mode: STRICT}\n";
    let mesh = Mesh::start(strict, "", &[]).await?;
    mesh.wait_routed().await?;
    for _ in 0..20 {
        assert_eq!(mesh.call("reviews:9080").await?.status(), 200);
    }

    // Both rows of every call name both identities.
    let both = format!(
        "SELECT count(*) AS n FROM requests WHERE mtls AND source_principal = '{PRODUCTPAGE}' \
         AND destination_principal = '{REVIEWS}' AND destination_service = 'reviews'"
    );
    wait_for_count(&mesh.sql_url(), &both, 42).await?;
    // Every answered call went over mTLS on both sides. A call made while
    // productpage's sidecar was still starting (before `wait_routed` saw a
    // 200) may be recorded by the source without mTLS, but never answered.
    let rows = sql(
        &mesh.sql_url(),
        "SELECT DISTINCT reporter, mtls FROM requests WHERE destination_service = 'reviews' \
         AND status = 200 ORDER BY reporter",
    )
    .await?;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r["mtls"] == true), "{rows:?}");
    let plaintext = sql(
        &mesh.sql_url(),
        "SELECT reporter, status, response_flags FROM requests \
         WHERE destination_service = 'reviews' AND NOT mtls AND status BETWEEN 100 AND 499",
    )
    .await?;
    assert!(plaintext.is_empty(), "answered without mTLS: {plaintext:?}");

    // Istio's labels on Istio's metric.
    let query = format!(
        "sum(istio_requests_total{{reporter=\"destination\",connection_security_policy=\"mutual_tls\",source_principal=\"{PRODUCTPAGE}\",destination_principal=\"{REVIEWS}\"}})"
    );
    let url = format!("http://127.0.0.1:{}/api/v1/query", mesh.ports.query);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: Value = reqwest::Client::new()
            .get(&url)
            .query(&[("query", query.as_str())])
            .send()
            .await?
            .json()
            .await?;
        let n = v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
        if n >= 21.0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{query}: {v}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // /config_dump: the certificate's id, serial and expiry, never its bytes.
    let dump = admin(mesh.reviews.admin, "/config_dump").await?;
    let v: Value = serde_json::from_str(&dump)?;
    assert_eq!(v["certificate"]["spiffe_id"], REVIEWS);
    assert!(
        v["certificate"]["serial"]
            .as_str()
            .is_some_and(|s| s.len() >= 16)
    );
    assert!(v["certificate"]["not_after"].as_str().is_some());
    assert_eq!(v["inboundMtls"], "STRICT");
    assert!(!dump.contains("BEGIN"), "no PEM in the dump");

    let inbound = mesh.reviews.inbound;
    let ca = mesh.ca();
    let ca_pem = std::fs::read_to_string(ca.join("ca-cert.pem"))?;
    let ca_key = std::fs::read_to_string(ca.join("ca-key.pem"))?;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let certs = tempfile::tempdir()?;

    // A sidecar's own certificate gets through (so what fails below fails
    // for its certificate, not for curl).
    let good = leaf(
        certs.path(),
        "good",
        (&ca_pem, &ca_key),
        PRODUCTPAGE,
        now - hour,
        now + hour,
    )?;
    assert_eq!(curl(inbound, Some(&good))?, (0, 200));

    // Plaintext.
    let before = refused(mesh.reviews.admin, "mtls_required").await?;
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{inbound}/"))
        .header("host", "reviews:9080")
        .send()
        .await;
    assert!(plain.is_err(), "plaintext was served: {plain:?}");
    assert_eq!(
        refused(mesh.reviews.admin, "mtls_required").await?,
        before + 1.0
    );

    // Another CA's certificate, an expired one of this CA, none at all,
    // TLS 1.2: each a refused handshake, counted.
    let other = foreign_ca()?;
    let foreign = leaf(
        certs.path(),
        "foreign",
        (&other.0, &other.1),
        PRODUCTPAGE,
        now - hour,
        now + hour,
    )?;
    let expired = leaf(
        certs.path(),
        "expired",
        (&ca_pem, &ca_key),
        PRODUCTPAGE,
        now - 3 * hour,
        now - hour,
    )?;
    let handshakes = refused(mesh.reviews.admin, "mtls_handshake").await?;
    for (what, cert) in [("another CA's", &foreign), ("an expired", &expired)] {
        let (exit, status) = curl(inbound, Some(cert))?;
        assert_ne!((exit, status), (0, 200), "{what} certificate was served");
        assert_eq!(status, 0, "{what} certificate got an HTTP answer");
    }
    let (_, status) = curl(inbound, None)?;
    assert_eq!(
        status, 0,
        "a client without a certificate got an HTTP answer"
    );
    let out = s_client(inbound, &["-tls1_3"])?;
    assert!(!out.contains("HTTP/1.1 200"), "{out}");
    let out = s_client(
        inbound,
        &[
            "-tls1_2",
            "-cert",
            &good.0.display().to_string(),
            "-key",
            &good.1.display().to_string(),
        ],
    )?;
    assert!(!out.contains("HTTP/1.1 200"), "TLS 1.2 was served: {out}");
    let counted = refused(mesh.reviews.admin, "mtls_handshake").await? - handshakes;
    assert!(counted >= 5.0, "{counted} refused handshakes counted");
    Ok(())
}

/// A TLS server holding `cert` that answers 200 to anything; its address.
async fn tls_server(cert: &(PathBuf, PathBuf)) -> Result<SocketAddr> {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<_> =
        rustls::pki_types::CertificateDer::pem_file_iter(&cert.0)?.collect::<Result<_, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&cert.1)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            });
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_refuses_a_server_that_holds_the_wrong_identity() -> Result<()> {
    // details: configured to run as bookinfo-details, reached with
    // ISTIO_MUTUAL. One server holds that identity, one another of the
    // same mesh CA.
    let (genuine_port, impostor_port) = (free_port(), free_port());
    let services = format!(
        "  - name: details\n    port: 9080\n    endpoints:\n    - {{address: 127.0.0.1:{genuine_port}, version: v1, serviceAccount: bookinfo-details}}\n  - name: ratings\n    port: 9080\n    endpoints:\n    - {{address: 127.0.0.1:{impostor_port}, version: v1, serviceAccount: bookinfo-ratings}}\n"
    );
    let rules = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: details}\nspec:\n  host: details\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ratings}\nspec:\n  host: ratings\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n";
    let mesh = Mesh::start(rules, &services, &[]).await?;
    mesh.wait_routed().await?;
    let ca = mesh.ca();
    let ca_pem = std::fs::read_to_string(ca.join("ca-cert.pem"))?;
    let ca_key = std::fs::read_to_string(ca.join("ca-key.pem"))?;
    let (now, hour) = (SystemTime::now(), Duration::from_secs(3600));
    let certs = tempfile::tempdir()?;
    let details = leaf(
        certs.path(),
        "details",
        (&ca_pem, &ca_key),
        "spiffe://cluster.local/ns/default/sa/bookinfo-details",
        now - hour,
        now + hour,
    )?;
    let genuine = tls_server(&details).await?;
    // Holds details' identity where ratings' is expected.
    let impostor = tls_server(&details).await?;
    forward(genuine_port, genuine).await?;
    forward(impostor_port, impostor).await?;

    let ok = mesh.call("details:9080").await?;
    assert_eq!(ok.status(), 200, "the genuine server is reached over mTLS");
    let refused = mesh.call("ratings:9080").await?;
    assert_eq!(refused.status(), 503, "the impostor is refused");
    wait_for_count(
        &mesh.sql_url(),
        "SELECT count(*) AS n FROM requests WHERE destination_service = 'ratings' \
         AND reporter = 'source' AND status = 503 AND response_flags LIKE '%UF%'",
        1,
    )
    .await?;
    // The rows say which call was over mTLS, and to whom.
    wait_for_count(
        &mesh.sql_url(),
        "SELECT count(*) AS n FROM requests WHERE destination_service = 'details' AND mtls \
         AND destination_principal = 'spiffe://cluster.local/ns/default/sa/bookinfo-details'",
        1,
    )
    .await?;
    Ok(())
}

/// Relays connections on 127.0.0.1:`port` to `to` (a server bound to a
/// port chosen before it existed).
async fn forward(port: u16, to: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    tokio::spawn(async move {
        while let Ok((mut a, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut b) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    });
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_takes_both_and_the_row_says_which() -> Result<()> {
    // No PeerAuthentication: Istio's default, PERMISSIVE.
    let mesh = Mesh::start("", "", &[]).await?;
    mesh.wait_routed().await?;
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/", mesh.reviews.inbound))
        .header("host", "reviews:9080")
        .send()
        .await?;
    assert_eq!(plain.status(), 200, "plaintext is served under PERMISSIVE");
    let dump: Value = serde_json::from_str(&admin(mesh.reviews.admin, "/config_dump").await?)?;
    assert_eq!(dump["inboundMtls"], "PERMISSIVE");
    let url = mesh.sql_url();
    wait_for_count(
        &url,
        "SELECT count(*) AS n FROM requests WHERE reporter = 'destination' AND NOT mtls AND source_principal IS NULL",
        1,
    )
    .await?;
    wait_for_count(
        &url,
        &format!("SELECT count(*) AS n FROM requests WHERE reporter = 'destination' AND mtls AND source_principal = '{PRODUCTPAGE}'"),
        1,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() -> Result<()> {
    // 10 s certificates: renewed every 5 s.
    let mesh = Mesh::start("", "", &["--workload-cert-ttl", "10s"]).await?;
    mesh.wait_routed().await?;
    let mut serials = std::collections::BTreeSet::new();
    let (mut ok, mut failed) = (0u32, Vec::new());
    let started = Instant::now();
    // Bounded: at most 40 s, or once both sides have rotated 3 times.
    while started.elapsed() < Duration::from_secs(40) {
        for port in [mesh.reviews.admin, mesh.productpage.admin] {
            let dump: Value = serde_json::from_str(&admin(port, "/config_dump").await?)?;
            if let Some(s) = dump["certificate"]["serial"].as_str() {
                serials.insert((port, s.to_string()));
            }
        }
        let per_side = |port: u16| serials.iter().filter(|(p, _)| *p == port).count();
        if per_side(mesh.reviews.admin) >= 4 && per_side(mesh.productpage.admin) >= 4 {
            break;
        }
        for _ in 0..20 {
            match mesh.call("reviews:9080").await {
                Ok(r) if r.status() == 200 => ok += 1,
                Ok(r) => failed.push(r.status().to_string()),
                Err(e) => failed.push(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let per_side = |port: u16| serials.iter().filter(|(p, _)| *p == port).count();
    assert!(
        per_side(mesh.reviews.admin) >= 4 && per_side(mesh.productpage.admin) >= 4,
        "three rotations on each side: {serials:?}"
    );
    assert!(failed.is_empty(), "{} ok, failed: {failed:?}", ok);
    assert!(ok > 200, "{ok} requests");
    Ok(())
}
