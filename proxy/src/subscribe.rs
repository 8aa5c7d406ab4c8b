//! Following the control plane: one `StreamConfig` call carrying this
//! proxy's snapshots. Each snapshot is validated as files are and, when
//! valid, published whole (the routing table is swapped atomically) and
//! acknowledged with its version; when not, refused (NACK) with the reason,
//! the last good configuration staying in force. While the control plane
//! is unreachable the proxy keeps serving what it has and reconnects with
//! backoff; the policy engine's decisions are kept too, until the proxy
//! has been cut off for its staleness: then each conditional policy
//! follows its `failMode` until a stream is back. The stream also brings
//! the mesh's trust bundle and which sidecars hold certificates
//! ([`crate::mtls`]), and tells the control plane this proxy's own SPIFFE
//! id whenever it changes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use lumen_core::control::v1::control_plane_client::ControlPlaneClient;
use lumen_core::control::v1::{self, Node, ProxyMessage};
use lumen_core::resource::Resource;
use lumen_core::{ConfigError, MeshConfig};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::controlplane::{ControlEndpoint, error_chain};

/// How often a proxy reports its quota usage.
pub const QUOTA_REPORT: Duration = Duration::from_secs(1);

/// Aborts a task when dropped (a session's helpers end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a proxy cut off from the control plane keeps the policy
/// engine's last decisions before conditional policies follow their
/// `failMode`.
pub const DEFAULT_POLICY_STALENESS: Duration = Duration::from_secs(30);

/// Follows the control plane at `endpoint` (`http://host:port`) until
/// `stop` turns true, publishing each accepted snapshot on `tx`; cut off
/// for `staleness`, marks the decisions stale.
pub fn follow(
    endpoint: ControlEndpoint,
    node: Node,
    tx: watch::Sender<Arc<MeshConfig>>,
    staleness: Duration,
    quotas: Arc<crate::quota::QuotaLedger>,
    tls: Arc<crate::mtls::MeshTls>,
    stop: watch::Receiver<bool>,
) -> lumen_core::BoxFuture<'static, ()> {
    Box::pin(follow_until(
        endpoint, node, tx, staleness, quotas, tls, stop,
    ))
}

async fn follow_until(
    endpoint: ControlEndpoint,
    node: Node,
    tx: watch::Sender<Arc<MeshConfig>>,
    staleness: Duration,
    quotas: Arc<crate::quota::QuotaLedger>,
    tls: Arc<crate::mtls::MeshTls>,
    mut stop: watch::Receiver<bool>,
) {
    // Since when no stream has been up (`None`: one is).
    let (down, down_rx) = watch::channel(Some(Instant::now()));
    tokio::spawn(mark_stale(down_rx, tx.clone(), staleness, stop.clone()));
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    loop {
        let mut received = false;
        let ended = tokio::select! {
            ended = session(&endpoint, &node, &tx, &down, &quotas, &tls, &mut received) => ended,
            _ = stop.wait_for(|s| *s) => return,
        };
        down.send_if_modified(|d| {
            let was_up = d.is_none();
            if was_up {
                *d = Some(Instant::now());
            }
            was_up
        });
        // A stream that delivered something was a recovery: its end is a
        // new outage, worth a warning.
        if received {
            backoff = Duration::from_millis(100);
            failing = false;
        }
        match ended {
            Ok(()) => {
                tracing::warn!(%endpoint, "the control plane ended the config stream; reconnecting")
            }
            Err(e) if !failing => {
                tracing::warn!(%endpoint, error = %e, "control plane unreachable; serving the last good config and retrying")
            }
            Err(e) => tracing::debug!(%endpoint, error = %e, "control plane still unreachable"),
        }
        failing = !received;
        let wait = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Marks the decisions stale once no stream has been up for `staleness`.
async fn mark_stale(
    mut down: watch::Receiver<Option<Instant>>,
    tx: watch::Sender<Arc<MeshConfig>>,
    staleness: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let deadline = down.borrow_and_update().map(|t| t + staleness);
        let due = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let fired = tokio::select! {
            () = due => true,
            r = down.changed() => if r.is_err() { return } else { false },
            _ = stop.wait_for(|s| *s) => return,
        };
        if !fired {
            continue;
        }
        let marked = tx.send_if_modified(|current| {
            // Nothing received yet: there are no decisions to distrust, and
            // a changed value would pass for a first configuration.
            if current.policies_stale || current.version.is_empty() {
                return false;
            }
            let mut mesh = (**current).clone();
            mesh.policies_stale = true;
            *current = Arc::new(mesh);
            true
        });
        if marked {
            tracing::warn!(
                staleness = %humantime::format_duration(staleness),
                "no word from the policy engine: conditional policies follow their failMode"
            );
        }
        tokio::select! {
            r = down.changed() => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn session(
    endpoint: &ControlEndpoint,
    node: &Node,
    tx: &watch::Sender<Arc<MeshConfig>>,
    down: &watch::Sender<Option<Instant>>,
    quotas: &Arc<crate::quota::QuotaLedger>,
    tls: &Arc<crate::mtls::MeshTls>,
    received: &mut bool,
) -> Result<(), String> {
    // Keepalive pings: a control plane that vanished without closing the
    // connection is noticed within seconds, so staleness starts counting.
    // A connect that gets no answer (a partition drops the SYN) is given
    // up soon, so the next attempt after the network heals is not left
    // waiting out TCP's own backoff.
    let channel = endpoint
        .endpoint()?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| error_chain(&e))?;
    let mut client = ControlPlaneClient::new(channel);
    let (out, out_rx) = mpsc::channel(4);
    let running = tx.borrow().version.clone();
    let mut ids = tls.watch_id();
    let mut node = node.clone();
    node.spiffe_id = ids.borrow_and_update().clone().unwrap_or_default();
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
    // Quota usage goes up every second while the stream lives, all of it
    // first (the control plane may have restarted).
    quotas.report_all();
    let _reporter = {
        let (out, quotas) = (out.clone(), quotas.clone());
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(QUOTA_REPORT);
            loop {
                tick.tick().await;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                let usage = quotas.take_usage(now);
                if usage.is_empty() {
                    continue;
                }
                let report = ProxyMessage {
                    quota_usage: usage,
                    ..Default::default()
                };
                if out.send(report).await.is_err() {
                    return;
                }
            }
        }))
    };
    // A certificate that comes (or changes identity) while the stream is
    // up is announced, so other sidecars start mTLS to this one.
    let _announcer = {
        let out = out.clone();
        AbortOnDrop(tokio::spawn(async move {
            while ids.changed().await.is_ok() {
                node.spiffe_id = ids.borrow_and_update().clone().unwrap_or_default();
                let update = ProxyMessage {
                    node: Some(node.clone()),
                    ..Default::default()
                };
                if out.send(update).await.is_err() {
                    return;
                }
            }
        }))
    };
    // The parts of the view being received: (nonce, resources so far).
    let mut partial: Option<(String, Vec<bytes::Bytes>)> = None;
    while let Some(mut snapshot) = snapshots
        .message()
        .await
        .map_err(|s| s.message().to_string())?
    {
        *received = true;
        down.send_if_modified(|d| d.take().is_some());
        if snapshot.quota_only {
            quotas.apply(&snapshot.allocations, snapshot.proxies);
            continue;
        }
        if snapshot.peers_only {
            take_peers(tls, &snapshot);
            continue;
        }
        if snapshot.policies_only {
            let active: BTreeSet<String> = snapshot.active_policies.into_iter().collect();
            tracing::info!(active = ?active, "policy decisions from the control plane");
            tx.send_if_modified(|current| {
                let changed = current.active_policies != active || current.policies_stale;
                if changed {
                    let mut mesh = (**current).clone();
                    mesh.active_policies = active;
                    mesh.policies_stale = false;
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
        take_peers(tls, &snapshot);
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
                quotas.retain(&mesh.quotas.iter().map(|q| q.id()).collect::<Vec<_>>());
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

/// The trust bundle and the sidecars with certificates, as a snapshot
/// tells them.
fn take_peers(tls: &crate::mtls::MeshTls, snapshot: &v1::Snapshot) {
    if !snapshot.trust_bundle.is_empty() {
        tls.take_bundle(&snapshot.trust_bundle);
    }
    let peers = snapshot
        .peers
        .iter()
        .filter_map(|p| Some((p.address.parse().ok()?, Arc::from(p.spiffe_id.as_str()))))
        .collect();
    tls.set_peers(peers);
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
        async fn set_active_policies(
            &self,
            _: Request<v1::ActivePolicies>,
        ) -> Result<Response<v1::ActivePoliciesResponse>, Status> {
            Err(Status::unimplemented("fake"))
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
        async fn create_certificate(
            &self,
            _: Request<v1::CertificateRequest>,
        ) -> Result<Response<v1::CertificateResponse>, Status> {
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
        tokio::spawn(follow(
            ControlEndpoint::plain(format!("http://{addr}")),
            node,
            tx,
            DEFAULT_POLICY_STALENESS,
            Default::default(),
            Default::default(),
            stop,
        ));

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
