//! The controller against a stand-in API server: `tower-test`'s mock
//! service, answering lists, watches, status patches and `Lease` calls the
//! way kube-apiserver does, fed with recorded objects
//! (`tests/data/k8s/bookinfo-cluster.json`) and Istio's own Bookinfo files.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use lumen_control::ConfigStore;
use lumen_control::controller::{Controller, Options};
use lumen_control::lease::{Elector, LeaseConfig};
use lumen_core::MeshConfig;
use lumen_core::resource::parse_resources;
use serde_json::{Value, json};
use tokio::sync::watch;
use tower_test::mock::SendResponse;

type Reply = SendResponse<Response<Body>>;

fn data(path: &str) -> PathBuf {
    // Run time, not compile time: a shared target directory may have
    // compiled this test in another checkout.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from)
        .join("../tests/data")
        .join(path)
}

/// The collection an object is listed in: `/api/v1/pods`,
/// `/apis/networking.istio.io/v1/virtualservices`.
fn collection(api_version: &str, kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    let plural = match lower.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{lower}s"),
    };
    if api_version.contains('/') {
        format!("/apis/{api_version}/{plural}")
    } else {
        format!("/api/{api_version}/{plural}")
    }
}

/// An object's own path, `…/namespaces/<ns>/<plural>/<name>`.
fn object_path(o: &Value) -> String {
    let coll = collection(
        o["apiVersion"].as_str().unwrap(),
        o["kind"].as_str().unwrap(),
    );
    let name = o["metadata"]["name"].as_str().unwrap();
    match o["metadata"]["namespace"].as_str() {
        Some(ns) => {
            let (prefix, plural) = coll.rsplit_once('/').unwrap();
            format!("{prefix}/namespaces/{ns}/{plural}/{name}")
        }
        None => format!("{coll}/{name}"),
    }
}

fn status(code: u16, reason: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": reason, "reason": reason, "code": code});
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn ok(v: &Value) -> Response<Body> {
    Response::new(Body::from(serde_json::to_vec(v).unwrap()))
}

#[derive(Default)]
struct State {
    /// Every object, by its own path.
    objects: HashMap<String, Value>,
    /// Watches waiting for an event, by collection.
    parked: HashMap<String, Vec<Reply>>,
    /// Writes: method, path and query, body.
    writes: Vec<(Method, String, Value)>,
    version: u64,
}

/// A stand-in kube-apiserver.
#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<State>>);

impl FakeApi {
    fn with(objects: Vec<Value>) -> (Client, FakeApi) {
        let api = FakeApi::default();
        for o in objects {
            api.put(o);
        }
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = api.clone();
        tokio::spawn(async move {
            while let Some((req, reply)) = handle.next_request().await {
                server.answer(req, reply).await;
            }
        });
        (Client::new(service, "default"), api)
    }

    fn put(&self, mut o: Value) -> Value {
        let mut s = self.0.lock().unwrap();
        s.version += 1;
        o["metadata"]["resourceVersion"] = s.version.to_string().into();
        s.objects.insert(object_path(&o), o.clone());
        o
    }

    /// Changes an object and tells the watches of its kind.
    fn modify(&self, o: Value) {
        let o = self.put(o);
        let coll = collection(
            o["apiVersion"].as_str().unwrap(),
            o["kind"].as_str().unwrap(),
        );
        let line = serde_json::to_vec(&json!({"type": "MODIFIED", "object": o})).unwrap();
        let parked = self
            .0
            .lock()
            .unwrap()
            .parked
            .remove(&coll)
            .unwrap_or_default();
        for reply in parked {
            reply.send_response(Response::new(Body::from(line.clone())));
        }
    }

    fn get(&self, path: &str) -> Option<Value> {
        self.0.lock().unwrap().objects.get(path).cloned()
    }

    fn writes(&self) -> Vec<(Method, String, Value)> {
        self.0.lock().unwrap().writes.clone()
    }

    async fn answer(&self, req: Request<Body>, reply: Reply) {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let apply = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v == "application/apply-patch+yaml");
        let body = req.into_body().collect_bytes().await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let mut s = self.0.lock().unwrap();
        if method != Method::GET {
            s.writes
                .push((method.clone(), format!("{path}?{query}"), body.clone()));
        }
        // A collection: every object under it (all namespaces).
        let listed = |s: &State| -> Option<Vec<Value>> {
            let items: Vec<Value> = s
                .objects
                .values()
                .filter(|o| {
                    collection(
                        o["apiVersion"].as_str().unwrap(),
                        o["kind"].as_str().unwrap(),
                    ) == path
                })
                .cloned()
                .collect();
            let known = [
                "/api/v1/services",
                "/api/v1/pods",
                "/api/v1/nodes",
                "/api/v1/namespaces",
                "/apis/discovery.k8s.io/v1/endpointslices",
                "/apis/networking.istio.io/v1/virtualservices",
                "/apis/networking.istio.io/v1/destinationrules",
            ];
            (known.contains(&path.as_str()) || !items.is_empty()).then_some(items)
        };
        let response = match method {
            Method::GET if query.contains("watch=true") => {
                s.parked.entry(path).or_default().push(reply);
                return;
            }
            Method::GET => match (s.objects.get(&path), listed(&s)) {
                (Some(o), _) => ok(o),
                (None, Some(items)) => ok(&json!({
                    "apiVersion": "v1", "kind": "List",
                    "metadata": {"resourceVersion": s.version.to_string()},
                    "items": items,
                })),
                // Not installed here (Lumen's policy kinds, Istio's other kinds).
                (None, None) => status(404, "NotFound"),
            },
            Method::POST => {
                let mut o = body.clone();
                let ns = path.split('/').skip_while(|p| *p != "namespaces").nth(1);
                if let Some(ns) = ns {
                    o["metadata"]["namespace"] = ns.into();
                }
                if s.objects.contains_key(&object_path(&o)) {
                    status(409, "AlreadyExists")
                } else {
                    s.version += 1;
                    o["metadata"]["resourceVersion"] = s.version.to_string().into();
                    s.objects.insert(object_path(&o), o.clone());
                    ok(&o)
                }
            }
            Method::PUT => match s.objects.get(&path) {
                Some(cur)
                    if cur["metadata"]["resourceVersion"]
                        != body["metadata"]["resourceVersion"] =>
                {
                    status(409, "Conflict")
                }
                Some(_) => {
                    let mut o = body.clone();
                    s.version += 1;
                    o["metadata"]["resourceVersion"] = s.version.to_string().into();
                    s.objects.insert(path, o.clone());
                    ok(&o)
                }
                None => status(404, "NotFound"),
            },
            // Server-side apply: the object as sent, created when missing.
            Method::PATCH if apply => {
                let mut o = body.clone();
                s.version += 1;
                o["metadata"]["resourceVersion"] = s.version.to_string().into();
                s.objects.insert(path, o.clone());
                ok(&o)
            }
            Method::PATCH => {
                let target = path.strip_suffix("/status").unwrap_or(&path).to_string();
                match s.objects.get(&target).cloned() {
                    Some(mut o) if path.ends_with("/status") => {
                        o["status"] = body["status"].clone();
                        s.version += 1;
                        o["metadata"]["resourceVersion"] = s.version.to_string().into();
                        s.objects.insert(target, o.clone());
                        ok(&o)
                    }
                    Some(mut o) => {
                        let patch: json_patch::Patch = serde_json::from_value(body).unwrap();
                        match json_patch::patch(&mut o, &patch) {
                            Ok(()) => {
                                s.objects.insert(target, o.clone());
                                ok(&o)
                            }
                            Err(_) => status(409, "Conflict"),
                        }
                    }
                    None => status(404, "NotFound"),
                }
            }
            _ => status(405, "MethodNotAllowed"),
        };
        reply.send_response(response);
    }
}

/// The recorded cluster, Istio's Bookinfo DestinationRules and 50/50
/// reviews VirtualService, and `extra` objects.
fn bookinfo(extra: Vec<Value>) -> Vec<Value> {
    let list: Value =
        serde_json::from_str(&std::fs::read_to_string(data("k8s/bookinfo-cluster.json")).unwrap())
            .unwrap();
    let mut out: Vec<Value> = list["items"].as_array().unwrap().clone();
    for file in [
        "destination-rule-all.yaml",
        "virtual-service-reviews-50-v3.yaml",
    ] {
        let path = data(&format!("istio/bookinfo/networking/{file}"));
        let text = std::fs::read_to_string(&path).unwrap();
        for r in parse_resources(file, &text).unwrap() {
            out.push(json!({
                "apiVersion": r.api_version.replace("v1alpha3", "v1").replace("v1beta1", "v1"),
                "kind": r.kind.as_str(),
                "metadata": {"name": r.name, "namespace": "bookinfo", "generation": 1, "uid": format!("uid-{}", r.name)},
                "spec": r.spec,
            }));
        }
    }
    out.extend(extra);
    out
}

fn webhook_configuration() -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "lumen-sidecar-injector"},
        "webhooks": [{
            "name": "sidecar.lumen.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "clientConfig": {"service": {"name": "lumen-control", "namespace": "lumen-system", "path": "/inject", "port": 443}},
        }],
    })
}

const BUNDLE: &str = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";

fn options() -> Options {
    Options {
        webhook_configuration: Some("lumen-sidecar-injector".into()),
        ca_bundle: BUNDLE.into(),
        debounce: Duration::from_millis(20),
        ..Default::default()
    }
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Running {
    store: Arc<ConfigStore>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn run(client: Client, leading: watch::Receiver<bool>) -> Running {
    let store = Arc::new(ConfigStore::open(Vec::new(), None).unwrap());
    let controller = Controller::start(client, options());
    controller
        .wait_ready(Duration::from_millis(300))
        .await
        .unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(controller.run(store.clone(), leading, stop_rx));
    Running { store, stop, task }
}

fn service_names(mesh: &MeshConfig) -> Vec<String> {
    mesh.services
        .iter()
        .map(|s| format!("{}.{}", s.name, s.namespace))
        .collect()
}

#[tokio::test]
async fn a_cluster_running_bookinfo_gives_the_snapshot_its_files_would() {
    let invalid = json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "ratings-typo", "namespace": "bookinfo", "generation": 3, "uid": "u-typo"},
        "spec": {"hosts": ["ratings"], "http": [{"route": [{"destination": {"host": "ratngs"}}]}]},
    });
    let (client, api) = FakeApi::with(bookinfo(vec![invalid, webhook_configuration()]));
    let (_lead, leading) = watch::channel(true);
    let r = run(client, leading).await;
    let mesh = until("the cluster's services", || {
        let m = r.store.current().mesh.clone();
        (m.services.len() == 5 && m.virtual_services.len() == 1).then_some(m)
    })
    .await;

    // The services are exactly those the equivalent Mesh file defines.
    let expected = MeshConfig::from_resources(
        &parse_resources(
            "bookinfo-mesh.yaml",
            &std::fs::read_to_string(data("k8s/bookinfo-mesh.yaml")).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(service_names(&mesh), service_names(&expected));
    for (got, want) in mesh.services.iter().zip(&expected.services) {
        assert_eq!(got, want, "{}", want.name);
    }
    // Istio's objects are in force: the four DestinationRules, the 50/50 split.
    let hosts: Vec<&str> = mesh
        .destination_rules
        .iter()
        .map(|d| d.host.as_str())
        .collect();
    assert_eq!(hosts.len(), 4, "{hosts:?}");
    assert_eq!(mesh.virtual_services[0].name, "reviews");

    // Each custom resource's status says whether it is in force, and why not.
    let written = until("every status", || {
        let w: Vec<_> = api
            .writes()
            .into_iter()
            .filter(|(m, p, _)| m == Method::PATCH && p.contains("/status?"))
            .collect();
        (w.len() == 6).then_some(w)
    })
    .await;
    for (_, path, _) in &written {
        assert!(
            path.ends_with("?&fieldManager=lumen-control")
                || path.ends_with("?fieldManager=lumen-control"),
            "{path}"
        );
    }
    let typo = api
        .get("/apis/networking.istio.io/v1/namespaces/bookinfo/virtualservices/ratings-typo")
        .unwrap();
    let cond = &typo["status"]["conditions"][0];
    assert_eq!(cond["type"], "Accepted");
    assert_eq!(cond["status"], "False");
    assert_eq!(cond["reason"], "Invalid");
    let message = cond["message"].as_str().unwrap();
    assert!(
        message.starts_with("spec.http[0].route[0].destination.host: ")
            && message.contains("ratngs"),
        "{message}"
    );
    assert_eq!(typo["status"]["observedGeneration"], 3);
    let reviews = api
        .get("/apis/networking.istio.io/v1/namespaces/bookinfo/virtualservices/reviews")
        .unwrap();
    assert_eq!(reviews["status"]["conditions"][0]["status"], "True");
    assert_eq!(reviews["status"]["observedGeneration"], 1);
    let dr = api
        .get("/apis/networking.istio.io/v1/namespaces/bookinfo/destinationrules/reviews")
        .unwrap();
    assert_eq!(dr["status"]["conditions"][0]["reason"], "Accepted");

    // The webhook now trusts the mesh CA.
    let hook = until("the CA bundle", || {
        api.get("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/lumen-sidecar-injector")
            .filter(|h| !h["webhooks"][0]["clientConfig"]["caBundle"].is_null())
    })
    .await;
    use base64::Engine as _;
    let bundle = base64::engine::general_purpose::STANDARD
        .decode(
            hook["webhooks"][0]["clientConfig"]["caBundle"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    assert_eq!(bundle, BUNDLE.as_bytes());

    // Every meshed namespace gets the trust bundle its sidecars check the
    // control plane's TLS port with.
    for ns in ["bookinfo", "kube-system"] {
        let cm = until("the root ConfigMap", || {
            api.get(&format!(
                "/api/v1/namespaces/{ns}/configmaps/lumen-ca-root-cert"
            ))
        })
        .await;
        assert_eq!(cm["data"]["root-cert.pem"], BUNDLE, "{ns}");
    }

    // Fixing the typo: the object's status follows, the route comes in.
    let fixed = json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "ratings-typo", "namespace": "bookinfo", "generation": 4, "uid": "u-typo"},
        "spec": {"hosts": ["ratings"], "http": [{"route": [{"destination": {"host": "ratings"}}]}]},
    });
    api.modify(fixed);
    until("the fixed route", || {
        (r.store.current().mesh.virtual_services.len() == 2).then_some(())
    })
    .await;
    until("the fixed status", || {
        let o = api
            .get("/apis/networking.istio.io/v1/namespaces/bookinfo/virtualservices/ratings-typo")?;
        (o["status"]["conditions"][0]["status"] == "True" && o["status"]["observedGeneration"] == 4)
            .then_some(())
    })
    .await;

    r.stop.send(true).unwrap();
    r.task.await.unwrap();
}

#[tokio::test]
async fn an_endpoint_that_leaves_the_cluster_leaves_the_snapshot() {
    let objects = bookinfo(Vec::new());
    let slice = objects
        .iter()
        .find(|o| {
            o["kind"] == "EndpointSlice"
                && o["metadata"]["labels"]["kubernetes.io/service-name"] == "reviews"
        })
        .unwrap()
        .clone();
    let (client, api) = FakeApi::with(objects);
    let (_lead, leading) = watch::channel(true);
    let r = run(client, leading).await;
    let reviews = |m: &MeshConfig| {
        m.services
            .iter()
            .find(|s| s.name.as_ref() == "reviews")
            .map(|s| {
                s.endpoints
                    .iter()
                    .map(|e| e.workload.to_string())
                    .collect::<Vec<_>>()
            })
    };
    until("reviews' three endpoints", || {
        (reviews(&r.store.current().mesh)?.len() == 3).then_some(())
    })
    .await;

    // reviews-v2's pod goes away: the EndpointSlice controller removes it.
    let mut gone = slice.clone();
    gone["endpoints"].as_array_mut().unwrap().retain(|e| {
        !e["targetRef"]["name"]
            .as_str()
            .unwrap()
            .starts_with("reviews-v2")
    });
    api.modify(gone);
    let left = until("reviews-v2 to leave", || {
        let w = reviews(&r.store.current().mesh)?;
        (w.len() == 2).then_some(w)
    })
    .await;
    assert_eq!(left, ["reviews-v1", "reviews-v3"]);

    // A pod that is not ready stays out too.
    let mut unready = slice;
    unready["endpoints"][0]["conditions"]["ready"] = false.into();
    api.modify(unready);
    let left = until("reviews-v1 to be unready", || {
        let w = reviews(&r.store.current().mesh)?;
        (w == ["reviews-v3", "reviews-v2"]).then_some(w)
    })
    .await;
    assert_eq!(left.len(), 2, "ordered by address");

    r.stop.send(true).unwrap();
    r.task.await.unwrap();
}

fn lease(holder: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "lumen-control", "namespace": "lumen-system"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 1,
                 "renewTime": "2026-12-06T10:00:00.000000Z", "leaseTransitions": 4},
    })
}

fn lease_config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        duration: Duration::from_secs(1),
        renew_deadline: Duration::from_millis(800),
        retry: Duration::from_millis(100),
        ..LeaseConfig::new("lumen-system", "lumen-control", identity)
    }
}

#[tokio::test]
async fn a_replica_without_the_lease_serves_but_never_writes() {
    let (client, api) = FakeApi::with(bookinfo(vec![
        lease("lumen-control-7f9c-a"),
        webhook_configuration(),
    ]));
    // This replica campaigns for real; its controller writes only while
    // the election says it leads.
    let (lead_tx, leading) = watch::channel(false);
    let (stop_election, election_stop) = watch::channel(false);
    let election = tokio::spawn(
        Elector::new(client.clone(), lease_config("lumen-control-7f9c-b"))
            .run(lead_tx, election_stop),
    );
    let r = run(client.clone(), leading.clone()).await;
    // Another replica holds the lease and renews it: this one never leads…
    for _ in 0..8 {
        api.modify(renewed_lease("lumen-control-7f9c-a"));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(!*leading.borrow());
    }
    // …serves the cluster's configuration all the same…
    until("the cluster's services", || {
        (r.store.current().mesh.services.len() == 5).then_some(())
    })
    .await;
    // …and wrote nothing: no status, no CA bundle, no ConfigMap, no lease.
    let writes = api.writes();
    assert!(writes.is_empty(), "{writes:?}");

    // The holder stops renewing: after the lease's duration this replica
    // takes it, and, leading, writes the statuses.
    until("statuses written by the new leader", || {
        let n = api
            .writes()
            .iter()
            .filter(|(m, p, _)| *m == Method::PATCH && p.contains("/status?"))
            .count();
        (n == 5).then_some(())
    })
    .await;
    let held = api
        .get("/apis/coordination.k8s.io/v1/namespaces/lumen-system/leases/lumen-control")
        .unwrap();
    assert_eq!(held["spec"]["holderIdentity"], "lumen-control-7f9c-b");
    assert_eq!(held["spec"]["leaseTransitions"], 5);
    assert!(*leading.borrow());
    // Stopping hands the lease over at once.
    stop_election.send(true).unwrap();
    election.await.unwrap();
    let released = api
        .get("/apis/coordination.k8s.io/v1/namespaces/lumen-system/leases/lumen-control")
        .unwrap();
    assert!(released["spec"]["holderIdentity"].is_null());
    assert!(!*leading.borrow());

    r.stop.send(true).unwrap();
    r.task.await.unwrap();
}

/// The same lease, renewed now by its holder.
fn renewed_lease(holder: &str) -> Value {
    let mut l = lease(holder);
    l["spec"]["renewTime"] = k8s_openapi::jiff::Timestamp::now().to_string().into();
    l
}
