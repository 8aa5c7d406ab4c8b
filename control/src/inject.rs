//! Sidecar injection: the mutating admission webhook's answer to a pod
//! being created, as Istio's injector gives it — so a namespace labelled
//! `istio-injection=enabled` moves to Lumen as it is.
//!
//! A pod gets an init container (`lumen-init`, with `NET_ADMIN`) that
//! installs the traffic capture, and the `lumen-proxy` sidecar: who it
//! stands beside from the pod (its `app` / `version` labels, namespace,
//! service account, workload), where the control plane and collector are,
//! its identity from a projected service-account token the mesh CA checks,
//! resources from Istio's annotations (`sidecar.istio.io/proxyCPU`, …) or
//! Lumen's. HTTP liveness, readiness and startup probes are pointed at the
//! sidecar's admin port, which asks the app the original probe from inside
//! the pod, so the kubelet still reaches the app under STRICT mTLS.
//! Istio's `traffic.sidecar.istio.io/*` annotations narrow the capture.
//!
//! Which namespaces are injected is the `MutatingWebhookConfiguration`'s
//! namespace selector (`lumen-injection=enabled`, or `istio-injection=
//! enabled`); a pod opts out with `sidecar.istio.io/inject: "false"` or
//! `lumen.dev/inject: "false"` (annotation or label). A review that cannot
//! be read is answered as invalid, never with a crash; the configuration's
//! `failurePolicy` says whether the pod is then created.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::{Value, json};

/// The sidecar's container name; a pod that has one is not injected again.
pub const SIDECAR: &str = "lumen-proxy";
pub const INIT: &str = "lumen-init";
/// The sidecar's admin port: readiness, stats and the app's probes.
pub const ADMIN_PORT: u16 = 15020;
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
/// Istio's proxy uid: the capture leaves its traffic alone.
pub const PROXY_UID: i64 = 1337;
/// Where the projected service-account token is mounted, and its audience.
pub const TOKEN_DIR: &str = "/var/run/secrets/lumen";
/// The ConfigMap holding the mesh root in each meshed namespace, and its key.
pub const ROOT_CONFIGMAP: &str = "lumen-ca-root-cert";
pub const ROOT_KEY: &str = "root-cert.pem";
pub const TOKEN_AUDIENCE: &str = "lumen";

/// What every injected pod is told.
#[derive(Debug, Clone)]
pub struct Injector {
    /// The `lumen-proxy` image (it also holds `lumen-init`).
    pub image: String,
    /// The control plane as sidecars reach it: `host:port`, or
    /// `https://host:port` for its TLS port (checked against the mesh root).
    pub control: String,
    /// The collector's OTLP gRPC endpoint, `http://host:port`.
    pub collector: String,
    pub requests_cpu: String,
    pub requests_memory: String,
    pub limits_cpu: Option<String>,
    pub limits_memory: Option<String>,
}

impl Default for Injector {
    fn default() -> Self {
        Injector {
            image: "ghcr.io/lumen-mesh/lumen-proxy:latest".into(),
            control: "https://lumen-control.lumen-system.svc:15012".into(),
            collector: "http://lumen-collector.lumen-system.svc:4317".into(),
            requests_cpu: "100m".into(),
            requests_memory: "64Mi".into(),
            limits_cpu: None,
            limits_memory: Some("512Mi".into()),
        }
    }
}

/// The webhook's answer to one `AdmissionReview` body.
pub fn review(body: &[u8], injector: &Injector) -> AdmissionReview<DynamicObject> {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return AdmissionResponse::invalid(format!("not an AdmissionReview: {e}"))
                .into_review();
        }
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return AdmissionResponse::invalid(e.to_string()).into_review(),
    };
    let allowed = AdmissionResponse::from(&request);
    if request.operation != Operation::Create {
        return allowed.into_review();
    }
    let Some(object) = request.object.clone() else {
        return allowed.into_review();
    };
    let pod: Pod = match object.try_parse() {
        Ok(p) => p,
        Err(e) => {
            return allowed
                .deny(format!("the object is not a Pod: {e}"))
                .into_review();
        }
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let ops = match patch(&pod, &namespace, injector) {
        Ok(Some(ops)) => ops,
        Ok(None) => return allowed.into_review(),
        // A pod whose annotations cannot be carried out is refused with
        // the reason, rather than left stuck in its init container.
        Err(why) => return allowed.deny(why).into_review(),
    };
    let patch: json_patch::Patch = match serde_json::from_value(Value::Array(ops)) {
        Ok(p) => p,
        Err(e) => {
            return allowed
                .deny(format!("cannot build the patch: {e}"))
                .into_review();
        }
    };
    match allowed.clone().with_patch(patch) {
        Ok(r) => r.into_review(),
        Err(e) => allowed
            .deny(format!("cannot encode the patch: {e}"))
            .into_review(),
    }
}

fn meta<'p>(pod: &'p Pod, key: &str) -> Option<&'p str> {
    let m = &pod.metadata;
    m.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .or_else(|| m.labels.as_ref().and_then(|l| l.get(key)))
        .map(String::as_str)
}

fn label<'p>(pod: &'p Pod, key: &str) -> Option<&'p str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

/// Whether the pod asked not to be injected, or already is.
pub fn skip(pod: &Pod) -> Option<&'static str> {
    for key in ["sidecar.istio.io/inject", "lumen.dev/inject"] {
        if meta(pod, key).is_some_and(|v| v.eq_ignore_ascii_case("false")) {
            return Some("opted out");
        }
    }
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return Some("host network");
    }
    if spec.containers.iter().any(|c| c.name == SIDECAR) {
        return Some("already injected");
    }
    None
}

/// The workload a pod belongs to, as Istio names it: its controller's
/// name (a ReplicaSet's without the pod-template hash), else the pod's.
fn workload(pod: &Pod) -> String {
    let m = &pod.metadata;
    if let Some(owner) = m
        .owner_references
        .as_ref()
        .and_then(|o| o.iter().find(|o| o.controller == Some(true)))
    {
        if owner.kind == "ReplicaSet"
            && let Some(hash) = label(pod, "pod-template-hash")
            && let Some(deployment) = owner.name.strip_suffix(&format!("-{hash}"))
        {
            return deployment.to_string();
        }
        return owner.name.clone();
    }
    m.name
        .clone()
        .or_else(|| {
            m.generate_name
                .clone()
                .map(|g| g.trim_end_matches('-').to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A container port by number or by its name.
fn port_number(port: &IntOrString, container: &Container) -> Option<i32> {
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port),
    }
}

/// JSON pointer escaping of one token.
fn token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// An IPv4 CIDR, as the capture takes it.
fn valid_cidr(c: &str) -> bool {
    lumen_core::networking::virtual_service::parse_subnet(c).is_some_and(|(ip, _)| ip.is_ipv4())
}

/// The JSON patch that injects `pod`, `None` to leave it as it is, or why
/// its annotations cannot be carried out.
pub fn patch(
    pod: &Pod,
    namespace: &str,
    injector: &Injector,
) -> Result<Option<Vec<Value>>, String> {
    if let Some(why) = skip(pod) {
        tracing::debug!(pod = ?pod.metadata.name, why, "not injected");
        return Ok(None);
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(None);
    };
    let mut ops = Vec::new();

    // The app's probes, asked by the sidecar from inside the pod.
    let mut probes: BTreeMap<String, Value> = BTreeMap::new();
    for (i, c) in spec.containers.iter().enumerate() {
        for (field, kind, probe) in [
            ("livenessProbe", "livez", &c.liveness_probe),
            ("readinessProbe", "readyz", &c.readiness_probe),
            ("startupProbe", "startupz", &c.startup_probe),
        ] {
            let Some(Probe {
                http_get: Some(get),
                ..
            }) = probe
            else {
                continue;
            };
            let Some(port) = port_number(&get.port, c) else {
                continue;
            };
            let path = format!("/app-health/{}/{kind}", c.name);
            probes.insert(
                path.clone(),
                json!({
                    "port": port,
                    "path": get.path.clone().unwrap_or_else(|| "/".into()),
                    "scheme": get.scheme.clone().unwrap_or_else(|| "HTTP".into()),
                    "headers": get.http_headers.iter().flatten()
                        .map(|h| json!({"name": h.name, "value": h.value})).collect::<Vec<_>>(),
                }),
            );
            ops.push(json!({
                "op": "replace",
                "path": format!("/spec/containers/{i}/{field}/httpGet"),
                "value": {"path": path, "port": ADMIN_PORT, "scheme": "HTTP"},
            }));
        }
    }

    // The app's first declared port.
    let app_port = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .map(|p| p.container_port);

    let ann = |keys: &[&str]| keys.iter().find_map(|k| meta(pod, k)).map(str::to_string);
    let mut capture = vec![
        "--outbound-port".to_string(),
        OUTBOUND_PORT.to_string(),
        "--inbound-port".into(),
        INBOUND_PORT.to_string(),
        "--admin-port".into(),
        ADMIN_PORT.to_string(),
        "--proxy-uid".into(),
        PROXY_UID.to_string(),
    ];
    let list = |v: Option<String>| -> Vec<String> {
        v.map(|s| {
            s.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect()
        })
        .unwrap_or_default()
    };
    // Istio's meaning: an empty include list captures no outbound traffic.
    if ann(&["traffic.sidecar.istio.io/includeOutboundIPRanges"])
        .is_some_and(|v| v.trim().is_empty())
    {
        capture.push("--no-outbound".into());
    }
    for (annotation, flag, cidr) in [
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "--include-outbound-cidr",
            true,
        ),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "--exclude-outbound-cidr",
            true,
        ),
        (
            "traffic.sidecar.istio.io/excludeOutboundPorts",
            "--exclude-outbound-port",
            false,
        ),
        (
            "traffic.sidecar.istio.io/excludeInboundPorts",
            "--exclude-inbound-port",
            false,
        ),
    ] {
        for v in list(ann(&[annotation])) {
            let ok = if cidr {
                (v == "*" && flag == "--include-outbound-cidr") || valid_cidr(&v)
            } else {
                v.parse::<u16>().is_ok()
            };
            if !ok {
                return Err(format!(
                    "annotation {annotation}: `{v}` is not {} (IPv6 ranges are not captured yet)",
                    if cidr { "an IPv4 CIDR" } else { "a port" }
                ));
            }
            capture.extend([flag.to_string(), v]);
        }
    }
    let init = json!({
        "name": INIT,
        "image": injector.image,
        "command": ["lumen-init"],
        "args": capture,
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
    });
    if spec.init_containers.as_ref().is_none_or(Vec::is_empty) {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [init]}));
    } else {
        // First: the capture is in place before any other init container
        // makes a call.
        ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": init}));
    }

    let service = label(pod, "app")
        .or_else(|| label(pod, "app.kubernetes.io/name"))
        .or_else(|| label(pod, "service.istio.io/canonical-name"))
        .map(str::to_string)
        .unwrap_or_else(|| workload(pod));
    let version = label(pod, "version")
        .or_else(|| label(pod, "app.kubernetes.io/version"))
        .unwrap_or("unknown");
    let account = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut args = vec![
        "--service".to_string(),
        service,
        "--version".into(),
        version.into(),
        "--workload".into(),
        workload(pod),
        "--namespace".into(),
        namespace.into(),
        "--service-account".into(),
        account,
        "--control".into(),
        injector.control.clone(),
        "--join-token-file".into(),
        format!("{TOKEN_DIR}/token"),
        "--collector".into(),
        injector.collector.clone(),
        "--outbound".into(),
        format!("127.0.0.1:{OUTBOUND_PORT}"),
        "--admin".into(),
        format!("0.0.0.0:{ADMIN_PORT}"),
    ];
    // Over the TLS port, the control plane is checked against the mesh
    // root mounted beside the token.
    let tls_control = injector.control.starts_with("https://");
    if tls_control {
        args.extend(["--control-ca".into(), format!("{TOKEN_DIR}/{ROOT_KEY}")]);
    }
    // Every inbound port is captured (Istio's `*`) and each connection
    // reaches the app on the port it was sent to; the first declared port
    // also takes calls made to the sidecar's inbound port itself, and a pod
    // that declares none takes only what the capture brings (port 0).
    args.extend([
        "--inbound".into(),
        format!("0.0.0.0:{INBOUND_PORT}"),
        "--app".into(),
        format!("127.0.0.1:{}", app_port.unwrap_or(0)),
    ]);
    if let Some(locality) = ann(&["lumen.dev/locality"]) {
        args.extend(["--locality".into(), locality]);
    }
    let mut requests = serde_json::Map::new();
    let mut limits = serde_json::Map::new();
    let pick = |keys: &[&str], default: Option<&String>| ann(keys).or_else(|| default.cloned());
    for (limit, name, keys, default) in [
        (
            false,
            "cpu",
            &["lumen.dev/proxy-cpu", "sidecar.istio.io/proxyCPU"][..],
            Some(&injector.requests_cpu),
        ),
        (
            false,
            "memory",
            &["lumen.dev/proxy-memory", "sidecar.istio.io/proxyMemory"][..],
            Some(&injector.requests_memory),
        ),
        (
            true,
            "cpu",
            &[
                "lumen.dev/proxy-cpu-limit",
                "sidecar.istio.io/proxyCPULimit",
            ][..],
            injector.limits_cpu.as_ref(),
        ),
        (
            true,
            "memory",
            &[
                "lumen.dev/proxy-memory-limit",
                "sidecar.istio.io/proxyMemoryLimit",
            ][..],
            injector.limits_memory.as_ref(),
        ),
    ] {
        if let Some(v) = pick(keys, default) {
            let map = if limit { &mut limits } else { &mut requests };
            map.insert(name.into(), Value::String(v));
        }
    }
    let mut env = vec![
        json!({"name": "RUST_LOG", "value": "info"}),
        // Callers' sidecars know this pod by its address: every port of it
        // reaches this sidecar, so they originate mTLS to any of them.
        json!({"name": "LUMEN_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
    ];
    if !probes.is_empty() {
        env.push(json!({
            "name": "LUMEN_APP_PROBES",
            "value": serde_json::to_string(&probes).unwrap_or_default(),
        }));
    }
    let sidecar = json!({
        "name": SIDECAR,
        "image": injector.image,
        "args": args,
        "env": env,
        "ports": [{"name": "lumen-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": ADMIN_PORT},
            "periodSeconds": 2,
            "failureThreshold": 30,
        },
        "resources": {"requests": requests, "limits": limits},
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "lumen-token", "mountPath": TOKEN_DIR, "readOnly": true}],
    });
    ops.push(json!({"op": "add", "path": "/spec/containers/-", "value": sidecar}));

    let mut sources = vec![json!({"serviceAccountToken": {
        "audience": TOKEN_AUDIENCE, "expirationSeconds": 43200, "path": "token",
    }})];
    if tls_control {
        // The mesh root the controller keeps in every meshed namespace.
        sources.push(json!({"configMap": {
            "name": ROOT_CONFIGMAP,
            "items": [{"key": ROOT_KEY, "path": ROOT_KEY}],
        }}));
    }
    let volume = json!({"name": "lumen-token", "projected": {"sources": sources}});
    if spec.volumes.as_ref().is_none_or(Vec::is_empty) {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": [volume]}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
    }

    // Marked injected, and scrapeable where Istio's pods are.
    let mut annotations = vec![("lumen.dev/status", "injected".to_string())];
    if meta(pod, "prometheus.io/scrape").is_none() {
        annotations.extend([
            ("prometheus.io/scrape", "true".to_string()),
            ("prometheus.io/port", ADMIN_PORT.to_string()),
            ("prometheus.io/path", "/stats/prometheus".to_string()),
        ]);
    }
    if pod.metadata.annotations.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    for (k, v) in annotations {
        ops.push(json!({
            "op": "add",
            "path": format!("/metadata/annotations/{}", token(k)),
            "value": v,
        }));
    }
    Ok(Some(ops))
}
