//! The Kubernetes controller: the cluster as a source of the control
//! plane's resources, beside (or instead of) files.
//!
//! Reflectors keep Services, EndpointSlices, Pods, Nodes and Namespaces,
//! and the custom resources of [`crate::crd`], in memory. On every change
//! (debounced) [`cluster_resources`] turns them into the resources files
//! would hold — one `Mesh` per namespace listing its Services with their
//! ready endpoints (pod labels → workload, `version`, service account;
//! node labels → locality), and each custom resource as written — and the
//! [`ConfigStore`] publishes them as the next snapshot, the same snapshots
//! file discovery makes. An object that does not validate is left out and
//! the rest go on; each custom resource's `status` then says `Accepted`,
//! or not with the field and the reason. Only the replica holding the
//! leader [`crate::lease`] writes (statuses, the webhook's `caBundle`); a
//! failed write is retried with backoff ([`error_policy`]); everything is
//! re-checked every [`RESYNC`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use lumen_core::resource::{LUMEN_API, Resource, ResourceKey};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::crd::{self, Condition, MeshResource, Status};
use crate::store::ConfigStore;

/// The field manager of the controller's writes.
pub const MANAGER: &str = "lumen-control";
/// How often everything is rebuilt and every status re-checked, changes or not.
pub const RESYNC: Duration = Duration::from_secs(300);
/// The name of the `Mesh` resource made of a namespace's Services.
pub const MESH_NAME: &str = "kubernetes";

#[derive(Debug, Clone)]
pub struct Options {
    /// Namespaces in the mesh, as Istio's `discoverySelectors`: a namespace
    /// is in when any selector's labels all match (all when there are none).
    pub discovery_selectors: Vec<BTreeMap<String, String>>,
    /// The `MutatingWebhookConfiguration` whose `caBundle` the leader keeps
    /// equal to the mesh's trust bundle.
    pub webhook_configuration: Option<String>,
    /// The trust bundle (PEM).
    pub ca_bundle: String,
    /// How long changes gather before a snapshot is built.
    pub debounce: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            discovery_selectors: Vec::new(),
            webhook_configuration: None,
            ca_bundle: String::new(),
            debounce: Duration::from_millis(200),
        }
    }
}

/// Parses a selector as `key=value[,key=value…]`.
pub fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, String> {
    text.split(',')
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().into(), v.trim().into())),
            _ => Err(format!("`{kv}` is not key=value")),
        })
        .collect()
}

/// A custom resource found in the cluster, with what its status says.
#[derive(Debug, Clone)]
pub struct Found {
    pub resource: Resource,
    pub generation: Option<i64>,
    pub status: Option<Status>,
    pub api: ApiResource,
}

/// What the reflectors hold, at one moment.
#[derive(Debug, Default, Clone)]
pub struct ClusterObjects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub pods: Vec<Arc<Pod>>,
    pub nodes: Vec<Arc<Node>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub custom: Vec<Found>,
}

impl ClusterObjects {
    fn in_mesh(&self, selectors: &[BTreeMap<String, String>]) -> impl Fn(&str) -> bool {
        let selected: Option<BTreeSet<String>> = (!selectors.is_empty()).then(|| {
            self.namespaces
                .iter()
                .filter(|ns| {
                    let labels = ns.labels();
                    selectors
                        .iter()
                        .any(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
                })
                .map(|ns| ns.name_any())
                .collect()
        });
        move |ns: &str| selected.as_ref().is_none_or(|s| s.contains(ns))
    }
}

/// The resources the cluster defines: a `Mesh` per namespace with
/// Services, then the custom resources of the mesh's namespaces.
pub fn cluster_resources(c: &ClusterObjects, options: &Options) -> Vec<Resource> {
    let in_mesh = c.in_mesh(&options.discovery_selectors);
    let pods: HashMap<(String, String), &Pod> = c
        .pods
        .iter()
        .map(|p| {
            (
                (p.namespace().unwrap_or_default(), p.name_any()),
                p.as_ref(),
            )
        })
        .collect();
    let nodes: HashMap<String, &Node> =
        c.nodes.iter().map(|n| (n.name_any(), n.as_ref())).collect();
    let mut slices: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
    for slice in &c.slices {
        if let (Some(ns), Some(svc)) = (
            slice.namespace(),
            slice.labels().get("kubernetes.io/service-name"),
        ) {
            slices.entry((ns, svc.clone())).or_default().push(slice);
        }
    }
    let mut by_namespace: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    let mut services: Vec<&Service> = c.services.iter().map(Arc::as_ref).collect();
    services.sort_by_key(|s| (s.namespace(), s.name_any()));
    for svc in services {
        let ns = svc.namespace().unwrap_or_default();
        if !in_mesh(&ns) {
            continue;
        }
        if let Some(spec) = service_spec(svc, &slices, &pods, &nodes) {
            by_namespace.entry(ns).or_default().push(spec);
        }
    }
    let mut out: Vec<Resource> = by_namespace
        .into_iter()
        .map(|(ns, services)| Resource {
            api_version: LUMEN_API.into(),
            kind: lumen_core::resource::Kind::Mesh,
            name: MESH_NAME.into(),
            namespace: ns.clone(),
            labels: BTreeMap::new(),
            spec: serde_json::json!({ "services": services }),
            origin: format!("cluster services in {ns}"),
            prefix: String::new(),
        })
        .collect();
    out.extend(
        c.custom
            .iter()
            .filter(|f| in_mesh(&f.resource.namespace))
            .map(|f| f.resource.clone()),
    );
    out
}

/// Istio's protocol selection: `appProtocol`, else the port name's prefix
/// (`http-web`, `grpc`), else the caller's own protocol.
fn protocol(port: &ServicePort) -> &'static str {
    let named = port
        .app_protocol
        .as_deref()
        .or_else(|| port.name.as_deref().and_then(|n| n.split('-').next()))
        .unwrap_or_default()
        .to_ascii_lowercase();
    match named.as_str() {
        "http" => "http",
        "http2" | "h2c" | "kubernetes.io/h2c" => "http2",
        "grpc" | "grpc-web" => "grpc",
        "tcp" | "tls" | "https" | "kubernetes.io/ws" | "kubernetes.io/wss" | "mongo" | "mysql"
        | "redis" => "tcp",
        _ => "auto",
    }
}

/// The workload a pod belongs to, as Istio names it: its Deployment
/// (the ReplicaSet's name less the pod-template hash), StatefulSet,
/// DaemonSet or Job, else the pod itself.
fn workload(pod: &Pod) -> String {
    let Some(owner) = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
    else {
        return pod.name_any();
    };
    if owner.kind == "ReplicaSet"
        && let Some(hash) = pod.labels().get("pod-template-hash")
        && let Some(deployment) = owner.name.strip_suffix(&format!("-{hash}"))
    {
        return deployment.to_string();
    }
    owner.name.clone()
}

fn locality(node: &Node) -> Option<String> {
    let l = node.labels();
    let region = l.get("topology.kubernetes.io/region")?;
    let mut out = region.clone();
    if let Some(zone) = l.get("topology.kubernetes.io/zone") {
        out = format!("{out}/{zone}");
        if let Some(sub) = l.get("topology.istio.io/subzone") {
            out = format!("{out}/{sub}");
        }
    }
    Some(out)
}

/// A Service as `Mesh` lists it, with the ready endpoints of its first TCP
/// port; `None` for ExternalName Services and Services without TCP ports.
fn service_spec(
    svc: &Service,
    slices: &HashMap<(String, String), Vec<&EndpointSlice>>,
    pods: &HashMap<(String, String), &Pod>,
    nodes: &HashMap<String, &Node>,
) -> Option<serde_json::Value> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let port = spec
        .ports
        .as_ref()?
        .iter()
        .find(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))?;
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let mut endpoints: Vec<serde_json::Value> = Vec::new();
    let mut seen = BTreeSet::new();
    let ours = slices
        .get(&(ns.clone(), name.clone()))
        .map(Vec::as_slice)
        .unwrap_or_default();
    for slice in ours {
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == port.name.as_deref().unwrap_or_default()
        }) else {
            continue;
        };
        let Some(target_port) = target.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for ep in &slice.endpoints {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready) != Some(false);
            let Some(ip) = ep
                .addresses
                .first()
                .and_then(|a| a.parse::<std::net::IpAddr>().ok())
            else {
                continue;
            };
            let address = std::net::SocketAddr::new(ip, target_port);
            if !ready || !seen.insert(address) {
                continue;
            }
            let mut e = serde_json::Map::new();
            e.insert("address".into(), address.to_string().into());
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    let pod_ns = r.namespace.clone().unwrap_or_else(|| ns.clone());
                    pods.get(&(pod_ns, r.name.clone()?))
                });
            if let Some(pod) = pod {
                e.insert("workload".into(), workload(pod).into());
                let labels = pod.labels();
                if let Some(v) = labels.get("version") {
                    e.insert("version".into(), v.clone().into());
                }
                e.insert(
                    "labels".into(),
                    serde_json::to_value(labels).unwrap_or_default(),
                );
                let sa = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into());
                e.insert("serviceAccount".into(), sa.into());
            }
            let node = ep
                .node_name
                .as_ref()
                .or_else(|| pod.and_then(|p| p.spec.as_ref()?.node_name.as_ref()));
            if let Some(l) = node.and_then(|n| nodes.get(n)).and_then(|n| locality(n)) {
                e.insert("locality".into(), l.into());
            }
            endpoints.push(e.into());
        }
    }
    // By address, so the slices' own order (which moves) never makes a new version.
    endpoints.sort_by_key(|e| {
        e["address"]
            .as_str()
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
    });
    let mut out = serde_json::json!({
        "name": name,
        "namespace": ns,
        "port": port.port,
        "protocol": protocol(port),
        "endpoints": endpoints,
    });
    if let Some(ip) = spec
        .cluster_ip
        .as_deref()
        .filter(|ip| !ip.is_empty() && *ip != "None")
    {
        out["clusterIP"] = ip.into();
    }
    Some(out)
}

/// The condition a custom resource should carry.
pub fn desired_condition(refused: Option<&lumen_core::ConfigError>) -> Condition {
    match refused {
        None => Condition {
            type_: "Accepted".into(),
            status: "True".into(),
            reason: "Accepted".into(),
            message: "in force at every proxy of the mesh".into(),
            ..Default::default()
        },
        Some(e) => Condition {
            type_: "Accepted".into(),
            status: "False".into(),
            reason: "Invalid".into(),
            message: if e.field.is_empty() {
                e.reason.clone()
            } else {
                format!("{}: {}", e.field, e.reason)
            },
            ..Default::default()
        },
    }
}

/// The status to write, or `None` when the object already says it.
pub fn status_update(found: &Found, want: &Condition, now: &str) -> Option<Status> {
    let current = found.status.clone().unwrap_or_default();
    let same = current.observed_generation == found.generation
        && current.conditions.iter().any(|c| {
            c.type_ == want.type_
                && c.status == want.status
                && c.reason == want.reason
                && c.message == want.message
        });
    if same {
        return None;
    }
    let mut next = current;
    let changed_state = !next
        .conditions
        .iter()
        .any(|c| c.type_ == want.type_ && c.status == want.status);
    let previous = next
        .conditions
        .iter()
        .find(|c| c.type_ == want.type_)
        .and_then(|c| c.last_transition_time.clone());
    next.conditions.retain(|c| c.type_ != want.type_);
    next.conditions.push(Condition {
        last_transition_time: if changed_state {
            Some(now.into())
        } else {
            previous.or_else(|| Some(now.into()))
        },
        ..want.clone()
    });
    next.observed_generation = found.generation;
    Some(next)
}

/// How long to wait before retrying a failed write, or `None` to give up
/// (the object is gone). Doubles from 1 s to 5 min.
pub fn error_policy(error: &kube::Error, attempt: u32) -> Option<Duration> {
    if let kube::Error::Api(s) = error
        && s.is_not_found()
    {
        return None;
    }
    Some(Duration::from_secs(1 << attempt.min(9)).min(Duration::from_secs(300)))
}

async fn write_status(client: &Client, found: &Found, status: &Status) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &found.resource.namespace, &found.api);
    api.patch_status(
        &found.resource.name,
        &PatchParams::apply(MANAGER),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .map(drop)
}

/// Makes every webhook of the configuration trust `pem`. `Ok(false)` when
/// it already did (or does not exist).
pub async fn patch_ca_bundle(client: &Client, name: &str, pem: &str) -> Result<bool, kube::Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(config) = api.get_opt(name).await? else {
        tracing::warn!(
            configuration = name,
            "no MutatingWebhookConfiguration to give the CA bundle to"
        );
        return Ok(false);
    };
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(pem);
    let mut ops = vec![serde_json::json!({
        "op": "test",
        "path": "/metadata/resourceVersion",
        "value": config.metadata.resource_version,
    })];
    for (i, hook) in config.webhooks.iter().flatten().enumerate() {
        if hook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice())
            != Some(pem.as_bytes())
        {
            ops.push(serde_json::json!({
                "op": "add",
                "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                "value": encoded,
            }));
        }
    }
    if ops.len() == 1 {
        return Ok(false);
    }
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::Value::Array(ops)).map_err(kube::Error::SerdeError)?;
    api.patch(
        name,
        &PatchParams::apply(MANAGER),
        &Patch::Json::<()>(patch),
    )
    .await?;
    tracing::info!(configuration = name, "webhook now trusts the mesh CA");
    Ok(true)
}

/// The ConfigMap each meshed namespace gets with the trust bundle, as
/// istiod writes `istio-ca-root-cert`: injected sidecars mount it to check
/// the control plane's TLS port.
pub use crate::inject::{ROOT_CONFIGMAP, ROOT_KEY};

/// Keeps [`ROOT_CONFIGMAP`] equal to `pem` in `namespace` (server-side
/// apply: created when missing, left alone when equal).
pub async fn apply_root_configmap(
    client: &Client,
    namespace: &str,
    pem: &str,
) -> Result<(), kube::Error> {
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), namespace);
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": ROOT_CONFIGMAP,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "lumen"},
        },
        "data": { ROOT_KEY: pem },
    });
    api.patch(
        ROOT_CONFIGMAP,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map(drop)
}

/// A reflector of one custom resource kind, seen without its type.
trait CustomStore: Send + Sync {
    fn found(&self) -> Vec<Found>;
    fn kind(&self) -> &'static str;
    fn ready(&self) -> bool;
}

struct Custom<K: MeshResource> {
    store: Store<K>,
}

impl<K: MeshResource> CustomStore for Custom<K> {
    fn found(&self) -> Vec<Found> {
        let api = ApiResource::erase::<K>(&());
        self.store
            .state()
            .iter()
            .map(|o| Found {
                resource: crd::to_resource(o.as_ref()),
                generation: o.meta().generation,
                status: o.status().cloned(),
                api: api.clone(),
            })
            .collect()
    }
    fn kind(&self) -> &'static str {
        K::KIND.as_str()
    }
    fn ready(&self) -> bool {
        self.store.wait_until_ready().now_or_never().is_some()
    }
}

use futures::FutureExt as _;

/// Keeps a reflector of `api` running; pokes `changed` on every event.
fn reflect<K>(
    api: Api<K>,
    what: &'static str,
    changed: Arc<Notify>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
    trim: fn(&mut K),
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(move |o| {
            o.managed_fields_mut().clear();
            trim(o);
        })
        .reflect(writer);
    tasks.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    if failing {
                        tracing::info!(kind = what, "watching again");
                        failing = false;
                    }
                    changed.notify_one();
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(kind = what, error = %e, "cannot watch; retrying with backoff");
                    }
                    failing = true;
                }
            }
        }
    }));
    reader
}

/// The controller: reflectors, and what it last published.
pub struct Controller {
    client: Client,
    options: Options,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    nodes: Store<Node>,
    namespaces: Store<Namespace>,
    custom: Vec<Box<dyn CustomStore>>,
    changed: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Controller {
    /// Starts watching every kind the mesh reads.
    pub fn start(client: Client, options: Options) -> Self {
        let changed = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        let c = &client;
        let n = &changed;
        let t = &mut tasks;
        let services = reflect(Api::all(c.clone()), "Service", n.clone(), t, |_| {});
        let slices = reflect(Api::all(c.clone()), "EndpointSlice", n.clone(), t, |_| {});
        // Of a pod, only what an endpoint takes (labels, owner, service
        // account, node) stays in memory; of a node, its labels.
        let pods = reflect(Api::all(c.clone()), "Pod", n.clone(), t, |p: &mut Pod| {
            p.status = None;
            if let Some(spec) = p.spec.as_mut() {
                *spec = k8s_openapi::api::core::v1::PodSpec {
                    service_account_name: spec.service_account_name.take(),
                    node_name: spec.node_name.take(),
                    ..Default::default()
                };
            }
            p.metadata.annotations = None;
        });
        let nodes = reflect(
            Api::all(c.clone()),
            "Node",
            n.clone(),
            t,
            |node: &mut Node| {
                node.spec = None;
                node.status = None;
                node.metadata.annotations = None;
            },
        );
        let namespaces = reflect(Api::all(c.clone()), "Namespace", n.clone(), t, |_| {});
        fn custom<K: MeshResource>(
            c: &Client,
            n: &Arc<Notify>,
            tasks: &mut Vec<tokio::task::JoinHandle<()>>,
        ) -> Box<dyn CustomStore> {
            let store = reflect(
                Api::<K>::all(c.clone()),
                K::KIND.as_str(),
                n.clone(),
                tasks,
                |_| {},
            );
            Box::new(Custom { store })
        }
        let custom = vec![
            custom::<crd::VirtualService>(c, n, &mut tasks),
            custom::<crd::DestinationRule>(c, n, &mut tasks),
            custom::<crd::ServiceEntry>(c, n, &mut tasks),
            custom::<crd::Gateway>(c, n, &mut tasks),
            custom::<crd::Sidecar>(c, n, &mut tasks),
            custom::<crd::PeerAuthentication>(c, n, &mut tasks),
            custom::<crd::AuthorizationPolicy>(c, n, &mut tasks),
            custom::<crd::RequestAuthentication>(c, n, &mut tasks),
            custom::<crd::RateLimit>(c, n, &mut tasks),
            custom::<crd::AccessPolicy>(c, n, &mut tasks),
            custom::<crd::Quota>(c, n, &mut tasks),
        ];
        Controller {
            client,
            options,
            services,
            slices,
            pods,
            nodes,
            namespaces,
            custom,
            changed,
            tasks,
        }
    }

    /// Waits for the first full list of the built-in kinds, and of custom
    /// kinds for at most `custom_wait` (a kind whose definition is not
    /// installed is taken once it is).
    pub fn wait_ready(
        &self,
        custom_wait: Duration,
    ) -> lumen_core::BoxFuture<'_, Result<(), reflector::store::WriterDropped>> {
        Box::pin(self.wait_ready_inner(custom_wait))
    }

    async fn wait_ready_inner(
        &self,
        custom_wait: Duration,
    ) -> Result<(), reflector::store::WriterDropped> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.nodes.wait_until_ready().await?;
        self.namespaces.wait_until_ready().await?;
        let deadline = Instant::now() + custom_wait;
        while Instant::now() < deadline && self.custom.iter().any(|c| !c.ready()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for c in self.custom.iter().filter(|c| !c.ready()) {
            tracing::warn!(
                kind = c.kind(),
                "not listed yet (is its CustomResourceDefinition installed, and may lumen-control list it?); taken once it is"
            );
        }
        Ok(())
    }

    /// Everything the reflectors hold now.
    pub fn objects(&self) -> ClusterObjects {
        ClusterObjects {
            services: self.services.state(),
            slices: self.slices.state(),
            pods: self.pods.state(),
            nodes: self.nodes.state(),
            namespaces: self.namespaces.state(),
            custom: self.custom.iter().flat_map(|c| c.found()).collect(),
        }
    }

    /// Publishes the cluster's resources into `store` until `shutdown`;
    /// a task of its own writes statuses, the CA bundle and the root
    /// ConfigMaps while `leading` says so, so a slow API server never
    /// holds back the next snapshot.
    pub fn run(
        self,
        store: Arc<ConfigStore>,
        leading: watch::Receiver<bool>,
        shutdown: watch::Receiver<bool>,
    ) -> lumen_core::BoxFuture<'static, ()> {
        Box::pin(self.publish_until(store, leading, shutdown))
    }

    async fn publish_until(
        self,
        store: Arc<ConfigStore>,
        leading: watch::Receiver<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let (writes_tx, writes) = watch::channel(Arc::new(Writes::default()));
        let writer = tokio::spawn(write_back(
            self.client.clone(),
            self.options.clone(),
            writes,
            leading,
            shutdown.clone(),
        ));
        let mut held: Vec<ResourceKey> = Vec::new();
        let mut resync = tokio::time::interval(RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = resync.tick() => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
            tokio::select! {
                _ = tokio::time::sleep(self.options.debounce) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
            let objects = self.objects();
            let resources = cluster_resources(&objects, &self.options);
            let keys: Vec<ResourceKey> = resources.iter().map(Resource::key).collect();
            let refused = match store.replace_source(&held, resources) {
                Ok((version, refused)) => {
                    held = keys
                        .into_iter()
                        .filter(|k| !refused.iter().any(|(r, _)| r == k))
                        .collect();
                    for (key, e) in &refused {
                        tracing::warn!(resource = %key, error = %e, "left out: does not validate");
                    }
                    tracing::debug!(%version, resources = held.len(), "cluster configuration published");
                    refused
                }
                Err(e) => {
                    tracing::error!(error = %e, "cluster configuration refused; the last valid one stays in force");
                    continue;
                }
            };
            writes_tx.send_replace(Arc::new(Writes {
                roots: root_namespaces(&objects, &self.options),
                refused: refused.into_iter().collect(),
                custom: objects.custom,
            }));
        }
        drop(writes_tx);
        let _ = writer.await;
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What the cluster should be told after a snapshot.
#[derive(Default)]
struct Writes {
    custom: Vec<Found>,
    refused: HashMap<ResourceKey, lumen_core::ConfigError>,
    /// Namespaces that need the root ConfigMap.
    roots: BTreeSet<String>,
}

/// Namespaces whose sidecars mount the mesh root: those in the mesh and
/// those labelled for injection (a pod injected there must start even
/// when --discovery-selector leaves its namespace out), not terminating.
fn root_namespaces(objects: &ClusterObjects, options: &Options) -> BTreeSet<String> {
    let in_mesh = objects.in_mesh(&options.discovery_selectors);
    objects
        .namespaces
        .iter()
        .filter(|ns| ns.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating"))
        .filter(|ns| {
            let labels = ns.labels();
            in_mesh(&ns.name_any())
                || labels.get("lumen-injection").map(String::as_str) == Some("enabled")
                || labels.get("istio-injection").map(String::as_str) == Some("enabled")
        })
        .map(|ns| ns.name_any())
        .collect()
}

/// Writes to the cluster while this replica leads: after each snapshot,
/// when failed writes are due again, and at every resync.
async fn write_back(
    client: Client,
    options: Options,
    mut writes: watch::Receiver<Arc<Writes>>,
    mut leading: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut statuses = StatusWriter::default();
    let mut bundle_given = false;
    let mut roots_given: BTreeSet<String> = BTreeSet::new();
    let mut resync = tokio::time::interval(RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let lead = *leading.borrow_and_update();
        if !lead {
            // A follower remembers nothing of what it wrote or failed to.
            statuses = StatusWriter::default();
            bundle_given = false;
            roots_given.clear();
        }
        tokio::select! {
            changed = writes.changed() => if changed.is_err() { return },
            _ = changed_or_never(&mut leading) => {}
            _ = sleep_until(statuses.next_retry().filter(|_| lead)) => {}
            _ = resync.tick() => {
                statuses.written.clear();
                bundle_given = false;
                roots_given.clear();
            }
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if !*leading.borrow() {
            continue;
        }
        let current = writes.borrow_and_update().clone();
        if !bundle_given && let Some(name) = &options.webhook_configuration {
            match patch_ca_bundle(&client, name, &options.ca_bundle).await {
                Ok(_) => bundle_given = true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot give the webhook the CA bundle; retried at the next resync")
                }
            }
        }
        if !options.ca_bundle.is_empty() {
            for ns in current.roots.difference(&roots_given.clone()) {
                match apply_root_configmap(&client, ns, &options.ca_bundle).await {
                    Ok(()) => {
                        roots_given.insert(ns.clone());
                    }
                    Err(e) => {
                        tracing::warn!(namespace = %ns, error = %e, "cannot write the mesh root ConfigMap; retried at the next resync")
                    }
                }
            }
        }
        statuses
            .write(&client, &current.custom, &current.refused)
            .await;
    }
}

/// A leadership change; nothing once nobody can change it any more.
async fn changed_or_never(leading: &mut watch::Receiver<bool>) {
    if leading.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes statuses that differ from what objects say; remembers what it
/// wrote (the watch brings the object back a little later) and retries
/// failures with [`error_policy`].
#[derive(Default)]
struct StatusWriter {
    written: HashMap<ResourceKey, (Option<i64>, Condition)>,
    failing: HashMap<ResourceKey, (u32, Instant)>,
}

impl StatusWriter {
    /// When the earliest failed write is due again.
    fn next_retry(&self) -> Option<Instant> {
        self.failing.values().map(|(_, at)| *at).min()
    }

    async fn write(
        &mut self,
        client: &Client,
        found: &[Found],
        refused: &HashMap<ResourceKey, lumen_core::ConfigError>,
    ) {
        let now = k8s_openapi::jiff::Timestamp::now()
            .round(k8s_openapi::jiff::Unit::Second)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let present: BTreeSet<ResourceKey> = found.iter().map(|f| f.resource.key()).collect();
        self.written.retain(|k, _| present.contains(k));
        self.failing.retain(|k, _| present.contains(k));
        for f in found {
            let key = f.resource.key();
            let want = desired_condition(refused.get(&key));
            if self.written.get(&key) == Some(&(f.generation, want.clone())) {
                continue;
            }
            if self
                .failing
                .get(&key)
                .is_some_and(|(_, at)| *at > Instant::now())
            {
                continue;
            }
            let Some(status) = status_update(f, &want, &now) else {
                // It says so already (someone wrote it): nothing is due.
                self.failing.remove(&key);
                continue;
            };
            match write_status(client, f, &status).await {
                Ok(()) => {
                    self.failing.remove(&key);
                    self.written.insert(key, (f.generation, want));
                }
                Err(e) => {
                    let attempt = self.failing.get(&key).map_or(0, |(n, _)| n + 1);
                    match error_policy(&e, attempt) {
                        Some(wait) => {
                            tracing::warn!(resource = %key, error = %e, retry_in = ?wait, "cannot write status");
                            self.failing.insert(key, (attempt, Instant::now() + wait));
                        }
                        None => {
                            self.failing.remove(&key);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: Option<&str>, app_protocol: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.map(Into::into),
            app_protocol: app_protocol.map(Into::into),
            port: 80,
            ..Default::default()
        }
    }

    #[test]
    fn protocols_are_chosen_as_istio_chooses_them() {
        assert_eq!(protocol(&port(Some("http"), None)), "http");
        assert_eq!(protocol(&port(Some("http-web"), None)), "http");
        assert_eq!(protocol(&port(Some("grpc-api"), None)), "grpc");
        assert_eq!(
            protocol(&port(Some("web"), Some("kubernetes.io/h2c"))),
            "http2"
        );
        assert_eq!(
            protocol(&port(Some("http"), Some("tcp"))),
            "tcp",
            "appProtocol wins"
        );
        assert_eq!(protocol(&port(Some("https"), None)), "tcp");
        assert_eq!(protocol(&port(Some("web"), None)), "auto");
        assert_eq!(protocol(&port(None, None)), "auto");
    }

    #[test]
    fn a_pod_belongs_to_its_deployment_statefulset_or_itself() {
        let pod = |owner: Option<(&str, &str)>, hash: Option<&str>| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {
                    "name": "p-1",
                    "labels": hash.map(|h| serde_json::json!({"pod-template-hash": h})).unwrap_or_default(),
                    "ownerReferences": owner.map(|(kind, name)| serde_json::json!([{
                        "apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u", "controller": true
                    }])).unwrap_or_default(),
                }
            }))
            .unwrap()
        };
        assert_eq!(
            workload(&pod(
                Some(("ReplicaSet", "reviews-v1-6c8f7b9d5c")),
                Some("6c8f7b9d5c")
            )),
            "reviews-v1"
        );
        assert_eq!(
            workload(&pod(Some(("ReplicaSet", "bare-rs")), None)),
            "bare-rs"
        );
        assert_eq!(workload(&pod(Some(("StatefulSet", "db")), None)), "db");
        assert_eq!(workload(&pod(None, None)), "p-1");
    }

    #[test]
    fn a_status_is_written_only_when_it_says_something_new() {
        let found = |status: Option<Status>, generation: i64| Found {
            resource: crate::crd::to_resource(&crate::crd::VirtualService::new(
                "r",
                Default::default(),
            )),
            generation: Some(generation),
            status,
            api: ApiResource::erase::<crate::crd::VirtualService>(&()),
        };
        let ok = desired_condition(None);
        let first = status_update(&found(None, 1), &ok, "2026-12-06T10:00:00Z").unwrap();
        assert_eq!(first.observed_generation, Some(1));
        assert_eq!(
            first.conditions[0].last_transition_time.as_deref(),
            Some("2026-12-06T10:00:00Z")
        );
        // Written already: nothing to do.
        assert!(status_update(&found(Some(first.clone()), 1), &ok, "later").is_none());
        // A new generation, still accepted: the transition time stays.
        let next = status_update(&found(Some(first.clone()), 2), &ok, "later").unwrap();
        assert_eq!(
            next.conditions[0].last_transition_time.as_deref(),
            Some("2026-12-06T10:00:00Z")
        );
        // Now invalid: a transition, with the field and reason.
        let e = lumen_core::ConfigError {
            file: "cluster".into(),
            resource: "VirtualService default/r".into(),
            field: "spec.hosts".into(),
            reason: "must not be empty".into(),
        };
        let bad =
            status_update(&found(Some(next), 3), &desired_condition(Some(&e)), "now").unwrap();
        assert_eq!(bad.conditions.len(), 1);
        assert_eq!(bad.conditions[0].status, "False");
        assert_eq!(bad.conditions[0].message, "spec.hosts: must not be empty");
        assert_eq!(
            bad.conditions[0].last_transition_time.as_deref(),
            Some("now")
        );
        // Another controller's conditions are kept.
        let mut theirs = first;
        theirs.conditions.insert(
            0,
            Condition {
                type_: "Reconciled".into(),
                status: "True".into(),
                ..Default::default()
            },
        );
        let both = status_update(&found(Some(theirs), 2), &ok, "later").unwrap();
        let types: Vec<&str> = both.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Reconciled", "Accepted"]);
    }

    #[test]
    fn failed_writes_back_off_and_gone_objects_are_dropped() {
        let api = |code: u16, reason: &str| {
            kube::Error::Api(Box::new(
                kube::core::Status::failure(reason, reason).with_code(code),
            ))
        };
        assert_eq!(error_policy(&api(404, "NotFound"), 0), None);
        assert_eq!(
            error_policy(&api(500, "InternalError"), 0),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            error_policy(&api(409, "Conflict"), 3),
            Some(Duration::from_secs(8))
        );
        assert_eq!(
            error_policy(&api(500, "InternalError"), 30),
            Some(Duration::from_secs(300))
        );
    }

    #[test]
    fn discovery_selectors_pick_namespaces_by_label() {
        assert_eq!(
            parse_selector("lumen-injection=enabled, team=a").unwrap(),
            [
                ("lumen-injection".into(), "enabled".into()),
                ("team".into(), "a".into())
            ]
            .into()
        );
        assert!(parse_selector("nolabel").unwrap_err().contains("`nolabel`"));
        let ns = |name: &str, label: Option<&str>| -> Arc<Namespace> {
            Arc::new(serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": label.map(|l| serde_json::json!({"mesh": l})).unwrap_or_default()}
            })).unwrap())
        };
        let objects = ClusterObjects {
            namespaces: vec![ns("a", Some("on")), ns("b", Some("off")), ns("c", None)],
            ..Default::default()
        };
        let all = objects.in_mesh(&[]);
        assert!(all("a") && all("b") && all("c"));
        let selectors = [parse_selector("mesh=on").unwrap()];
        let some = objects.in_mesh(&selectors);
        assert!(some("a") && !some("b") && !some("c"));
    }
}
