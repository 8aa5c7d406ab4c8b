//! `lumen up --mesh-control`: the mesh's control plane runs apart (on
//! Kubernetes, `lumen-control`), so the policy engine beside the collector
//! follows that control plane's configuration as a proxy does and sends it
//! its decisions, which it streams on to every sidecar.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use lumen_core::MeshConfig;
use lumen_core::control::v1;
use lumen_proxy::subscribe::ControlEndpoint;
use tokio::sync::watch;

/// Decisions are sent again this often, so a restarted control plane has
/// them without waiting for the next change.
const RESEND: Duration = Duration::from_secs(10);

pub struct MeshControl {
    pub mesh: watch::Receiver<Arc<MeshConfig>>,
    pub decisions: watch::Sender<BTreeSet<String>>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub fn start(endpoint: ControlEndpoint, stop: watch::Receiver<bool>) -> MeshControl {
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
    let send = tokio::spawn(send_decisions(endpoint, rx, stop));
    MeshControl {
        mesh,
        decisions,
        tasks: vec![follow, send],
    }
}

async fn send_decisions(
    endpoint: ControlEndpoint,
    mut decisions: watch::Receiver<BTreeSet<String>>,
    mut stop: watch::Receiver<bool>,
) {
    let channel = match endpoint.endpoint() {
        Ok(e) => e.connect_timeout(Duration::from_secs(5)).connect_lazy(),
        Err(e) => {
            tracing::error!(error = %e, "the mesh's control plane: policy decisions cannot be sent");
            return;
        }
    };
    let mut client = v1::control_plane_client::ControlPlaneClient::new(channel);
    let mut failing = false;
    loop {
        let active: Vec<String> = decisions.borrow_and_update().iter().cloned().collect();
        let sent = client
            .set_active_policies(v1::ActivePolicies {
                active: active.clone(),
            })
            .await;
        let wait = match sent {
            Ok(_) => {
                if failing {
                    tracing::info!(control = %endpoint, "policy decisions reach the control plane again");
                }
                failing = false;
                RESEND
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(control = %endpoint, error = %e.message(), "cannot send policy decisions; retrying");
                }
                failing = true;
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = decisions.changed() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
