//! Following the control plane: one `StreamConfig` call carrying this
//! proxy's snapshots. Each snapshot is validated as files are and, when
//! valid, published whole (the routing table is swapped atomically) and
//! acknowledged with its version; when not, refused (NACK) with the reason,
//! the last good configuration staying in force. While the control plane
//! is unreachable the proxy keeps serving what it has and reconnects with
//! backoff.

use std::sync::Arc;
use std::time::Duration;

use lumen_core::MeshConfig;
use lumen_core::control::v1::control_plane_client::ControlPlaneClient;
use lumen_core::control::v1::{Node, ProxyMessage};
use lumen_core::resource::Resource;
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
    while let Some(snapshot) = snapshots
        .message()
        .await
        .map_err(|s| s.message().to_string())?
    {
        *received = true;
        let built = snapshot
            .resources
            .iter()
            .map(Resource::try_from)
            .collect::<Result<Vec<_>, _>>()
            .and_then(|rs| MeshConfig::from_resources(&rs));
        let answer = match built {
            Ok(mut mesh) => {
                mesh.version = snapshot.version_info.clone();
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
