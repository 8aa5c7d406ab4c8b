//! `lumen install`: `deploy/overlays/default` (rendered into
//! `deploy/lumen.yaml`, kept equal by a test) applied to the cluster with
//! server-side apply, or printed with `--dry-run`.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use clap::Args;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;

/// The objects of `deploy/overlays/default`, as `kubectl kustomize` renders them.
pub const MANIFEST: &str = include_str!("../../deploy/lumen.yaml");

const MANAGER: &str = "lumen-install";
const NAMESPACE: &str = "lumen-system";

#[derive(Args)]
pub struct InstallArgs {
    /// Print the manifests instead of applying them (`kubectl apply -f -`
    /// takes them as they are).
    #[arg(long)]
    pub dry_run: bool,
    /// Leave Istio's CustomResourceDefinitions out [default: left out when
    /// the cluster already has Istio's].
    #[arg(long)]
    pub skip_istio_crds: bool,
    /// The `lumen` image the control plane and collector run.
    #[arg(long, default_value = LUMEN_IMAGE)]
    pub image: String,
    /// The sidecar image the injector gives pods (`lumen-proxy`, `lumen-init`).
    #[arg(long, default_value = PROXY_IMAGE)]
    pub proxy_image: String,
}

const LUMEN_IMAGE: &str = "ghcr.io/lumen-mesh/lumen:latest";
const PROXY_IMAGE: &str = "ghcr.io/lumen-mesh/lumen-proxy:latest";

/// Every string of `v` equal to `from` (or a flag `--x=from`) made `to`.
fn replace_strings(v: &mut serde_json::Value, from: &str, to: &str) {
    match v {
        serde_json::Value::String(s) => {
            if s == from {
                *s = to.to_string();
            } else if let Some((flag, value)) = s.split_once('=')
                && value == from
                && flag.starts_with("--")
            {
                *s = format!("{flag}={to}");
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| replace_strings(x, from, to)),
        serde_json::Value::Object(m) => m.values_mut().for_each(|x| replace_strings(x, from, to)),
        _ => {}
    }
}

/// The objects, in the order they are applied: the namespace and the
/// definitions before what uses them.
pub fn objects(a: &InstallArgs) -> Result<Vec<serde_json::Value>> {
    let mut out = manifest_objects(a.skip_istio_crds)?;
    for o in &mut out {
        replace_strings(o, LUMEN_IMAGE, &a.image);
        replace_strings(o, PROXY_IMAGE, &a.proxy_image);
    }
    Ok(out)
}

fn manifest_objects(skip_istio_crds: bool) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(MANIFEST) {
        let v: serde_json::Value =
            serde::Deserialize::deserialize(doc).context("deploy/lumen.yaml")?;
        if v.is_null() {
            continue;
        }
        let istio_crd = v["kind"] == "CustomResourceDefinition"
            && v["spec"]["group"]
                .as_str()
                .is_some_and(|g| g.ends_with(".istio.io"));
        if skip_istio_crds && istio_crd {
            continue;
        }
        out.push(v);
    }
    let rank = |v: &serde_json::Value| match v["kind"].as_str() {
        Some("Namespace") => 0,
        Some("CustomResourceDefinition") => 1,
        _ => 2,
    };
    out.sort_by_key(rank);
    Ok(out)
}

/// Where each kind of the manifest lives in the API: plural and scope.
fn resource(gvk: &GroupVersionKind) -> Result<(ApiResource, bool)> {
    let (plural, namespaced) = match gvk.kind.as_str() {
        "Namespace" => ("namespaces", false),
        "CustomResourceDefinition" => ("customresourcedefinitions", false),
        "ClusterRole" => ("clusterroles", false),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        "MutatingWebhookConfiguration" => ("mutatingwebhookconfigurations", false),
        "ServiceAccount" => ("serviceaccounts", true),
        "Role" => ("roles", true),
        "RoleBinding" => ("rolebindings", true),
        "ConfigMap" => ("configmaps", true),
        "Secret" => ("secrets", true),
        "Service" => ("services", true),
        "Deployment" => ("deployments", true),
        "StatefulSet" => ("statefulsets", true),
        "PodDisruptionBudget" => ("poddisruptionbudgets", true),
        other => bail!("lumen install does not know where a {other} goes"),
    };
    Ok((ApiResource::from_gvk_with_plural(gvk, plural), namespaced))
}

fn gvk_of(v: &serde_json::Value) -> Result<GroupVersionKind> {
    let api_version = v["apiVersion"].as_str().context("apiVersion")?;
    let kind = v["kind"].as_str().context("kind")?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    Ok(GroupVersionKind::gvk(group, version, kind))
}

fn to_yaml(objects: &[serde_json::Value]) -> Result<String> {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(o)?);
    }
    Ok(out)
}

pub async fn install(a: InstallArgs) -> Result<()> {
    if a.dry_run {
        print!("{}", to_yaml(&objects(&a)?)?);
        eprintln!(
            "# also needed (lumen install makes them): Secrets {NAMESPACE}/lumen-query \
             (`pg-password`), {NAMESPACE}/lumen-ca (the mesh CA: `ca-cert.pem`, `ca-key.pem`), \
             {NAMESPACE}/lumen-collector-tls (`tls.crt`, `tls.key`, `ca.crt`: the collector's \
             certificate for {COLLECTOR_DNS:?}; cert-manager's form) and {NAMESPACE}/lumen-tokens \
             (`tokens.csv`, `policy-token`)"
        );
        return Ok(());
    }
    let client = kube::Client::try_default()
        .await
        .context("lumen install needs the Kubernetes API (KUBECONFIG or in-cluster)")?;
    let mut a = a;
    if !a.skip_istio_crds {
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        if let Some(vs) = crds
            .get_opt("virtualservices.networking.istio.io")
            .await
            .context("looking for Istio's CustomResourceDefinitions")?
        {
            let ours = vs
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app.kubernetes.io/part-of"))
                == Some(&"lumen".to_string());
            if !ours {
                println!("Istio's CustomResourceDefinitions are installed: keeping them");
                a.skip_istio_crds = true;
            }
        }
    }
    let params = PatchParams::apply(MANAGER).force();
    for o in objects(&a)? {
        let gvk = gvk_of(&o)?;
        let (ar, namespaced) = resource(&gvk)?;
        let name = o["metadata"]["name"]
            .as_str()
            .context("metadata.name")?
            .to_string();
        let api: Api<DynamicObject> = if namespaced {
            let ns = o["metadata"]["namespace"].as_str().unwrap_or(NAMESPACE);
            Api::namespaced_with(client.clone(), ns, &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        };
        api.patch(&name, &params, &Patch::Apply(&o))
            .await
            .with_context(|| format!("applying {} {name}", gvk.kind))?;
        println!("{}/{name} serverside-applied", ar.plural);
    }
    ensure_pg_password(&client).await?;
    ensure_collector_tls(&client).await?;
    ensure_tokens(&client).await?;
    println!(
        "\nLumen is installed in {NAMESPACE}. Mesh a namespace with\n  kubectl label namespace <namespace> lumen-injection=enabled\nand restart its pods; then\n  kubectl -n {NAMESPACE} port-forward svc/lumen-query 9900\nand open https://127.0.0.1:9900/ as user admin with admin's token of
  kubectl -n {NAMESPACE} get secret lumen-tokens -o jsonpath='{{.data.tokens\\.csv}}' | base64 -d
(the certificate is the mesh CA's, for lumen-query.{NAMESPACE}.svc; see docs/kubernetes.md)."
    );
    Ok(())
}

/// The DNS names the collector's certificate is for: its Services.
const COLLECTOR_DNS: [&str; 4] = [
    "lumen-collector.lumen-system.svc",
    "lumen-collector.lumen-system.svc.cluster.local",
    "lumen-query.lumen-system.svc",
    "lumen-query.lumen-system.svc.cluster.local",
];
/// A collector certificate is issued for a year and renewed by `lumen
/// install` once it has less than this left.
const RENEW_WITHIN: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

fn labels() -> Option<BTreeMap<String, String>> {
    Some(BTreeMap::from([(
        "app.kubernetes.io/part-of".to_string(),
        "lumen".to_string(),
    )]))
}

/// Creates `secret`, or replaces it (`replace`), saying so.
async fn put_secret(
    secrets: &Api<Secret>,
    secret: Secret,
    replace: bool,
    what: &str,
) -> Result<()> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let done = if replace {
        secrets
            .replace(&name, &PostParams::default(), &secret)
            .await
            .map(|_| "replaced")
    } else {
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .map(|_| "created")
    };
    match done {
        Ok(how) => {
            println!("secrets/{name} {how} ({what})");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("writing Secret {NAMESPACE}/{name}")),
    }
}

/// The collector's TLS certificate, from the mesh CA (made in its Secret
/// `lumen-ca` now if lumen-control has not yet): sidecars check it against
/// the mesh's trust bundle they already hold, and the collector takes
/// their workload certificates against the same root (`ca.crt`). Kept in
/// cert-manager's form, so a Certificate may own it instead.
async fn ensure_collector_tls(client: &kube::Client) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let existing = secrets.get_opt("lumen-collector-tls").await?;
    if let Some(s) = &existing {
        let left = s
            .data
            .as_ref()
            .and_then(|d| d.get("tls.crt"))
            .and_then(|c| {
                use rustls::pki_types::pem::PemObject;
                rustls::pki_types::CertificateDer::from_pem_slice(&c.0).ok()
            })
            .and_then(|der| lumen_control::ca::not_after(&der))
            .and_then(|end| end.duration_since(std::time::SystemTime::now()).ok());
        if left.is_some_and(|l| l > RENEW_WITHIN) {
            return Ok(());
        }
    }
    let dir = tempfile::tempdir().context("a scratch directory for the mesh CA")?;
    let trust_domain = lumen_core::identity::DEFAULT_TRUST_DOMAIN;
    lumen_control::casecret::sync(
        client.clone(),
        NAMESPACE,
        "lumen-ca",
        dir.path(),
        trust_domain,
    )
    .await
    .context("the mesh CA (Secret lumen-system/lumen-ca)")?;
    let source = lumen_control::ca::CaSource::Files {
        cert: dir.path().join(lumen_control::casecret::CERT_KEY),
        key: dir.path().join(lumen_control::casecret::KEY_KEY),
        dir: dir.path().join("bundle"),
    };
    let ca = lumen_control::ca::MeshCa::open(&source, trust_domain)
        .context("opening the mesh CA")?
        .with_lifetime(std::time::Duration::from_secs(365 * 24 * 3600));
    let names: Vec<String> = COLLECTOR_DNS.iter().map(|n| n.to_string()).collect();
    let serving = ca
        .serving(&names)
        .context("issuing the collector's certificate")?;
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("lumen-collector-tls".into()),
            namespace: Some(NAMESPACE.into()),
            labels: labels(),
            resource_version: existing.and_then(|e| e.metadata.resource_version),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        string_data: Some(BTreeMap::from([
            ("tls.crt".to_string(), serving.chain.concat()),
            ("tls.key".to_string(), serving.key),
            ("ca.crt".to_string(), ca.trust_bundle().concat()),
        ])),
        ..Default::default()
    };
    let replace = secret.metadata.resource_version.is_some();
    put_secret(
        &secrets,
        secret,
        replace,
        "the collector's TLS certificate, from the mesh CA",
    )
    .await
}

fn random_token() -> String {
    use rand::Rng as _;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(40)
        .map(char::from)
        .collect()
}

/// The token file the collector and the control plane share: `admin` for
/// people (SQL, Grafana, `lumen apply --token`), `lumen-policy` for the
/// policy engine's decisions to lumen-control.
async fn ensure_tokens(client: &kube::Client) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    if secrets.get_opt("lumen-tokens").await?.is_some() {
        return Ok(());
    }
    let (admin, policy) = (random_token(), random_token());
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("lumen-tokens".into()),
            namespace: Some(NAMESPACE.into()),
            labels: labels(),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([
            (
                "tokens.csv".to_string(),
                format!(
                    "# token,user — kube-apiserver's --token-auth-file form\n{admin},admin\n{policy},lumen-policy\n"
                ),
            ),
            ("policy-token".to_string(), policy),
        ])),
        ..Default::default()
    };
    put_secret(
        &secrets,
        secret,
        false,
        &format!(
            "bearer tokens; yours is admin's: kubectl -n {NAMESPACE} get secret lumen-tokens -o jsonpath='{{.data.tokens\\.csv}}' | base64 -d"
        ),
    )
    .await
}

/// The Postgres password the query service asks for, made once.
async fn ensure_pg_password(client: &kube::Client) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    if secrets.get_opt("lumen-query").await?.is_some() {
        return Ok(());
    }
    use rand::Rng as _;
    let password: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("lumen-query".into()),
            namespace: Some(NAMESPACE.into()),
            labels: labels(),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([("pg-password".to_string(), password)])),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            println!(
                "secrets/lumen-query created (the Postgres password; read it with kubectl -n {NAMESPACE} get secret lumen-query -o jsonpath='{{.data.pg-password}}' | base64 -d)"
            );
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        Err(e) => Err(e).context("creating Secret lumen-system/lumen-query"),
    }
}
