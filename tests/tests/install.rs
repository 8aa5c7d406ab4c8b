//! `lumen install` against a stand-in API server (no cluster runs here):
//! what it sends is what kube-apiserver would get — server-side apply of
//! every object of deploy/overlays/default, in an order that works, and the
//! Postgres password Secret made once.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};

use anyhow::{Result, ensure};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lumen_tests::lumen_bin;
use serde_json::{Value, json};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
struct Call {
    method: String,
    uri: String,
    content_type: String,
    body: Value,
}

/// Answers as kube-apiserver: `istio` says whether Istio's definitions are
/// installed.
async fn api_server(istio: bool) -> Result<(SocketAddr, Arc<Mutex<Vec<Call>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let method = req.method().to_string();
                        let uri = req.uri().to_string();
                        let content_type = req
                            .headers()
                            .get(http::header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        let bytes = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                        seen.lock().unwrap().push(Call {
                            method: method.clone(),
                            uri: uri.clone(),
                            content_type,
                            body: body.clone(),
                        });
                        let not_found = || {
                            (
                                404,
                                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                            )
                        };
                        let (code, answer) = match method.as_str() {
                            "GET" if uri.ends_with("/customresourcedefinitions/virtualservices.networking.istio.io") && istio => (200, json!({
                                "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                                "metadata": {"name": "virtualservices.networking.istio.io", "labels": {"app": "istio-pilot"}},
                                "spec": {"group": "networking.istio.io", "names": {"kind": "VirtualService", "plural": "virtualservices"}, "scope": "Namespaced", "versions": []},
                            })),
                            "GET" => not_found(),
                            "PATCH" | "POST" => (if method == "POST" { 201 } else { 200 }, body),
                            _ => (405, Value::Null),
                        };
                        let response = http::Response::builder()
                            .status(code)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(serde_json::to_vec(&answer).unwrap())))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok((addr, calls))
}

fn kubeconfig(dir: &std::path::Path, addr: SocketAddr) -> Result<std::path::PathBuf> {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{addr}\nusers:\n- name: admin\n  user:\n    token: t0ken\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\ncurrent-context: test\n"
        ),
    )?;
    Ok(path)
}

async fn install(istio: bool) -> Result<(Vec<Call>, String)> {
    let dir = tempfile::tempdir()?;
    let (addr, calls) = api_server(istio).await?;
    let config = kubeconfig(dir.path(), addr)?;
    let out = tokio::task::spawn_blocking(move || {
        Command::new(lumen_bin())
            .arg("install")
            .env("KUBECONFIG", &config)
            .env("HOME", config.parent().unwrap())
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = calls.lock().unwrap().clone();
    Ok((calls, stdout))
}

fn dry_run(flags: &[&str]) -> Result<Vec<Value>> {
    let out = Command::new(lumen_bin())
        .args(["install", "--dry-run"])
        .args(flags)
        .output()?;
    ensure!(out.status.success());
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&String::from_utf8(out.stdout)?) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lumen_install_applies_every_object_server_side_in_a_working_order() -> Result<()> {
    let (calls, stdout) = install(false).await?;
    let applied: Vec<&Call> = calls.iter().filter(|c| c.method == "PATCH").collect();
    let want = dry_run(&[])?;
    assert_eq!(applied.len(), want.len(), "{stdout}");
    for (call, object) in applied.iter().zip(&want) {
        assert_eq!(call.content_type, "application/apply-patch+yaml");
        assert!(
            call.uri.contains("fieldManager=lumen-install") && call.uri.contains("force=true"),
            "{}",
            call.uri
        );
        assert_eq!(call.body, *object, "{}", call.uri);
        assert!(
            call.uri.ends_with(&format!(
                "/{}",
                object["metadata"]["name"].as_str().unwrap()
            )) || call.uri.contains(&format!(
                "/{}?",
                object["metadata"]["name"].as_str().unwrap()
            )),
            "{}",
            call.uri
        );
    }
    let path = |c: &Call| c.uri.split('?').next().unwrap_or_default().to_string();
    assert_eq!(path(applied[0]), "/api/v1/namespaces/lumen-system");
    let paths: BTreeSet<String> = applied.iter().map(|c| path(c)).collect();
    for p in [
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/virtualservices.networking.istio.io",
        "/apis/apps/v1/namespaces/lumen-system/deployments/lumen-control",
        "/apis/apps/v1/namespaces/lumen-system/statefulsets/lumen-collector",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/lumen-control",
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/lumen-sidecar-injector",
        "/api/v1/namespaces/lumen-system/configmaps/lumen-grafana-dashboards-istio",
        "/apis/policy/v1/namespaces/lumen-system/poddisruptionbudgets/lumen-control",
    ] {
        assert!(paths.contains(p), "{p} not applied: {paths:?}");
    }
    // The Postgres password: made, 24 characters, once.
    let secret = calls
        .iter()
        .find(|c| {
            c.method == "POST" && c.uri.starts_with("/api/v1/namespaces/lumen-system/secrets")
        })
        .expect("the lumen-query Secret");
    assert_eq!(secret.body["metadata"]["name"], "lumen-query");
    assert_eq!(
        secret.body["stringData"]["pg-password"]
            .as_str()
            .unwrap()
            .len(),
        24
    );
    // The mesh CA (as lumen-control keeps it), the collector's
    // certificate from it, and the tokens the collector and control plane
    // share.
    let posted = |name: &str| {
        calls.iter().find(|c| {
            c.method == "POST"
                && c.uri.starts_with("/api/v1/namespaces/lumen-system/secrets")
                && c.body["metadata"]["name"] == name
        })
    };
    let ca = posted("lumen-ca").expect("the lumen-ca Secret");
    let ca_pem = base64::engine::general_purpose::STANDARD
        .decode(ca.body["data"]["ca-cert.pem"].as_str().unwrap_or_default())?;
    let tls = posted("lumen-collector-tls").expect("the lumen-collector-tls Secret");
    assert_eq!(tls.body["type"], "kubernetes.io/tls");
    let data = &tls.body["stringData"];
    let cert = data["tls.crt"].as_str().unwrap_or_default();
    assert!(
        data["tls.key"]
            .as_str()
            .unwrap_or_default()
            .contains("PRIVATE KEY")
    );
    assert_eq!(
        data["ca.crt"].as_str().unwrap_or_default().trim(),
        String::from_utf8(ca_pem)?.trim(),
        "ca.crt is the mesh root"
    );
    // A certificate for the collector's Services, chaining to the root.
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(cert.as_bytes())
        .map(|d: rustls::pki_types::CertificateDer<'static>| d.to_vec())?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der)?;
    let root_der = rustls::pki_types::pem::PemObject::from_pem_slice(
        data["ca.crt"].as_str().unwrap_or_default().as_bytes(),
    )
    .map(|d: rustls::pki_types::CertificateDer<'static>| d.to_vec())?;
    let (_, root) = x509_parser::parse_x509_certificate(&root_der)?;
    parsed
        .verify_signature(Some(root.public_key()))
        .map_err(|e| anyhow::anyhow!("the collector's certificate is not signed by ca.crt: {e}"))?;
    let names: Vec<String> = parsed
        .subject_alternative_name()?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| n.to_string())
                .collect()
        })
        .unwrap_or_default();
    for want in [
        "lumen-collector.lumen-system.svc",
        "lumen-query.lumen-system.svc",
    ] {
        assert!(
            names.iter().any(|n| n.contains(want)),
            "{want} not in {names:?}"
        );
    }
    let tokens = posted("lumen-tokens").expect("the lumen-tokens Secret");
    let csv = tokens.body["stringData"]["tokens.csv"]
        .as_str()
        .unwrap_or_default();
    let policy = tokens.body["stringData"]["policy-token"]
        .as_str()
        .unwrap_or_default();
    assert!(policy.len() >= 32, "{policy}");
    assert!(csv.contains(&format!("{policy},lumen-policy")), "{csv}");
    assert!(csv.lines().any(|l| l.ends_with(",admin")), "{csv}");
    assert!(
        stdout.contains("kubectl label namespace <namespace> lumen-injection=enabled"),
        "{stdout}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_istio_keeps_istios_definitions() -> Result<()> {
    let (calls, stdout) = install(true).await?;
    assert!(
        stdout.contains("Istio's CustomResourceDefinitions are installed: keeping them"),
        "{stdout}"
    );
    let applied: Vec<&Call> = calls.iter().filter(|c| c.method == "PATCH").collect();
    assert_eq!(applied.len(), dry_run(&["--skip-istio-crds"])?.len());
    assert!(
        applied.iter().all(|c| !c.uri.contains(".istio.io")),
        "an Istio definition was applied"
    );
    assert!(
        applied
            .iter()
            .any(|c| c.uri.contains("ratelimits.policy.lumen.dev"))
    );
    Ok(())
}

#[test]
fn images_of_your_own_registry_replace_the_defaults_everywhere() -> Result<()> {
    let docs = dry_run(&[
        "--image",
        "registry.example/lumen:1.2",
        "--proxy-image",
        "registry.example/lumen-proxy:1.2",
    ])?;
    let text = serde_json::to_string(&docs)?;
    assert!(
        !text.contains("ghcr.io/lumen-mesh"),
        "a default image is left"
    );
    let control = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "lumen-control")
        .expect("lumen-control");
    let container = &control["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.example/lumen:1.2");
    assert!(
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--proxy-image=registry.example/lumen-proxy:1.2"),
        "{container}"
    );
    Ok(())
}
