//! Following the control plane: one `StreamConfig` call carrying this
//! proxy's snapshots. Each snapshot is validated as files are and, when
//! valid, published whole (the routing table is swapped atomically) and
//! acknowledged with its version; when not, refused (NACK) with the reason,
//! the last good configuration staying in force. While the control plane
//! is unreachable the proxy keeps serving what it has and reconnects with
//! backoff.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use lumen_core::control::v1::control_plane_client::ControlPlaneClient;
use lumen_core::control::v1::{self, Node, ProxyMessage};
use lumen_core::resource::Resource;
use lumen_core::{ConfigError, MeshConfig};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// Follows the control plane at `endpoint` (`http://host:port`) until
/// `stop` turns true, publishing each accepted snapshot on `tx`.
pub async fn follow(
    endpoint: String,
    node: Node,
    tx: watch::Sender<Arc<MeshConfig>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    loop {
        let mut received = false;
        tokio::select! {
            ended = session(&endpoint, &node, &tx, &mut received) => {
                match ended {
                    Ok(()) => tracing::warn!(%endpoint, "the control plane ended the config stream; reconnecting"),
                    Err(e) if !failing => tracing::warn!(%endpoint, error = %e, "control plane unreachable; serving the last good config and retrying"),
                    Err(e) => tracing::debug!(%endpoint, error = %e, "control plane still unreachable"),
                }
            }
            _ = stop.wait_for(|s| *s) => return,
        }
        if received {
            backoff = Duration::from_millis(100);
            failing = false;
        } else {
            failing = true;
        }
        let wait = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(
    endpoint: &str,
    node: &Node,
    tx: &watch::Sender<Arc<MeshConfig>>,
    received: &mut bool,
) -> Result<(), String> {
    let mut client = ControlPlaneClient::connect(endpoint.to_string())
        .await
        .map_err(|e| e.to_string())?;
    let (out, out_rx) = mpsc::channel(4);
    let running = tx.borrow().version.clone();
    let _ = out
        .send(ProxyMessage {
            node: Some(node.clone()),
            version_info: running,
            ..Default::default()
        })
        .await;
    let mut snapshots = client
        .stream_config(ReceiverStream::new(out_rx))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    // The parts of the view being received: (nonce, resources so far).
    let mut partial: Option<(String, Vec<bytes::Bytes>)> = None;
    while let Some(mut snapshot) = snapshots
        .message()
        .await
        .map_err(|s| s.message().to_string())?
    {
        *received = true;
        if snapshot.policies_only {
            let active: BTreeSet<String> = snapshot.active_policies.into_iter().collect();
            tracing::info!(active = ?active, "policy decisions from the control plane");
            tx.send_if_modified(|current| {
                let changed = current.active_policies != active;
                if changed {
                    let mut mesh = (**current).clone();
                    mesh.active_policies = active;
                    *current = Arc::new(mesh);
                }
                changed
            });
            continue;
        }
        if let Some((nonce, mut resources)) = partial.take()
            && nonce == snapshot.nonce
        {
            resources.append(&mut snapshot.resources);
            snapshot.resources = resources;
        }
        if snapshot.more {
            partial = Some((snapshot.nonce, snapshot.resources));
            continue;
        }
        let built = snapshot
            .resources
            .iter()
            .map(|bytes| {
                let wire =
                    <v1::Resource as prost::Message>::decode(bytes.as_ref()).map_err(|e| {
                        ConfigError {
                            file: "control plane".into(),
                            resource: String::new(),
                            field: "resources".into(),
                            reason: format!("a resource that does not decode: {e}"),
                        }
                    })?;
                Resource::try_from(&wire)
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(|rs| MeshConfig::from_resources(&rs));
        let answer = match built {
            Ok(mut mesh) => {
                mesh.version = snapshot.version_info.clone();
                mesh.active_policies = snapshot.active_policies.iter().cloned().collect();
                tracing::info!(version = %mesh.version, "config from the control plane");
                tx.send_if_modified(|current| {
                    let changed = **current != mesh;
                    if changed {
                        *current = Arc::new(mesh);
                    }
                    changed
                });
                ProxyMessage {
                    version_info: snapshot.version_info,
                    response_nonce: snapshot.nonce,
                    ..Default::default()
                }
            }
            Err(e) => {
                tracing::error!(version = %snapshot.version_info, error = %e, "config from the control plane refused (NACK); the last good config stays");
                ProxyMessage {
                    version_info: tx.borrow().version.clone(),
                    response_nonce: snapshot.nonce,
                    error_detail: e.to_string(),
                    ..Default::default()
                }
            }
        };
        if out.send(answer).await.is_err() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_core::control::v1::control_plane_server::{ControlPlane, ControlPlaneServer};
    use lumen_core::control::v1::{self, Snapshot};
    use lumen_core::resource::parse_resources;
    use tonic::{Request, Response, Status, Streaming};

    const MESH: &str = "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec:\n  services:\n    - name: reviews\n";
    const GOOD_VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews}}]\n";
    const BAD_VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: nowhere}}]\n";

    /// Sends a valid snapshot, then one no proxy can take, and hands over
    /// what the proxy answers.
    struct Fake {
        answers: mpsc::UnboundedSender<ProxyMessage>,
    }

    fn snapshot(version: &str, nonce: &str, yaml: &str, more: bool) -> Snapshot {
        let resources = parse_resources("f.yaml", yaml).unwrap();
        Snapshot {
            version_info: version.into(),
            nonce: nonce.into(),
            resources: resources
                .iter()
                .map(|r| prost::Message::encode_to_vec(&v1::Resource::from(r)).into())
                .collect(),
            more,
            ..Default::default()
        }
    }

    #[tonic::async_trait]
    impl ControlPlane for Fake {
        type StreamConfigStream = ReceiverStream<Result<Snapshot, Status>>;

        async fn stream_config(
            &self,
            request: Request<Streaming<ProxyMessage>>,
        ) -> Result<Response<Self::StreamConfigStream>, Status> {
            let mut inbound = request.into_inner();
            let (tx, rx) = mpsc::channel(4);
            let answers = self.answers.clone();
            tokio::spawn(async move {
                let _ = answers.send(inbound.message().await.unwrap().unwrap());
                // v1 in two parts: the route of the second needs the
                // service of the first, so only the whole view is valid.
                let _ = tx.send(Ok(snapshot("v1", "1", MESH, true))).await;
                let _ = tx.send(Ok(snapshot("v1", "1", GOOD_VS, false))).await;
                let _ = answers.send(inbound.message().await.unwrap().unwrap());
                let _ = tx
                    .send(Ok(snapshot(
                        "v2",
                        "2",
                        &format!("{MESH}---\n{BAD_VS}"),
                        false,
                    )))
                    .await;
                let _ = answers.send(inbound.message().await.unwrap().unwrap());
                // Keep the stream open until the test ends.
                std::future::pending::<()>().await;
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        }
        async fn apply(
            &self,
            _: Request<v1::ApplyRequest>,
        ) -> Result<Response<v1::ApplyResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn delete(
            &self,
            _: Request<v1::DeleteRequest>,
        ) -> Result<Response<v1::DeleteResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn get(
            &self,
            _: Request<v1::GetRequest>,
        ) -> Result<Response<v1::GetResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn proxy_status(
            &self,
            _: Request<v1::ProxyStatusRequest>,
        ) -> Result<Response<v1::ProxyStatusResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
    }

    #[tokio::test]
    async fn a_valid_snapshot_is_acked_and_a_bad_one_nacked_keeping_the_last_good() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (answers, mut got) = mpsc::unbounded_channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ControlPlaneServer::new(Fake { answers }))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let (tx, mut rx) = watch::channel(Arc::new(MeshConfig::default()));
        let (_stop_tx, stop) = watch::channel(false);
        let node = Node {
            id: "reviews-v1-1".into(),
            ..Default::default()
        };
        tokio::spawn(follow(format!("http://{addr}"), node, tx, stop));

        let hello = got.recv().await.unwrap();
        assert_eq!(hello.node.unwrap().id, "reviews-v1-1");
        let ack = got.recv().await.unwrap();
        assert_eq!(
            (ack.version_info.as_str(), ack.response_nonce.as_str()),
            ("v1", "1")
        );
        assert!(ack.error_detail.is_empty());
        let v1 = rx.wait_for(|m| m.version == "v1").await.unwrap().clone();
        assert_eq!(
            v1.virtual_services.len(),
            1,
            "both parts of v1 applied together"
        );
        let nack = got.recv().await.unwrap();
        assert_eq!(
            (nack.version_info.as_str(), nack.response_nonce.as_str()),
            ("v1", "2")
        );
        assert!(
            nack.error_detail.contains("`nowhere` is not a service"),
            "{}",
            nack.error_detail
        );
        assert_eq!(rx.borrow().version, "v1", "the last good config stays");
    }
}
