//! The sidecar injector with the `AdmissionReview` the API server sends
//! when Bookinfo's reviews-v1 ReplicaSet creates a pod
//! (`tests/data/k8s/`): the answer's JSON patch, applied to that pod,
//! gives a pod with the capture's init container, the sidecar (who it is,
//! where the control plane and collector are, its token, resources) and
//! the app's HTTP probes pointed at the sidecar; an opted-out pod is
//! allowed unchanged; a malformed review gets an error answer.

use anyhow::{Context, Result};
use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use lumen_control::inject::{ADMIN_PORT, Injector, review};
use serde_json::{Value, json};

fn reviews_v1() -> Result<Value> {
    let path = lumen_tests::crate_dir().join("data/k8s/admission-review-reviews-v1.json");
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

/// The webhook's answer to `body`, as JSON.
fn answer(body: &Value, injector: &Injector) -> Result<Value> {
    let out = review(&serde_json::to_vec(body)?, injector);
    Ok(serde_json::to_value(out)?)
}

/// The pod with the answer's patch applied, as the API server would.
fn patched(request: &Value, response: &Value) -> Result<Pod> {
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    // Go's []byte: a base64 string, or (as kube writes it, and Go's JSON
    // decoder takes too) an array of byte values.
    let bytes: Vec<u8> = match &response["patch"] {
        Value::String(b64) => base64::engine::general_purpose::STANDARD.decode(b64)?,
        Value::Array(values) => values
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|b| u8::try_from(b).ok())
                    .context("a byte")
            })
            .collect::<Result<_>>()?,
        other => anyhow::bail!("no patch: {other}"),
    };
    let patch: json_patch::Patch = serde_json::from_slice(&bytes)?;
    let mut pod = request["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch)?;
    Ok(serde_json::from_value(pod)?)
}

fn args(c: &k8s_openapi::api::core::v1::Container) -> Vec<String> {
    c.args.clone().unwrap_or_default()
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[test]
fn a_labelled_namespaces_pod_gets_the_capture_the_sidecar_and_probes_through_it() -> Result<()> {
    let request = reviews_v1()?;
    let injector = Injector {
        image: "registry.example/lumen-proxy:1.0".into(),
        ..Injector::default()
    };
    let out = answer(&request, &injector)?;
    assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(out["kind"], "AdmissionReview");
    let response = &out["response"];
    // The answer is to this request.
    assert_eq!(response["uid"], request["request"]["uid"]);
    assert_eq!(response["allowed"], true);
    let pod = patched(&request, response)?;
    let spec = pod.spec.as_ref().context("spec")?;

    // The capture first, with what it needs and no more.
    let init = &spec.init_containers.as_ref().context("init containers")?[0];
    assert_eq!(init.name, "lumen-init");
    assert_eq!(
        init.image.as_deref(),
        Some("registry.example/lumen-proxy:1.0")
    );
    assert_eq!(
        init.command.as_deref(),
        Some(&["lumen-init".to_string()][..])
    );
    let caps = init
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .context("capabilities")?;
    assert_eq!(
        caps.add.as_deref(),
        Some(&["NET_ADMIN".to_string(), "NET_RAW".to_string()][..])
    );
    let capture = args(init);
    assert_eq!(flag(&capture, "--proxy-uid").as_deref(), Some("1337"));
    assert!(!capture.contains(&"--no-inbound".to_string()));

    // The app's container is still first; the sidecar after it, knowing
    // who it stands beside.
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["reviews", "lumen-proxy"]);
    let sidecar = &spec.containers[1];
    let a = args(sidecar);
    for (name, value) in [
        ("--service", "reviews"),
        ("--version", "v1"),
        ("--workload", "reviews-v1"),
        ("--namespace", "bookinfo"),
        ("--service-account", "bookinfo-reviews"),
        ("--control", "https://lumen-control.lumen-system.svc:15012"),
        ("--control-ca", "/var/run/secrets/lumen/root-cert.pem"),
        (
            "--collector",
            "http://lumen-collector.lumen-system.svc:4317",
        ),
        ("--app", "127.0.0.1:9080"),
        ("--inbound", "0.0.0.0:15006"),
        ("--join-token-file", "/var/run/secrets/lumen/token"),
    ] {
        assert_eq!(flag(&a, name).as_deref(), Some(value), "{name} in {a:?}");
    }
    let security = sidecar
        .security_context
        .as_ref()
        .context("sidecar security")?;
    assert_eq!(security.run_as_user, Some(1337));
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let resources = sidecar.resources.as_ref().context("resources")?;
    assert!(
        resources
            .requests
            .as_ref()
            .is_some_and(|r| r.contains_key("cpu"))
    );

    // Its identity: a projected token for the mesh CA, beside the volumes
    // the pod had.
    let volumes = spec.volumes.as_ref().context("volumes")?;
    assert_eq!(volumes.len(), 4);
    let token = volumes
        .iter()
        .find(|v| v.name == "lumen-token")
        .context("token volume")?;
    let sources = token
        .projected
        .as_ref()
        .context("projected")?
        .sources
        .as_ref()
        .context("sources")?;
    let sat = sources[0]
        .service_account_token
        .as_ref()
        .context("serviceAccountToken")?;
    assert_eq!(sat.audience.as_deref(), Some("lumen"));
    // Beside it, the mesh root the TLS control port is checked against.
    let root = sources[1].config_map.as_ref().context("configMap")?;
    assert_eq!(root.name, "lumen-ca-root-cert");
    let items = root.items.as_ref().context("items")?;
    assert_eq!(
        (items[0].key.as_str(), items[0].path.as_str()),
        ("root-cert.pem", "root-cert.pem")
    );

    // The kubelet's probes go to the sidecar's admin port, which asks the
    // app's originals (a named port resolved, headers kept).
    let app = &spec.containers[0];
    for (probe, kind) in [
        (&app.readiness_probe, "readyz"),
        (&app.liveness_probe, "livez"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .context("httpGet")?;
        assert_eq!(
            get.path.as_deref(),
            Some(format!("/app-health/reviews/{kind}").as_str())
        );
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(ADMIN_PORT))
        );
    }
    // Thresholds and periods stay the app's.
    assert_eq!(
        app.readiness_probe.as_ref().and_then(|p| p.period_seconds),
        Some(5)
    );
    let env = sidecar.env.as_ref().context("env")?;
    // The pod's address, from the downward API: callers originate mTLS to it.
    let pod_ip = env
        .iter()
        .find(|e| e.name == "LUMEN_POD_IP")
        .context("LUMEN_POD_IP")?;
    assert_eq!(
        pod_ip
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("status.podIP")
    );
    let probes: Value = serde_json::from_str(
        env.iter()
            .find(|e| e.name == "LUMEN_APP_PROBES")
            .and_then(|e| e.value.as_deref())
            .context("LUMEN_APP_PROBES")?,
    )?;
    assert_eq!(
        probes["/app-health/reviews/readyz"],
        json!({"port": 9080, "path": "/health", "scheme": "HTTP", "headers": []})
    );
    assert_eq!(
        probes["/app-health/reviews/livez"]["headers"],
        json!([{"name": "X-Probe", "value": "kubelet"}])
    );
    // Every flag injected is one the real binaries take: a wrong one
    // would crash-loop every injected pod.
    #[derive(clap::Parser)]
    struct Proxy {
        #[command(flatten)]
        args: lumen_sidecar::ProxyArgs,
    }
    #[derive(clap::Parser)]
    struct Init {
        #[command(flatten)]
        args: lumen_sidecar::capture::CaptureArgs,
    }
    use clap::Parser;
    let mut argv = vec!["lumen-proxy".to_string()];
    argv.extend(args(sidecar));
    if let Err(e) = Proxy::try_parse_from(&argv) {
        anyhow::bail!("lumen-proxy refuses the injected flags: {e}");
    }
    let mut argv = vec!["lumen-init".to_string()];
    argv.extend(capture.clone());
    let init_args = match Init::try_parse_from(&argv) {
        Ok(i) => i.args,
        Err(e) => anyhow::bail!("lumen-init refuses the injected flags: {e}"),
    };
    lumen_sidecar::capture::rules(&init_args)?;
    let probes_env = env
        .iter()
        .find(|e| e.name == "LUMEN_APP_PROBES")
        .and_then(|e| e.value.clone())
        .context("LUMEN_APP_PROBES")?;
    lumen_proxy::admin::parse_app_probes(&probes_env).map_err(anyhow::Error::msg)?;
    let annotations = pod.metadata.annotations.as_ref().context("annotations")?;
    assert_eq!(annotations["lumen.dev/status"], "injected");
    assert_eq!(annotations["prometheus.io/port"], ADMIN_PORT.to_string());

    // Injecting the injected pod again changes nothing.
    let mut again = request.clone();
    again["request"]["object"] = serde_json::to_value(&pod)?;
    let second = answer(&again, &injector)?;
    assert_eq!(second["response"]["allowed"], true);
    assert!(second["response"]["patch"].is_null(), "{second}");
    Ok(())
}

#[test]
fn istios_annotations_narrow_the_capture_and_size_the_sidecar() -> Result<()> {
    let mut request = reviews_v1()?;
    request["request"]["object"]["metadata"]["annotations"] = json!({
        "traffic.sidecar.istio.io/excludeOutboundPorts": "5432, 6379",
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.96.0.0/12",
        "sidecar.istio.io/proxyCPU": "250m",
        "sidecar.istio.io/proxyMemoryLimit": "1Gi",
    });
    let out = answer(&request, &Injector::default())?;
    let pod = patched(&request, &out["response"])?;
    let spec = pod.spec.as_ref().context("spec")?;
    let capture = args(&spec.init_containers.as_ref().context("init")?[0]);
    let joined = capture.join(" ");
    assert!(
        joined.contains("--exclude-outbound-port 5432 --exclude-outbound-port 6379"),
        "{joined}"
    );
    assert!(
        joined.contains("--include-outbound-cidr 10.96.0.0/12"),
        "{joined}"
    );
    let resources = spec.containers[1].resources.as_ref().context("resources")?;
    assert_eq!(
        resources.requests.as_ref().context("requests")?["cpu"].0,
        "250m"
    );
    assert_eq!(
        resources.limits.as_ref().context("limits")?["memory"].0,
        "1Gi"
    );
    // The pod's own annotations stay.
    let annotations = pod.metadata.annotations.as_ref().context("annotations")?;
    assert_eq!(annotations["sidecar.istio.io/proxyCPU"], "250m");
    Ok(())
}

#[test]
fn annotations_that_cannot_be_carried_out_deny_the_pod_saying_why() -> Result<()> {
    for (annotation, value, reason) in [
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "fd00::/8",
            "`fd00::/8` is not an IPv4 CIDR",
        ),
        (
            "traffic.sidecar.istio.io/excludeOutboundPorts",
            "5432,http",
            "`http` is not a port",
        ),
    ] {
        let mut request = reviews_v1()?;
        request["request"]["object"]["metadata"]["annotations"] = json!({ annotation: value });
        let out = answer(&request, &Injector::default())?;
        let response = &out["response"];
        // Denied, answering this request (its uid), with the reason.
        assert_eq!(response["allowed"], false, "{out}");
        assert_eq!(response["uid"], request["request"]["uid"]);
        let message = response["status"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains(annotation) && message.contains(reason),
            "{message}"
        );
    }
    // Istio's empty include list: no outbound capture at all.
    let mut request = reviews_v1()?;
    request["request"]["object"]["metadata"]["annotations"] =
        json!({"traffic.sidecar.istio.io/includeOutboundIPRanges": ""});
    let out = answer(&request, &Injector::default())?;
    let pod = patched(&request, &out["response"])?;
    let capture = args(
        &pod.spec
            .as_ref()
            .context("spec")?
            .init_containers
            .as_ref()
            .context("init")?[0],
    );
    assert!(
        capture.contains(&"--no-outbound".to_string()),
        "{capture:?}"
    );
    Ok(())
}

#[test]
fn an_opted_out_pod_is_allowed_unchanged() -> Result<()> {
    for (place, key) in [
        ("annotations", "sidecar.istio.io/inject"),
        ("labels", "sidecar.istio.io/inject"),
        ("annotations", "lumen.dev/inject"),
    ] {
        let mut request = reviews_v1()?;
        request["request"]["object"]["metadata"][place][key] = json!("false");
        let out = answer(&request, &Injector::default())?;
        assert_eq!(out["response"]["allowed"], true, "{place} {key}");
        assert!(out["response"]["patch"].is_null(), "{place} {key}: {out}");
    }
    Ok(())
}

#[test]
fn a_malformed_review_gets_an_error_answer_never_a_crash() -> Result<()> {
    for body in [
        b"not json".to_vec(),
        b"{}".to_vec(),
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x"}}"#
            .to_vec(),
    ] {
        let out = serde_json::to_value(review(&body, &Injector::default()))?;
        let response = &out["response"];
        assert_eq!(response["allowed"], false, "{out}");
        assert!(
            response["status"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{out}"
        );
    }
    // A request for something that is not a pod.
    let mut request = reviews_v1()?;
    request["request"]["object"] = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": 1}});
    let out = answer(&request, &Injector::default())?;
    assert_eq!(out["response"]["allowed"], false, "{out}");
    Ok(())
}

/// The other half of the probe rewrite: the sidecar asks the app the
/// probes the injector moved to its admin port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_asks_the_app_the_probes_the_kubelet_sends_it() -> Result<()> {
    use lumen_tests::{Sidecar, SidecarPorts, free_port, upstream::start_app, write_mesh};
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("web", 8080, &[])])?;
    let healthy = start_app("web").await;
    let failing = start_app("web-failing").await;
    let closed = free_port();
    let probes = json!({
        "/app-health/web/readyz": {"port": healthy.port(), "path": "/health", "scheme": "HTTP",
            "headers": [{"name": "X-Probe", "value": "kubelet"}]},
        "/app-health/web/livez": {"port": failing.port(), "path": "/"},
        "/app-health/gone/readyz": {"port": closed, "path": "/"},
    })
    .to_string();
    let ports = SidecarPorts::pick();
    let _sidecar = Sidecar {
        service: "web",
        version: "v1",
        mesh: &mesh,
        ports,
        app: None,
        collector: "http://127.0.0.1:9",
        extra: &["--app-probes", &probes, "--telemetry", "off"],
    }
    .start(dir.path())
    .await?;
    let get = |path: &str| {
        let url = format!("http://127.0.0.1:{}{path}", ports.admin);
        async move { Ok::<_, anyhow::Error>(reqwest::get(url).await?.status().as_u16()) }
    };
    assert_eq!(get("/app-health/web/readyz").await?, 200);
    // The app's own answer is the probe's: 503 fails it.
    assert_eq!(get("/app-health/web/livez").await?, 503);
    // An app not listening fails the probe; a probe never configured is 404.
    assert_eq!(get("/app-health/gone/readyz").await?, 503);
    assert_eq!(get("/app-health/web/startupz").await?, 404);

    // Before its first configuration (its control plane away), a sidecar is
    // not ready, but the kubelet's probes still reach the app: a healthy
    // app is not restarted for the control plane's absence.
    let waiting_ports = SidecarPorts::pick();
    let args: Vec<String> = [
        "--service".to_string(),
        "web".into(),
        "--no-inbound".into(),
        "--outbound".into(),
        format!("127.0.0.1:{}", waiting_ports.outbound),
        "--admin".into(),
        format!("127.0.0.1:{}", waiting_ports.admin),
        "--control".into(),
        format!("127.0.0.1:{}", free_port()),
        "--collector".into(),
        "http://127.0.0.1:9".into(),
        "--app-probes".into(),
        probes.clone(),
    ]
    .to_vec();
    let _waiting = lumen_tests::LumenProcess::spawn_bin(
        &lumen_tests::lumen_proxy_bin(),
        "sidecar-waiting",
        dir.path(),
        &args,
    )?;
    let admin = |path: &str| {
        let url = format!("http://127.0.0.1:{}{path}", waiting_ports.admin);
        async move { Ok::<_, anyhow::Error>(reqwest::get(url).await?.status().as_u16()) }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match admin("/ready").await {
            Ok(code) => {
                assert_eq!(code, 503, "ready without a configuration");
                break;
            }
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Err(e) => return Err(e),
        }
    }
    assert_eq!(admin("/app-health/web/readyz").await?, 200);
    assert_eq!(admin("/app-health/web/livez").await?, 503);

    // A probe list that is not one stops the sidecar at start, saying so.
    let out = std::process::Command::new(lumen_tests::lumen_proxy_bin())
        .args([
            "--service",
            "web",
            "--no-outbound",
            "--no-inbound",
            "--app-probes",
            "{\"/health\": 1}",
        ])
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("app probes"), "{stderr}");
    Ok(())
}

/// `lumen control --webhook-addr` serves the injector over HTTPS with a
/// certificate from the mesh CA for the webhook Service's name: the API
/// server, given the CA's trust bundle as `caBundle`, accepts it and gets
/// the patch; a client expecting another name refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_serves_the_injector_over_tls_the_ca_bundle_verifies() -> Result<()> {
    use lumen_tests::{LumenProcess, free_port};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir()?;
    let (control, webhook, monitoring) = (free_port(), free_port(), free_port());
    let data = dir.path().join("control");
    let args: Vec<String> = [
        "control",
        "--data-dir",
        &data.display().to_string(),
        "--control-addr",
        &format!("127.0.0.1:{control}"),
        "--webhook-addr",
        &format!("127.0.0.1:{webhook}"),
        "--proxy-image",
        "registry.example/lumen-proxy:2.0",
        "--monitoring-addr",
        &format!("127.0.0.1:{monitoring}"),
    ]
    .map(String::from)
    .to_vec();
    let mut process = LumenProcess::spawn("lumen-control", dir.path(), &args)?;
    let name = "lumen-control.lumen-system.svc";
    let bundle = data.join("ca/trust-bundle.pem");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !bundle.exists() {
        if Instant::now() > deadline {
            anyhow::bail!("no trust bundle:\n{}", process.logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&bundle)?)?;
    let client = |host: &str| {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca.clone())
            .resolve(host, std::net::SocketAddr::from(([127, 0, 0, 1], webhook)))
            .timeout(Duration::from_secs(5))
            .build()
    };
    let api_server = client(name)?;
    let url = format!("https://{name}:{webhook}/inject");
    let body = serde_json::to_vec(&reviews_v1()?)?;
    let answer = loop {
        match api_server.post(&url).body(body.clone()).send().await {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline && e.is_connect() => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => anyhow::bail!("{e:?}\n{}", process.logs()),
        }
    };
    assert_eq!(answer.status(), 200);
    let out: Value = answer.json().await?;
    assert_eq!(
        out["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    let pod = patched(&reviews_v1()?, &out["response"])?;
    let sidecar = &pod.spec.as_ref().context("spec")?.containers[1];
    assert_eq!(
        sidecar.image.as_deref(),
        Some("registry.example/lumen-proxy:2.0")
    );

    // The certificate names the Service, nothing else.
    let other = client("lumen-control.other.svc")?;
    let refused = other
        .post(format!("https://lumen-control.other.svc:{webhook}/inject"))
        .body(body)
        .send()
        .await;
    assert!(
        refused.is_err(),
        "a certificate for another name was accepted"
    );
    // Garbage gets an answer, and the server goes on.
    let junk = api_server.post(&url).body("{").send().await?;
    assert_eq!(junk.status(), 200);
    let junk: Value = junk.json().await?;
    assert_eq!(junk["response"]["allowed"], false);
    assert_eq!(
        api_server
            .get(format!("https://{name}:{webhook}/ready"))
            .send()
            .await?
            .status(),
        200
    );
    // SIGTERM: a clean stop.
    // The monitoring port: ready (no cluster to list), and the control plane's series.
    let plain = reqwest::Client::new();
    let ready = plain
        .get(format!("http://127.0.0.1:{monitoring}/ready"))
        .send()
        .await?;
    assert_eq!(ready.status(), 200);
    let metrics = plain
        .get(format!("http://127.0.0.1:{monitoring}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(metrics.contains("pilot_xds"), "{metrics}");
    assert_eq!(process.terminate()?, 0, "{}", process.logs());
    Ok(())
}

#[test]
fn a_pod_that_declares_no_ports_is_still_captured_inbound() -> Result<()> {
    let mut request = reviews_v1()?;
    for c in request["request"]["object"]["spec"]["containers"]
        .as_array_mut()
        .context("containers")?
    {
        c.as_object_mut().context("container")?.remove("ports");
        // Probes by number: with no named port left.
        for probe in ["readinessProbe", "livenessProbe"] {
            c[probe]["httpGet"]["port"] = 9080.into();
        }
    }
    let out = answer(&request, &Injector::default())?;
    assert_eq!(out["response"]["allowed"], true, "{out}");
    let pod = patched(&request, &out["response"])?;
    let spec = pod.spec.as_ref().context("spec")?;
    let capture = args(&spec.init_containers.as_ref().context("init")?[0]);
    assert!(
        !capture.contains(&"--no-inbound".to_string()),
        "{capture:?}"
    );
    let sidecar = args(&spec.containers[1]);
    // Only what the capture brings, each connection on the port it was sent to.
    assert_eq!(flag(&sidecar, "--app").as_deref(), Some("127.0.0.1:0"));
    assert_eq!(
        flag(&sidecar, "--inbound").as_deref(),
        Some("0.0.0.0:15006")
    );
    assert!(!sidecar.contains(&"--no-inbound".to_string()));
    Ok(())
}
