//! An `AccessPolicy` as the decisions in force make it: it denies the
//! sources it lists (or every source but them), or — switched on by an
//! alert — the sources the alert named. Calling sidecars compile it into
//! their routing table (a request checks a short list of names and
//! allocates nothing); Lumen's ext_authz service compiles it per check.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use crate::policy::{AccessAction, AccessPolicy, FailMode, SourceMatch};

#[derive(Debug)]
pub struct AccessRule {
    /// `namespace/name`, for the row, the header and logs.
    pub id: Arc<str>,
    action: AccessAction,
    listed: Vec<SourceMatch>,
    /// `(namespace, workload)` the alerts named.
    named: HashSet<(String, String)>,
}

impl AccessRule {
    /// The rule for `ap` as the decisions in force (`active`, and whether
    /// they are `stale`) have it, if it is on.
    pub fn compile(
        ap: &AccessPolicy,
        active: &BTreeSet<String>,
        stale: bool,
    ) -> Option<AccessRule> {
        let id = ap.id();
        let decided = |entry: &str| {
            if stale {
                ap.fail_mode == FailMode::Closed
            } else {
                active.contains(entry)
            }
        };
        let mut named = HashSet::new();
        if ap.when.is_some() {
            if ap.sources_from_alert() {
                // Stale and failing closed: the sources last named stay denied.
                if stale && ap.fail_mode == FailMode::Open {
                    return None;
                }
                let prefix = format!("{id}#");
                for entry in active.range(prefix.clone()..) {
                    let Some(source) = entry.strip_prefix(&prefix) else {
                        break;
                    };
                    if let Some((ns, wl)) = source.split_once('/') {
                        named.insert((ns.to_string(), wl.to_string()));
                    }
                }
                if named.is_empty() {
                    return None;
                }
            } else if !decided(&id) {
                return None;
            }
        }
        Some(AccessRule {
            id: id.into(),
            action: ap.action,
            listed: ap.sources.clone(),
            named,
        })
    }

    /// Whether a call from this workload is refused.
    pub fn denies(&self, namespace: &str, workload: &str) -> bool {
        let listed = self.listed.iter().any(|s| s.matches(namespace, workload));
        match self.action {
            AccessAction::AllowOnly => !listed,
            AccessAction::Deny if self.listed.is_empty() => self
                .named
                .iter()
                .any(|(ns, wl)| ns == namespace && wl == workload),
            AccessAction::Deny => listed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Condition;
    use std::time::Duration;

    fn policy(action: AccessAction, sources: &[(&str, &str)], when: bool) -> AccessPolicy {
        AccessPolicy {
            name: "ap".into(),
            namespace: "default".into(),
            service: "ratings".into(),
            action,
            sources: sources
                .iter()
                .map(|(ns, wl)| SourceMatch {
                    namespace: Some(ns.to_string()),
                    workload: Some(wl.to_string()),
                })
                .collect(),
            when: when.then(|| Condition {
                alert: "Noisy".into(),
                labels: Default::default(),
                cooldown: Duration::from_secs(30),
            }),
            ttl: None,
            fail_mode: FailMode::Closed,
        }
    }

    #[test]
    fn listed_denied_allow_only_and_alert_named_sources() {
        let none = BTreeSet::new();
        let deny = AccessRule::compile(
            &policy(AccessAction::Deny, &[("default", "reviews-v2")], false),
            &none,
            false,
        )
        .unwrap();
        assert!(deny.denies("default", "reviews-v2"));
        assert!(!deny.denies("default", "reviews-v1"));
        let allow = AccessRule::compile(
            &policy(AccessAction::AllowOnly, &[("default", "reviews-v1")], false),
            &none,
            false,
        )
        .unwrap();
        assert!(allow.denies("default", "reviews-v2"));
        assert!(!allow.denies("default", "reviews-v1"));

        let from_alert = policy(AccessAction::Deny, &[], true);
        assert!(
            AccessRule::compile(&from_alert, &none, false).is_none(),
            "no decision: off"
        );
        let decided = BTreeSet::from(["default/ap#default/reviews-v2".to_string()]);
        let rule = AccessRule::compile(&from_alert, &decided, false).unwrap();
        assert!(rule.denies("default", "reviews-v2"));
        assert!(!rule.denies("default", "productpage-v1"));
        // Stale: failing closed keeps the last sources; open lifts them.
        assert!(AccessRule::compile(&from_alert, &decided, true).is_some());
        let open = AccessPolicy {
            fail_mode: FailMode::Open,
            ..from_alert
        };
        assert!(AccessRule::compile(&open, &decided, true).is_none());
    }
}
