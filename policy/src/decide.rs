//! Decisions: which conditional policies (`when: {alert: …}`) are on. After
//! every rule evaluation and every Alertmanager webhook, a policy whose
//! alert fires (by name, and labels
//! if it names any) is on; it stays on for its `cooldown` after the alert
//! stops, so a limit does not flap. The set goes to the control plane,
//! which streams it to every proxy at once.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use lumen_core::policy::RateLimit;
use tokio::sync::watch;

use crate::alerts::{Alert, AlertState, RuleEngine};

/// What is on now, given the firing alerts and when each policy's alert
/// was last seen firing.
pub fn active(
    limits: &[RateLimit],
    firing: &[Alert],
    last_seen: &mut HashMap<String, Instant>,
    now: Instant,
) -> BTreeSet<String> {
    let mut on = BTreeSet::new();
    for rl in limits {
        let Some(cond) = &rl.when else { continue };
        let id = rl.id();
        let fires = firing.iter().any(|a| {
            a.state == AlertState::Firing
                && a.labels.get("alertname") == Some(&cond.alert)
                && cond.labels.iter().all(|(k, v)| a.labels.get(k) == Some(v))
        });
        if fires {
            last_seen.insert(id.clone(), now);
        }
        let cooling = last_seen
            .get(&id)
            .is_some_and(|t| now.saturating_duration_since(*t) < cond.cooldown);
        if fires || cooling {
            on.insert(id);
        }
    }
    last_seen.retain(|id, _| limits.iter().any(|rl| rl.id() == *id));
    on
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

fn states(
    limits: &[RateLimit],
    on: &BTreeSet<String>,
    last_seen: &HashMap<String, Instant>,
    now: Instant,
) -> Vec<PolicyState> {
    limits
        .iter()
        .map(|rl| {
            let id = rl.id();
            let (is_on, why) = match &rl.when {
                None => (true, "always on".to_string()),
                Some(c) => {
                    let on = on.contains(&id);
                    let why = match last_seen.get(&id) {
                        Some(t) if *t == now => format!("alert {} fires", c.alert),
                        Some(t) if on => format!(
                            "alert {} stopped; cooldown ends in {}s",
                            c.alert,
                            c.cooldown
                                .saturating_sub(now.saturating_duration_since(*t))
                                .as_secs()
                        ),
                        _ => format!("alert {} is not firing", c.alert),
                    };
                    (on, why)
                }
            };
            PolicyState {
                policy: id,
                kind: "RateLimit",
                target: rl.service.clone(),
                on: is_on,
                dry_run: rl.dry_run,
                why,
            }
        })
        .collect()
}

/// Decides after every evaluation of `engine` (and every second, so new
/// policies show) until `stop`: `limits` gives the RateLimits in force,
/// `publish` takes the set that is on, `board` shows every policy's state.
pub async fn run(
    engine: Arc<RuleEngine>,
    board: Arc<Board>,
    limits: impl Fn() -> Vec<RateLimit> + Send + 'static,
    publish: impl Fn(BTreeSet<String>) + Send + 'static,
    mut stop: watch::Receiver<bool>,
) {
    let mut evaluated = engine.subscribe();
    let mut last_seen = HashMap::new();
    let mut was = BTreeSet::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            changed = evaluated.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
            () = crate::alerts::stopped(&mut stop) => return,
        }
        let mut firing = engine.alerts();
        firing.extend(engine.external_alerts());
        let limits = limits();
        let now = Instant::now();
        let now_on = active(&limits, &firing, &mut last_seen, now);
        board.set(states(&limits, &now_on, &last_seen, now));
        for id in now_on.difference(&was) {
            tracing::info!(policy = %id, "policy on: its alert fires");
        }
        for id in was.difference(&now_on) {
            tracing::info!(policy = %id, "policy off: its alert stopped and the cooldown passed");
        }
        if now_on != was {
            publish(now_on.clone());
            was = now_on;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_core::policy::{Condition, LimitKey};
    use std::collections::BTreeMap;
    use std::time::{Duration, SystemTime};

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
            when: Some(Condition {
                alert: alert.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                cooldown: Duration::from_secs(10),
            }),
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

    #[test]
    fn a_policy_is_on_while_its_alert_fires_and_for_its_cooldown() {
        let limits = vec![
            limit("any", "Failing", &[]),
            limit("ratings-only", "Failing", &[("service", "ratings")]),
            limit("other", "Slow", &[]),
        ];
        let mut seen = HashMap::new();
        let t = Instant::now();
        let on = active(
            &limits,
            &[firing("Failing", &[("service", "reviews")])],
            &mut seen,
            t,
        );
        assert_eq!(on, BTreeSet::from(["default/any".to_string()]));
        let on = active(
            &limits,
            &[firing("Failing", &[("service", "ratings")])],
            &mut seen,
            t,
        );
        assert_eq!(
            on,
            BTreeSet::from([
                "default/any".to_string(),
                "default/ratings-only".to_string()
            ])
        );
        // Stopped: on through the cooldown, then off.
        let on = active(&limits, &[], &mut seen, t + Duration::from_secs(9));
        assert_eq!(on.len(), 2);
        let on = active(&limits, &[], &mut seen, t + Duration::from_secs(10));
        assert!(on.is_empty());
    }
}
