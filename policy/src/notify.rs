//! Firing alerts sent to Alertmanager, as Prometheus sends them: `POST
//! /api/v2/alerts` with every firing alert when one starts or ends and
//! again every `resend` (Alertmanager drops an alert whose `endsAt` passes
//! without a resend), and an alert that stops firing once more with
//! `endsAt` now, so Alertmanager resolves it at once. A failing
//! Alertmanager is logged and counted; evaluation never waits for it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::alerts::{Alert, AlertState, RuleEngine};

/// Prometheus's default `--rules.alert.resend-delay`.
pub const RESEND: Duration = Duration::from_secs(60);

/// Sends to every Alertmanager in `urls` (their base URLs).
pub struct Notifier {
    urls: Vec<String>,
    client: reqwest::Client,
    /// Where an alert's `generatorURL` points: the query port's alerts.
    generator: String,
    resend: Duration,
    pub sent: AtomicU64,
    pub failed: AtomicU64,
}

type Key = BTreeMap<String, String>;

impl Notifier {
    pub fn new(urls: Vec<String>, generator: String) -> Self {
        Notifier {
            urls: urls
                .into_iter()
                .map(|u| u.trim_end_matches('/').to_string())
                .collect(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            generator,
            resend: RESEND,
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Its counters in OpenMetrics text, for the query port's `/metrics`.
    pub fn metrics_text(&self) -> String {
        format!(
            "# HELP lumen_alertmanager_notifications Alert batches sent to Alertmanagers, by outcome.\n\
             # TYPE lumen_alertmanager_notifications counter\n\
             lumen_alertmanager_notifications_total{{outcome=\"sent\"}} {}\n\
             lumen_alertmanager_notifications_total{{outcome=\"failed\"}} {}\n",
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed)
        )
    }

    /// Follows `engine`'s evaluations until `stop` turns true.
    pub fn run(
        self: Arc<Self>,
        engine: Arc<RuleEngine>,
        stop: watch::Receiver<bool>,
    ) -> lumen_core::BoxFuture<'static, ()> {
        Box::pin(self.notify_until(engine, stop))
    }

    async fn notify_until(
        self: Arc<Self>,
        engine: Arc<RuleEngine>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut evaluated = engine.subscribe();
        let mut firing: BTreeMap<Key, Alert> = BTreeMap::new();
        let mut last_send: Option<Instant> = None;
        loop {
            tokio::select! {
                changed = evaluated.changed() => if changed.is_err() { return },
                () = crate::alerts::stopped(&mut stop) => return,
            }
            let now_firing: BTreeMap<Key, Alert> = engine
                .alerts()
                .into_iter()
                .filter(|a| a.state == AlertState::Firing)
                .map(|a| (a.labels.clone(), a))
                .collect();
            let now = SystemTime::now();
            let mut batch: Vec<Value> = Vec::new();
            // Ended: once more, resolved now.
            for (key, a) in &firing {
                if !now_firing.contains_key(key) {
                    batch.push(self.alert_json(a, now));
                }
            }
            let started = now_firing.keys().any(|k| !firing.contains_key(k));
            let due = last_send.is_none_or(|t| t.elapsed() >= self.resend);
            if started || !batch.is_empty() || (due && !now_firing.is_empty()) {
                // Firing: valid for four resends, as Prometheus sets it.
                let until = now + 4 * self.resend;
                batch.extend(now_firing.values().map(|a| self.alert_json(a, until)));
            }
            firing = now_firing;
            if batch.is_empty() {
                continue;
            }
            last_send = Some(Instant::now());
            // In the background: a slow Alertmanager delays nothing.
            let this = self.clone();
            tokio::spawn(async move { this.send(&Value::Array(batch)).await });
        }
    }

    fn alert_json(&self, a: &Alert, ends_at: SystemTime) -> Value {
        json!({
            "labels": a.labels,
            "annotations": a.annotations,
            "startsAt": humantime::format_rfc3339_millis(a.fired_at.unwrap_or(a.active_at)).to_string(),
            "endsAt": humantime::format_rfc3339_millis(ends_at).to_string(),
            "generatorURL": self.generator,
        })
    }

    async fn send(&self, batch: &Value) {
        for url in &self.urls {
            let target = format!("{url}/api/v2/alerts");
            let result = self
                .client
                .post(&target)
                .json(batch)
                .send()
                .await
                .and_then(|r| r.error_for_status());
            match result {
                Ok(_) => {
                    self.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(alertmanager = %url, error = %e, "sending alerts failed");
                }
            }
        }
    }
}
