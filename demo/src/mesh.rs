//! The demo's configuration, written as files into its data directory in
//! the form users edit: Lumen's `Mesh` (where each Bookinfo instance's
//! sidecar listens, known only at run time) and Istio's own kinds, named as
//! Istio's Bookinfo samples name them — so applying one of Istio's sample
//! files replaces the demo's resource of that name, as `kubectl apply`
//! would on a cluster.

use std::net::SocketAddr;
use std::path::Path;

use crate::bookinfo::{App, DB_PORT, PORT};

/// The file the demo prints as the one to edit.
pub const ROUTING_FILE: &str = "bookinfo-networking.yaml";

/// The demo's policy: a limit on ratings while its error rate alert fires.
pub const POLICY_FILE: &str = "bookinfo-policy.yaml";

/// The demo's security: STRICT mTLS and who may call whom.
pub const SECURITY_FILE: &str = "bookinfo-security.yaml";

/// Writes `mesh.yaml`, [`ROUTING_FILE`], [`POLICY_FILE`] and
/// [`SECURITY_FILE`] into `dir`.
pub fn write(
    dir: &Path,
    instances: &[(App, SocketAddr)],
    ingress_port: u16,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut mesh = String::from(
        "# Where each Bookinfo instance's sidecar listens (picked at start).\n\
         apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata:\n  name: bookinfo\nspec:\n  services:\n",
    );
    for service in ["productpage", "details", "reviews", "ratings", "mongodb"] {
        // Ratings v2's database speaks TCP, as Bookinfo's MongoDB does.
        let (port, protocol) = match service {
            "mongodb" => (DB_PORT, "\n      protocol: tcp"),
            _ => (PORT, ""),
        };
        mesh.push_str(&format!(
            "    - name: {service}\n      port: {port}{protocol}\n      endpoints:\n"
        ));
        for (app, address) in instances.iter().filter(|(a, _)| a.service() == service) {
            mesh.push_str(&format!(
                "        - address: {address}\n          version: {}\n",
                app.version()
            ));
        }
    }
    std::fs::write(dir.join("mesh.yaml"), mesh)?;
    std::fs::write(dir.join(POLICY_FILE), POLICY)?;
    std::fs::write(dir.join(SECURITY_FILE), SECURITY)?;
    std::fs::write(
        dir.join(ROUTING_FILE),
        ROUTING.replace("INGRESS_PORT", &ingress_port.to_string()),
    )
}

/// Mesh-wide STRICT mTLS, and Istio's Bookinfo authorization task: only
/// productpage may call details and reviews, only reviews ratings.
const SECURITY: &str = r#"# Every hop is mutual TLS with certificates from the demo's mesh CA:
#   lumen sql "SELECT source_principal, destination_principal, mtls, count(*)
#              FROM requests WHERE reporter = 'destination' GROUP BY 1, 2, 3"
# and who may call whom, by SPIFFE identity (the load generator's direct
# calls to ratings are denied: status 403, policy 'none').
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: details-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: details
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]
    to:
    - operation:
        methods: ["GET"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: reviews
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]
    to:
    - operation:
        methods: ["GET"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ratings-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: ratings
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-reviews"]
    to:
    - operation:
        methods: ["GET"]
"#;

const POLICY: &str = r#"# Shed load on ratings while it fails: on when Lumen's shipped rule
# ServiceHighErrorRate fires for ratings, off 30 s after it stops.
#   lumen policy status
#   lumen sql "SELECT time, kind, name, old_state, new_state, reason FROM policy_events ORDER BY time"
apiVersion: policy.lumen.dev/v1alpha1
kind: RateLimit
metadata:
  name: shed-ratings
spec:
  target:
    service: ratings
  requestsPerSecond: 5
  burst: 5
  when:
    alert: ServiceHighErrorRate
    labels:
      destination_service_name: ratings
  cooldown: 30s
"#;

/// Istio-form routing for the demo: reviews split by weight with jason's
/// requests on v2, a retry policy and a small delay on ratings, outlier
/// detection on reviews, and Istio's Bookinfo ingress.
const ROUTING: &str = r#"# Edit me while `lumen demo` runs: changes apply within a second.
# Try the weights of `reviews`, then:
#   lumen sql "SELECT destination_version, count(*) FROM requests
#              WHERE destination_service = 'reviews' AND reporter = 'source'
#              AND time > now() - INTERVAL '10 seconds' GROUP BY 1"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: productpage
spec:
  host: productpage
  subsets:
  - name: v1
    labels:
      version: v1
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 5
      interval: 10s
      baseEjectionTime: 30s
      maxEjectionPercent: 50
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
  - name: v3
    labels:
      version: v3
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
spec:
  host: ratings
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: details
spec:
  host: details
  subsets:
  - name: v1
    labels:
      version: v1
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - name: jason
    match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - name: split
    route:
    - destination:
        host: reviews
        subset: v1
      weight: 50
    - destination:
        host: reviews
        subset: v2
      weight: 30
    - destination:
        host: reviews
        subset: v3
      weight: 20
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - name: ratings
    fault:
      delay:
        percentage:
          value: 2
        fixedDelay: 50ms
    retries:
      attempts: 2
      perTryTimeout: 1s
      retryOn: 5xx
    route:
    - destination:
        host: ratings
        subset: v1
      weight: 50
    - destination:
        host: ratings
        subset: v2
      weight: 50
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: bookinfo-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: INGRESS_PORT
      name: http
      protocol: HTTP
    hosts:
    - "*"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bookinfo
spec:
  hosts:
  - "*"
  gateways:
  - bookinfo-gateway
  http:
  - match:
    - uri:
        exact: /productpage
    - uri:
        prefix: /static
    - uri:
        exact: /login
    - uri:
        exact: /logout
    - uri:
        prefix: /api/v1/products
    route:
    - destination:
        host: productpage
        port:
          number: 9080
"#;
