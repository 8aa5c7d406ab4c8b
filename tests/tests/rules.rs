//! Prometheus alerting and recording rules in `lumen up --rules`: a rule
//! file Prometheus's own `promtool check rules` accepts is loaded as is,
//! evaluated over Lumen's series, and served the Prometheus way at
//! `/api/v1/rules` and `/api/v1/alerts`; failing traffic turns its alert
//! to firing, and a real Alertmanager (`--alertmanager`) receives it. A
//! rule file with bad PromQL keeps `lumen up` from starting, naming the
//! file, group, rule and reason. A recording rule's result is a series of
//! its own name that later rules and queries read, kept through a crash.

use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use lumen_core::{Reporter, RequestRecord, Workload};
use lumen_tests::alertmanager::Alertmanager;
use lumen_tests::flight::{self, client};
use lumen_tests::{UpPorts, lumen_bin, peer_tool, start_up, wait_for_count, write_mesh};
use serde_json::Value;

const RULES: &str = r#"groups:
- name: mesh
  rules:
  - alert: ServiceFailing
    expr: sum by (destination_service_name) (increase(istio_requests_total{response_code="503"}[5m])) > 0
    labels:
      severity: page
    annotations:
      summary: "{{ $labels.destination_service_name }} answered 503"
  - alert: NeverFires
    expr: sum(istio_requests_total{response_code="418"}) > 0
    for: 1m
  - record: service:istio_requests:increase5m
    expr: sum by (destination_service_name) (increase(istio_requests_total[5m]))
    labels:
      team: mesh
  - alert: RecordedTraffic
    expr: service:istio_requests:increase5m{team="mesh"} > 0
- name: slow
  interval: 5s
  rules:
  - alert: AlwaysPending
    expr: vector(1)
    for: 1h
"#;

fn workload(service: &str) -> Workload {
    Workload {
        service: service.into(),
        workload: format!("{service}-v1").into(),
        namespace: "default".into(),
        version: "v1".into(),
    }
}

async fn get(url: &str) -> Result<Value> {
    let v: Value = reqwest::get(url).await?.error_for_status()?.json().await?;
    if v["status"] != "success" {
        bail!("{url}: {v}");
    }
    Ok(v["data"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_traffic_fires_the_alert_of_a_prometheus_rule_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let rules = dir.path().join("mesh.rules.yaml");
    std::fs::write(&rules, RULES)?;
    // Prometheus's own checker takes the file Lumen takes.
    let promtool = peer_tool("promtool", "apt-get install -y prometheus");
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()?;
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("ratings", 9080, &[])])?;
    let ports = UpPorts::pick();
    let rules_arg = rules.display().to_string();
    let alertmanager = Alertmanager::start(None).await?;
    let up_args = ["--rules", &rules_arg, "--alertmanager", &alertmanager.url];
    let mut up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, &up_args).await?;
    let base = format!("http://127.0.0.1:{}", ports.query);

    // The groups and rules, as Prometheus lists them.
    let data = get(&format!("{base}/api/v1/rules")).await?;
    let groups = data["groups"].as_array().context("groups")?;
    assert_eq!(groups.len(), 2, "{data}");
    assert_eq!(groups[0]["name"], "mesh");
    assert_eq!(groups[0]["file"], rules_arg.as_str());
    assert_eq!(
        groups[0]["interval"], 1.0,
        "the default evaluation interval"
    );
    assert_eq!(groups[1]["interval"], 5.0);
    let kinds: Vec<&str> = groups[0]["rules"]
        .as_array()
        .context("rules")?
        .iter()
        .filter_map(|r| r["type"].as_str())
        .collect();
    assert_eq!(kinds, ["alerting", "alerting", "recording", "alerting"]);
    let only_alerts = get(&format!("{base}/api/v1/rules?type=alert")).await?;
    assert_eq!(
        only_alerts["groups"][0]["rules"].as_array().map(Vec::len),
        Some(3)
    );

    // Ratings fails: 40 requests answered 503.
    let end = SystemTime::now();
    let records: Vec<RequestRecord> = (0..40)
        .map(|i| RequestRecord {
            start_time: end - Duration::from_millis(100 * i),
            reporter: Reporter::Destination,
            source: workload("reviews"),
            destination: workload("ratings"),
            status: 503,
            span_id: rand::random(),
            ..RequestRecord::example()
        })
        .collect();
    let mut flight = client(&ports).await?;
    flight::put_records(&mut flight, [9; 16], 0, &records).await?;
    wait_for_count(
        &ports.sql_url(),
        "SELECT count(*) AS n FROM requests WHERE status = 503",
        40,
    )
    .await?;

    // Within the rollup window and the next evaluation, the alert fires.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let firing = loop {
        let alerts = get(&format!("{base}/api/v1/alerts")).await?;
        let found = alerts["alerts"]
            .as_array()
            .context("alerts")?
            .iter()
            .find(|a| a["labels"]["alertname"] == "ServiceFailing" && a["state"] == "firing")
            .cloned();
        if let Some(a) = found {
            break a;
        }
        if std::time::Instant::now() > deadline {
            bail!("ServiceFailing never fired; alerts: {alerts}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(firing["labels"]["destination_service_name"], "ratings");
    assert_eq!(firing["labels"]["severity"], "page");
    assert_eq!(firing["annotations"]["summary"], "ratings answered 503");
    assert!(
        firing["value"].as_str().and_then(|v| v.parse::<f64>().ok()) > Some(0.0),
        "{firing}"
    );

    let data = get(&format!("{base}/api/v1/rules")).await?;
    let mesh_rules = &data["groups"][0]["rules"];
    assert_eq!(mesh_rules[0]["state"], "firing");
    assert_eq!(mesh_rules[0]["health"], "ok");
    assert_eq!(mesh_rules[1]["state"], "inactive", "no 418 was answered");
    assert_eq!(mesh_rules[2]["health"], "ok", "{data}");
    // `for: 1h` keeps its alert pending.
    let slow = &data["groups"][1]["rules"][0];
    assert_eq!(slow["state"], "pending", "{data}");
    assert_eq!(slow["alerts"][0]["state"], "pending");

    // Alertmanager has the firing alert (and not the pending one), with
    // Lumen's query port as its source.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let received = loop {
        let alerts: Value = reqwest::get(format!("{}/api/v2/alerts", alertmanager.url))
            .await?
            .json()
            .await?;
        let found = alerts
            .as_array()
            .context("alertmanager's alerts")?
            .iter()
            .find(|a| a["labels"]["alertname"] == "ServiceFailing")
            .cloned();
        if let Some(a) = found {
            assert!(
                !alerts
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|a| a["labels"]["alertname"] == "AlwaysPending"),
                "{alerts}"
            );
            break a;
        }
        if std::time::Instant::now() > deadline {
            bail!("alertmanager never got ServiceFailing: {alerts}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // Counted on /metrics.
    let text = reqwest::get(format!("{base}/metrics"))
        .await?
        .text()
        .await?;
    let sent: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("lumen_alertmanager_notifications_total{outcome=\"sent\"} "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no notifications counter in {text}"))?;
    assert!(sent >= 1.0, "{text}");
    assert_eq!(received["labels"]["destination_service_name"], "ratings");
    assert_eq!(received["labels"]["severity"], "page");
    assert_eq!(received["annotations"]["summary"], "ratings answered 503");
    assert_eq!(received["status"]["state"], "active");
    assert_eq!(
        received["generatorURL"],
        format!("{base}/api/v1/alerts").as_str()
    );

    // The recording rule's result is a series of its own name, with the
    // expression's labels and the rule's, and nothing else; the alerting
    // rule after it in the group reads it.
    let recorded = |at: Option<f64>| {
        let base = base.clone();
        async move {
            let mut url = format!("{base}/api/v1/query?query=service:istio_requests:increase5m");
            if let Some(t) = at {
                url.push_str(&format!("&time={t}"));
            }
            let data = get(&url).await?;
            let result = data["result"].as_array().context("result")?.clone();
            anyhow::Ok(result)
        }
    };
    let result = recorded(None).await?;
    assert_eq!(result.len(), 1, "{result:?}");
    assert_eq!(
        result[0]["metric"],
        serde_json::json!({
            "__name__": "service:istio_requests:increase5m",
            "destination_service_name": "ratings",
            "team": "mesh",
        })
    );
    let value: f64 = result[0]["value"][1].as_str().context("value")?.parse()?;
    assert!(value > 0.0, "{result:?}");
    let at = result[0]["value"][0].as_f64().context("time")?;
    let data = get(&format!("{base}/api/v1/rules")).await?;
    let reader = &data["groups"][0]["rules"][3];
    assert_eq!(reader["health"], "ok", "{data}");
    assert_eq!(reader["state"], "firing", "{data}");
    assert_eq!(
        reader["alerts"][0]["labels"]["destination_service_name"],
        "ratings"
    );

    // Stored like ingested rows: a crash keeps what was recorded.
    up.kill9()?;
    let _up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, &up_args).await?;
    let before = recorded(Some(at)).await?;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["metric"]["team"], "mesh");
    let again: f64 = before[0]["value"][1].as_str().context("value")?.parse()?;
    assert!(again > 0.0, "{before:?}");
    Ok(())
}

#[test]
fn a_rule_with_bad_promql_keeps_lumen_up_from_starting() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let rules = dir.path().join("bad.rules.yaml");
    std::fs::write(
        &rules,
        "groups:\n- name: g\n  rules:\n  - alert: Broken\n    expr: sum(rate(istio_requests_total[5m])\n",
    )?;
    let out = Command::new(lumen_bin())
        .args(["up", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--rules")
        .arg(&rules)
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{}: group \"g\", rule 1 (\"Broken\"): expr: ",
        rules.display()
    );
    assert!(stderr.contains(&want), "{stderr}");
    Ok(())
}

/// The rules Lumen ships pass Prometheus's checker and Prometheus's own
/// unit tests of their expressions, and Lumen reads them as they are.
#[test]
fn the_shipped_rules_pass_promtool_and_load() -> Result<()> {
    let root = lumen_tests::crate_dir().join("../policy/rules");
    let promtool = peer_tool("promtool", "apt-get install -y prometheus");
    for args in [
        vec!["check".into(), "rules".into(), root.join("mesh.rules.yaml")],
        vec![
            "test".into(),
            "rules".into(),
            root.join("tests/mesh.rules.test.yaml"),
        ],
    ] {
        let out = Command::new(&promtool).args(&args).output()?;
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let groups = lumen_policy::rules::load(&root.join("mesh.rules.yaml"))?;
    assert_eq!(groups[0].rules.len(), 3);
    Ok(())
}
