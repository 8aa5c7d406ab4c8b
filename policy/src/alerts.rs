//! Rule evaluation with Prometheus's semantics: every group on its interval
//! runs its rules' PromQL at "now" over Lumen's own series; an alerting
//! rule's result series become alerts, pending until they have held for
//! `for`, then firing until they stop holding (and `keep_firing_for` has
//! passed); a recording rule's result is stored as series of its recorded
//! name (through the collector's WAL into `metrics`), which later rules and
//! every PromQL query read like any other. The state is what
//! `/api/v1/rules` and `/api/v1/alerts` serve.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lumen_collector::events::{RecordedSample, RecordingWriter};
use lumen_query::QueryEngine;
use lumen_query::promql::value::{Labels, METRIC_NAME, Steps, Value};
use lumen_query::promql::{self, PromQuery};
use tokio::sync::watch;

use crate::rules::{Rule, RuleGroup, RuleKind};

/// Where an alert is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertState {
    Pending,
    Firing,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Pending => "pending",
            AlertState::Firing => "firing",
        }
    }
}

/// One alert: a series an alerting rule's expression returned.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// The series' labels without its name, the rule's labels over them,
    /// and `alertname`.
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub state: AlertState,
    pub active_at: SystemTime,
    pub fired_at: Option<SystemTime>,
    /// The expression's value at the last evaluation that returned it.
    pub value: f64,
    last_seen: SystemTime,
}

impl Alert {
    #[cfg(test)]
    pub(crate) fn firing_for_test(labels: BTreeMap<String, String>, at: SystemTime) -> Alert {
        Alert {
            labels,
            annotations: BTreeMap::new(),
            state: AlertState::Firing,
            active_at: at,
            fired_at: Some(at),
            value: 1.0,
            last_seen: at,
        }
    }
}

/// An alert an Alertmanager's webhook reported.
#[derive(Debug, Clone)]
pub struct Received {
    /// `firing`, else `resolved`.
    pub firing: bool,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// A rule and what its last evaluation found.
#[derive(Debug, Clone)]
pub struct RuleStatus {
    pub rule: Rule,
    /// `ok`, `err`, or `unknown` before the first evaluation.
    pub health: &'static str,
    pub last_error: Option<String>,
    pub last_evaluation: Option<SystemTime>,
    pub evaluation_time: Duration,
    /// Alerting rules: by their labels.
    pub alerts: BTreeMap<Vec<(String, String)>, Alert>,
    /// Recording rules: the series of the last evaluation.
    pub recorded: usize,
}

impl RuleStatus {
    /// Firing if any alert fires, else pending if any is pending, else
    /// inactive.
    pub fn state(&self) -> &'static str {
        let states = || self.alerts.values().map(|a| a.state);
        if states().any(|s| s == AlertState::Firing) {
            "firing"
        } else if states().any(|s| s == AlertState::Pending) {
            "pending"
        } else {
            "inactive"
        }
    }
}

#[derive(Debug, Clone)]
pub struct GroupStatus {
    pub group: RuleGroup,
    pub interval: Duration,
    pub rules: Vec<RuleStatus>,
    pub last_evaluation: Option<SystemTime>,
    pub evaluation_time: Duration,
}

/// Every rule group, evaluated on its interval.
pub struct RuleEngine {
    groups: Vec<Mutex<GroupStatus>>,
    /// Firing alerts an Alertmanager posted to the webhook, by labels.
    external: Mutex<BTreeMap<BTreeMap<String, String>, Alert>>,
    /// Bumped after every group evaluation, for those that act on alerts.
    changed: watch::Sender<u64>,
    /// Where recording rules' results are stored; without it they are only
    /// counted.
    recorder: Option<RecordingWriter>,
}

impl RuleEngine {
    /// `default_interval` is for groups that name none (Prometheus's
    /// `evaluation_interval`).
    pub fn new(groups: Vec<RuleGroup>, default_interval: Duration) -> Self {
        let groups = groups
            .into_iter()
            .map(|g| {
                Mutex::new(GroupStatus {
                    interval: g.interval.unwrap_or(default_interval),
                    rules: g
                        .rules
                        .iter()
                        .map(|r| RuleStatus {
                            rule: r.clone(),
                            health: "unknown",
                            last_error: None,
                            last_evaluation: None,
                            evaluation_time: Duration::ZERO,
                            alerts: BTreeMap::new(),
                            recorded: 0,
                        })
                        .collect(),
                    group: g,
                    last_evaluation: None,
                    evaluation_time: Duration::ZERO,
                })
            })
            .collect();
        RuleEngine {
            groups,
            external: Mutex::new(BTreeMap::new()),
            changed: watch::channel(0).0,
            recorder: None,
        }
    }

    /// Stores recording rules' results with `writer`, so PromQL reads them
    /// by name.
    pub fn recording_to(mut self, writer: RecordingWriter) -> Self {
        self.recorder = Some(writer);
        self
    }

    /// A copy of every group's state.
    pub fn groups(&self) -> Vec<GroupStatus> {
        self.groups
            .iter()
            .map(|g| g.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// Every pending and firing alert, with its rule's name.
    pub fn alerts(&self) -> Vec<Alert> {
        self.groups()
            .into_iter()
            .flat_map(|g| g.rules)
            .flat_map(|r| r.alerts.into_values())
            .collect()
    }

    /// Firing alerts from an Alertmanager's webhook (not Lumen's own: they
    /// switch policies, they are not listed at `/api/v1/alerts`).
    pub fn external_alerts(&self) -> Vec<Alert> {
        self.external
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Takes an Alertmanager webhook's alerts: `firing` ones are kept,
    /// `resolved` ones dropped; decisions follow at once.
    pub fn receive(&self, alerts: Vec<Received>) {
        let now = SystemTime::now();
        let mut external = self.external.lock().unwrap_or_else(|p| p.into_inner());
        for Received {
            firing,
            labels,
            annotations,
        } in alerts
        {
            if firing {
                let a = external.entry(labels.clone()).or_insert_with(|| Alert {
                    labels,
                    annotations: BTreeMap::new(),
                    state: AlertState::Firing,
                    active_at: now,
                    fired_at: Some(now),
                    value: 1.0,
                    last_seen: now,
                });
                a.annotations = annotations;
                a.last_seen = now;
            } else {
                external.remove(&labels);
            }
        }
        drop(external);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Changes after every evaluation of any group.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Evaluates every group on its interval until `stop` turns true.
    pub fn run(
        self: Arc<Self>,
        engine: QueryEngine,
        stop: watch::Receiver<bool>,
    ) -> lumen_core::BoxFuture<'static, ()> {
        Box::pin(self.evaluate_until(engine, stop))
    }

    async fn evaluate_until(self: Arc<Self>, engine: QueryEngine, stop: watch::Receiver<bool>) {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..self.groups.len() {
            let (this, engine, mut stop) = (self.clone(), engine.clone(), stop.clone());
            tasks.spawn(async move {
                let interval = this.groups[i]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .interval;
                let mut tick = tokio::time::interval(interval);
                // A slow evaluation skips ticks rather than bunching them.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        _ = tick.tick() => this.evaluate_group(i, &engine).await,
                        () = stopped(&mut stop) => return,
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn evaluate_group(&self, i: usize, engine: &QueryEngine) {
        let (name, rules): (String, Vec<Rule>) = {
            let g = self.groups[i].lock().unwrap_or_else(|p| p.into_inner());
            (
                g.group.name.clone(),
                g.rules.iter().map(|r| r.rule.clone()).collect(),
            )
        };
        let started = Instant::now();
        let now = SystemTime::now();
        let mut results = Vec::with_capacity(rules.len());
        // The group's rules run at one instant: a selector several of them
        // read is read once.
        let cache = Arc::new(promql::SelectCache::default());
        for rule in &rules {
            let t0 = Instant::now();
            let query = PromQuery {
                expr: rule.expr.clone(),
                steps: Steps::instant(promql::eval::system_millis(&now)),
                lookback: promql::eval::DEFAULT_LOOKBACK,
                origin: format!("rule {name}/{}", rule.name),
                raw: false,
                cache: Some(cache.clone()),
            };
            let mut got = promql::evaluate(engine, query).await.and_then(samples);
            if let (Ok(samples), RuleKind::Record) = (&got, &rule.kind) {
                // Stored before the next rule runs: it may read this one.
                if let Err(e) = self.record(rule, now, samples).await {
                    got = Err(promql::PromError::Execution(e));
                }
                cache.forget(&rule.name);
            }
            results.push((got, t0.elapsed()));
        }
        let mut g = self.groups[i].lock().unwrap_or_else(|p| p.into_inner());
        for (status, (got, took)) in g.rules.iter_mut().zip(results) {
            status.last_evaluation = Some(now);
            status.evaluation_time = took;
            match got {
                Ok(samples) => {
                    status.health = "ok";
                    status.last_error = None;
                    update(status, samples, now);
                }
                // Shutting down: the query engine stopped first; nothing to say.
                Err(promql::PromError::Query(lumen_query::QueryError::Stopped(
                    lumen_query::guard::StopReason::Shutdown,
                ))) => continue,
                Err(e) => {
                    tracing::warn!(group = %name, rule = %status.rule.name, error = %e, "rule evaluation failed");
                    status.health = "err";
                    status.last_error = Some(e.to_string());
                }
            }
        }
        g.last_evaluation = Some(now);
        g.evaluation_time = started.elapsed();
        drop(g);
        self.changed.send_modify(|n| *n += 1);
    }
}

impl RuleEngine {
    /// Stores a recording rule's samples as Prometheus does: each series'
    /// labels without `__name__`, the rule's labels over them, named
    /// `record`; two series left with one label set is an error.
    async fn record(
        &self,
        rule: &Rule,
        now: SystemTime,
        samples: &[(Labels, f64)],
    ) -> Result<(), String> {
        let Some(writer) = &self.recorder else {
            return Ok(());
        };
        let mut out = Vec::with_capacity(samples.len());
        let mut seen = std::collections::HashSet::with_capacity(samples.len());
        for (series, value) in samples {
            let mut labels: BTreeMap<String, String> = series
                .iter()
                .filter(|(k, _)| k != METRIC_NAME)
                .cloned()
                .collect();
            for (k, v) in &rule.labels {
                labels.insert(k.clone(), v.clone());
            }
            let labels: Vec<(String, String)> = labels.into_iter().collect();
            if !seen.insert(labels.clone()) {
                return Err(
                    "vector contains metrics with the same labelset after applying rule labels"
                        .into(),
                );
            }
            out.push(RecordedSample {
                name: rule.name.clone(),
                labels,
                value: *value,
            });
        }
        // At the evaluation's millisecond, as PromQL reads time: a later
        // rule of the group, evaluated "at now", then includes it.
        let at = std::time::UNIX_EPOCH
            + Duration::from_millis(promql::eval::system_millis(&now).max(0) as u64);
        writer
            .write(at, out)
            .await
            .map_err(|e| format!("storing the recorded series: {e}"))
    }
}

pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// An instant result's series and values (a scalar is one series without
/// labels).
fn samples(v: Value) -> Result<Vec<(Labels, f64)>, promql::PromError> {
    match v {
        Value::Vector(series) => Ok(series
            .into_iter()
            .filter_map(|s| Some((s.labels, s.values.first().copied().flatten()?)))
            .collect()),
        Value::Scalar(v) => Ok(v.first().map(|x| (Vec::new(), *x)).into_iter().collect()),
        other => Err(promql::PromError::BadData(format!(
            "a rule's expression must give an instant vector or a scalar, not a {}",
            other.kind()
        ))),
    }
}

/// Moves a rule's alerts on by one evaluation's result, as Prometheus's
/// alerting rules do.
fn update(status: &mut RuleStatus, samples: Vec<(Labels, f64)>, now: SystemTime) {
    let RuleKind::Alert {
        for_,
        keep_firing_for,
        annotations,
    } = &status.rule.kind
    else {
        status.recorded = samples.len();
        return;
    };
    let mut seen = Vec::with_capacity(samples.len());
    for (series, value) in samples {
        let mut labels: BTreeMap<String, String> = series
            .into_iter()
            .filter(|(k, _)| k != METRIC_NAME)
            .collect();
        for (k, v) in &status.rule.labels {
            labels.insert(k.clone(), expand(v, &labels, value));
        }
        labels.insert("alertname".into(), status.rule.name.clone());
        let key: Vec<(String, String)> = labels.clone().into_iter().collect();
        let expanded = annotations
            .iter()
            .map(|(k, v)| (k.clone(), expand(v, &labels, value)))
            .collect();
        let alert = status.alerts.entry(key.clone()).or_insert_with(|| Alert {
            labels,
            annotations: BTreeMap::new(),
            state: AlertState::Pending,
            active_at: now,
            fired_at: None,
            value,
            last_seen: now,
        });
        alert.value = value;
        alert.last_seen = now;
        alert.annotations = expanded;
        if alert.state == AlertState::Pending
            && now.duration_since(alert.active_at).unwrap_or_default() >= *for_
        {
            alert.state = AlertState::Firing;
            alert.fired_at = Some(now);
        }
        seen.push(key);
    }
    // Gone from the result: a pending alert ends; a firing one ends once
    // `keep_firing_for` has passed since it was last seen.
    status.alerts.retain(|key, a| {
        seen.contains(key)
            || a.state == AlertState::Firing
                && now.duration_since(a.last_seen).unwrap_or_default() < *keep_firing_for
    });
}

/// Prometheus's most used template forms in labels and annotations:
/// `{{ $labels.name }}`, `{{ $value }}` (and `$labels.name` / `$value`
/// written without spaces). Anything else stays as written.
fn expand(template: &str, labels: &BTreeMap<String, String>, value: f64) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find("}}") else {
            rest = &rest[open..];
            break;
        };
        let inner = rest[open + 2..open + close].trim();
        let replaced = if inner == "$value" {
            Some(lumen_query::promql::value::format_number(value))
        } else {
            inner
                .strip_prefix("$labels.")
                .map(|name| labels.get(name).cloned().unwrap_or_default())
        };
        match replaced {
            Some(r) => out.push_str(&r),
            None => out.push_str(&rest[open..open + close + 2]),
        }
        rest = &rest[open + close + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(for_: u64, keep: u64) -> RuleStatus {
        RuleStatus {
            rule: Rule {
                kind: RuleKind::Alert {
                    for_: Duration::from_secs(for_),
                    keep_firing_for: Duration::from_secs(keep),
                    annotations: [(
                        "summary".to_string(),
                        "{{ $labels.service }} at {{ $value }}".to_string(),
                    )]
                    .into(),
                },
                name: "HighErrors".into(),
                expr: "x > 1".into(),
                labels: [("severity".to_string(), "page".to_string())].into(),
            },
            health: "unknown",
            last_error: None,
            last_evaluation: None,
            evaluation_time: Duration::ZERO,
            alerts: BTreeMap::new(),
            recorded: 0,
        }
    }

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    fn series(v: f64) -> Vec<(Labels, f64)> {
        vec![(
            vec![
                (METRIC_NAME.to_string(), "x".to_string()),
                ("service".to_string(), "ratings".to_string()),
            ],
            v,
        )]
    }

    #[test]
    fn an_alert_is_pending_for_its_for_then_fires_then_keeps_firing_then_ends() {
        let mut s = status(2, 3);
        update(&mut s, series(5.0), at(0));
        let a = s.alerts.values().next().unwrap();
        assert_eq!(a.state, AlertState::Pending);
        assert_eq!(a.labels["alertname"], "HighErrors");
        assert_eq!(a.labels["severity"], "page");
        assert!(!a.labels.contains_key(METRIC_NAME));
        assert_eq!(a.annotations["summary"], "ratings at 5");
        assert_eq!(s.state(), "pending");
        update(&mut s, series(6.0), at(1));
        assert_eq!(s.state(), "pending");
        update(&mut s, series(7.0), at(2));
        assert_eq!(s.state(), "firing");
        assert_eq!(s.alerts.values().next().unwrap().fired_at, Some(at(2)));
        // Gone, but kept firing for 3 s after it was last seen.
        update(&mut s, vec![], at(4));
        assert_eq!(s.state(), "firing");
        update(&mut s, vec![], at(5));
        assert_eq!(s.state(), "inactive");
        // A pending alert that goes away ends at once.
        update(&mut s, series(5.0), at(10));
        update(&mut s, vec![], at(11));
        assert!(s.alerts.is_empty());
    }

    #[test]
    fn without_for_an_alert_fires_at_once() {
        let mut s = status(0, 0);
        update(&mut s, series(5.0), at(0));
        assert_eq!(s.state(), "firing");
        update(&mut s, vec![], at(1));
        assert_eq!(s.state(), "inactive");
    }

    #[test]
    fn templates_expand_labels_and_value() {
        let labels: BTreeMap<String, String> = [("a".to_string(), "x".to_string())].into();
        assert_eq!(expand("{{$labels.a}}/{{ $value }}", &labels, 0.5), "x/0.5");
        assert_eq!(
            expand("{{ humanize $value }}", &labels, 1.0),
            "{{ humanize $value }}"
        );
        assert_eq!(expand("open {{ only", &labels, 1.0), "open {{ only");
    }
}
