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
pub fn record(
    engine: QueryEngine,
    writer: RecordingWriter,
    instance: String,
    stop: watch::Receiver<bool>,
) -> lumen_core::BoxFuture<'static, ()> {
    Box::pin(record_until(engine, writer, instance, stop))
}

async fn record_until(
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

/// The samples of the process's exposition, labelled as a scrape of it
/// would be.
fn parse(text: &str, instance: &str) -> Vec<RecordedSample> {
    lumen_core::exposition::parse(text)
        .into_iter()
        .map(|s| {
            let mut labels = s.labels;
            labels.push(("job".into(), "lumen".into()));
            labels.push(("instance".into(), instance.to_string()));
            RecordedSample {
                name: s.name,
                labels,
                value: s.value,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_lines_become_samples_with_job_and_instance() {
        let text = "# TYPE lumen_flushes counter\nlumen_flushes_total 3\n\
                    lumen_flushes_created 1.7e9\nlumen_table_rows{table=\"requests\"} 120\n# EOF\n";
        let got = parse(text, "127.0.0.1:9900");
        let names: Vec<&str> = got.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["lumen_flushes_total", "lumen_table_rows"]);
        assert_eq!(
            got[1].labels,
            [
                ("table".to_string(), "requests".to_string()),
                ("job".into(), "lumen".into()),
                ("instance".into(), "127.0.0.1:9900".into())
            ]
        );
    }
}
