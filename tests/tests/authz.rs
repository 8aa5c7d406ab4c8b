//! Istio's AuthorizationPolicy and RequestAuthentication through real
//! `lumen proxy` processes with mesh mTLS: the resources of Istio's own
//! authorization tasks (copied from istio.io) are applied with `lumen
//! apply` and decide by the callers' SPIFFE identities, methods, paths,
//! headers and JWT claims — 403 `RBAC: access denied` with the policy in
//! the row, 401 for a bad token — as they do in Istio.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Result, bail};
use lumen_tests::upstream::start_app;
use lumen_tests::{
    LumenProcess, Sidecar, SidecarPorts, UpPorts, lumen_bin, start_up, wait_for_count,
};

fn istio(path: &str) -> String {
    lumen_tests::crate_dir()
        .join("data/istio")
        .join(path)
        .display()
        .to_string()
}

/// `lumen up`, the targets details (default) and httpbin (foo) behind
/// sidecars, and three callers: productpage and reviews (certified as
/// Bookinfo's service accounts) and sleep (no certificate: plaintext).
struct Mesh {
    dir: tempfile::TempDir,
    ports: UpPorts,
    callers: Vec<(&'static str, SidecarPorts)>,
    _processes: Vec<LumenProcess>,
}

impl Mesh {
    async fn start() -> Result<Mesh> {
        let dir = tempfile::tempdir()?;
        let (details, httpbin) = (SidecarPorts::pick(), SidecarPorts::pick());
        let mesh = dir.path().join("mesh.yaml");
        std::fs::write(
            &mesh,
            format!(
                "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: m}}\nspec:\n  services:\n  - name: details\n    port: 9080\n    endpoints: [{{address: 127.0.0.1:{}, version: v1}}]\n  - name: httpbin\n    namespace: foo\n    port: 8000\n    endpoints: [{{address: 127.0.0.1:{}, version: v1}}]\n",
                details.inbound, httpbin.inbound
            ),
        )?;
        let ports = UpPorts::pick();
        let up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, &[]).await?;
        let control = format!("127.0.0.1:{}", ports.control);
        let collector = format!("http://127.0.0.1:{}", ports.otlp_grpc);
        let token = dir
            .path()
            .join("data/control/ca/join-token")
            .display()
            .to_string();
        let mut processes = vec![up];
        let mut callers = Vec::new();
        for (service, namespace, sa, app) in [
            ("details", "default", Some("bookinfo-details"), true),
            ("httpbin", "foo", Some("httpbin"), true),
            (
                "productpage",
                "default",
                Some("bookinfo-productpage"),
                false,
            ),
            ("reviews", "default", Some("bookinfo-reviews"), false),
            ("sleep", "foo", None, false),
        ] {
            let sp = SidecarPorts::pick();
            let sp = match service {
                "details" => details,
                "httpbin" => httpbin,
                _ => sp,
            };
            let app = if app {
                Some(start_app(service).await)
            } else {
                None
            };
            let mut extra = vec!["--control", &control, "--namespace", namespace];
            if let Some(sa) = sa {
                extra.extend(["--join-token-file", &token, "--service-account", sa]);
            }
            let sidecar = Sidecar {
                service,
                version: "v1",
                mesh: &mesh,
                ports: sp,
                app,
                collector: &collector,
                extra: &extra,
            };
            processes.push(sidecar.start(dir.path()).await?);
            if app.is_none() {
                callers.push((service, sp));
            }
        }
        Ok(Mesh {
            dir,
            ports,
            callers,
            _processes: processes,
        })
    }

    fn apply(&self, files: &[String]) -> Result<()> {
        let mut args = vec!["apply"];
        for f in files {
            args.extend(["-f", f]);
        }
        self.lumen(&args)
    }

    /// `lumen <args>` against this mesh's control plane.
    fn lumen(&self, args: &[&str]) -> Result<()> {
        let out = Command::new(lumen_bin())
            .args(args)
            .args(["--control", &format!("127.0.0.1:{}", self.ports.control)])
            .output()?;
        if !out.status.success() {
            bail!(
                "lumen {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// `caller` sends `method host path` with `headers`: status and body.
    async fn call(
        &self,
        caller: &str,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, String)> {
        let port = self
            .callers
            .iter()
            .find(|(c, _)| *c == caller)
            .map(|(_, p)| p.outbound)
            .expect("a caller");
        let mut req = reqwest::Client::new()
            .request(method.parse()?, format!("http://127.0.0.1:{port}{path}"))
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await?;
        Ok((resp.status().as_u16(), resp.text().await?))
    }

    /// Waits until `caller`'s call gets `want` (configuration and
    /// certificates take a moment to reach every sidecar).
    async fn until(
        &self,
        caller: &str,
        method: &str,
        host: &str,
        path: &str,
        want: u16,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.call(caller, method, host, path, &[]).await?;
            if status == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{caller}: {method} {host}{path} answered {status} ({body}), not {want}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

const DETAILS: &str = "details:9080";
const HTTPBIN: &str = "httpbin.foo:8000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_authorization_tasks_decide_by_identity_method_path_header_and_jwt() -> Result<()> {
    let mesh = Mesh::start().await?;
    // Certificates issued and every caller knows the targets take mTLS.
    mesh.until("productpage", "GET", DETAILS, "/", 200).await?;
    mesh.until("reviews", "GET", DETAILS, "/", 200).await?;

    // "Authorization for HTTP traffic": nothing, then details to
    // productpage's GETs only.
    mesh.apply(&[istio("security/authz-http/allow-nothing.yaml")])?;
    mesh.until("productpage", "GET", DETAILS, "/details/0", 403)
        .await?;
    let (status, body) = mesh
        .call("productpage", "GET", DETAILS, "/details/0", &[])
        .await?;
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    mesh.apply(&[istio("security/authz-http/details-viewer.yaml")])?;
    mesh.until("productpage", "GET", DETAILS, "/details/0", 200)
        .await?;
    let cases = [
        ("productpage", "POST", DETAILS, "/details/0", 403),
        ("reviews", "GET", DETAILS, "/details/0", 403),
        // No certificate, no principal.
        ("sleep", "GET", "details.default:9080", "/details/0", 403),
        // allow-nothing is default's: foo's httpbin is open.
        ("sleep", "GET", HTTPBIN, "/get", 200),
    ];
    for (caller, method, host, path, want) in cases {
        let (status, body) = mesh.call(caller, method, host, path, &[]).await?;
        assert_eq!(status, want, "{caller}: {method} {host}{path}: {body}");
    }
    wait_for_count(
        &mesh.ports.sql_url(),
        "SELECT count(*) AS n FROM requests WHERE reporter = 'destination' AND status = 403 \
         AND destination_service = 'details' AND policy = 'none'",
        3,
    )
    .await?;

    // "Explicit deny" on foo's httpbin: GETs denied unless x-token is
    // admin; then only /ip allowed.
    mesh.apply(&[istio(
        "security/authz-deny/deny-method-get-unless-admin.yaml",
    )])?;
    mesh.until("sleep", "GET", HTTPBIN, "/get", 403).await?;
    let admin = [("x-token", "admin")];
    let guest = [("x-token", "guest")];
    assert_eq!(
        mesh.call("sleep", "GET", HTTPBIN, "/get", &admin).await?.0,
        200
    );
    assert_eq!(
        mesh.call("sleep", "GET", HTTPBIN, "/get", &guest).await?.0,
        403
    );
    assert_eq!(
        mesh.call("sleep", "POST", HTTPBIN, "/post", &[]).await?.0,
        200
    );
    mesh.apply(&[istio("security/authz-deny/allow-path-ip.yaml")])?;
    mesh.until("sleep", "POST", HTTPBIN, "/post", 403).await?;
    assert_eq!(
        mesh.call("sleep", "GET", HTTPBIN, "/ip", &guest).await?.0,
        403
    );
    assert_eq!(
        mesh.call("sleep", "GET", HTTPBIN, "/ip", &admin).await?.0,
        200
    );
    assert_eq!(
        mesh.call("sleep", "GET", HTTPBIN, "/get", &admin).await?.0,
        403
    );
    wait_for_count(
        &mesh.ports.sql_url(),
        "SELECT count(*) AS n FROM requests WHERE reporter = 'destination' AND status = 403 \
         AND destination_service = 'httpbin' AND policy = 'foo/deny-method-get'",
        2,
    )
    .await?;
    // Back to open for the JWT task.
    for name in ["allow-path-ip", "deny-method-get"] {
        mesh.lumen(&["delete", "ap", name, "-n", "foo"])?;
    }
    mesh.until("sleep", "POST", HTTPBIN, "/post", 200).await?;
    jwt_task(&mesh).await
}

/// Istio's "JWT token" task, with its own tokens and key set (served here:
/// the machine has no internet, so `jwksUri` names a local copy).
async fn jwt_task(mesh: &Mesh) -> Result<()> {
    let jwks = std::fs::read_to_string(istio("jwt/jwks.json"))?;
    let jwks_url = serve_once_ready(jwks).await?;
    let ra = mesh.dir.path().join("jwt-example.yaml");
    let original = std::fs::read_to_string(istio("security/authz-jwt/jwt-example.yaml"))?;
    std::fs::write(
        &ra,
        original.replace(
            "https://raw.githubusercontent.com/istio/istio/release-1.8/security/tools/jwt/samples/jwks.json",
            &jwks_url,
        ),
    )?;
    mesh.apply(&[ra.display().to_string()])?;
    let bearer = |t: &str| format!("Bearer {}", t.trim());
    let demo = bearer(&std::fs::read_to_string(istio("jwt/demo.jwt"))?);
    let groups = bearer(&std::fs::read_to_string(istio("jwt/groups-scope.jwt"))?);
    let invalid = bearer("invalidToken");
    let get = |h: &'static str, v: String| async move {
        let headers = [(h, v.as_str())];
        mesh.call("sleep", "GET", HTTPBIN, "/headers", &headers)
            .await
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while get("authorization", invalid.clone()).await?.0 != 401 {
        if Instant::now() > deadline {
            bail!("the RequestAuthentication never applied");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        mesh.call("sleep", "GET", HTTPBIN, "/headers", &[]).await?.0,
        200,
        "no token is let through"
    );
    assert_eq!(get("authorization", demo.clone()).await?.0, 200);

    // Tokens signed with Istio's sample key: expired, another issuer,
    // a bad signature.
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(istio("jwt/key.pem"))?)?;
    let kid = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(istio(
        "jwt/jwks.json",
    ))?)?["keys"][0]["kid"]
        .as_str()
        .map(str::to_string);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs();
    let sign = |claims: serde_json::Value| -> Result<String> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = kid.clone();
        Ok(bearer(&jsonwebtoken::encode(&header, &claims, &key)?))
    };
    let iss = "testing@secure.istio.io";
    let expired = sign(serde_json::json!({"iss": iss, "sub": iss, "exp": now - 3600}))?;
    let stranger = sign(serde_json::json!({"iss": "someone@else", "sub": iss, "exp": now + 3600}))?;
    let fresh = sign(serde_json::json!({"iss": iss, "sub": "alice", "exp": now + 3600}))?;
    let mut tampered = fresh.clone();
    tampered.replace_range(tampered.len() - 4.., "AAAA");
    for (what, token, reason) in [
        ("expired", expired, "Jwt is expired"),
        ("another issuer's", stranger, "Jwt issuer is not configured"),
        ("a tampered", tampered, "Jwt verification fails"),
        ("a malformed", invalid.clone(), "Jwt"),
    ] {
        let (status, body) = get("authorization", token).await?;
        assert_eq!(status, 401, "{what} token: {body}");
        assert!(body.contains(reason), "{what} token: {body}");
    }
    assert_eq!(get("authorization", fresh.clone()).await?.0, 200);
    // The token is also taken from ?access_token=, as Istio's default.
    let query_token = demo.trim_start_matches("Bearer ").to_string();
    let (status, _) = mesh
        .call(
            "sleep",
            "GET",
            HTTPBIN,
            &format!("/headers?access_token={query_token}"),
            &[],
        )
        .await?;
    assert_eq!(status, 200);
    let (status, _) = mesh
        .call(
            "sleep",
            "GET",
            HTTPBIN,
            "/headers?access_token=invalidToken",
            &[],
        )
        .await?;
    assert_eq!(status, 401);

    // require-jwt: a request principal is needed; then group1 in `groups`.
    mesh.apply(&[istio("security/authz-jwt/require-jwt.yaml")])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while mesh.call("sleep", "GET", HTTPBIN, "/headers", &[]).await?.0 != 403 {
        if Instant::now() > deadline {
            bail!("require-jwt never applied");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get("authorization", demo.clone()).await?.0, 200);
    assert_eq!(
        get("authorization", fresh).await?.0,
        403,
        "sub alice is not the required principal"
    );
    mesh.apply(&[istio("security/authz-jwt/require-jwt-group1.yaml")])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while get("authorization", demo.clone()).await?.0 != 403 {
        if Instant::now() > deadline {
            bail!("the group1 rule never applied");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get("authorization", groups).await?.0, 200);
    wait_for_count(
        &mesh.ports.sql_url(),
        "SELECT count(*) AS n FROM requests WHERE reporter = 'destination' AND status = 401 \
         AND policy = 'foo/jwt-example'",
        5,
    )
    .await?;
    Ok(())
}

/// Serves `body` as JSON at a local URL until the test ends.
async fn serve_once_ready(body: String) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        let mut resp = hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        ));
                        resp.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    Ok(format!("http://{addr}/jwks.json"))
}
