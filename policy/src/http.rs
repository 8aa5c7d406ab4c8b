//! The rule engine's state in Prometheus's HTTP API shapes, on the query
//! port beside PromQL, so Grafana's alert list and anything else that reads
//! a Prometheus reads Lumen's rules: `GET /api/v1/rules` (`?type=alert` or
//! `record`) and `GET /api/v1/alerts`; and `POST /api/v1/alerts/webhook`,
//! an Alertmanager webhook receiver, so alerts of an existing Prometheus
//! switch Lumen's policies too; `GET /api/v1/policies`, every policy and
//! why it is on or off.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::response::Json;
use axum::routing::get;
use serde_json::{Value, json};

use crate::alerts::{Alert, RuleEngine, RuleStatus};
use crate::rules::RuleKind;

pub fn router(engine: Arc<RuleEngine>, board: Arc<crate::decide::Board>) -> Router {
    Router::new()
        .route("/api/v1/rules", get(rules))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/alerts/webhook", axum::routing::post(webhook))
        .with_state(engine)
        .merge(
            Router::new()
                .route("/api/v1/policies", get(policies))
                .with_state(board),
        )
}

/// Every policy, whether it is on and why (`lumen policy status`).
async fn policies(State(board): State<Arc<crate::decide::Board>>) -> Json<Value> {
    Json(json!({"status": "success", "data": {"policies": board.get()}}))
}

fn rfc3339(t: Option<SystemTime>) -> Value {
    match t {
        // Prometheus's zero time for "never".
        None => json!("0001-01-01T00:00:00Z"),
        Some(t) => json!(humantime::format_rfc3339_nanos(t).to_string()),
    }
}

fn alert_json(a: &Alert) -> Value {
    json!({
        "labels": a.labels,
        "annotations": a.annotations,
        "state": a.state.as_str(),
        "activeAt": rfc3339(Some(a.active_at)),
        "value": lumen_query::promql::value::format_number(a.value),
    })
}

fn rule_json(r: &RuleStatus) -> Value {
    let mut out = json!({
        "name": r.rule.name,
        "query": r.rule.expr,
        "labels": r.rule.labels,
        "health": r.health,
        "evaluationTime": r.evaluation_time.as_secs_f64(),
        "lastEvaluation": rfc3339(r.last_evaluation),
    });
    if let Some(e) = &r.last_error {
        out["lastError"] = json!(e);
    }
    match &r.rule.kind {
        RuleKind::Alert {
            for_,
            keep_firing_for,
            annotations,
        } => {
            out["type"] = json!("alerting");
            out["state"] = json!(r.state());
            out["duration"] = json!(for_.as_secs_f64());
            out["keepFiringFor"] = json!(keep_firing_for.as_secs_f64());
            out["annotations"] = json!(annotations);
            out["alerts"] = r.alerts.values().map(alert_json).collect();
        }
        RuleKind::Record => out["type"] = json!("recording"),
    }
    out
}

async fn rules(State(engine): State<Arc<RuleEngine>>, RawQuery(q): RawQuery) -> Json<Value> {
    let kind = form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "type")
        .map(|(_, v)| v.into_owned());
    let want = |r: &RuleStatus| {
        !matches!(
            (kind.as_deref(), &r.rule.kind),
            (Some("alert"), RuleKind::Record) | (Some("record"), RuleKind::Alert { .. })
        )
    };
    let groups: Vec<Value> = engine
        .groups()
        .iter()
        .map(|g| {
            json!({
                "name": g.group.name,
                "file": g.group.file,
                "interval": g.interval.as_secs_f64(),
                "limit": g.group.limit,
                "rules": g.rules.iter().filter(|r| want(r)).map(rule_json).collect::<Vec<_>>(),
                "evaluationTime": g.evaluation_time.as_secs_f64(),
                "lastEvaluation": rfc3339(g.last_evaluation),
            })
        })
        .collect();
    Json(json!({"status": "success", "data": {"groups": groups}}))
}

async fn alerts(State(engine): State<Arc<RuleEngine>>) -> Json<Value> {
    let alerts: Vec<Value> = engine.alerts().iter().map(alert_json).collect();
    Json(json!({"status": "success", "data": {"alerts": alerts}}))
}

/// Alertmanager's webhook payload (version 4), the parts Lumen reads.
#[derive(serde::Deserialize)]
struct Webhook {
    alerts: Vec<WebhookAlert>,
}

#[derive(serde::Deserialize)]
struct WebhookAlert {
    status: String,
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

async fn webhook(
    State(engine): State<Arc<RuleEngine>>,
    body: axum::body::Bytes,
) -> (axum::http::StatusCode, Json<Value>) {
    let bad = |reason: String| {
        (
            axum::http::StatusCode::BAD_REQUEST,
            Json(json!({"status": "error", "errorType": "bad_data", "error": reason})),
        )
    };
    let hook: Webhook = match serde_json::from_slice(&body) {
        Ok(h) => h,
        Err(e) => return bad(format!("not an Alertmanager webhook payload: {e}")),
    };
    let mut alerts = Vec::with_capacity(hook.alerts.len());
    for (i, a) in hook.alerts.into_iter().enumerate() {
        let firing = match a.status.as_str() {
            "firing" => true,
            "resolved" => false,
            other => {
                return bad(format!(
                    "alerts[{i}].status: `{other}` is neither firing nor resolved"
                ));
            }
        };
        if !a.labels.contains_key("alertname") {
            return bad(format!("alerts[{i}].labels: no alertname"));
        }
        alerts.push(crate::alerts::Received {
            firing,
            labels: a.labels,
            annotations: a.annotations,
        });
    }
    let n = alerts.len();
    engine.receive(alerts);
    tracing::info!(alerts = n, "alerts from an Alertmanager webhook");
    (
        axum::http::StatusCode::OK,
        Json(json!({"status": "success"})),
    )
}
