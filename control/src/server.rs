//! The control plane's gRPC service: one `StreamConfig` call per proxy
//! carrying versioned snapshots down and acknowledgements up (xDS's
//! version / nonce / ACK / NACK), plus the calls behind `lumen apply`,
//! `delete`, `get` and `proxy-status`, and the mesh CA's
//! `CreateCertificate`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use lumen_core::control::v1::control_plane_server::{ControlPlane, ControlPlaneServer};
use lumen_core::control::v1::{self, ProxyMessage, Snapshot};
use lumen_core::resource::{Kind, Resource, ResourceKey};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::ca::MeshCa;
use crate::store::{ConfigStore, StoreError};

/// The mesh CA and who may ask it for certificates.
pub struct Security {
    pub ca: MeshCa,
    /// Join tokens a local proxy proves itself with.
    pub join_tokens: Vec<String>,
    /// On Kubernetes: who a pod's projected service-account token says
    /// the caller is (a TokenReview).
    pub reviewer: Option<Arc<dyn TokenReviewer>>,
}

/// A review's answer to come: the `(namespace, service account)` a token
/// proves, or why it proves nothing.
pub type Reviewed =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(String, String), String>> + Send>>;

/// Checks a bearer token that is not a join token.
pub trait TokenReviewer: Send + Sync {
    fn review(&self, token: String) -> Reviewed;
}

impl Security {
    /// Whether `presented` is one of the join tokens, compared in constant
    /// time.
    fn admits(&self, presented: &[u8]) -> bool {
        self.join_tokens.iter().fold(false, |ok, t| {
            let t = t.as_bytes();
            let same = t.len() == presented.len()
                && t.iter().zip(presented).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0;
            ok | same
        })
    }
}

/// The service over a [`ConfigStore`].
#[derive(Clone)]
pub struct ControlService {
    store: Arc<ConfigStore>,
    proxies: Arc<Mutex<BTreeMap<String, v1::ProxyState>>>,
    nonces: Arc<AtomicU64>,
    /// Each proxy's current stream, by serial. A proxy that reconnects
    /// after a partition has a new stream before the control plane sees
    /// the old one end; only the end of its current stream removes it.
    streams: Arc<Mutex<BTreeMap<String, u64>>>,
    quotas: Arc<crate::quota::QuotaBook>,
    security: Option<Arc<Security>>,
    /// Whose token may change or read the configuration (apply, delete,
    /// get, proxy status, policy decisions); open without credentials.
    operators: Arc<lumen_listen::Access>,
    /// Bumped when a proxy with a certificate comes or goes.
    peers_changed: watch::Sender<u64>,
    /// Snapshots proxies refused (NACK) since start.
    rejects: Arc<AtomicU64>,
}

impl ControlService {
    pub fn new(store: Arc<ConfigStore>) -> Self {
        ControlService {
            store,
            proxies: Default::default(),
            nonces: Arc::new(AtomicU64::new(0)),
            streams: Default::default(),
            quotas: Default::default(),
            security: None,
            operators: lumen_listen::Access::open(),
            peers_changed: watch::channel(0).0,
            rejects: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The control plane's view of its proxies as Prometheus text —
    /// `istioctl proxy-status` as series: Istio's `pilot_xds` (proxies
    /// connected) and `pilot_total_xds_rejects` (snapshots refused), the
    /// config version served, and per proxy the version it acknowledged
    /// and whether that is the one served (`synced`), an older one
    /// (`stale`), or a refusal (`rejected`).
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let current = self.store.current().version.clone();
        let proxies: Vec<(String, v1::ProxyState)> = self
            .proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, p)| (id.clone(), p.clone()))
            .collect();
        use lumen_core::exposition::write_labels;
        let mut out = String::new();
        let _ = write!(
            out,
            "# HELP pilot_xds Proxies connected to this control plane.\n# TYPE pilot_xds gauge\n\
             pilot_xds {}\n\
             # HELP pilot_total_xds_rejects Config snapshots proxies refused (NACK) since start (Istio's name; a gauge, as a counter's sample would need `_total`).\n\
             # TYPE pilot_total_xds_rejects gauge\n\
             pilot_total_xds_rejects {}\n\
             # HELP lumen_control_config_info The mesh config version the control plane serves.\n# TYPE lumen_control_config_info gauge\n\
             lumen_control_config_info",
            proxies.len(),
            self.rejects.load(Ordering::Relaxed),
        );
        write_labels(&mut out, [("version", current.as_str())]);
        out.push_str(
            " 1\n# HELP lumen_control_proxy_config_info Each connected proxy's acknowledged config version and its state: synced, stale or rejected.\n\
             # TYPE lumen_control_proxy_config_info gauge\n",
        );
        for (id, p) in &proxies {
            let node = p.node.clone().unwrap_or_default();
            let state = if !p.nack_error.is_empty() {
                "rejected"
            } else if p.acked_version == current {
                "synced"
            } else {
                "stale"
            };
            out.push_str("lumen_control_proxy_config_info");
            write_labels(
                &mut out,
                [
                    ("proxy", id.as_str()),
                    ("workload", &node.workload),
                    ("namespace", &node.namespace),
                    ("version", &p.acked_version),
                    ("state", state),
                ],
            );
            out.push_str(" 1\n");
        }
        out
    }

    /// Runs the mesh CA: proxies with a join token get certificates.
    pub fn with_security(mut self, security: Security) -> Self {
        self.security = Some(Arc::new(security));
        self
    }

    /// Requires a token of `operators` (once it has any) on the calls
    /// that change or read the configuration.
    pub fn with_operators(mut self, operators: Arc<lumen_listen::Access>) -> Self {
        self.operators = operators;
        self
    }

    fn authorize<T>(&self, request: &Request<T>, call: &str) -> Result<(), Status> {
        let headers = request.metadata().clone().into_headers();
        match self
            .operators
            .authenticate(None, &headers, lumen_listen::Grant::Operate)
        {
            Ok(lumen_listen::Principal::User(user)) => {
                tracing::info!(%user, call, "operator call");
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(denied) => {
                tracing::warn!(peer = ?request.remote_addr(), call, %denied, "control call refused");
                Err(Status::unauthenticated(format!(
                    "{call}: {denied} (lumen's commands send the one --token or LUMEN_TOKEN gives)"
                )))
            }
        }
    }

    fn trust_bundle(&self) -> Vec<String> {
        self.security
            .as_ref()
            .map(|s| s.ca.trust_bundle().to_vec())
            .unwrap_or_default()
    }

    /// The connected sidecars that have certificates.
    fn peers(&self) -> Vec<v1::MeshPeer> {
        let mut peers: Vec<v1::MeshPeer> = self
            .proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|p| p.node.as_ref())
            .filter(|n| !n.spiffe_id.is_empty() && !n.inbound_address.is_empty())
            .map(|n| v1::MeshPeer {
                address: n.inbound_address.clone(),
                spiffe_id: n.spiffe_id.clone(),
            })
            .collect();
        peers.sort_by(|a, b| a.address.cmp(&b.address));
        peers.dedup_by(|a, b| a.address == b.address);
        peers
    }

    fn connected(&self) -> u32 {
        self.proxies.lock().unwrap_or_else(|p| p.into_inner()).len() as u32
    }

    /// This proxy's quota allocations now, if it has any to be told (or
    /// the number of proxies changed since `told`).
    fn quota_message(&self, id: &str, told: &mut u32) -> Option<Snapshot> {
        let config = self.store.current();
        if config.mesh.quotas.is_empty() {
            return None;
        }
        let limits: std::collections::HashMap<String, (u64, i64)> = config
            .mesh
            .quotas
            .iter()
            .map(|q| (q.id(), (q.limit, q.per.secs())))
            .collect();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let allocations = self.quotas.allocations(id, now, |q| limits.get(q).copied());
        let proxies = self.connected();
        if allocations.is_empty() && proxies == *told {
            return None;
        }
        *told = proxies;
        Some(Snapshot {
            version_info: config.version.clone(),
            nonce: self.nonces.fetch_add(1, Ordering::Relaxed).to_string(),
            allocations,
            proxies,
            quota_only: true,
            ..Default::default()
        })
    }

    pub fn into_server(self) -> ControlPlaneServer<Self> {
        ControlPlaneServer::new(self)
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut v1::ProxyState)) {
        let mut proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = proxies.get_mut(id) {
            f(p);
        }
    }
}

fn status_of(e: StoreError) -> Status {
    match e {
        StoreError::Invalid(e) => Status::invalid_argument(e.to_string()),
        StoreError::NotFound(k) => Status::not_found(format!("{k} not found")),
        e @ StoreError::Persist { .. } => Status::internal(e.to_string()),
    }
}

fn resources(wire: &[v1::Resource]) -> Result<Vec<Resource>, Status> {
    wire.iter()
        .map(|r| Resource::try_from(r).map_err(|e| Status::invalid_argument(e.to_string())))
        .collect()
}

#[tonic::async_trait]
impl ControlPlane for ControlService {
    type StreamConfigStream = ReceiverStream<Result<Snapshot, Status>>;

    async fn stream_config(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Self::StreamConfigStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before naming its proxy"))?;
        let node = first.node.ok_or_else(|| {
            Status::invalid_argument("the first message must name the proxy (node)")
        })?;
        if node.id.is_empty() {
            return Err(Status::invalid_argument("node.id must not be empty"));
        }
        let id = node.id.clone();
        let connected_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let serial = self.nonces.fetch_add(1, Ordering::Relaxed);
        // Lock order, here and where the stream ends: streams, then proxies.
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.insert(id.clone(), serial);
        self.proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id.clone(),
                v1::ProxyState {
                    node: Some(node),
                    connected_at_ms,
                    // A reconnecting proxy says what it already runs.
                    acked_version: first.version_info.clone(),
                    ..Default::default()
                },
            );
        drop(streams);
        tracing::info!(proxy = %id, "proxy connected");
        self.peers_changed.send_modify(|n| *n += 1);
        let (tx, rx) = mpsc::channel(2);
        let this = self.clone();
        tokio::spawn(async move {
            let mut published = this.store.subscribe();
            let mut decisions = this.store.active_policies();
            let mut peers_changed = this.peers_changed.subscribe();
            // Quota allocations every second, as proxies report.
            let mut quota_tick = tokio::time::interval(std::time::Duration::from_secs(1));
            quota_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut told_proxies = 0;
            'send: loop {
                let snapshot = published.borrow_and_update().clone();
                let active: Vec<String> = decisions.borrow_and_update().iter().cloned().collect();
                peers_changed.borrow_and_update();
                let (bundle, peers) = (this.trust_bundle(), this.peers());
                let nonce = this.nonces.fetch_add(1, Ordering::Relaxed).to_string();
                // Part by part, each the shared encoded bytes: a stream
                // holds handles, never a copy of the view.
                let last = snapshot.parts.len() - 1;
                for (i, part) in snapshot.parts.iter().enumerate() {
                    let message = Snapshot {
                        version_info: snapshot.version.clone(),
                        nonce: nonce.clone(),
                        resources: snapshot.resources[part.clone()].to_vec(),
                        more: i < last,
                        active_policies: if i == last {
                            active.clone()
                        } else {
                            Vec::new()
                        },
                        trust_bundle: if i == last {
                            bundle.clone()
                        } else {
                            Vec::new()
                        },
                        peers: if i == last { peers.clone() } else { Vec::new() },
                        ..Default::default()
                    };
                    if tx.send(Ok(message)).await.is_err() {
                        break 'send;
                    }
                }
                this.update(&id, |p| p.sent_version = snapshot.version.clone());
                loop {
                    tokio::select! {
                        changed = published.changed() => {
                            if changed.is_err() { break 'send; }
                            continue 'send;
                        }
                        changed = decisions.changed() => {
                            if changed.is_err() { break 'send; }
                            // Only the decisions: no view, nothing to acknowledge.
                            let message = Snapshot {
                                version_info: snapshot.version.clone(),
                                nonce: this.nonces.fetch_add(1, Ordering::Relaxed).to_string(),
                                active_policies: decisions.borrow_and_update().iter().cloned().collect(),
                                policies_only: true,
                                ..Default::default()
                            };
                            if tx.send(Ok(message)).await.is_err() {
                                break 'send;
                            }
                        }
                        changed = peers_changed.changed() => {
                            if changed.is_err() { break 'send; }
                            let message = Snapshot {
                                version_info: snapshot.version.clone(),
                                nonce: this.nonces.fetch_add(1, Ordering::Relaxed).to_string(),
                                trust_bundle: this.trust_bundle(),
                                peers: this.peers(),
                                peers_only: true,
                                ..Default::default()
                            };
                            if tx.send(Ok(message)).await.is_err() {
                                break 'send;
                            }
                        }
                        _ = quota_tick.tick() => {
                            if let Some(message) = this.quota_message(&id, &mut told_proxies)
                                && tx.send(Ok(message)).await.is_err()
                            {
                                break 'send;
                            }
                        }
                        msg = inbound.message() => match msg {
                            // Who the proxy is changed (its certificate came).
                            Ok(Some(m)) if m.response_nonce.is_empty() && m.node.is_some() => {
                                this.update(&id, |p| p.node = m.node);
                                this.peers_changed.send_modify(|n| *n += 1);
                            }
                            // A usage report, not an answer to a snapshot.
                            Ok(Some(m)) if m.response_nonce.is_empty() && !m.quota_usage.is_empty() => {
                                this.quotas.report(&id, &m.quota_usage);
                            }
                            Ok(Some(m)) => this.update(&id, |p| {
                                if m.error_detail.is_empty() {
                                    p.acked_version = m.version_info;
                                    p.nack_error.clear();
                                } else {
                                    tracing::warn!(proxy = %id, error = %m.error_detail, "proxy refused a snapshot (NACK)");
                                    this.rejects.fetch_add(1, Ordering::Relaxed);
                                    p.acked_version = m.version_info;
                                    p.nack_error = m.error_detail;
                                }
                            }),
                            Ok(None) | Err(_) => break 'send,
                        },
                    }
                }
            }
            {
                let mut streams = this.streams.lock().unwrap_or_else(|p| p.into_inner());
                if streams.get(&id) != Some(&serial) {
                    tracing::info!(proxy = %id, "an earlier stream of the proxy ended; it follows on a newer one");
                    return;
                }
                streams.remove(&id);
                this.proxies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
            this.quotas.idle(&id);
            this.peers_changed.send_modify(|n| *n += 1);
            tracing::info!(proxy = %id, "proxy disconnected");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn set_active_policies(
        &self,
        request: Request<v1::ActivePolicies>,
    ) -> Result<Response<v1::ActivePoliciesResponse>, Status> {
        self.authorize(&request, "SetActivePolicies")?;
        let active: std::collections::BTreeSet<String> =
            request.into_inner().active.into_iter().collect();
        if let Some(bad) = active.iter().find(|a| a.split('/').count() != 2) {
            return Err(Status::invalid_argument(format!(
                "`{bad}` is not namespace/name"
            )));
        }
        tracing::debug!(?active, "policy decisions received");
        self.store.set_active_policies(active);
        Ok(Response::new(v1::ActivePoliciesResponse {}))
    }

    async fn apply(
        &self,
        request: Request<v1::ApplyRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        self.authorize(&request, "Apply")?;
        let req = request.into_inner();
        let list = resources(&req.resources)?;
        if let Some(r) = list.iter().find(|r| !r.kind.is_mesh_config()) {
            return Err(Status::invalid_argument(format!(
                "{}: {} is not mesh configuration",
                r.origin,
                r.key()
            )));
        }
        let (results, version) = self.store.apply(list, req.dry_run).map_err(status_of)?;
        Ok(Response::new(v1::ApplyResponse { results, version }))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        self.authorize(&request, "Delete")?;
        let keys: Vec<ResourceKey> = request
            .into_inner()
            .keys
            .iter()
            .map(|k| ResourceKey::try_from(k).map_err(Status::invalid_argument))
            .collect::<Result<_, _>>()?;
        let (results, version) = self.store.delete(keys).map_err(status_of)?;
        Ok(Response::new(v1::DeleteResponse { results, version }))
    }

    async fn get(
        &self,
        request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::GetResponse>, Status> {
        self.authorize(&request, "Get")?;
        let req = request.into_inner();
        let kind = match req.kind.as_str() {
            "" | "all" => None,
            k => Some(Kind::parse(k).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "unknown kind `{k}`; Lumen has mesh, virtualservices (vs), destinationrules (dr), serviceentries (se), gateways (gw), ratelimits (rl), accesspolicies (acp), quotas, peerauthentications (pa), authorizationpolicies (ap), requestauthentications (ra)"
                ))
            })?),
        };
        let namespace = (!req.namespace.is_empty()).then_some(req.namespace.as_str());
        let list = self.store.get(kind, namespace);
        Ok(Response::new(v1::GetResponse {
            resources: list.iter().map(v1::Resource::from).collect(),
            version: self.store.current().version.clone(),
        }))
    }

    async fn create_certificate(
        &self,
        request: Request<v1::CertificateRequest>,
    ) -> Result<Response<v1::CertificateResponse>, Status> {
        self.create_certificate_now(request)
            .await
            .map(Response::new)
    }

    async fn proxy_status(
        &self,
        request: Request<v1::ProxyStatusRequest>,
    ) -> Result<Response<v1::ProxyStatusResponse>, Status> {
        self.authorize(&request, "ProxyStatus")?;
        let proxies = self
            .proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        Ok(Response::new(v1::ProxyStatusResponse {
            version: self.store.current().version.clone(),
            proxies,
        }))
    }
}

impl ControlService {
    async fn create_certificate_now(
        &self,
        request: Request<v1::CertificateRequest>,
    ) -> Result<v1::CertificateResponse, Status> {
        let Some(security) = &self.security else {
            return Err(Status::failed_precondition(
                "this control plane runs no mesh CA",
            ));
        };
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("a certificate needs `authorization: Bearer <join token>`")
            })?;
        // A join token lets a local proxy name its identity; a pod's
        // service-account token is the identity, which the request must
        // then name.
        let proven = if security.admits(token) {
            None
        } else if let Some(reviewer) = &security.reviewer {
            let token = String::from_utf8(token.to_vec())
                .map_err(|_| Status::unauthenticated("the token is not text"))?;
            match reviewer.review(token).await {
                Ok(identity) => Some(identity),
                Err(why) => {
                    tracing::warn!(%why, "a certificate request's token was refused");
                    return Err(Status::unauthenticated(format!(
                        "the token is neither the join token nor a valid service-account token: {why}"
                    )));
                }
            }
        } else {
            return Err(Status::unauthenticated("the join token is not valid"));
        };
        let req = request.into_inner();
        if let Some((namespace, account)) = &proven
            && (namespace != &req.namespace || account != &req.service_account)
        {
            return Err(Status::permission_denied(format!(
                "the token is service account {namespace}/{account}, not {}/{}",
                req.namespace, req.service_account
            )));
        }
        for (field, value) in [
            ("namespace", &req.namespace),
            ("service_account", &req.service_account),
        ] {
            if !lumen_core::identity::valid_segment(value) {
                return Err(Status::invalid_argument(format!(
                    "{field} {value:?} is not a valid Kubernetes name"
                )));
            }
        }
        let id = lumen_core::identity::SpiffeId::new(
            security.ca.trust_domain(),
            &req.namespace,
            &req.service_account,
        );
        let lifetime = u64::try_from(req.validity_duration)
            .ok()
            .filter(|s| *s > 0)
            .map(std::time::Duration::from_secs);
        let issued = security
            .ca
            .sign(&req.csr, &id, lifetime)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(identity = %id, serial = %issued.serial, not_after = %humantime::format_rfc3339_seconds(issued.not_after), "issued a workload certificate");
        Ok(v1::CertificateResponse {
            cert_chain: issued.chain,
            trust_bundle: security.ca.trust_bundle().to_vec(),
        })
    }
}

/// The gRPC server of both control ports. Its keepalive pings find a
/// proxy cut off by a partition within seconds, so it is marked gone (and
/// its quota share freed) while it is away, not when TCP gives up on it.
fn keepalive_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
}

/// Serves the control plane on `listener` until `shutdown` resolves.
pub fn serve(
    listener: tokio::net::TcpListener,
    service: ControlService,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> lumen_core::BoxFuture<'static, Result<(), tonic::transport::Error>> {
    serve_boxed(listener, service, Box::pin(shutdown))
}

// Not generic, so the state machine it boxes is compiled here, once
// (see `lumen_core::BoxFuture`).
fn serve_boxed(
    listener: tokio::net::TcpListener,
    service: ControlService,
    shutdown: lumen_core::BoxFuture<'static, ()>,
) -> lumen_core::BoxFuture<'static, Result<(), tonic::transport::Error>> {
    Box::pin(serve_until(listener, service, shutdown))
}

async fn serve_until(
    listener: tokio::net::TcpListener,
    service: ControlService,
    shutdown: lumen_core::BoxFuture<'static, ()>,
) -> Result<(), tonic::transport::Error> {
    keepalive_server()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}

/// Serves `service` over TLS with `cert` (Istio's 15012: sidecars check
/// the control plane against the mesh root they have mounted, and their
/// tokens travel encrypted). Handshakes run beside the accept loop, each
/// within 10 s, at most 256 at once.
pub fn serve_tls<'a>(
    listener: tokio::net::TcpListener,
    service: ControlService,
    cert: &'a crate::serving::ServingCert,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> lumen_core::BoxFuture<'a, Result<(), ServeTlsError>> {
    serve_tls_boxed(listener, service, cert, Box::pin(shutdown))
}

// Not generic, so the state machine it boxes is compiled here, once
// (see `lumen_core::BoxFuture`).
fn serve_tls_boxed<'a>(
    listener: tokio::net::TcpListener,
    service: ControlService,
    cert: &'a crate::serving::ServingCert,
    shutdown: lumen_core::BoxFuture<'static, ()>,
) -> lumen_core::BoxFuture<'a, Result<(), ServeTlsError>> {
    Box::pin(serve_tls_until(listener, service, cert, shutdown))
}

async fn serve_tls_until(
    listener: tokio::net::TcpListener,
    service: ControlService,
    cert: &crate::serving::ServingCert,
    shutdown: lumen_core::BoxFuture<'static, ()>,
) -> Result<(), ServeTlsError> {
    let config = cert.server_config(&[b"h2"]).map_err(ServeTlsError::Tls)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<_>>(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(256));
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "control plane accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many TLS handshakes at once: connection closed");
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "control plane TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(%peer, "control plane TLS handshake timed out"),
                }
            });
        }
    });
    let served = keepalive_server()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), shutdown)
        .await;
    accept.abort();
    served.map_err(ServeTlsError::Serve)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeTlsError {
    #[error("TLS configuration: {0}")]
    Tls(rustls::Error),
    #[error(transparent)]
    Serve(tonic::transport::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_core::control::v1::control_plane_client::ControlPlaneClient;
    use std::time::Duration;

    const MESH: &str = "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec:\n  services:\n    - name: reviews\n";

    /// Opens a config stream as proxy `id`; the stream lives while the
    /// returned sender does.
    async fn stream(addr: std::net::SocketAddr, id: &str) -> mpsc::Sender<ProxyMessage> {
        let mut client = ControlPlaneClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.send(ProxyMessage {
            node: Some(v1::Node {
                id: id.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut snapshots = client
            .stream_config(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        snapshots
            .message()
            .await
            .unwrap()
            .expect("a first snapshot");
        tokio::spawn(async move { while let Ok(Some(_)) = snapshots.message().await {} });
        tx
    }

    fn listed(service: &ControlService, id: &str) -> bool {
        service.proxies.lock().unwrap().contains_key(id)
    }

    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("not within 5 s: {what}");
    }

    /// A proxy cut off by a partition reconnects on a new stream before
    /// the control plane sees its old one end; the old one's end must not
    /// remove it (found by the chaos test: proxies vanished from
    /// `proxy-status` and their quota share was freed while connected).
    #[tokio::test]
    async fn the_end_of_a_proxys_old_stream_leaves_its_new_one_listed() {
        let resources = lumen_core::resource::parse_resources("m.yaml", MESH).unwrap();
        let store = Arc::new(ConfigStore::open(resources, None).unwrap());
        let service = ControlService::new(store);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, service.clone(), std::future::pending()));

        let old = stream(addr, "reviews-v1-1").await;
        let new = stream(addr, "reviews-v1-1").await;
        drop(old);
        // The old stream's task ends (and logs so) without removing it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            listed(&service, "reviews-v1-1"),
            "the reconnected proxy was removed"
        );
        drop(new);
        eventually("the proxy is removed once its current stream ends", || {
            !listed(&service, "reviews-v1-1")
        })
        .await;
    }
}
