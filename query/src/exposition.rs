//! `/metrics`: Istio's standard metrics (from rollups) and the query
//! service's own, in Prometheus's text format or, when `Accept` asks for
//! it, OpenMetrics — so a real Prometheus can scrape Lumen.

use std::fmt::Write;

use crate::engine::QueryEngine;
use crate::promql::PromError;
use crate::promql::istio::{Exposed, IstioSource};
use crate::promql::value::{Labels, format_number};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// Prometheus text format 0.0.4.
    Text,
    OpenMetrics,
}

impl Exposition {
    /// OpenMetrics when the scraper lists it in `Accept` (Prometheus does).
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Exposition::OpenMetrics,
            _ => Exposition::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::Text => "text/plain; version=0.0.4; charset=utf-8",
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Renders every metric; `own` is the query service's registry, in the
/// OpenMetrics text `prometheus-client` writes.
pub fn render(
    engine: &QueryEngine,
    format: Exposition,
) -> lumen_core::BoxFuture<'_, Result<String, PromError>> {
    Box::pin(render_inner(engine, format))
}

async fn render_inner(engine: &QueryEngine, format: Exposition) -> Result<String, PromError> {
    let source = IstioSource::new(engine.clone(), "metrics scrape".into());
    let samples = source.totals().await?;
    let mut out = String::with_capacity(samples.len() * 200);
    write_istio(&mut out, &samples, format);
    out.push_str(&own_only(engine, format));
    Ok(out)
}

/// The query service's own metrics alone.
pub fn own_only(engine: &QueryEngine, format: Exposition) -> String {
    let own = engine.metrics();
    match format {
        Exposition::OpenMetrics => {
            let mut out = own
                .trim_end()
                .trim_end_matches("# EOF")
                .trim_end()
                .to_string();
            out.push_str("\n# EOF\n");
            out
        }
        Exposition::Text => openmetrics_to_text(&own),
    }
}

fn write_istio(out: &mut String, samples: &[Exposed], format: Exposition) {
    let mut family = "";
    for s in samples {
        let (name, kind, help) = s.metric.meta;
        if name != family {
            family = name;
            // OpenMetrics names a counter family without its `_total`.
            let declared = match format {
                Exposition::OpenMetrics if kind == "counter" => name.trim_end_matches("_total"),
                _ => name,
            };
            let _ = writeln!(out, "# HELP {declared} {help}");
            let _ = writeln!(out, "# TYPE {declared} {kind}");
        }
        out.push_str(s.metric.name);
        write_labels(out, &s.labels);
        out.push(' ');
        out.push_str(&format_number(s.value));
        out.push('\n');
    }
}

/// `{k="v",…}` in Prometheus's text format, values escaped.
pub fn write_labels(out: &mut String, labels: &Labels) {
    lumen_core::exposition::write_labels(out, labels.iter().map(|(k, v)| (k, v)));
}

/// `prometheus-client` writes OpenMetrics; the text format names a
/// counter's family with its `_total` and has no `# EOF`.
fn openmetrics_to_text(om: &str) -> String {
    let counters: Vec<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# TYPE ", "# HELP ", "# UNIT "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        if line.starts_with("# UNIT ") {
            continue;
        }
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_renamed_for_the_text_format() {
        let om =
            "# HELP q Queries.\n# TYPE q counter\nq_total{a=\"b\"} 3\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP q_total Queries.\n# TYPE q_total counter\nq_total{a=\"b\"} 3\n# TYPE g gauge\ng 1\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        write_labels(&mut out, &vec![("a".into(), "x\"y\\z\nw".into())]);
        assert_eq!(out, "{a=\"x\\\"y\\\\z\\nw\"}");
    }
}
