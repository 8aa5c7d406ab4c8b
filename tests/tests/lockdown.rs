//! Every listener that takes data or config, locked down: `lumen up` with
//! a server certificate, a token file and the mesh's root as client CA.
//! Each port is tried as a stranger would (no credentials, a wrong
//! token, a certificate from another CA, cleartext) and as its users do
//! (a token as bearer, as Basic, as the Postgres / Flight SQL password; a
//! workload certificate for telemetry). Beyond loopback, a listener
//! without TLS and credentials refuses to start.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use lumen_tests::{
    LumenProcess, Sidecar, SidecarPorts, UpPorts, free_port, local, lumen_bin, peer_tool,
    write_mesh,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use prost::Message;

const TOKEN: &str = "4f1c2d9e8b7a6f5e4d3c2b1a";
const WRONG: &str = "4f1c2d9e8b7a6f5e4d3c2b1b";
const BOB_TOKEN: &str = "b0b0b0b0b0b0b0b0b0b0b0b0";
const PSQL_INSTALL: &str = "apt-get install -y postgresql-client";

/// The test's PKI: the mesh root, the server's certificate under it, a
/// workload's (reviews) under it, and one from a CA nobody trusts.
struct Pki {
    root: PathBuf,
    root_key: PathBuf,
    server: (PathBuf, PathBuf),
    workload: (PathBuf, PathBuf),
    stranger: (PathBuf, PathBuf),
}

fn pki(dir: &Path) -> Result<Pki> {
    let ca = |name: &str| -> Result<(rcgen::Issuer<'static, rcgen::KeyPair>, String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key)?.pem();
        Ok((rcgen::Issuer::new(params, key), pem, key_pem))
    };
    let leaf = |issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
                name: &str,
                sans: Vec<rcgen::SanType>|
     -> Result<(PathBuf, PathBuf)> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let cert = params.signed_by(&key, issuer)?;
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem())?;
        std::fs::write(&k, key.serialize_pem())?;
        Ok((c, k))
    };
    let (mesh, root_pem, root_key_pem) = ca("mesh root")?;
    let (other, _, _) = ca("someone else's root")?;
    let (root, root_key) = (dir.join("root.crt"), dir.join("root.key"));
    std::fs::write(&root, &root_pem)?;
    std::fs::write(&root_key, &root_key_pem)?;
    let spiffe = |id: &str| -> Result<rcgen::SanType> {
        Ok(rcgen::SanType::URI(id.to_string().try_into()?))
    };
    Ok(Pki {
        server: leaf(
            &mesh,
            "server",
            vec![
                rcgen::SanType::DnsName("localhost".try_into()?),
                rcgen::SanType::IpAddress([127, 0, 0, 1].into()),
            ],
        )?,
        workload: leaf(
            &mesh,
            "reviews",
            vec![spiffe("spiffe://cluster.local/ns/default/sa/reviews")?],
        )?,
        stranger: leaf(
            &other,
            "stranger",
            vec![spiffe("spiffe://cluster.local/ns/default/sa/reviews")?],
        )?,
        root,
        root_key,
    })
}

/// An HTTPS client trusting the test root, presenting `identity` if given.
fn https(pki: &Pki, identity: Option<&(PathBuf, PathBuf)>) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&pki.root)?)?);
    if let Some((cert, key)) = identity {
        let mut pem = std::fs::read(cert)?;
        pem.extend(std::fs::read(key)?);
        b = b.identity(reqwest::Identity::from_pem(&pem)?);
    }
    Ok(b.build()?)
}

/// A gRPC channel over TLS to `port`, presenting `identity` if given.
async fn grpc(
    pki: &Pki,
    port: u16,
    identity: Option<&(PathBuf, PathBuf)>,
) -> Result<tonic::transport::Channel> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(
            &pki.root,
        )?))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            std::fs::read(cert)?,
            std::fs::read(key)?,
        ));
    }
    Ok(
        tonic::transport::Endpoint::from_shared(format!("https://localhost:{port}"))?
            .tls_config(tls)?
            .connect()
            .await?,
    )
}

fn bearer<T>(mut request: tonic::Request<T>, token: &str) -> tonic::Request<T> {
    if let Ok(v) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", v);
    }
    request
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

async fn status_of(request: reqwest::RequestBuilder) -> Result<u16> {
    Ok(request.send().await?.status().as_u16())
}

fn psql(port: u16, sslmode: &str, password: &str, user: &str) -> Result<(bool, String)> {
    let out = Command::new(peer_tool("psql", PSQL_INSTALL))
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-U",
            user,
            "-d",
            "lumen",
        ])
        .args(["-p", &port.to_string(), "-c", "SELECT 41 + 1"])
        .env("PGPASSWORD", password)
        .env("PGSSLMODE", sslmode)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

fn lumen(args: &[&str], token: Option<&str>) -> Result<(bool, String)> {
    let mut cmd = Command::new(lumen_bin());
    cmd.args(args).env_remove("LUMEN_TOKEN");
    if let Some(t) = token {
        cmd.env("LUMEN_TOKEN", t);
    }
    let out = cmd.output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_data_and_config_port_refuses_strangers_and_serves_its_users() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki(dir.path())?;
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let envoy = free_port();
    let envoy_addr = local(envoy).to_string();
    let mut up = locked_up(
        dir.path(),
        &pki,
        ports,
        &mesh,
        &["--envoy-addr", &envoy_addr],
    )
    .await?;
    let client = https(&pki, None)?;
    let query = format!("https://localhost:{}", ports.query);

    // Query HTTP (SQL, Prometheus, Jaeger, UI): tokens only.
    let sql = format!("{query}/api/v1/sql");
    let body = "SELECT 41 + 1 AS answer";
    let post = |c: &reqwest::Client| c.post(&sql).body(body);
    assert_eq!(status_of(post(&client)).await?, 401, "no credentials");
    let refused = post(&client).send().await?;
    ensure!(
        refused
            .headers()
            .get("www-authenticate")
            .is_some_and(|v| v.to_str().unwrap_or_default().contains("Bearer")),
        "a 401 says how to authenticate"
    );
    let said = refused.text().await?;
    ensure!(said.contains("credentials required"), "{said}");
    assert_eq!(status_of(post(&client).bearer_auth(WRONG)).await?, 401);
    assert_eq!(status_of(post(&client).bearer_auth(TOKEN)).await?, 200);
    assert_eq!(
        status_of(post(&client).header("authorization", basic("alice", TOKEN))).await?,
        200,
        "Basic with the token as password (Grafana, Prometheus)"
    );
    assert_eq!(
        status_of(post(&client).header("authorization", basic("mallory", TOKEN))).await?,
        401,
        "someone else's token under another name"
    );
    let promql = format!("{query}/api/v1/query?query=up");
    assert_eq!(status_of(client.get(&promql)).await?, 401);
    assert_eq!(
        status_of(client.get(&promql).bearer_auth(TOKEN)).await?,
        200
    );
    // A workload's certificate sends telemetry; it does not read it.
    let workload = https(&pki, Some(&pki.workload))?;
    assert_eq!(status_of(post(&workload)).await?, 403);
    // Cleartext to a TLS port gets nothing.
    let plain = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/api/v1/sql", ports.query))
        .body(body)
        .send()
        .await;
    ensure!(
        !plain.as_ref().is_ok_and(|r| r.status().is_success()),
        "cleartext HTTP to the TLS query port answered {plain:?}"
    );
    // A certificate from another CA fails the handshake.
    let stranger = https(&pki, Some(&pki.stranger))?;
    ensure!(
        post(&stranger).send().await.is_err(),
        "a certificate from another CA was accepted"
    );

    // OTLP/HTTP: tokens and workload certificates.
    let traces = format!("https://localhost:{}/v1/traces", ports.otlp_http);
    let payload = lumen_tests::otlp::export("reviews", 1, 0).encode_to_vec();
    let send = |c: &reqwest::Client| {
        c.post(&traces)
            .header("content-type", "application/x-protobuf")
            .body(payload.clone())
    };
    assert_eq!(status_of(send(&client)).await?, 401);
    assert_eq!(status_of(send(&client).bearer_auth(WRONG)).await?, 401);
    assert_eq!(status_of(send(&client).bearer_auth(TOKEN)).await?, 200);
    assert_eq!(status_of(send(&workload)).await?, 200);

    // OTLP/gRPC (and Flight DoPut on the same port).
    let export = || lumen_tests::otlp::export("reviews", 1, 0);
    let mut anonymous = TraceServiceClient::new(grpc(&pki, ports.otlp_grpc, None).await?);
    let code = anonymous.export(export()).await.err().map(|s| s.code());
    assert_eq!(code, Some(tonic::Code::Unauthenticated));
    let code = anonymous
        .export(bearer(tonic::Request::new(export()), WRONG))
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(code, Some(tonic::Code::Unauthenticated));
    anonymous
        .export(bearer(tonic::Request::new(export()), TOKEN))
        .await
        .context("OTLP/gRPC with a token")?;
    TraceServiceClient::new(grpc(&pki, ports.otlp_grpc, Some(&pki.workload)).await?)
        .export(export())
        .await
        .context("OTLP/gRPC with a workload certificate")?;
    ensure!(
        grpc(&pki, ports.otlp_grpc, Some(&pki.stranger))
            .await
            .is_err()
            || TraceServiceClient::new(grpc(&pki, ports.otlp_grpc, Some(&pki.stranger)).await?)
                .export(export())
                .await
                .is_err(),
        "OTLP/gRPC took a certificate from another CA"
    );

    // Flight SQL: Flight's Basic handshake hands back the bearer token.
    let channel = grpc(&pki, ports.flight_sql, None).await?;
    let mut flight = arrow_flight::sql::client::FlightSqlServiceClient::new(channel.clone());
    match flight.execute("SELECT 1".into(), None).await {
        Err(e) if e.to_string().contains("credentials required") => {}
        other => bail!("Flight SQL without credentials: {other:?}"),
    }
    ensure!(
        flight.handshake("alice", WRONG).await.is_err(),
        "a wrong password passed the handshake"
    );
    let mut flight = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
    flight.handshake("alice", TOKEN).await?;
    ensure!(
        flight.token() == Some(&TOKEN.to_string()),
        "the handshake hands back the token: {:?}",
        flight.token()
    );
    flight
        .execute("SELECT 41 + 1 AS answer".into(), None)
        .await
        .context("Flight SQL after the handshake")?;

    // Envoy's rate-limit service: Envoys are workloads.
    let should_rate_limit = |channel: tonic::transport::Channel, token: Option<&'static str>| async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await?;
        let mut request = tonic::Request::new(bytes::Bytes::new());
        if let Some(t) = token {
            request = bearer(request, t);
        }
        let answer = grpc
            .unary(
                request,
                http::uri::PathAndQuery::from_static(
                    "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
                ),
                lumen_core::otlp::PassThrough,
            )
            .await;
        anyhow::Ok(answer.err().map(|s| s.code()))
    };
    assert_eq!(
        should_rate_limit(grpc(&pki, envoy, None).await?, None).await?,
        Some(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        should_rate_limit(grpc(&pki, envoy, None).await?, Some(WRONG)).await?,
        Some(tonic::Code::Unauthenticated)
    );
    // Past the guard, the service itself answers the empty request.
    assert_eq!(
        should_rate_limit(grpc(&pki, envoy, None).await?, Some(TOKEN)).await?,
        Some(tonic::Code::InvalidArgument),
        "an Envoy with a token reaches the service"
    );
    assert_eq!(
        should_rate_limit(grpc(&pki, envoy, Some(&pki.workload)).await?, None).await?,
        Some(tonic::Code::InvalidArgument),
        "an Envoy with a workload certificate reaches the service"
    );

    // Postgres wire: SCRAM-SHA-256 over TLS, the token as password.
    let (ok, said) = psql(ports.pg, "require", TOKEN, "alice")?;
    ensure!(ok && said.contains("42"), "{said}");
    let (ok, said) = psql(ports.pg, "require", WRONG, "alice")?;
    ensure!(
        !ok && said
            .to_lowercase()
            .contains("password authentication failed"),
        "{said}"
    );
    let (ok, said) = psql(ports.pg, "require", TOKEN, "bob")?;
    ensure!(
        !ok && said
            .to_lowercase()
            .contains("password authentication failed"),
        "alice's token as bob: {said}"
    );
    let (ok, said) = psql(ports.pg, "require", BOB_TOKEN, "bob")?;
    ensure!(ok && said.contains("42"), "{said}");
    let (ok, said) = psql(ports.pg, "require", TOKEN, "mallory")?;
    ensure!(
        !ok && said
            .to_lowercase()
            .contains("password authentication failed"),
        "a user nobody has fails as a wrong password does: {said}"
    );
    let (ok, said) = psql(ports.pg, "disable", TOKEN, "alice")?;
    ensure!(!ok && said.contains("requires TLS"), "{said}");

    // The control plane: changes and reads need an operator's token.
    let control = ports.control_addr();
    let vs = dir.path().join("vs.yaml");
    std::fs::write(
        &vs,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: default}\n\
         spec:\n  hosts: [reviews]\n  http:\n    - route:\n        - destination: {host: reviews}\n",
    )?;
    let apply = [
        "apply",
        "--control",
        &control,
        "-f",
        vs.to_str().unwrap_or_default(),
    ];
    let (ok, said) = lumen(&apply, None)?;
    ensure!(!ok && said.contains("credentials required"), "{said}");
    let (ok, said) = lumen(&apply, Some(WRONG))?;
    ensure!(!ok && said.contains("not valid"), "{said}");
    let (ok, said) = lumen(&apply, Some(TOKEN))?;
    ensure!(ok, "{said}");
    let get = ["get", "virtualservices", "--control", &control];
    let (ok, said) = lumen(&get, None)?;
    ensure!(!ok && said.contains("credentials required"), "{said}");
    let (ok, said) = lumen(&get, Some(TOKEN))?;
    ensure!(ok && said.contains("reviews"), "{said}");

    // lumen sql and lumen policy status: the token and the CA.
    let root = pki.root.display().to_string();
    let sql_args = [
        "sql",
        "SELECT 41 + 1 AS answer",
        "--url",
        &query,
        "--cacert",
        &root,
    ];
    let (ok, said) = lumen(&sql_args, None)?;
    ensure!(!ok && said.contains("401"), "{said}");
    let (ok, said) = lumen(&sql_args, Some(TOKEN))?;
    ensure!(ok && said.contains("42"), "{said}");
    let (ok, said) = lumen(
        &["policy", "status", "--url", &query, "--cacert", &root],
        Some(TOKEN),
    )?;
    ensure!(ok, "{said}");

    let logs = up.logs();
    ensure!(
        logs.contains("operator call") && logs.contains("alice"),
        "operator calls are logged by user:\n{logs}"
    );
    up.terminate()?;
    Ok(())
}

/// `lumen up` with every listener locked (TLS, the mesh root as client
/// CA, a token file) and `extra` flags, ready.
async fn locked_up(
    dir: &Path,
    pki: &Pki,
    ports: UpPorts,
    mesh: &Path,
    extra: &[&str],
) -> Result<LumenProcess> {
    let tokens = dir.join("tokens.csv");
    std::fs::write(
        &tokens,
        format!("# people and tools\n{TOKEN},alice,1000\n{BOB_TOKEN},bob\n"),
    )?;
    let mut args: Vec<String> = vec!["up".into(), "-f".into(), mesh.display().to_string()];
    args.extend(ports.flags(&dir.join("data")));
    for (flag, file) in [
        ("--tls-cert-file", &pki.server.0),
        ("--tls-key-file", &pki.server.1),
        ("--tls-client-ca-file", &pki.root),
        ("--token-file", &tokens),
    ] {
        args.extend([flag.to_string(), file.display().to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut up = LumenProcess::spawn("lumen-up", dir, &args)?;
    // Readiness stays open to probes.
    up.wait_ready_with(
        &https(pki, None)?,
        &format!("https://localhost:{}/ready", ports.query),
    )
    .await?;
    Ok(up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_export_to_a_locked_collector_with_their_mesh_certificates() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki(dir.path())?;
    let (reviews, productpage) = (SidecarPorts::pick(), SidecarPorts::pick());
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(
        &mesh,
        &[("reviews", 9080, &[(local(reviews.inbound), "v1")])],
    )?;
    let ports = UpPorts::pick();
    // The mesh CA is the test's root: the collector's server certificate
    // and the sidecars' workload certificates share it.
    let (root, root_key) = (
        pki.root.display().to_string(),
        pki.root_key.display().to_string(),
    );
    let mut up = locked_up(
        dir.path(),
        &pki,
        ports,
        &mesh,
        &["--ca-cert", &root, "--ca-key", &root_key],
    )
    .await?;
    let control = ports.control_addr();
    let join = dir
        .path()
        .join("data/control/ca/join-token")
        .display()
        .to_string();
    let collector = format!("https://localhost:{}", ports.otlp_grpc);
    let app = lumen_tests::upstream::start_app("reviews").await;
    let mut sidecars = Vec::new();
    for (service, sa, sp, app) in [
        ("reviews", "bookinfo-reviews", reviews, Some(app)),
        ("productpage", "bookinfo-productpage", productpage, None),
    ] {
        let extra = [
            "--control",
            &control,
            "--join-token-file",
            &join,
            "--service-account",
            sa,
        ];
        sidecars.push(
            Sidecar {
                service,
                version: "v1",
                mesh: &mesh,
                ports: sp,
                app,
                collector: &collector,
                extra: &extra,
            }
            .start(dir.path())
            .await?,
        );
    }
    let client = reqwest::Client::new();
    // Until productpage has its certificate and the control plane has
    // told it reviews takes mTLS.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = client
            .get(format!("http://127.0.0.1:{}/", productpage.outbound))
            .header("host", "reviews")
            .send()
            .await?;
        if r.status().is_success() {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "reviews not reached through the mesh: {}",
            r.status()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let calls = 20;
    for _ in 0..calls {
        let r = client
            .get(format!("http://127.0.0.1:{}/", productpage.outbound))
            .header("host", "reviews")
            .send()
            .await?;
        ensure!(r.status().is_success(), "through the mesh: {}", r.status());
    }
    // Both sides' records arrive over mutual TLS; SQL needs the token.
    let query = https(&pki, None)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let count = "SELECT count(*) AS n FROM requests WHERE destination_service = 'reviews'";
    loop {
        let rows: Vec<serde_json::Value> = query
            .post(format!("https://localhost:{}/api/v1/sql", ports.query))
            .bearer_auth(TOKEN)
            .body(count)
            .send()
            .await?
            .json()
            .await?;
        let n = rows.first().and_then(|r| r["n"].as_i64()).unwrap_or(0);
        if n >= 2 * calls {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "{n} of {} records stored:\n{}\n{}",
                2 * calls,
                up.logs(),
                sidecars.iter().map(LumenProcess::logs).collect::<String>()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for mut s in sidecars {
        s.terminate()?;
    }
    up.terminate()?;
    Ok(())
}

#[test]
fn beyond_loopback_a_listener_without_tls_and_credentials_refuses_to_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(&tokens, format!("{TOKEN},alice\n"))?;
    let ports = UpPorts::pick();
    let up = |exposed: &str, extra: &[&str]| -> Result<(bool, String)> {
        let mut args: Vec<String> = vec!["up".into(), "-f".into(), mesh.display().to_string()];
        args.extend([
            "--data-dir".into(),
            dir.path().join("data").display().to_string(),
        ]);
        for (flag, port) in [
            ("--otlp-grpc", ports.otlp_grpc),
            ("--otlp-http", ports.otlp_http),
            ("--query-addr", ports.query),
            ("--pg-addr", ports.pg),
            ("--flight-sql-addr", ports.flight_sql),
            ("--control-addr", ports.control),
        ] {
            let addr = if flag == exposed {
                format!("0.0.0.0:{}", free_port())
            } else {
                local(port).to_string()
            };
            args.extend([flag.to_string(), addr]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lumen(&args, None)
    };
    for (flag, what) in [
        ("--otlp-grpc", "OTLP/gRPC"),
        ("--otlp-http", "OTLP/HTTP"),
        ("--query-addr", "query HTTP"),
        ("--flight-sql-addr", "Flight SQL"),
        ("--pg-addr", "Postgres wire"),
    ] {
        let (ok, said) = up(flag, &[])?;
        ensure!(
            !ok && said.contains(&format!("{what} on 0.0.0.0:"))
                && said.contains("cleartext and without")
                && said.contains("listen on 127.0.0.1"),
            "{flag}: {said}"
        );
        // A token alone would travel in cleartext.
        let (ok, said) = up(flag, &["--token-file", tokens.to_str().unwrap_or_default()])?;
        ensure!(
            !ok && said.contains("reachable from other machines in cleartext"),
            "{flag} with tokens only: {said}"
        );
    }
    // The control plane's changes need operators' tokens beyond loopback.
    let (ok, said) = lumen(
        &[
            "control",
            "--data-dir",
            dir.path().join("control").to_str().unwrap_or_default(),
            "--control-addr",
            &format!("0.0.0.0:{}", free_port()),
            "--monitoring-addr",
            &local(free_port()).to_string(),
        ],
        None,
    )?;
    ensure!(
        !ok && said.contains("would let anyone who reaches it change the mesh"),
        "{said}"
    );
    // Half the TLS flags is a usage error.
    let (ok, said) = up("", &["--tls-cert-file", "server.crt"])?;
    ensure!(!ok && said.contains("--tls-key-file"), "{said}");
    Ok(())
}
