//! Lumen's `RateLimit` resource at a real calling sidecar: a request over a
//! limit is answered 429 by the sidecar (never reaching the service) with
//! `RL`, `retry-after` and `x-ratelimit-*`; limits keyed by a header keep
//! callers apart; a dry run limits nothing; a limit applied later through
//! the control plane takes effect without a restart; an invalid limit is
//! refused naming its field. Conditional policies follow alerts over the
//! last seconds of traffic — on and off again, each change a
//! `policy_events` row — an `AccessPolicy` denies the caller an alert
//! names, and with the policy engine `kill -9`ed the calling sidecar keeps
//! its last decisions, then follows each policy's `failMode`.

use std::net::SocketAddr;
use std::process::Command;

use anyhow::Result;
use lumen_tests::alertmanager::Alertmanager;
use lumen_tests::upstream::{requests_seen, start_app};
use lumen_tests::{
    LumenProcess, Sidecar, SidecarPorts, UpPorts, local, lumen_bin, sql, start_up, wait_for_count,
};

const LIMITS: &str = r#"
apiVersion: policy.lumen.dev/v1alpha1
kind: RateLimit
metadata: {name: ratings-per-user}
spec:
  target: {service: ratings, path: {prefix: /ratings}}
  key: {header: x-user}
  requestsPerSecond: 0.1
  burst: 3
---
apiVersion: policy.lumen.dev/v1alpha1
kind: RateLimit
metadata: {name: details-trial}
spec:
  target: {service: details}
  requestsPerSecond: 0.1
  burst: 1
  dryRun: true
"#;

async fn get(
    client: &reqwest::Client,
    outbound: SocketAddr,
    host: &str,
    path: &str,
    user: &str,
) -> Result<reqwest::Response> {
    Ok(client
        .get(format!("http://{outbound}{path}"))
        .header("host", format!("{host}:8080"))
        .header("x-user", user)
        .send()
        .await?)
}

/// `lumen up` over `services` (name → app address) and the `limits` YAML,
/// with `rules` (a Prometheus rule file) if given, and one calling sidecar
/// (`caller`) that follows its control plane.
struct Mesh {
    dir: tempfile::TempDir,
    up: UpPorts,
    control: String,
    /// The caller's outbound listener.
    out: SocketAddr,
    client: reqwest::Client,
    up_process: LumenProcess,
    _caller: LumenProcess,
    _control: Option<LumenProcess>,
}

impl Mesh {
    async fn start(
        caller: &str,
        services: &[(&str, SocketAddr)],
        limits: &str,
        rules: Option<&str>,
        caller_args: &[&str],
    ) -> Result<Self> {
        Self::start_with(caller, services, limits, rules, caller_args, false).await
    }

    /// With `apart`, the mesh's control plane is a `lumen control` of its
    /// own (as on Kubernetes) that the caller follows, and `lumen up`'s
    /// policy engine sends its decisions there (`--mesh-control`).
    async fn start_with(
        caller: &str,
        services: &[(&str, SocketAddr)],
        limits: &str,
        rules: Option<&str>,
        caller_args: &[&str],
        apart: bool,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("config");
        std::fs::create_dir(&config)?;
        let mut mesh = String::from(
            "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec:\n  services:\n",
        );
        for (name, app) in services {
            mesh.push_str(&format!(
                "    - {{name: {name}, port: 8080, endpoints: [{{address: {app}}}]}}\n"
            ));
        }
        std::fs::write(config.join("mesh.yaml"), mesh)?;
        std::fs::write(config.join("limits.yaml"), limits)?;
        let mut up_args = Vec::new();
        if let Some(text) = rules {
            let file = dir.path().join("rules.yaml");
            std::fs::write(&file, text)?;
            up_args = vec!["--rules".to_string(), file.display().to_string()];
        }
        let up = UpPorts::pick();
        let mut control = up.control_addr();
        let mut control_process = None;
        if apart {
            control = local(lumen_tests::free_port()).to_string();
            let monitoring = local(lumen_tests::free_port()).to_string();
            let args: Vec<String> = [
                "control",
                "-f",
                config.to_str().unwrap_or_default(),
                "--control-addr",
                &control,
                "--monitoring-addr",
                &monitoring,
                "--data-dir",
                dir.path().join("control").to_str().unwrap_or_default(),
            ]
            .map(String::from)
            .to_vec();
            let mut p = LumenProcess::spawn("lumen-control", dir.path(), &args)?;
            p.wait_ready(&format!("http://{monitoring}/ready")).await?;
            control_process = Some(p);
            up_args.extend(["--mesh-control".to_string(), control.clone()]);
        }
        let up_args: Vec<&str> = up_args.iter().map(String::as_str).collect();
        let up_process =
            start_up(dir.path(), &config, &dir.path().join("data"), up, &up_args).await?;
        let ports = SidecarPorts::pick();
        let collector = up.grpc_endpoint();
        let mut extra = vec!["--control", &control];
        extra.extend_from_slice(caller_args);
        let caller_process = Sidecar {
            service: caller,
            version: "v1",
            mesh: &config,
            ports,
            app: None,
            collector: &collector,
            extra: &extra,
        }
        .start(dir.path())
        .await?;
        Ok(Mesh {
            dir,
            up,
            control,
            out: local(ports.outbound),
            client: reqwest::Client::builder().no_proxy().build()?,
            up_process,
            _caller: caller_process,
            _control: control_process,
        })
    }

    async fn get(&self, host: &str, path: &str, user: &str) -> Result<reqwest::Response> {
        get(&self.client, self.out, host, path, user).await
    }

    /// Calls ratings (answering 503) until the caller's sidecar limits it.
    async fn until_limited(&self, what: &str) -> Result<reqwest::Response> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let resp = self.get("ratings", "/status/503", "u").await?;
            if resp.status() == 429 {
                return Ok(resp);
            }
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Calls ratings (answering 200) until the limit lifts; only 429s before.
    async fn until_lifted(&self, what: &str) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let s = self.get("ratings", "/ok", "u").await?.status();
            if s == 200 {
                return Ok(());
            }
            assert_eq!(s, 429);
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_a_rate_limit_are_answered_429_by_the_calling_sidecar() -> Result<()> {
    let ratings = start_app("ratings-rl").await;
    let details = start_app("details-rl").await;
    let reviews = start_app("reviews-rl").await;
    let m = Mesh::start(
        "productpage",
        &[
            ("ratings", ratings),
            ("details", details),
            ("reviews", reviews),
        ],
        LIMITS,
        None,
        &[],
    )
    .await?;
    let (dir, control, up) = (&m.dir, &m.control, m.up);

    // jason has a burst of 3, then 429s from the sidecar; the app sees 3.
    let seen_before = requests_seen("ratings-rl");
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let resp = m.get("ratings", "/ratings/1", "jason").await?;
        if resp.status() == 429 {
            assert_eq!(resp.headers()["x-lumen-policy"], "default/ratings-per-user");
            assert_eq!(resp.headers()["x-ratelimit-remaining"], "0");
            let retry: u64 = resp.headers()["retry-after"].to_str()?.parse()?;
            assert!((1..=10).contains(&retry), "retry-after {retry}");
        }
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
    assert_eq!(requests_seen("ratings-rl") - seen_before, 3);
    // Another user has a bucket of their own; a path the limit does not
    // cover is not limited.
    assert_eq!(m.get("ratings", "/ratings/1", "alice").await?.status(), 200);
    assert_eq!(m.get("ratings", "/health", "jason").await?.status(), 200);
    // A dry run limits nothing.
    for _ in 0..4 {
        assert_eq!(m.get("details", "/d", "jason").await?.status(), 200);
    }

    // A limit applied to the running mesh takes effect without a restart.
    let reviews_limit = dir.path().join("reviews-limit.yaml");
    std::fs::write(
        &reviews_limit,
        "apiVersion: policy.lumen.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: reviews-global}\nspec:\n  target: {service: reviews}\n  requestsPerSecond: 0.1\n  burst: 2\n",
    )?;
    let applied = Command::new(lumen_bin())
        .args(["apply", "--control", control, "-f"])
        .arg(&reviews_limit)
        .output()?;
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let s = m.get("reviews", "/r", "anyone").await?.status();
        if s == 429 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the applied limit never took effect"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Rows: 429 with RL at the source, and none of them reached ratings.
    let url = up.sql_url();
    let limited = "SELECT count(*) AS n FROM requests WHERE reporter = 'source' \
                   AND destination_service = 'ratings' AND status = 429 AND response_flags = 'RL'";
    assert_eq!(wait_for_count(&url, limited, 3).await?, 3);
    let rows = sql(
        &url,
        "SELECT count(*) AS n FROM requests WHERE reporter = 'destination' AND status = 429",
    )
    .await?;
    assert_eq!(
        rows[0]["n"], 0,
        "limited requests never reach a destination"
    );

    // Invalid: refused with file, resource, field and reason.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: policy.lumen.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: bad}\nspec:\n  target: {service: ratings}\n  requestsPerSecond: 0\n",
    )?;
    let refused = Command::new(lumen_bin())
        .args(["apply", "--control", control, "-f"])
        .arg(&bad)
        .output()?;
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("RateLimit default/bad: spec.requestsPerSecond: 0 is not a rate"),
        "{err}"
    );
    Ok(())
}

/// The policy loop end to end: ratings fails (its app answers 503), the
/// sidecar records it, a Prometheus rule over the last seconds of those
/// rows fires, and the conditional limit on ratings switches on at the
/// calling sidecar — with no change to any file; once the failures stop
/// showing and the cooldown passes, it lifts. `policy_events` says why
/// for both, and the limited rows name the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_alert_switches_a_conditional_limit_on_at_the_callers() -> Result<()> {
    let ratings = start_app("ratings-policy").await;
    let m = Mesh::start(
        "reviews",
        &[("ratings", ratings)],
        "apiVersion: policy.lumen.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: shed-ratings}\nspec:\n  target: {service: ratings}\n  requestsPerSecond: 0.01\n  burst: 1\n  when: {alert: RatingsFailing, labels: {destination_service_name: ratings}}\n  cooldown: 2s\n",
        Some("groups:\n- name: mesh\n  rules:\n  - alert: RatingsFailing\n    expr: sum by (destination_service_name) (rate(istio_requests_total{reporter=\"source\", response_code=\"503\"}[5s])) > 0.5\n    annotations: {summary: ratings answers 503}\n"),
        &[],
    )
    .await?;
    let up = m.up;

    // Before the alert: ratings' own 503s come through, nothing is limited.
    for _ in 0..5 {
        assert_eq!(m.get("ratings", "/status/503", "u").await?.status(), 503);
    }
    // The rows reach the rules; the alert fires; the limit switches on.
    let limited = m
        .until_limited("the conditional limit never switched on")
        .await?;
    assert_eq!(limited.headers()["x-lumen-policy"], "default/shed-ratings");
    let alerts: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{}/api/v1/alerts", up.query))
            .await?
            .json()
            .await?;
    assert_eq!(
        alerts["data"]["alerts"][0]["labels"]["alertname"], "RatingsFailing",
        "{alerts}"
    );
    // `lumen policy status` says it is on, and why.
    let status = Command::new(lumen_bin())
        .args(["policy", "status", "--url"])
        .arg(format!("http://127.0.0.1:{}", up.query))
        .output()?;
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let text = String::from_utf8_lossy(&status.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("default/shed-ratings"))
        .unwrap_or_else(|| panic!("no line for the policy in:\n{text}"));
    assert!(
        line.contains("RateLimit") && line.contains("ratings") && line.contains("ON"),
        "{line}"
    );
    assert!(line.contains("alert RatingsFailing"), "{line}");

    // Limited calls never reach ratings, so no 503 shows in the last
    // seconds: the alert resolves, the cooldown passes, the limit lifts.
    m.until_lifted("the limit never lifted after the failures stopped")
        .await?;

    // Why, in `policy_events`; and which policy, in the limited rows.
    let url = up.sql_url();
    let on = "SELECT count(*) AS n FROM policy_events WHERE kind = 'RateLimit' \
              AND name = 'default/shed-ratings' AND old_state = 'off' AND new_state = 'on' \
              AND target = 'ratings' AND reason LIKE 'alert RatingsFailing{%} fires' AND value > 0.5";
    assert!(wait_for_count(&url, on, 1).await? >= 1);
    let off = "SELECT count(*) AS n FROM policy_events WHERE name = 'default/shed-ratings' \
               AND new_state = 'off' AND reason = 'alert RatingsFailing stopped; cooldown 2s passed'";
    assert!(wait_for_count(&url, off, 1).await? >= 1);
    let alert = sql(
        &url,
        "SELECT old_state, new_state, reason FROM policy_events WHERE kind = 'alert' \
         AND name = 'RatingsFailing' ORDER BY time",
    )
    .await?;
    assert_eq!(alert[0]["old_state"], "inactive", "{alert:?}");
    assert_eq!(alert[0]["new_state"], "firing", "{alert:?}");
    assert_eq!(alert[0]["reason"], "ratings answers 503", "{alert:?}");
    assert!(
        alert.iter().any(|e| e["new_state"] == "inactive"),
        "resolved: {alert:?}"
    );
    let rows = "SELECT count(*) AS n FROM requests WHERE status = 429 \
                AND response_flags = 'RL' AND policy = 'default/shed-ratings'";
    assert!(wait_for_count(&url, rows, 1).await? >= 1);
    Ok(())
}

/// An `AccessPolicy` with its sources from the alert: the caller whose
/// request rate crossed the rule's line is denied (403, `UAEX`, the
/// policy in the row). Then the policy engine is `kill -9`ed: the sidecar
/// keeps the last decisions; once they are stale, a limit failing closed
/// turns on, and the access policy failing closed keeps denying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_policy_denies_the_caller_an_alert_names_and_stale_decisions_fail_as_told()
-> Result<()> {
    let ratings = start_app("ratings-access").await;
    let details = start_app("details-access").await;
    let policies = r#"
apiVersion: policy.lumen.dev/v1alpha1
kind: AccessPolicy
metadata: {name: block-noisy}
spec:
  target: {service: ratings}
  action: DENY
  when: {alert: NoisyCaller}
  ttl: 10m
  failMode: closed
---
apiVersion: policy.lumen.dev/v1alpha1
kind: RateLimit
metadata: {name: details-guard}
spec:
  target: {service: details}
  requestsPerSecond: 0.01
  burst: 1
  when: {alert: DetailsOverloaded}
  failMode: closed
"#;
    let mut m = Mesh::start(
        "reviews",
        &[("ratings", ratings), ("details", details)],
        policies,
        Some("groups:\n- name: callers\n  rules:\n  - alert: NoisyCaller\n    expr: sum by (source_workload, source_workload_namespace) (rate(istio_requests_total{reporter=\"source\", destination_service_name=\"ratings\"}[5s])) > 2\n"),
        &["--policy-staleness", "2s"],
    )
    .await?;
    let url = m.up.sql_url();
    for _ in 0..3 {
        assert_eq!(m.get("details", "/d", "u").await?.status(), 200);
    }

    // reviews-v1 calls ratings fast: the alert names it, and it is denied.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let denied = loop {
        let resp = m.get("ratings", "/r", "u").await?;
        if resp.status() == 403 {
            break resp;
        }
        assert_eq!(resp.status(), 200);
        assert!(
            std::time::Instant::now() < deadline,
            "the noisy caller was never denied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(denied.headers()["x-lumen-policy"], "default/block-noisy");
    assert_eq!(denied.headers()["x-lumen-response-flags"], "UAEX");
    let rows = "SELECT count(*) AS n FROM requests WHERE status = 403 AND response_flags = 'UAEX' \
                AND policy = 'default/block-noisy' AND source_workload = 'reviews-v1'";
    assert!(wait_for_count(&url, rows, 1).await? >= 1);
    let event = "SELECT count(*) AS n FROM policy_events WHERE kind = 'AccessPolicy' \
                 AND name = 'default/block-noisy' AND new_state = 'on' \
                 AND target = 'ratings from default/reviews-v1'";
    assert!(wait_for_count(&url, event, 1).await? >= 1);

    // The engine dies without a word.
    m.up_process.kill9()?;
    assert_eq!(
        m.get("ratings", "/r", "u").await?.status(),
        403,
        "last decision kept"
    );
    // Stale after 2 s: the details limit fails closed and turns on; the
    // access policy fails closed and keeps denying the same caller.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = m.get("details", "/d", "u").await?.status();
        if s == 429 {
            break;
        }
        assert_eq!(s, 200);
        assert!(
            std::time::Instant::now() < deadline,
            "stale decisions never turned the fail-closed limit on"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(m.get("ratings", "/r", "u").await?.status(), 403);
    Ok(())
}

/// Alerts of an existing Prometheus switch Lumen's policies too: a real
/// Alertmanager posts to Lumen's webhook receiver; firing turns the
/// conditional limit on at the caller, resolved turns it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alertmanager_webhook_switches_a_limit_on_and_off() -> Result<()> {
    let ratings = start_app("ratings-hook").await;
    let m = Mesh::start(
        "reviews",
        &[("ratings", ratings)],
        "apiVersion: policy.lumen.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: incident}\nspec:\n  target: {service: ratings}\n  requestsPerSecond: 0.01\n  burst: 1\n  when: {alert: UpstreamIncident}\n  cooldown: 0s\n",
        None,
        &[],
    )
    .await?;
    let webhook = format!("http://127.0.0.1:{}/api/v1/alerts/webhook", m.up.query);
    let am = Alertmanager::start(Some(&webhook)).await?;
    let client = m.client.clone();
    for _ in 0..3 {
        assert_eq!(m.get("ratings", "/r", "u").await?.status(), 200);
    }

    // Another Prometheus's alert reaches Alertmanager…
    let alert = |ends: Option<String>| {
        let mut a =
            serde_json::json!({"labels": {"alertname": "UpstreamIncident", "service": "ratings"}});
        if let Some(e) = ends {
            a["endsAt"] = e.into();
        }
        serde_json::json!([a])
    };
    client
        .post(format!("{}/api/v2/alerts", am.url))
        .json(&alert(None))
        .send()
        .await?
        .error_for_status()?;
    // …which calls Lumen, which switches the limit on at the caller.
    let wait_for = |want: u16, what: &'static str| {
        let m = &m;
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let s = m.get("ratings", "/r", "u").await?.status().as_u16();
                if s == want {
                    return Ok::<_, anyhow::Error>(());
                }
                anyhow::ensure!(std::time::Instant::now() < deadline, "{what}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    };
    wait_for(
        429,
        "the webhook's firing alert never switched the limit on",
    )
    .await?;

    // Resolved: off again.
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    client
        .post(format!("{}/api/v2/alerts", am.url))
        .json(&alert(Some(now)))
        .send()
        .await?
        .error_for_status()?;
    wait_for(200, "the resolved alert never switched the limit off").await?;

    // Not an Alertmanager payload: 400, saying why.
    let resp = client.post(&webhook).body("{\"alerts\": 3}").send().await?;
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await?;
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("not an Alertmanager webhook payload"),
        "{body}"
    );
    Ok(())
}

/// A `Quota` of 1,000 a minute on ratings, across three calling sidecars
/// under load from each: together they admit no more than the limit plus
/// what they admit in one reporting interval (the bound docs/policy.md
/// states), and not much less; the refused calls are 429 naming the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_holds_across_three_calling_proxies_within_its_bound() -> Result<()> {
    const LIMIT: usize = 1000;
    const PER_PROXY_RPS: u64 = 50;
    const SECONDS: u64 = 12;
    let ratings = start_app("ratings-quota").await;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    std::fs::create_dir(&config)?;
    std::fs::write(
        config.join("mesh.yaml"),
        format!(
            "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: m}}\nspec:\n  services:\n    - {{name: ratings, port: 8080, endpoints: [{{address: {ratings}}}]}}\n\
             ---\napiVersion: policy.lumen.dev/v1alpha1\nkind: Quota\nmetadata: {{name: ratings-minute}}\nspec:\n  target: {{service: ratings}}\n  limit: {LIMIT}\n  per: minute\n"
        ),
    )?;
    let up = UpPorts::pick();
    let _up = start_up(dir.path(), &config, &dir.path().join("data"), up, &[]).await?;
    let collector = up.grpc_endpoint();
    let control = up.control_addr();
    let mut callers = Vec::new();
    for version in ["v1", "v2", "v3"] {
        let ports = SidecarPorts::pick();
        let process = Sidecar {
            service: "reviews",
            version,
            mesh: &config,
            ports,
            app: None,
            collector: &collector,
            extra: &["--control", &control],
        }
        .start(dir.path())
        .await?;
        callers.push((local(ports.outbound), process));
    }
    // Every proxy hears how many share the quota before traffic starts;
    // and the run stays inside one minute's window.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let into_minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        % 60;
    if into_minute > 60 - SECONDS - 5 {
        tokio::time::sleep(std::time::Duration::from_secs(61 - into_minute)).await;
    }

    let client = reqwest::Client::builder().no_proxy().build()?;
    let mut load = Vec::new();
    for (out, _) in &callers {
        let (client, out) = (client.clone(), *out);
        load.push(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(std::time::Duration::from_millis(1000 / PER_PROXY_RPS));
            let (mut allowed, mut refused) = (0usize, 0usize);
            for _ in 0..PER_PROXY_RPS * SECONDS {
                tick.tick().await;
                let resp = get(&client, out, "ratings", "/r", "u").await?;
                match resp.status().as_u16() {
                    200 => allowed += 1,
                    429 => {
                        anyhow::ensure!(
                            resp.headers()["x-lumen-policy"] == "default/ratings-minute"
                                && resp.headers()["x-ratelimit-limit"] == "1000",
                            "{:?}",
                            resp.headers()
                        );
                        refused += 1;
                    }
                    s => anyhow::bail!("unexpected status {s}"),
                }
            }
            Ok::<_, anyhow::Error>((allowed, refused))
        }));
    }
    let mut allowed = 0;
    let mut per_proxy = Vec::new();
    for l in load {
        let (a, r) = l.await??;
        allowed += a;
        per_proxy.push((a, r));
    }
    // One reporting interval (1 s) of the offered load, all proxies together.
    let bound = LIMIT + (3 * PER_PROXY_RPS) as usize;
    eprintln!(
        "{allowed} admitted of {LIMIT} (bound {bound}); per proxy (admitted, refused): {per_proxy:?}"
    );
    assert!(
        allowed <= bound,
        "{allowed} admitted, more than {LIMIT} + one interval: {per_proxy:?}"
    );
    assert!(
        allowed >= LIMIT * 9 / 10,
        "{allowed} admitted of {LIMIT}: {per_proxy:?}"
    );
    assert!(
        per_proxy.iter().all(|(a, r)| *a > 0 && *r > 0),
        "each proxy admitted some and was refused some: {per_proxy:?}"
    );
    let rows = "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND status = 429 \
                AND policy = 'default/ratings-minute'";
    let refused: usize = per_proxy.iter().map(|(_, r)| r).sum();
    assert_eq!(
        wait_for_count(&up.sql_url(), rows, refused as i64).await?,
        refused as i64
    );
    Ok(())
}

/// The same loop with the mesh's control plane apart, as on Kubernetes:
/// the caller follows `lumen control`; `lumen up --mesh-control` records,
/// evaluates the rule and sends its decision there, and the limit switches
/// on at the caller — then off once the failures stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_control_plane_apart_a_firing_alert_still_switches_the_limit() -> Result<()> {
    let ratings = start_app("ratings-apart").await;
    let m = Mesh::start_with(
        "reviews",
        &[("ratings", ratings)],
        "apiVersion: policy.lumen.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: shed-ratings}\nspec:\n  target: {service: ratings}\n  requestsPerSecond: 0.01\n  burst: 1\n  when: {alert: RatingsFailing, labels: {destination_service_name: ratings}}\n  cooldown: 2s\n",
        Some("groups:\n- name: mesh\n  rules:\n  - alert: RatingsFailing\n    expr: sum by (destination_service_name) (rate(istio_requests_total{reporter=\"source\", response_code=\"503\"}[5s])) > 0.5\n"),
        &[],
        true,
    )
    .await?;
    let limited = m
        .until_limited("the conditional limit never switched on through the control plane apart")
        .await?;
    assert_eq!(limited.headers()["x-lumen-policy"], "default/shed-ratings");
    m.until_lifted("the limit never lifted").await?;
    // The policy engine follows the control plane like a proxy does.
    let status = Command::new(lumen_bin())
        .args(["proxy-status", "--control", &m.control])
        .output()?;
    assert!(String::from_utf8_lossy(&status.stdout).contains("lumen-policy"));
    Ok(())
}
