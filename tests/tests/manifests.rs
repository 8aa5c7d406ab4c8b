//! `deploy/`'s overlays as a cluster would get them: rendered by the real
//! `kubectl kustomize` (Debian's kubernetes-client, installed by
//! scripts/test.sh), each object read into its Kubernetes type with no
//! field lost, and the objects checked against each other and against
//! the binaries they run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PodTemplateSpec, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use lumen_tests::lumen_bin;
use serde_json::Value;

const OVERLAYS: [&str; 3] = ["default", "with-istio", "object-storage"];

fn repo() -> PathBuf {
    lumen_tests::crate_dir().join("..")
}

fn render(overlay: &str) -> Result<Vec<Value>> {
    let dir = repo().join("deploy/overlays").join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .context("running kubectl (Debian's kubernetes-client; scripts/test.sh installs it)")?;
    ensure!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// Without the empty values serializers leave out either way.
fn normalized(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normalized(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalized).collect()),
        other => other.clone(),
    }
}

/// The first path of `written` that `read` does not hold as written.
fn lost(written: &Value, read: &Value, at: &str) -> Option<String> {
    match (written, read) {
        (Value::Object(w), Value::Object(r)) => w.iter().find_map(|(k, v)| match r.get(k) {
            Some(rv) => lost(v, rv, &format!("{at}.{k}")),
            None => Some(format!("{at}.{k}")),
        }),
        (Value::Array(w), Value::Array(r)) if w.len() == r.len() => w
            .iter()
            .zip(r)
            .enumerate()
            .find_map(|(i, (w, r))| lost(w, r, &format!("{at}[{i}]"))),
        (w, r) if w == r => None,
        _ => Some(at.to_string()),
    }
}

/// Reads `doc` as a `T`; fails naming the field when one is not `T`'s (a
/// typo the API server would drop or refuse).
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value, what: &str) -> Result<T> {
    let t: T = serde_json::from_value(doc.clone()).with_context(|| what.to_string())?;
    let back = normalized(&serde_json::to_value(&t)?);
    let mut want = normalized(doc);
    // kustomize v2 gives cluster-scoped objects the overlay's namespace;
    // the API server ignores it.
    if back["metadata"].get("namespace").is_none()
        && let Some(m) = want["metadata"].as_object_mut()
    {
        m.remove("namespace");
    }
    if let Some(path) = lost(&want, &back, "") {
        bail!(
            "{what}: `{path}` is lost reading it as a {}",
            std::any::type_name::<T>()
        );
    }
    Ok(t)
}

#[derive(Default)]
struct Objects {
    accounts: BTreeSet<String>,
    services: Vec<Service>,
    pods: Vec<(String, PodTemplateSpec)>,
    crds: Vec<CustomResourceDefinition>,
    cluster_roles: Vec<ClusterRole>,
    roles: Vec<Role>,
    config_maps: Vec<ConfigMap>,
    webhooks: Vec<MutatingWebhookConfiguration>,
}

fn read(overlay: &str) -> Result<Objects> {
    let mut o = Objects::default();
    for doc in render(overlay)? {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        let what = format!("{overlay}: {kind} {name}");
        match kind.as_str() {
            "Namespace" => drop(typed::<Namespace>(&doc, &what)?),
            "ServiceAccount" => {
                let sa: ServiceAccount = typed(&doc, &what)?;
                o.accounts.insert(sa.metadata.name.unwrap_or_default());
            }
            "ClusterRole" => o.cluster_roles.push(typed(&doc, &what)?),
            "Role" => o.roles.push(typed(&doc, &what)?),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&doc, &what)?),
            "RoleBinding" => drop(typed::<RoleBinding>(&doc, &what)?),
            "ConfigMap" => o.config_maps.push(typed(&doc, &what)?),
            "Service" => o.services.push(typed(&doc, &what)?),
            "Deployment" => {
                let d: Deployment = typed(&doc, &what)?;
                o.pods.push((what, d.spec.context("spec")?.template));
            }
            "StatefulSet" => {
                let s: StatefulSet = typed(&doc, &what)?;
                o.pods.push((what, s.spec.context("spec")?.template));
            }
            "PodDisruptionBudget" => drop(typed::<PodDisruptionBudget>(&doc, &what)?),
            "MutatingWebhookConfiguration" => o.webhooks.push(typed(&doc, &what)?),
            "CustomResourceDefinition" => o.crds.push(typed(&doc, &what)?),
            other => bail!("{what}: no test knows the kind {other}"),
        }
    }
    Ok(o)
}

#[test]
fn every_overlay_renders_and_each_object_reads_into_its_kubernetes_type() -> Result<()> {
    for overlay in OVERLAYS {
        let o = read(overlay)?;
        ensure!(!o.pods.is_empty(), "{overlay}: no workloads");
        // Every Service selects pods that exist, on ports they listen on.
        for svc in &o.services {
            let name = svc.metadata.name.clone().unwrap_or_default();
            let spec = svc.spec.as_ref().context("spec")?;
            let selector = spec.selector.clone().unwrap_or_default();
            let pods: Vec<&PodTemplateSpec> = o
                .pods
                .iter()
                .map(|(_, p)| p)
                .filter(|p| {
                    let labels = p
                        .metadata
                        .as_ref()
                        .and_then(|m| m.labels.clone())
                        .unwrap_or_default();
                    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                })
                .collect();
            ensure!(
                !pods.is_empty(),
                "{overlay}: Service {name} selects no pods"
            );
            for port in spec.ports.iter().flatten() {
                let target = match &port.target_port {
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p)) => *p,
                    _ => port.port,
                };
                for p in &pods {
                    let listens = p
                        .spec
                        .iter()
                        .flat_map(|s| &s.containers)
                        .flat_map(|c| c.ports.iter().flatten())
                        .any(|cp| cp.container_port == target);
                    ensure!(
                        listens,
                        "{overlay}: Service {name} port {target}: the pods do not listen there"
                    );
                }
            }
        }
        for (what, pod) in &o.pods {
            let spec = pod.spec.as_ref().context("pod spec")?;
            let sa = spec.service_account_name.clone().unwrap_or_default();
            ensure!(
                o.accounts.contains(&sa),
                "{what}: ServiceAccount {sa} is not in the overlay"
            );
            for c in &spec.containers {
                let ports: BTreeSet<i32> =
                    c.ports.iter().flatten().map(|p| p.container_port).collect();
                for probe in [&c.readiness_probe, &c.liveness_probe]
                    .into_iter()
                    .flatten()
                {
                    let port = probe
                        .http_get
                        .as_ref()
                        .map(|h| h.port.clone())
                        .or_else(|| probe.tcp_socket.as_ref().map(|t| t.port.clone()));
                    if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p)) =
                        port
                    {
                        ensure!(
                            ports.contains(&p),
                            "{what}: a probe asks port {p}, which {} does not declare",
                            c.name
                        );
                    }
                }
                // The image's binary takes these arguments: every flag is
                // known and every value parses (`--help` last stops the
                // parser after them).
                if c.image
                    .as_deref()
                    .is_some_and(|i| i.starts_with("ghcr.io/lumen-mesh/lumen"))
                {
                    let args = c.args.clone().unwrap_or_default();
                    let out = Command::new(lumen_bin())
                        .args(&args)
                        .arg("--help")
                        .output()?;
                    ensure!(
                        out.status.success(),
                        "{what}: lumen {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        // The injector's webhook calls lumen-control's Service.
        for hook in o.webhooks.iter().flat_map(|w| w.webhooks.iter().flatten()) {
            let svc = hook
                .client_config
                .service
                .as_ref()
                .context("webhook service")?;
            ensure!(
                svc.name == "lumen-control" && svc.path.as_deref() == Some("/inject"),
                "{overlay}: {}",
                hook.name
            );
            ensure!(
                o.services
                    .iter()
                    .any(|s| s.metadata.name.as_deref() == Some("lumen-control")
                        && s.spec
                            .iter()
                            .flat_map(|s| s.ports.iter().flatten())
                            .any(|p| Some(p.port) == svc.port)),
                "{overlay}: lumen-control has no port {:?}",
                svc.port
            );
        }
    }
    Ok(())
}

#[test]
fn the_definitions_are_the_controllers_types_and_rbac_lets_it_read_and_report_them() -> Result<()> {
    let types = lumen_control::crd::crds();
    for overlay in OVERLAYS {
        let o = read(overlay)?;
        let names: BTreeSet<String> = o
            .crds
            .iter()
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        let want: BTreeSet<String> = types
            .iter()
            .filter(|c| overlay != "with-istio" || !lumen_control::crd::is_istio(c))
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        assert_eq!(names, want, "{overlay}");
        for crd in &o.crds {
            let ours = types
                .iter()
                .find(|t| t.metadata.name == crd.metadata.name)
                .unwrap();
            assert_eq!(crd.spec, ours.spec, "{overlay}: {:?}", crd.metadata.name);
        }
        // lumen-control may list and watch every kind it reads, patch its
        // status, and nothing more on them.
        let role = o
            .cluster_roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some("lumen-control"))
            .context("ClusterRole lumen-control")?;
        let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for rule in role.rules.iter().flatten() {
            for g in rule.api_groups.iter().flatten() {
                for r in rule.resources.iter().flatten() {
                    granted
                        .entry((g.clone(), r.clone()))
                        .or_default()
                        .extend(rule.verbs.iter().cloned());
                }
            }
        }
        let verbs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        for crd in &types {
            let (g, plural) = (crd.spec.group.clone(), crd.spec.names.plural.clone());
            assert_eq!(
                granted.get(&(g.clone(), plural.clone())),
                Some(&verbs(&["list", "watch"])),
                "{plural}"
            );
            assert_eq!(
                granted.get(&(g, format!("{plural}/status"))),
                Some(&verbs(&["patch"])),
                "{plural}/status"
            );
        }
        for core in ["services", "pods", "nodes", "namespaces"] {
            assert_eq!(
                granted.get(&(String::new(), core.into())),
                Some(&verbs(&["list", "watch"])),
                "{core}"
            );
        }
        assert_eq!(
            granted.get(&("authentication.k8s.io".into(), "tokenreviews".into())),
            Some(&verbs(&["create"]))
        );
        assert_eq!(
            granted.get(&("discovery.k8s.io".into(), "endpointslices".into())),
            Some(&verbs(&["list", "watch"]))
        );
        assert_eq!(
            granted.get(&(String::new(), "configmaps".into())),
            Some(&verbs(&["create", "patch"]))
        );
        // What can be limited to one object, is.
        let named = |group: &str, resource: &str, verb: &str| -> Vec<String> {
            role.rules
                .iter()
                .flatten()
                .filter(|r| {
                    r.api_groups.iter().flatten().any(|g| g == group)
                        && r.resources.iter().flatten().any(|x| x == resource)
                        && r.verbs.iter().any(|v| v == verb)
                })
                .flat_map(|r| r.resource_names.clone().unwrap_or_default())
                .collect()
        };
        assert_eq!(named("", "configmaps", "patch"), ["lumen-ca-root-cert"]);
        for verb in ["get", "patch"] {
            assert_eq!(
                named(
                    "admissionregistration.k8s.io",
                    "mutatingwebhookconfigurations",
                    verb
                ),
                ["lumen-sidecar-injector"]
            );
        }
        assert!(
            role.rules
                .iter()
                .flatten()
                .all(|r| !r.verbs.iter().any(|v| v == "*" || v == "delete")),
            "{overlay}: no wildcard or delete"
        );
        let local = o
            .roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some("lumen-control"))
            .context("Role")?;
        let leases = local
            .rules
            .iter()
            .flatten()
            .filter(|r| r.resources.iter().flatten().any(|x| x == "leases"))
            .flat_map(|r| r.verbs.clone())
            .collect::<BTreeSet<_>>();
        assert_eq!(leases, verbs(&["get", "update", "create"]), "{overlay}");
        let secrets = local
            .rules
            .iter()
            .flatten()
            .filter(|r| r.resources.iter().flatten().any(|x| x == "secrets"))
            .map(|r| {
                (
                    r.verbs.clone(),
                    r.resource_names.clone().unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>();
        assert_eq!(
            secrets,
            [
                (vec!["get".to_string()], vec!["lumen-ca".to_string()]),
                (vec!["create".to_string()], vec![])
            ],
            "{overlay}: the CA Secret only"
        );
    }
    Ok(())
}

#[test]
fn grafana_gets_istios_dashboards_unchanged_and_lumens_own() -> Result<()> {
    let o = read("default")?;
    let map = |name: &str| -> Result<BTreeMap<String, String>> {
        o.config_maps
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .and_then(|c| c.data.clone())
            .with_context(|| format!("ConfigMap {name}"))
    };
    for (cm, dir) in [
        ("lumen-grafana-dashboards-istio", "istio"),
        ("lumen-grafana-dashboards-lumen", "lumen"),
    ] {
        let data = map(cm)?;
        let mut files: Vec<String> = std::fs::read_dir(repo().join("dashboards").join(dir))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|f| f.ends_with(".json"))
            .collect();
        files.sort();
        assert_eq!(data.keys().cloned().collect::<Vec<_>>(), files, "{cm}");
        for (f, text) in &data {
            assert_eq!(
                *text,
                std::fs::read_to_string(repo().join("dashboards").join(dir).join(f))?,
                "{f}"
            );
        }
        let labels = o
            .config_maps
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(cm))
            .and_then(|c| c.metadata.labels.clone())
            .unwrap_or_default();
        assert_eq!(
            labels.get("grafana_dashboard").map(String::as_str),
            Some("1"),
            "{cm}"
        );
    }
    let sources = map("lumen-grafana-datasources")?;
    let text = sources
        .get("lumen-datasources.yaml")
        .context("datasources file")?;
    assert!(
        text.contains("https://lumen-query.lumen-system.svc:9900")
            && text.contains("basicAuthPassword: $LUMEN_TOKEN"),
        "{text}"
    );
    Ok(())
}

fn parse_docs(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// Objects by kind and name; kustomize v2's namespace on cluster-scoped
/// objects dropped.
fn by_name(docs: Vec<Value>) -> BTreeMap<(String, String), Value> {
    const CLUSTER: [&str; 5] = [
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "MutatingWebhookConfiguration",
    ];
    docs.into_iter()
        .map(|mut d| {
            let kind = d["kind"].as_str().unwrap_or_default().to_string();
            if CLUSTER.contains(&kind.as_str())
                && let Some(m) = d["metadata"].as_object_mut()
            {
                m.remove("namespace");
            }
            let name = d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            ((kind, name), d)
        })
        .collect()
}

#[test]
fn lumen_yaml_is_the_default_overlay_and_lumen_install_prints_it() -> Result<()> {
    let path = repo().join("deploy/lumen.yaml");
    let rendered = render("default")?;
    if std::env::var_os("LUMEN_BLESS").is_some() {
        let mut text = String::from(
            "# Generated: deploy/overlays/default as kubectl kustomize renders it; what\n# lumen install applies. Do not edit; after changing deploy/, write it again with\n#   LUMEN_BLESS=1 cargo test -p lumen-tests --test manifests\n",
        );
        for d in &rendered {
            text.push_str("---\n");
            text.push_str(&serde_yaml_ng::to_string(d)?);
        }
        std::fs::write(&path, text)?;
    }
    let committed = parse_docs(&std::fs::read_to_string(&path)?)?;
    assert!(
        by_name(committed) == by_name(rendered.clone()),
        "deploy/lumen.yaml is not deploy/overlays/default any more; write it again with LUMEN_BLESS=1 cargo test -p lumen-tests --test manifests"
    );
    for (flags, overlay) in [
        (&[][..], "default"),
        (&["--skip-istio-crds"][..], "with-istio"),
    ] {
        let out = Command::new(lumen_bin())
            .args(["install", "--dry-run"])
            .args(flags)
            .output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = parse_docs(&String::from_utf8(out.stdout)?)?;
        // The namespace and the definitions come first.
        assert_eq!(printed[0]["kind"], "Namespace");
        let first_other = printed
            .iter()
            .position(|d| d["kind"] != "Namespace" && d["kind"] != "CustomResourceDefinition")
            .unwrap();
        assert!(
            printed[first_other..]
                .iter()
                .all(|d| d["kind"] != "CustomResourceDefinition")
        );
        assert!(
            by_name(printed) == by_name(render(overlay)?),
            "lumen install --dry-run {flags:?} is not {overlay}"
        );
    }
    Ok(())
}
