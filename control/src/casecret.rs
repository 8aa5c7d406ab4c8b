//! The mesh CA shared by every control-plane replica through a `Secret`
//! (as istiod keeps its self-signed root in `istio-ca-secret`): the first
//! replica to start makes the root and creates the Secret; the others —
//! and every restart — take the root from it, so all of them sign for one
//! trust bundle. A Secret the operator made (their own root or
//! intermediate, with its chain) is used as it is.

use std::path::Path;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;

use crate::ca::{CaError, generate_root, write_private};

pub const CERT_KEY: &str = "ca-cert.pem";
pub const KEY_KEY: &str = "ca-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name} has no `{key}`")]
    Missing {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// Makes `dir`'s `ca-cert.pem` and `ca-key.pem` those of the Secret,
/// creating the Secret (from the files already in `dir`, or a new root)
/// when there is none. `Ok(true)`: this replica created it.
pub fn sync<'a>(
    client: kube::Client,
    namespace: &'a str,
    name: &'a str,
    dir: &'a Path,
    trust_domain: &'a str,
) -> lumen_core::BoxFuture<'a, Result<bool, CaSecretError>> {
    Box::pin(sync_inner(client, namespace, name, dir, trust_domain))
}

async fn sync_inner(
    client: kube::Client,
    namespace: &str,
    name: &str,
    dir: &Path,
    trust_domain: &str,
) -> Result<bool, CaSecretError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let err = |source| CaSecretError::Api {
        namespace: namespace.into(),
        name: name.into(),
        source,
    };
    if let Some(secret) = api.get_opt(name).await.map_err(err)? {
        write_files(&secret, namespace, name, dir)?;
        return Ok(false);
    }
    std::fs::create_dir_all(dir).map_err(|e| CaError::File {
        path: dir.to_path_buf(),
        why: e.to_string(),
    })?;
    let (cert, key) = (dir.join(CERT_KEY), dir.join(KEY_KEY));
    let (cert_pem, key_pem) = match (std::fs::read(&cert), std::fs::read(&key)) {
        (Ok(c), Ok(k)) => (c, k),
        _ => {
            let (c, k) = generate_root(trust_domain)?;
            (c.into_bytes(), k.into_bytes())
        }
    };
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some([("app.kubernetes.io/part-of".to_string(), "lumen".to_string())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            [
                (CERT_KEY.to_string(), ByteString(cert_pem)),
                (KEY_KEY.to_string(), ByteString(key_pem)),
            ]
            .into(),
        ),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            write_files(&created, namespace, name, dir)?;
            tracing::info!(secret = %format!("{namespace}/{name}"), "made the mesh root CA and kept it in a Secret");
            Ok(true)
        }
        // Another replica made it first: use theirs.
        Err(kube::Error::Api(s)) if s.is_already_exists() => {
            let secret = api.get(name).await.map_err(err)?;
            write_files(&secret, namespace, name, dir)?;
            Ok(false)
        }
        Err(e) => Err(err(e)),
    }
}

fn write_files(
    secret: &Secret,
    namespace: &str,
    name: &str,
    dir: &Path,
) -> Result<(), CaSecretError> {
    std::fs::create_dir_all(dir).map_err(|e| CaError::File {
        path: dir.to_path_buf(),
        why: e.to_string(),
    })?;
    for key in [CERT_KEY, KEY_KEY] {
        let value = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .ok_or_else(|| CaSecretError::Missing {
                namespace: namespace.into(),
                name: name.into(),
                key,
            })?;
        let text = String::from_utf8_lossy(&value.0);
        write_private(&dir.join(key), &text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;

    fn client() -> (
        kube::Client,
        tower_test::mock::Handle<Request<Body>, Response<Body>>,
    ) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (kube::Client::new(svc, "default"), handle)
    }

    fn not_found() -> Response<Body> {
        let s = kube::core::Status::failure("secrets \"lumen-ca\" not found", "NotFound")
            .with_code(404);
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::from(serde_json::to_vec(&s).unwrap()))
            .unwrap()
    }

    #[tokio::test]
    async fn the_first_replica_makes_the_root_and_the_next_ones_take_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("a");
        let (c, mut api) = client();
        let server = tokio::spawn(async move {
            let (req, send) = api.next_request().await.unwrap();
            assert_eq!(
                req.uri().path(),
                "/api/v1/namespaces/lumen-system/secrets/lumen-ca"
            );
            send.send_response(not_found());
            let (req, send) = api.next_request().await.unwrap();
            assert_eq!(req.method(), Method::POST);
            assert_eq!(req.uri().path(), "/api/v1/namespaces/lumen-system/secrets");
            let body = req.into_body().collect_bytes().await.unwrap();
            let mut secret: serde_json::Value = serde_json::from_slice(&body).unwrap();
            secret["metadata"]["resourceVersion"] = "1".into();
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&secret).unwrap(),
            )));
            secret
        });
        assert!(
            sync(c, "lumen-system", "lumen-ca", &first, "cluster.local")
                .await
                .unwrap()
        );
        let secret = server.await.unwrap();
        let cert = std::fs::read_to_string(first.join(CERT_KEY)).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        crate::ca::MeshCa::open(
            &crate::ca::CaSource::Generated(first.clone()),
            "cluster.local",
        )
        .unwrap();

        // A second replica, with a root of its own from an earlier run: the Secret's wins.
        let second = dir.path().join("b");
        crate::ca::MeshCa::open(
            &crate::ca::CaSource::Generated(second.clone()),
            "cluster.local",
        )
        .unwrap();
        assert_ne!(
            std::fs::read_to_string(second.join(CERT_KEY)).unwrap(),
            cert
        );
        let (c, mut api) = client();
        let server = tokio::spawn(async move {
            let (_, send) = api.next_request().await.unwrap();
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&secret).unwrap(),
            )));
        });
        assert!(
            !sync(c, "lumen-system", "lumen-ca", &second, "cluster.local")
                .await
                .unwrap()
        );
        server.await.unwrap();
        assert_eq!(
            std::fs::read_to_string(second.join(CERT_KEY)).unwrap(),
            cert
        );
        assert_eq!(
            std::fs::read_to_string(second.join(KEY_KEY)).unwrap(),
            std::fs::read_to_string(first.join(KEY_KEY)).unwrap()
        );
    }

    #[tokio::test]
    async fn losing_the_race_to_create_takes_the_winners_root() {
        let dir = tempfile::tempdir().unwrap();
        let (c, mut api) = client();
        let server = tokio::spawn(async move {
            let (_, send) = api.next_request().await.unwrap();
            send.send_response(not_found());
            let (_, send) = api.next_request().await.unwrap();
            let s = kube::core::Status::failure("already exists", "AlreadyExists").with_code(409);
            send.send_response(
                Response::builder()
                    .status(StatusCode::CONFLICT)
                    .body(Body::from(serde_json::to_vec(&s).unwrap()))
                    .unwrap(),
            );
            let (_, send) = api.next_request().await.unwrap();
            let winner = serde_json::json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "lumen-ca", "namespace": "lumen-system"},
                "data": {"ca-cert.pem": "d2lubmVy", "ca-key.pem": "a2V5"},
            });
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&winner).unwrap(),
            )));
        });
        assert!(
            !sync(c, "lumen-system", "lumen-ca", dir.path(), "cluster.local")
                .await
                .unwrap()
        );
        server.await.unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CERT_KEY)).unwrap(),
            "winner"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join(KEY_KEY)).unwrap(),
            "key"
        );
    }
}
