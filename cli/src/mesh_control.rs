//! `lumen up --mesh-control`: the mesh's control plane runs apart (on
//! Kubernetes, `lumen-control`), so the policy engine beside the collector
//! follows that control plane's configuration as a proxy does and sends it
//! its decisions, which it streams on to every sidecar.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lumen_core::MeshConfig;
use lumen_core::control::v1;
use lumen_proxy::controlplane::ControlEndpoint;
use tokio::sync::watch;

/// Decisions are sent again this often, so a restarted control plane has
/// them without waiting for the next change.
const RESEND: Duration = Duration::from_secs(10);

pub struct MeshControl {
    pub mesh: watch::Receiver<Arc<MeshConfig>>,
    pub decisions: watch::Sender<BTreeSet<String>>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// `token` goes with every decision sent (the control plane's operators'
/// tokens guard them).
pub fn start(
    endpoint: ControlEndpoint,
    token: Option<String>,
    stop: watch::Receiver<bool>,
) -> MeshControl {
    let (tx, mesh) = watch::channel(Arc::<MeshConfig>::default());
    let node = v1::Node {
        id: format!("lumen-policy-{}", std::process::id()),
        service: "lumen-policy".into(),
        namespace: "lumen-system".into(),
        workload: "lumen-policy".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    let follow = tokio::spawn(lumen_proxy::subscribe::follow(
        endpoint.clone(),
        node,
        tx,
        lumen_proxy::subscribe::DEFAULT_POLICY_STALENESS,
        Default::default(),
        Default::default(),
        stop.clone(),
    ));
    let (decisions, rx) = watch::channel(BTreeSet::new());
    let send = tokio::spawn(send_decisions(endpoint, token, rx, stop));
    MeshControl {
        mesh,
        decisions,
        tasks: vec![follow, send],
    }
}

/// Sends the decisions to every address the control plane's name has —
/// each replica behind a headless Service keeps its own streams, so each
/// must hear them — again on every change and every [`RESEND`], looking
/// the name up each time (replicas come and go).
async fn send_decisions(
    endpoint: ControlEndpoint,
    token: Option<String>,
    mut decisions: watch::Receiver<BTreeSet<String>>,
    mut stop: watch::Receiver<bool>,
) {
    let Some((host, port)) = endpoint.host_port() else {
        tracing::error!(control = %endpoint, "the mesh's control plane has no host: policy decisions cannot be sent");
        return;
    };
    type Client = v1::control_plane_client::ControlPlaneClient<tonic::transport::Channel>;
    let mut clients: BTreeMap<SocketAddr, Client> = BTreeMap::new();
    let mut failing: BTreeSet<SocketAddr> = BTreeSet::new();
    loop {
        let active: Vec<String> = decisions.borrow_and_update().iter().cloned().collect();
        let addresses: BTreeSet<SocketAddr> = match tokio::net::lookup_host((host.as_str(), port))
            .await
        {
            Ok(found) => found.collect(),
            Err(e) => {
                tracing::warn!(control = %endpoint, error = %e, "cannot look the control plane up; retrying");
                BTreeSet::new()
            }
        };
        clients.retain(|a, _| addresses.contains(a));
        let mut all_sent = !addresses.is_empty();
        for address in &addresses {
            if !clients.contains_key(address) {
                match endpoint.at(*address) {
                    Ok(e) => {
                        // Keepalive: a connection a partition cut is
                        // replaced within seconds of the network healing.
                        let channel = e
                            .connect_timeout(Duration::from_secs(5))
                            .http2_keep_alive_interval(Duration::from_secs(5))
                            .keep_alive_timeout(Duration::from_secs(5))
                            .keep_alive_while_idle(true)
                            .connect_lazy();
                        clients.insert(*address, Client::new(channel));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "policy decisions cannot be sent");
                        return;
                    }
                }
            }
            let Some(client) = clients.get_mut(address) else {
                continue;
            };
            let mut request = tonic::Request::new(v1::ActivePolicies {
                active: active.clone(),
            });
            if let Some(value) = token
                .as_ref()
                .and_then(|t| format!("Bearer {t}").parse().ok())
            {
                request.metadata_mut().insert("authorization", value);
            }
            let sent =
                tokio::time::timeout(Duration::from_secs(5), client.set_active_policies(request))
                    .await;
            match sent {
                Ok(Ok(_)) => {
                    if failing.remove(address) {
                        tracing::info!(%address, "policy decisions reach this control plane replica again");
                    }
                }
                Ok(Err(e)) => {
                    all_sent = false;
                    if failing.insert(*address) {
                        tracing::warn!(%address, error = %e.message(), "cannot send policy decisions; retrying");
                    }
                }
                Err(_) => {
                    all_sent = false;
                    if failing.insert(*address) {
                        tracing::warn!(%address, "policy decisions not answered within 5 s; retrying");
                    }
                }
            }
        }
        let wait = if all_sent {
            RESEND
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = decisions.changed() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
