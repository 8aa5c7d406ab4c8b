//! Istio's standard metric labels, computed from what a request record or
//! a rollup key knows, so the proxy's `/stats/prometheus` and the query
//! service's PromQL give the same series the same labels.

/// The fields Istio's labels are made from.
#[derive(Debug, Clone, Copy)]
pub struct IstioKey<'a> {
    pub reporter: &'a str,
    pub source_service: &'a str,
    pub source_workload: &'a str,
    pub source_namespace: &'a str,
    pub source_version: &'a str,
    pub destination_service: &'a str,
    pub destination_workload: &'a str,
    pub destination_namespace: &'a str,
    pub destination_version: &'a str,
    /// The record's protocol: `http/1.1`, `h2`, `grpc`, `websocket`, `tcp`.
    pub protocol: &'a str,
    pub response_flags: &'a str,
    pub status: Option<i32>,
    pub grpc_status: Option<i32>,
    pub mtls: bool,
    /// SPIFFE ids mesh mTLS proved; empty without.
    pub source_principal: &'a str,
    pub destination_principal: &'a str,
}

/// The cluster every series names as its `source_cluster` and
/// `destination_cluster`: Istio's default cluster id, for a single
/// cluster (its dashboards filter by it).
pub const CLUSTER: &str = "Kubernetes";

/// A value, or Istio's `unknown` for none.
fn known(v: &str) -> String {
    if v.is_empty() { "unknown" } else { v }.to_string()
}

impl IstioKey<'_> {
    /// Whether the series are `istio_tcp_*` rather than request metrics.
    pub fn is_tcp(&self) -> bool {
        self.protocol == "tcp"
    }

    /// Istio's labels, sorted by name. TCP series have no `response_code`
    /// or `grpc_response_status`.
    pub fn labels(&self) -> Vec<(&'static str, String)> {
        let fqdn = if self.destination_namespace.is_empty() {
            self.destination_service.to_string()
        } else {
            format!(
                "{}.{}.svc.cluster.local",
                self.destination_service, self.destination_namespace
            )
        };
        // The source sidecar does not know what the destination enforces.
        let policy = if self.reporter == "source" {
            "unknown"
        } else if self.mtls {
            "mutual_tls"
        } else {
            "none"
        };
        let request_protocol = match self.protocol {
            "tcp" => "tcp",
            "grpc" => "grpc",
            _ => "http",
        };
        // Istio's canonical revision is the version label, or `latest`.
        let revision = |v: &str| if v.is_empty() { "latest" } else { v }.to_string();
        let mut labels = vec![
            ("connection_security_policy", policy.to_string()),
            ("destination_app", self.destination_service.to_string()),
            (
                "destination_canonical_revision",
                revision(self.destination_version),
            ),
            (
                "destination_canonical_service",
                self.destination_service.to_string(),
            ),
            ("destination_cluster", CLUSTER.to_string()),
            ("destination_principal", known(self.destination_principal)),
            ("destination_service", fqdn),
            (
                "destination_service_name",
                self.destination_service.to_string(),
            ),
            (
                "destination_service_namespace",
                self.destination_namespace.to_string(),
            ),
            ("destination_version", self.destination_version.to_string()),
            (
                "destination_workload",
                self.destination_workload.to_string(),
            ),
            (
                "destination_workload_namespace",
                self.destination_namespace.to_string(),
            ),
            ("reporter", self.reporter.to_string()),
            ("request_protocol", request_protocol.to_string()),
            ("response_flags", self.response_flags.to_string()),
            ("source_app", self.source_service.to_string()),
            ("source_canonical_revision", revision(self.source_version)),
            ("source_canonical_service", self.source_service.to_string()),
            ("source_cluster", CLUSTER.to_string()),
            ("source_principal", known(self.source_principal)),
            ("source_version", self.source_version.to_string()),
            ("source_workload", self.source_workload.to_string()),
            (
                "source_workload_namespace",
                self.source_namespace.to_string(),
            ),
        ];
        if !self.is_tcp() {
            if let Some(s) = self.status {
                labels.push(("response_code", s.to_string()));
            }
            if let Some(g) = self.grpc_status {
                labels.push(("grpc_response_status", g.to_string()));
            }
        }
        labels.sort_by_key(|(k, _)| *k);
        labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(protocol: &str, reporter: &str) -> IstioKey<'static> {
        IstioKey {
            reporter: if reporter == "source" {
                "source"
            } else {
                "destination"
            },
            source_service: "productpage",
            source_workload: "productpage-v1",
            source_namespace: "default",
            source_version: "v1",
            destination_service: "reviews",
            destination_workload: "reviews-v2",
            destination_namespace: "default",
            destination_version: "v2",
            protocol: match protocol {
                "tcp" => "tcp",
                "grpc" => "grpc",
                _ => "http/1.1",
            },
            response_flags: "-",
            status: Some(200),
            grpc_status: None,
            mtls: false,
            source_principal: "",
            destination_principal: "",
        }
    }

    #[test]
    fn http_series_carry_istio_names_and_the_service_fqdn() {
        let labels = key("http", "destination").labels();
        let get = |k: &str| {
            labels
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            get("destination_service"),
            Some("reviews.default.svc.cluster.local")
        );
        assert_eq!(get("destination_service_name"), Some("reviews"));
        assert_eq!(get("source_workload"), Some("productpage-v1"));
        assert_eq!(get("response_code"), Some("200"));
        assert_eq!(get("request_protocol"), Some("http"));
        assert_eq!(get("connection_security_policy"), Some("none"));
        assert_eq!(get("source_cluster"), Some("Kubernetes"));
        assert_eq!(get("destination_canonical_service"), Some("reviews"));
        assert_eq!(get("destination_canonical_revision"), Some("v2"));
        let mut sorted = labels.clone();
        sorted.sort();
        assert_eq!(labels, sorted);
    }

    #[test]
    fn tcp_series_have_no_response_code_and_the_source_does_not_know_the_policy() {
        let labels = key("tcp", "source").labels();
        assert!(labels.iter().all(|(n, _)| *n != "response_code"));
        assert!(labels.contains(&("request_protocol", "tcp".to_string())));
        assert!(labels.contains(&("connection_security_policy", "unknown".to_string())));
    }
}
