//! Prometheus rule files, in Prometheus's own format (`groups:` of
//! `rules:` with `alert` or `record`, `expr`, `for`, `keep_firing_for`,
//! `labels`, `annotations`), read and validated the way `promtool check
//! rules` does: a file that Prometheus takes, Lumen takes; one it refuses,
//! Lumen refuses naming the file, group, rule and reason.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// A rule file Lumen will not run, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: {place}{reason}")]
pub struct RuleError {
    pub file: String,
    /// `group "name", rule N ("alert"): ` — empty for the file itself.
    pub place: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuleGroup {
    pub name: String,
    pub file: String,
    /// How often the group is evaluated; the engine's default when the
    /// file does not say.
    pub interval: Option<Duration>,
    pub limit: usize,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub kind: RuleKind,
    /// The alert's name, or the recorded series' name.
    pub name: String,
    pub expr: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RuleKind {
    Alert {
        for_: Duration,
        keep_firing_for: Duration,
        annotations: BTreeMap<String, String>,
    },
    Record,
}

// ---- Prometheus's schema, field for field ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default)]
    groups: Vec<GroupSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupSpec {
    name: String,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    query_offset: Option<String>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    #[serde(default)]
    alert: Option<String>,
    #[serde(default)]
    record: Option<String>,
    expr: Option<serde_yaml_ng::Value>,
    #[serde(default, rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    keep_firing_for: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn duration(s: &str) -> Result<Duration, String> {
    promql_parser::util::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration (like 30s, 5m, 1h30m): {e}"))
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Reads and validates one rule file.
/// The rules Lumen ships (`policy/rules/mesh.rules.yaml`): error rate,
/// p99 and request rate per service over Istio's metrics.
pub const SHIPPED: &str = include_str!("../rules/mesh.rules.yaml");

pub fn load(path: &Path) -> Result<Vec<RuleGroup>, RuleError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| RuleError {
        file: file.clone(),
        place: String::new(),
        reason: format!("cannot read: {e}"),
    })?;
    parse(&file, &text)
}

/// Validates the rule file `text`, named `file` in errors.
pub fn parse(file: &str, text: &str) -> Result<Vec<RuleGroup>, RuleError> {
    let err = |place: String, reason: String| RuleError {
        file: file.to_string(),
        place,
        reason,
    };
    // serde_yaml_ng names the field path and the line itself.
    let spec: FileSpec =
        serde_yaml_ng::from_str(text).map_err(|e| err(String::new(), e.to_string()))?;
    let mut groups: Vec<RuleGroup> = Vec::new();
    for g in spec.groups {
        let at = format!("group {:?}: ", g.name);
        if g.name.is_empty() {
            return Err(err(String::new(), "a group has no name".into()));
        }
        if groups.iter().any(|x| x.name == g.name) {
            return Err(err(
                at,
                "a group of this name is already in the file".into(),
            ));
        }
        if g.query_offset.is_some() {
            return Err(err(at, "`query_offset` is not supported by Lumen".into()));
        }
        let interval = match g.interval.as_deref() {
            None => None,
            Some(s) => {
                let d = duration(s).map_err(|r| err(at.clone(), format!("interval: {r}")))?;
                if d.is_zero() {
                    return Err(err(at, "interval: must be more than 0".into()));
                }
                Some(d)
            }
        };
        let mut rules = Vec::with_capacity(g.rules.len());
        for (i, r) in g.rules.into_iter().enumerate() {
            let title = r.alert.as_deref().or(r.record.as_deref()).unwrap_or("");
            let at = format!("group {:?}, rule {} ({title:?}): ", g.name, i + 1);
            rules.push(rule(r).map_err(|reason| err(at, reason))?);
        }
        groups.push(RuleGroup {
            name: g.name,
            file: file.to_string(),
            interval,
            limit: g.limit.unwrap_or(0),
            rules,
        });
    }
    Ok(groups)
}

fn rule(r: RuleSpec) -> Result<Rule, String> {
    let (name, is_alert) = match (r.alert, r.record) {
        (Some(a), None) => (a, true),
        (None, Some(rec)) => (rec, false),
        (Some(_), Some(_)) => return Err("has both `alert` and `record`; one only".into()),
        (None, None) => return Err("has neither `alert` nor `record`".into()),
    };
    if name.trim().is_empty() {
        return Err("the name is empty".into());
    }
    if !is_alert && !is_metric_name(&name) {
        return Err(format!("`{name}` is not a valid metric name to record"));
    }
    let expr = match r.expr {
        Some(serde_yaml_ng::Value::String(s)) => s,
        Some(serde_yaml_ng::Value::Number(n)) => n.to_string(),
        Some(_) => return Err("expr: must be a PromQL expression".into()),
        None => return Err("has no `expr`".into()),
    };
    if expr.trim().is_empty() {
        return Err("expr: is empty".into());
    }
    lumen_query::promql::parse(&expr).map_err(|e| format!("expr: {e}"))?;
    for k in r.labels.keys() {
        if !is_label_name(k) {
            return Err(format!("labels: `{k}` is not a valid label name"));
        }
    }
    let kind = if is_alert {
        for k in r.annotations.keys() {
            if !is_label_name(k) {
                return Err(format!("annotations: `{k}` is not a valid annotation name"));
            }
        }
        RuleKind::Alert {
            for_: match r.for_.as_deref() {
                Some(s) => duration(s).map_err(|e| format!("for: {e}"))?,
                None => Duration::ZERO,
            },
            keep_firing_for: match r.keep_firing_for.as_deref() {
                Some(s) => duration(s).map_err(|e| format!("keep_firing_for: {e}"))?,
                None => Duration::ZERO,
            },
            annotations: r.annotations,
        }
    } else {
        for (field, set) in [
            ("for", r.for_.is_some()),
            ("keep_firing_for", r.keep_firing_for.is_some()),
            ("annotations", !r.annotations.is_empty()),
        ] {
            if set {
                return Err(format!(
                    "`{field}` is for alerting rules, not recording rules"
                ));
            }
        }
        RuleKind::Record
    };
    Ok(Rule {
        kind,
        name,
        expr,
        labels: r.labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
groups:
- name: mesh
  interval: 1s
  rules:
  - alert: HighErrorRate
    expr: sum by (destination_service) (rate(istio_requests_total{response_code=~"5.."}[10s])) > 0.1
    for: 2s
    keep_firing_for: 5s
    labels: {severity: page}
    annotations: {summary: "{{ $labels.destination_service }} fails"}
  - record: service:istio_requests:rate10s
    expr: sum by (destination_service) (rate(istio_requests_total[10s]))
- name: other
  rules:
  - alert: Always
    expr: vector(1)
"#;

    #[test]
    fn prometheus_rule_files_load() {
        let groups = parse("r.yaml", GOOD).unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].interval, Some(Duration::from_secs(1)));
        assert_eq!(groups[1].interval, None);
        let alert = &groups[0].rules[0];
        assert_eq!(alert.name, "HighErrorRate");
        assert_eq!(
            alert.kind,
            RuleKind::Alert {
                for_: Duration::from_secs(2),
                keep_firing_for: Duration::from_secs(5),
                annotations: [(
                    "summary".to_string(),
                    "{{ $labels.destination_service }} fails".to_string()
                )]
                .into()
            }
        );
        assert_eq!(groups[0].rules[1].kind, RuleKind::Record);
    }

    #[test]
    fn bad_rules_are_refused_naming_file_group_rule_and_reason() {
        let cases = [
            (
                "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: 'sum(rate(x[5m]'\n",
                "r.yaml: group \"g\", rule 1 (\"A\"): expr: ",
            ),
            (
                "groups:\n- name: g\n  rules:\n  - alert: A\n    record: b\n    expr: up\n",
                "r.yaml: group \"g\", rule 1 (\"A\"): has both `alert` and `record`; one only",
            ),
            (
                "groups:\n- name: g\n  rules:\n  - record: not-a-name\n    expr: up\n",
                "r.yaml: group \"g\", rule 1 (\"not-a-name\"): `not-a-name` is not a valid metric name to record",
            ),
            (
                "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up\n    for: soon\n",
                "r.yaml: group \"g\", rule 1 (\"A\"): for: `soon` is not a duration",
            ),
            (
                "groups:\n- name: g\n  rules:\n  - record: a\n    expr: up\n    for: 1m\n",
                "r.yaml: group \"g\", rule 1 (\"a\"): `for` is for alerting rules, not recording rules",
            ),
            (
                "groups:\n- name: g\n  rules: []\n- name: g\n  rules: []\n",
                "r.yaml: group \"g\": a group of this name is already in the file",
            ),
            (
                "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up\n    severity: page\n",
                "r.yaml: groups[0].rules[0]: unknown field `severity`",
            ),
        ];
        for (text, want) in cases {
            let e = parse("r.yaml", text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{text}\n got: {e}\nwant: {want}");
        }
    }
}
