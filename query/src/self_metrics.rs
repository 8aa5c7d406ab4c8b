//! Lumen's own metrics as stored series: every [`INTERVAL`] the process's
//! `/metrics` text (query service, collector, remote write) is read back
//! and written to `metrics` as gauges labelled `job="lumen"` and
//! `instance` — what a Prometheus scraping Lumen would keep — so PromQL
//! and Grafana show the collector's health over time with no Prometheus.
//! `_created` series (OpenMetrics' counter start times) are left out.

use std::time::{Duration, SystemTime};

use lumen_collector::events::{RecordedSample, RecordingWriter};
use tokio::sync::watch;

use crate::engine::QueryEngine;

/// How often the process records its own metrics, as a scrape would.
pub const INTERVAL: Duration = Duration::from_secs(15);

/// Records `engine`'s metrics every [`INTERVAL`] (the first at once) until
/// `stop` turns true.
pub async fn record(
    engine: QueryEngine,
    writer: RecordingWriter,
    instance: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let samples = parse(&engine.metrics(), &instance);
        if let Err(e) = writer.write(SystemTime::now(), samples).await {
            tracing::debug!(error = %e, "cannot record Lumen's own metrics");
        }
    }
}

/// The samples of Prometheus/OpenMetrics text as `prometheus-client`
/// writes it: `name{label="value",…} value`, one per line.
fn parse(text: &str, instance: &str) -> Vec<RecordedSample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some((s, v)) => (s.trim(), v.trim()),
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, labels_of(rest.strip_suffix('}').unwrap_or(rest))),
            None => (series, Vec::new()),
        };
        if name.ends_with("_created") {
            continue;
        }
        let mut labels = labels;
        labels.push(("job".into(), "lumen".into()));
        labels.push(("instance".into(), instance.to_string()));
        out.push(RecordedSample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

/// `a="x",b="y \"quoted\""` as pairs, with the text format's escapes.
fn labels_of(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let name = name.trim().trim_start_matches(',').trim().to_string();
        if name.is_empty() || chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                c => value.push(c),
            }
        }
        out.push((name, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_lines_become_samples_with_job_and_instance() {
        let text = "# HELP lumen_flushes Flushes\n# TYPE lumen_flushes counter\n\
                    lumen_flushes_total 3\nlumen_flushes_created 1.7e9\n\
                    lumen_table_rows{table=\"requests\"} 120\n\
                    lumen_x{a=\"q\\\"uote\",b=\"2\"} +Inf\n# EOF\n";
        let got = parse(text, "127.0.0.1:9900");
        let names: Vec<&str> = got.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["lumen_flushes_total", "lumen_table_rows", "lumen_x"]
        );
        assert_eq!(got[0].value, 3.0);
        assert_eq!(
            got[1].labels,
            [
                ("table".to_string(), "requests".to_string()),
                ("job".into(), "lumen".into()),
                ("instance".into(), "127.0.0.1:9900".into())
            ]
        );
        assert_eq!(got[2].labels[0], ("a".into(), "q\"uote".into()));
        assert_eq!(got[2].labels[1], ("b".into(), "2".into()));
        assert!(got[2].value.is_infinite());
    }
}
