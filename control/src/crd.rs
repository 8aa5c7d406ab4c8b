//! The custom resources the controller reads, typed with `kube`'s
//! `CustomResource` derive against their own groups: Istio's
//! `networking.istio.io` and `security.istio.io` kinds (so a cluster that
//! already runs Istio is read as it is) and Lumen's `policy.lumen.dev`
//! kinds. Specs stay JSON: `lumen_core` validates them exactly as it
//! validates the same YAML from files, and the controller reports what it
//! finds in each object's `status`. [`crds`] makes the
//! `CustomResourceDefinition`s `deploy/` installs, from the same types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceDefinition, CustomResourceDefinitionVersion,
    CustomResourceValidation, JSONSchemaProps,
};
use kube::core::{CustomResourceExt, ResourceExt};
use lumen_core::resource::{Kind, Resource};
use serde::{Deserialize, Serialize};

/// What the controller writes back: Istio's status shape (`conditions` and
/// `observedGeneration`), one `Accepted` condition.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// A number; istiod writes it as a string, which is read too.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "number_or_string"
    )]
    pub observed_generation: Option<i64>,
    /// Whatever else another controller (Istio's) keeps here.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `"True"` or `"False"`, as Kubernetes writes them.
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// Fields of another controller's conditions (`lastProbeTime`), kept.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Generation {
        Number(i64),
        Text(String),
    }
    Ok(match Option::<Generation>::deserialize(d)? {
        None => None,
        Some(Generation::Number(n)) => Some(n),
        Some(Generation::Text(t)) => t.trim().parse().ok(),
    })
}

macro_rules! kinds {
    ($($spec:ident : $root:ident = $kind:literal, $group:literal, $version:literal, $plural:literal, [$($short:literal),*];)*) => {
        $(
            #[doc = concat!("The spec of a `", $kind, "` (`", $group, "`), as written.")]
            #[derive(kube::CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
            #[kube(group = $group, version = $version, kind = $kind, plural = $plural,
                   namespaced, status = "Status", schema = "disabled" $(, shortname = $short)*)]
            pub struct $spec {
                #[serde(flatten)]
                pub fields: serde_json::Map<String, serde_json::Value>,
            }
        )*
    };
}

kinds! {
    VirtualServiceSpec: VirtualService = "VirtualService", "networking.istio.io", "v1", "virtualservices", ["vs"];
    DestinationRuleSpec: DestinationRule = "DestinationRule", "networking.istio.io", "v1", "destinationrules", ["dr"];
    ServiceEntrySpec: ServiceEntry = "ServiceEntry", "networking.istio.io", "v1", "serviceentries", ["se"];
    GatewaySpec: Gateway = "Gateway", "networking.istio.io", "v1", "gateways", ["gw"];
    SidecarSpec: Sidecar = "Sidecar", "networking.istio.io", "v1", "sidecars", [];
    PeerAuthenticationSpec: PeerAuthentication = "PeerAuthentication", "security.istio.io", "v1", "peerauthentications", ["pa"];
    AuthorizationPolicySpec: AuthorizationPolicy = "AuthorizationPolicy", "security.istio.io", "v1", "authorizationpolicies", ["ap"];
    RequestAuthenticationSpec: RequestAuthentication = "RequestAuthentication", "security.istio.io", "v1", "requestauthentications", ["ra"];
    RateLimitSpec: RateLimit = "RateLimit", "policy.lumen.dev", "v1alpha1", "ratelimits", ["rl"];
    AccessPolicySpec: AccessPolicy = "AccessPolicy", "policy.lumen.dev", "v1alpha1", "accesspolicies", [];
    QuotaSpec: Quota = "Quota", "policy.lumen.dev", "v1alpha1", "quotas", [];
}

/// A custom resource the controller reads, whatever its kind.
pub trait MeshResource:
    kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + CustomResourceExt
    + Clone
    + Serialize
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    const KIND: Kind;
    fn status(&self) -> Option<&Status>;
    fn spec_json(&self) -> serde_json::Value;
}

macro_rules! mesh_resources {
    ($($root:ident),*) => {
        $(
            impl MeshResource for $root {
                const KIND: Kind = Kind::$root;
                fn status(&self) -> Option<&Status> {
                    self.status.as_ref()
                }
                fn spec_json(&self) -> serde_json::Value {
                    serde_json::Value::Object(self.spec.fields.clone())
                }
            }
        )*
        /// Every kind's definition, in the order `deploy/` lists them.
        pub fn crds() -> Vec<CustomResourceDefinition> {
            vec![$(definition($root::crd())),*]
        }
    };
}

mesh_resources!(
    VirtualService,
    DestinationRule,
    ServiceEntry,
    Gateway,
    Sidecar,
    PeerAuthentication,
    AuthorizationPolicy,
    RequestAuthentication,
    RateLimit,
    AccessPolicy,
    Quota
);

/// Whether a definition is Istio's (installed only where Istio is not).
pub fn is_istio(crd: &CustomResourceDefinition) -> bool {
    crd.spec.group.ends_with(".istio.io")
}

/// The derive's definition made installable: a schema that keeps every
/// field (the controller validates and reports in `status`, so a typo is
/// a condition with the field's path rather than a silent prune), the
/// status subresource, and — for Istio's kinds — the older versions
/// Istio still serves, so `v1beta1` / `v1alpha3` files apply unchanged.
fn definition(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    let keep = || JSONSchemaProps {
        type_: Some("object".into()),
        x_kubernetes_preserve_unknown_fields: Some(true),
        ..Default::default()
    };
    let schema = CustomResourceValidation {
        open_api_v3_schema: Some(JSONSchemaProps {
            type_: Some("object".into()),
            properties: Some(
                [("spec".to_string(), keep()), ("status".to_string(), keep())]
                    .into_iter()
                    .collect(),
            ),
            ..Default::default()
        }),
    };
    let Some(v1) = crd.spec.versions.first_mut() else {
        return crd;
    };
    v1.schema = Some(schema);
    // `kubectl get` says whether each object is in force.
    v1.additional_printer_columns = Some(vec![
        CustomResourceColumnDefinition {
            name: "Accepted".into(),
            type_: "string".into(),
            json_path: r#".status.conditions[?(@.type=="Accepted")].status"#.into(),
            ..Default::default()
        },
        CustomResourceColumnDefinition {
            name: "Age".into(),
            type_: "date".into(),
            json_path: ".metadata.creationTimestamp".into(),
            ..Default::default()
        },
    ]);
    let older: Vec<CustomResourceDefinitionVersion> = if is_istio(&crd) {
        let names: &[&str] = if crd.spec.group == "networking.istio.io" {
            &["v1beta1", "v1alpha3"]
        } else {
            &["v1beta1"]
        };
        names
            .iter()
            .map(|n| CustomResourceDefinitionVersion {
                name: n.to_string(),
                storage: false,
                ..crd.spec.versions[0].clone()
            })
            .collect()
    } else {
        Vec::new()
    };
    crd.spec.versions.extend(older);
    crd
}

/// An object as the rest of the control plane knows resources. Its origin
/// names the cluster object, so validation errors say which.
pub fn to_resource<K: MeshResource>(obj: &K) -> Resource {
    let namespace = obj.namespace().unwrap_or_else(|| "default".into());
    Resource {
        api_version: K::api_version(&()).into_owned(),
        kind: K::KIND,
        name: obj.name_any(),
        labels: obj.labels().clone(),
        spec: obj.spec_json(),
        origin: format!("cluster {}/{}", K::plural(&()), obj.name_any()),
        namespace,
        prefix: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_keep_fields_serve_istios_versions_and_have_status() {
        let all = crds();
        assert_eq!(all.len(), 11);
        let vs = all
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some("virtualservices.networking.istio.io"))
            .unwrap();
        let versions: Vec<(&str, bool)> = vs
            .spec
            .versions
            .iter()
            .map(|v| (v.name.as_str(), v.storage))
            .collect();
        assert_eq!(
            versions,
            [("v1", true), ("v1beta1", false), ("v1alpha3", false)]
        );
        for v in &vs.spec.versions {
            assert!(v.served);
            assert!(v.subresources.as_ref().unwrap().status.is_some());
            let props = v
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema
                .as_ref()
                .unwrap();
            let spec = &props.properties.as_ref().unwrap()["spec"];
            assert_eq!(spec.x_kubernetes_preserve_unknown_fields, Some(true));
        }
        assert_eq!(
            vs.spec.names.short_names.as_deref(),
            Some(&["vs".to_string()][..])
        );
        let rl = all
            .iter()
            .find(|c| c.spec.names.kind == "RateLimit")
            .unwrap();
        assert_eq!(rl.spec.group, "policy.lumen.dev");
        assert_eq!(rl.spec.versions.len(), 1);
        assert!(!is_istio(rl));
    }

    #[test]
    fn an_object_becomes_the_resource_its_yaml_would_be() {
        let vs: VirtualService = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "shop", "labels": {"team": "a"}},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]},
            "status": {"conditions": [{"type": "Accepted", "status": "True"}], "validationMessages": []}
        }))
        .unwrap();
        let r = to_resource(&vs);
        assert_eq!(r.key().to_string(), "VirtualService shop/reviews");
        assert_eq!(r.spec["hosts"][0], "reviews");
        assert_eq!(r.labels["team"], "a");
        assert_eq!(r.origin, "cluster virtualservices/reviews");
        // Another controller's status fields survive a round trip.
        let back = serde_json::to_value(&vs).unwrap();
        assert!(back["status"]["validationMessages"].is_array());
        // istiod writes observedGeneration as a string, with lastProbeTime.
        let istio: Status = serde_json::from_value(serde_json::json!({
            "conditions": [{"type": "Reconciled", "status": "True", "lastProbeTime": null,
                            "lastTransitionTime": "2026-12-06T10:00:00Z"}],
            "observedGeneration": "68",
        }))
        .unwrap();
        assert_eq!(istio.observed_generation, Some(68));
        let back = serde_json::to_value(&istio).unwrap();
        assert!(
            back["conditions"][0]
                .as_object()
                .unwrap()
                .contains_key("lastProbeTime")
        );
    }
}
