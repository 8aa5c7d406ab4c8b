//! Decisions: which conditional policies (`when: {alert: …}`) are on. After
//! every rule evaluation and every Alertmanager webhook (and every second),
//! a policy whose alert fires (by name, and labels if it names any) is on;
//! it stays on for its `cooldown` after the alert stops, so a limit does
//! not flap, and never longer than its `ttl` in one episode. An
//! AccessPolicy without listed sources is on per source the firing alerts
//! name. The set goes to the control plane, which streams it to every
//! proxy at once; every change of an alert or a decision becomes a
//! `policy_events` row saying why.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use lumen_core::policy::{AccessPolicy, Condition, RateLimit, source_decision};
use lumen_core::schema::PolicyEvent;
use tokio::sync::watch;

use crate::alerts::{Alert, AlertState, RuleEngine};

/// The policies decisions are about, as the configuration has them now.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    pub rate_limits: Vec<RateLimit>,
    pub access: Vec<AccessPolicy>,
}

/// A conditional policy as decisions see it.
struct Conditional<'a> {
    kind: &'static str,
    id: String,
    service: &'a str,
    when: &'a Condition,
    ttl: Option<Duration>,
    /// On per source the alert names, not as a whole.
    per_source: bool,
}

impl Policies {
    /// The policies of a mesh configuration.
    pub fn of(mesh: &lumen_core::MeshConfig) -> Self {
        Policies {
            rate_limits: mesh.rate_limits.clone(),
            access: mesh.access_policies.clone(),
        }
    }

    fn conditional(&self) -> Vec<Conditional<'_>> {
        let limits = self.rate_limits.iter().filter_map(|rl| {
            Some(Conditional {
                kind: "RateLimit",
                id: rl.id(),
                service: &rl.service,
                when: rl.when.as_ref()?,
                ttl: None,
                per_source: false,
            })
        });
        let access = self.access.iter().filter_map(|ap| {
            Some(Conditional {
                kind: "AccessPolicy",
                id: ap.id(),
                service: &ap.service,
                when: ap.when.as_ref()?,
                ttl: ap.ttl,
                per_source: ap.sources_from_alert(),
            })
        });
        limits.chain(access).collect()
    }
}

/// `{a="b", …}`: an alert's labels (without its name) as Prometheus shows
/// a series.
pub fn label_text(labels: &BTreeMap<String, String>) -> String {
    let inner: Vec<String> = labels
        .iter()
        .filter(|(k, _)| k.as_str() != "alertname")
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect();
    format!("{{{}}}", inner.join(", "))
}

fn alert_name(a: &Alert) -> &str {
    a.labels.get("alertname").map_or("", String::as_str)
}

/// The source an alert names, `(namespace, workload)`, by Istio's labels.
fn named_source(a: &Alert) -> Option<(&str, &str)> {
    let workload = a.labels.get("source_workload")?;
    let namespace = a
        .labels
        .get("source_workload_namespace")
        .map_or("default", String::as_str);
    (!workload.is_empty() && workload != "unknown").then_some((namespace, workload))
}

/// One decision entry's episode: on since, and whether its TTL ran out.
#[derive(Debug, Clone, Copy)]
struct Episode {
    since: Instant,
    expired: bool,
}

/// Why an entry holds now: the alert that fires for it.
#[derive(Debug, Clone)]
struct Cause {
    alert: String,
    labels: String,
    value: f64,
}

/// Decisions over time: remembers when each entry's condition last held
/// and each episode began.
#[derive(Debug, Default)]
pub struct Decider {
    last_seen: HashMap<String, Instant>,
    episodes: HashMap<String, Episode>,
    causes: HashMap<String, Cause>,
    on: BTreeSet<String>,
    alerts: BTreeMap<(String, String), (AlertState, f64)>,
}

/// What one decision changed.
#[derive(Debug, Default)]
pub struct Decision {
    pub on: BTreeSet<String>,
    pub changed: bool,
    pub events: Vec<PolicyEvent>,
}

impl Decider {
    /// Decides what is on at `now` given the alerts (firing and pending).
    pub fn decide(&mut self, policies: &Policies, alerts: &[Alert], now: Instant) -> Decision {
        let wall = SystemTime::now();
        let mut events = self.alert_events(alerts, wall);
        let mut on = BTreeSet::new();
        let mut why_off: HashMap<String, String> = HashMap::new();
        let conditional = policies.conditional();
        for c in &conditional {
            let firing = alerts.iter().filter(|a| {
                a.state == AlertState::Firing
                    && alert_name(a) == c.when.alert
                    && c.when
                        .labels
                        .iter()
                        .all(|(k, v)| a.labels.get(k) == Some(v))
            });
            let mut holding = BTreeSet::new();
            for a in firing {
                let entry = if c.per_source {
                    match named_source(a) {
                        Some((ns, wl)) => source_decision(&c.id, ns, wl),
                        None => continue,
                    }
                } else {
                    c.id.clone()
                };
                self.last_seen.insert(entry.clone(), now);
                self.causes.insert(
                    entry.clone(),
                    Cause {
                        alert: c.when.alert.clone(),
                        labels: label_text(&a.labels),
                        value: a.value,
                    },
                );
                holding.insert(entry);
            }
            let prefix = format!("{}#", c.id);
            let mine: Vec<String> = self
                .last_seen
                .keys()
                .filter(|e| **e == c.id || e.starts_with(&prefix))
                .cloned()
                .collect();
            for entry in mine {
                let seen = self.last_seen[&entry];
                let cooling = now.saturating_duration_since(seen) < c.when.cooldown;
                if !(holding.contains(&entry) || cooling) {
                    self.last_seen.remove(&entry);
                    self.episodes.remove(&entry);
                    why_off.insert(
                        entry,
                        format!(
                            "alert {} stopped; cooldown {} passed",
                            c.when.alert,
                            humantime::format_duration(c.when.cooldown)
                        ),
                    );
                    continue;
                }
                let episode = self.episodes.entry(entry.clone()).or_insert(Episode {
                    since: now,
                    expired: false,
                });
                if let Some(ttl) = c.ttl
                    && now.saturating_duration_since(episode.since) >= ttl
                    && !episode.expired
                {
                    episode.expired = true;
                    why_off.insert(
                        entry.clone(),
                        format!(
                            "ttl {} reached; on again once alert {} stops and fires again",
                            humantime::format_duration(ttl),
                            c.when.alert
                        ),
                    );
                }
                if episode.expired {
                    if !holding.contains(&entry) {
                        // Stopped: the next firing is a new episode.
                        self.last_seen.remove(&entry);
                        self.episodes.remove(&entry);
                    }
                    continue;
                }
                on.insert(entry);
            }
        }
        let known: BTreeSet<&str> = conditional.iter().map(|c| c.id.as_str()).collect();
        let policy_of = |entry: &str| entry.split('#').next().unwrap_or(entry).to_string();
        self.last_seen
            .retain(|e, _| known.contains(policy_of(e).as_str()));
        self.episodes
            .retain(|e, _| known.contains(policy_of(e).as_str()));

        for entry in on.difference(&self.on) {
            let c = conditional.iter().find(|c| c.id == policy_of(entry));
            let cause = self.causes.get(entry);
            events.push(PolicyEvent {
                time: wall,
                kind: c.map_or("policy", |c| c.kind).to_string(),
                name: policy_of(entry),
                target: target_text(c.map_or("", |c| c.service), entry),
                old_state: "off".into(),
                new_state: "on".into(),
                value: cause.map(|c| c.value),
                reason: cause.map_or_else(
                    || "its alert fires".to_string(),
                    |c| format!("alert {}{} fires", c.alert, c.labels),
                ),
            });
            tracing::info!(policy = %entry, "policy on: its alert fires");
        }
        for entry in self.on.difference(&on) {
            let c = conditional.iter().find(|c| c.id == policy_of(entry));
            let reason = why_off
                .remove(entry)
                .unwrap_or_else(|| "the policy changed or was removed".to_string());
            events.push(PolicyEvent {
                time: wall,
                kind: c.map_or("policy", |c| c.kind).to_string(),
                name: policy_of(entry),
                target: target_text(c.map_or("", |c| c.service), entry),
                old_state: "on".into(),
                new_state: "off".into(),
                value: None,
                reason: reason.clone(),
            });
            tracing::info!(policy = %entry, %reason, "policy off");
        }
        self.causes.retain(|e, _| on.contains(e));
        let changed = on != self.on;
        self.on = on.clone();
        Decision {
            on,
            changed,
            events,
        }
    }

    /// Alerts that appeared, changed state or went away since the last
    /// decision.
    fn alert_events(&mut self, alerts: &[Alert], wall: SystemTime) -> Vec<PolicyEvent> {
        let mut now: BTreeMap<(String, String), (AlertState, f64, Option<String>)> =
            BTreeMap::new();
        for a in alerts {
            let summary = a
                .annotations
                .get("summary")
                .or_else(|| a.annotations.get("description"))
                .cloned();
            now.insert(
                (alert_name(a).to_string(), label_text(&a.labels)),
                (a.state, a.value, summary),
            );
        }
        let mut events = Vec::new();
        for ((name, labels), (state, value, summary)) in &now {
            let old = self.alerts.get(&(name.clone(), labels.clone()));
            if old.map(|o| o.0) == Some(*state) {
                continue;
            }
            events.push(PolicyEvent {
                time: wall,
                kind: "alert".into(),
                name: name.clone(),
                target: labels.clone(),
                old_state: old.map_or("inactive", |o| o.0.as_str()).into(),
                new_state: state.as_str().into(),
                value: Some(*value),
                reason: summary.clone().unwrap_or_else(|| match state {
                    AlertState::Pending => "its expression holds; waiting for `for`".into(),
                    AlertState::Firing => "its expression held for `for`".into(),
                }),
            });
        }
        for ((name, labels), (state, value)) in &self.alerts {
            if !now.contains_key(&(name.clone(), labels.clone())) {
                events.push(PolicyEvent {
                    time: wall,
                    kind: "alert".into(),
                    name: name.clone(),
                    target: labels.clone(),
                    old_state: state.as_str().into(),
                    new_state: "inactive".into(),
                    value: Some(*value),
                    reason: "resolved: its expression no longer holds".into(),
                });
            }
        }
        self.alerts = now.into_iter().map(|(k, (s, v, _))| (k, (s, v))).collect();
        events
    }

    fn states(&self, policies: &Policies, now: Instant) -> Vec<PolicyState> {
        let mut out = Vec::new();
        let why = |id: &str, when: &Condition| -> (bool, String) {
            let prefix = format!("{id}#");
            let mine: Vec<&String> = self
                .on
                .iter()
                .filter(|e| *e == id || e.starts_with(&prefix))
                .collect();
            if mine.is_empty() {
                return (false, format!("alert {} is not firing", when.alert));
            }
            let parts: Vec<String> = mine
                .iter()
                .map(|e| {
                    let who = e
                        .split_once('#')
                        .map_or(String::new(), |(_, s)| format!("{s}: "));
                    match self.last_seen.get(*e) {
                        Some(t) if *t == now => format!("{who}alert {} fires", when.alert),
                        Some(t) => format!(
                            "{who}alert {} stopped; cooldown ends in {}s",
                            when.alert,
                            when.cooldown
                                .saturating_sub(now.saturating_duration_since(*t))
                                .as_secs()
                        ),
                        None => format!("{who}on"),
                    }
                })
                .collect();
            (true, parts.join("; "))
        };
        for rl in &policies.rate_limits {
            let id = rl.id();
            let (on, why) = match &rl.when {
                None => (true, "always on".to_string()),
                Some(c) => why(&id, c),
            };
            out.push(PolicyState {
                policy: id,
                kind: "RateLimit",
                target: rl.service.clone(),
                on,
                dry_run: rl.dry_run,
                why,
            });
        }
        for ap in &policies.access {
            let id = ap.id();
            let (on, why) = match &ap.when {
                None => (true, "always on".to_string()),
                Some(c) => why(&id, c),
            };
            out.push(PolicyState {
                policy: id,
                kind: "AccessPolicy",
                target: ap.service.clone(),
                on,
                dry_run: false,
                why,
            });
        }
        out
    }
}

/// The target of an entry: the service, and the source it is about.
fn target_text(service: &str, entry: &str) -> String {
    match entry.split_once('#') {
        Some((_, source)) => format!("{service} from {source}"),
        None => service.to_string(),
    }
}

/// One policy as `lumen policy status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PolicyState {
    /// `namespace/name`.
    pub policy: String,
    pub kind: &'static str,
    pub target: String,
    /// Whether proxies enforce it now.
    pub on: bool,
    pub dry_run: bool,
    /// Why it is on or off.
    pub why: String,
}

/// What every policy is doing, as of the last decision.
#[derive(Debug, Default)]
pub struct Board(std::sync::Mutex<Vec<PolicyState>>);

impl Board {
    pub fn get(&self) -> Vec<PolicyState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, states: Vec<PolicyState>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = states;
    }
}

/// Decides after every evaluation of `engine` (and every second, so new
/// policies show and cooldowns end on time) until `stop`: `policies` gives
/// the policies in force, `publish` takes the set that is on, `record`
/// the events of each decision, `board` shows every policy's state.
pub fn run(
    engine: Arc<RuleEngine>,
    board: Arc<Board>,
    policies: impl Fn() -> Policies + Send + 'static,
    publish: impl Fn(BTreeSet<String>) + Send + 'static,
    record: impl Fn(Vec<PolicyEvent>) + Send + 'static,
    stop: watch::Receiver<bool>,
) -> lumen_core::BoxFuture<'static, ()> {
    run_boxed(
        engine,
        board,
        Box::new(policies),
        Box::new(publish),
        Box::new(record),
        stop,
    )
}

/// A callback of `decide::run`, boxed so its loop is compiled once, here.
type Hook<A> = Box<dyn Fn(A) + Send>;

// Not generic, so the state machine it boxes is compiled here, once
// (see `lumen_core::BoxFuture`).
fn run_boxed(
    engine: Arc<RuleEngine>,
    board: Arc<Board>,
    policies: Box<dyn Fn() -> Policies + Send>,
    publish: Hook<BTreeSet<String>>,
    record: Hook<Vec<PolicyEvent>>,
    stop: watch::Receiver<bool>,
) -> lumen_core::BoxFuture<'static, ()> {
    Box::pin(decide_until(engine, board, policies, publish, record, stop))
}

async fn decide_until(
    engine: Arc<RuleEngine>,
    board: Arc<Board>,
    policies: Box<dyn Fn() -> Policies + Send>,
    publish: Hook<BTreeSet<String>>,
    record: Hook<Vec<PolicyEvent>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut evaluated = engine.subscribe();
    let mut decider = Decider::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            changed = evaluated.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
            () = crate::alerts::stopped(&mut stop) => return,
        }
        let mut alerts = engine.alerts();
        alerts.extend(engine.external_alerts());
        let policies = policies();
        let now = Instant::now();
        let decision = decider.decide(&policies, &alerts, now);
        board.set(decider.states(&policies, now));
        if decision.changed {
            publish(decision.on);
        }
        if !decision.events.is_empty() {
            record(decision.events);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_core::policy::{AccessAction, FailMode, LimitKey};

    fn when(alert: &str, labels: &[(&str, &str)]) -> Option<Condition> {
        Some(Condition {
            alert: alert.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cooldown: Duration::from_secs(10),
        })
    }

    fn limit(name: &str, alert: &str, labels: &[(&str, &str)]) -> RateLimit {
        RateLimit {
            name: name.into(),
            namespace: "default".into(),
            service: "ratings".into(),
            method: None,
            path: None,
            key: LimitKey::Global,
            requests_per_second: 1.0,
            burst: 1,
            dry_run: false,
            when: when(alert, labels),
            fail_mode: FailMode::Open,
            envoy: None,
        }
    }

    fn firing(name: &str, labels: &[(&str, &str)]) -> Alert {
        let mut l: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.insert("alertname".into(), name.into());
        Alert::firing_for_test(l, SystemTime::now())
    }

    fn limits(list: Vec<RateLimit>) -> Policies {
        Policies {
            rate_limits: list,
            access: Vec::new(),
        }
    }

    #[test]
    fn a_policy_is_on_while_its_alert_fires_and_for_its_cooldown() {
        let p = limits(vec![
            limit("any", "Failing", &[]),
            limit("ratings-only", "Failing", &[("service", "ratings")]),
            limit("other", "Slow", &[]),
        ]);
        let mut d = Decider::default();
        let t = Instant::now();
        let first = d.decide(&p, &[firing("Failing", &[("service", "reviews")])], t);
        assert_eq!(first.on, BTreeSet::from(["default/any".to_string()]));
        let on_event = first.events.iter().find(|e| e.kind == "RateLimit").unwrap();
        assert_eq!(
            (on_event.name.as_str(), on_event.new_state.as_str()),
            ("default/any", "on")
        );
        assert!(
            on_event.reason.contains("Failing{service=\"reviews\"}"),
            "{on_event:?}"
        );
        assert!(
            first
                .events
                .iter()
                .any(|e| e.kind == "alert" && e.old_state == "inactive" && e.new_state == "firing")
        );
        let on = d
            .decide(&p, &[firing("Failing", &[("service", "ratings")])], t)
            .on;
        assert_eq!(
            on,
            BTreeSet::from([
                "default/any".to_string(),
                "default/ratings-only".to_string()
            ])
        );
        // Stopped: on through the cooldown, then off, saying why.
        let cooling = d.decide(&p, &[], t + Duration::from_secs(9));
        assert_eq!(cooling.on.len(), 2);
        assert!(cooling.events.iter().any(|e| e.new_state == "inactive"));
        let off = d.decide(&p, &[], t + Duration::from_secs(10));
        assert!(off.on.is_empty());
        let reasons: Vec<&str> = off.events.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons.iter().all(|r| r.contains("cooldown 10s passed")));
    }

    #[test]
    fn an_access_policy_denies_the_sources_its_alert_names_until_its_ttl() {
        let p = Policies {
            rate_limits: Vec::new(),
            access: vec![AccessPolicy {
                name: "block-noisy".into(),
                namespace: "default".into(),
                service: "ratings".into(),
                action: AccessAction::Deny,
                sources: Vec::new(),
                when: when("NoisyCaller", &[]),
                ttl: Some(Duration::from_secs(60)),
                fail_mode: FailMode::Closed,
            }],
        };
        let noisy = firing(
            "NoisyCaller",
            &[
                ("source_workload", "reviews-v2"),
                ("source_workload_namespace", "default"),
            ],
        );
        let mut d = Decider::default();
        let t = Instant::now();
        let on = d.decide(&p, std::slice::from_ref(&noisy), t).on;
        assert_eq!(
            on,
            BTreeSet::from(["default/block-noisy#default/reviews-v2".to_string()])
        );
        // Still firing past the TTL: lifted, and stays lifted while it fires.
        let lifted = d.decide(
            &p,
            std::slice::from_ref(&noisy),
            t + Duration::from_secs(60),
        );
        assert!(lifted.on.is_empty());
        assert!(lifted.events.iter().any(|e| e.reason.contains("ttl 1m")));
        assert!(
            d.decide(
                &p,
                std::slice::from_ref(&noisy),
                t + Duration::from_secs(61)
            )
            .on
            .is_empty()
        );
        // Stops, then fires again: a new episode.
        assert!(d.decide(&p, &[], t + Duration::from_secs(62)).on.is_empty());
        let again = d.decide(&p, &[noisy], t + Duration::from_secs(63)).on;
        assert_eq!(again.len(), 1);
    }
}
