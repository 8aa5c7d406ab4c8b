//! Reaction time of the policy loop: from a breach in live traffic to the
//! first request a proxy refuses for it. One `lumen up` (rules, control
//! plane, collector) and one calling sidecar following it; nginx behind.
//! A steady load of calls; at a trial's start, half of them carry a header
//! the VirtualService answers with an injected 503. The alert
//! (`errors / requests > 10 %` over the last 5 s, Istio's names) fires,
//! the conditional RateLimit switches on, and calls get 429 from the
//! sidecar. Measured at the client: first 503 → first 429. Then the
//! failures stop, the limit lifts after its cooldown, the window clears,
//! and the next trial starts.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::peers::{self, Proc, local};

pub struct Settings {
    pub trials: usize,
    /// Calls per second of the steady load.
    pub rate: u32,
    pub evaluation_interval: String,
}

pub struct Outcome {
    /// Per trial: first 503 → first 429.
    pub reactions: Vec<Duration>,
    /// Per trial: the rule's condition first holds in the traffic the
    /// client saw (5xx over the last 5 s > 10 %) → first 429.
    pub from_breach: Vec<Duration>,
    /// Per trial: failures stopped → first 200 again.
    pub lifts: Vec<Duration>,
}

const RULES: &str = "groups:\n- name: bench\n  rules:\n  - alert: UpstreamFailing\n    expr: |\n      sum by (destination_service_name) (rate(istio_requests_total{reporter=\"source\", response_code=~\"5..\"}[5s]))\n        / sum by (destination_service_name) (rate(istio_requests_total{reporter=\"source\"}[5s])) > 0.1\n";

fn config(app: u16) -> String {
    format!(
        "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: bench}}\nspec:\n  services:\n    - name: upstream\n      port: 8080\n      endpoints: [{{address: 127.0.0.1:{app}, version: v1}}]\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: upstream}}\nspec:\n  hosts: [upstream]\n  http:\n  - match: [{{headers: {{x-fail: {{exact: \"1\"}}}}}}]\n    fault: {{abort: {{httpStatus: 503, percentage: {{value: 100}}}}}}\n    route: [{{destination: {{host: upstream}}}}]\n  - route: [{{destination: {{host: upstream}}}}]\n\
         ---\napiVersion: policy.lumen.dev/v1alpha1\nkind: RateLimit\nmetadata: {{name: shed-upstream}}\nspec:\n  target: {{service: upstream}}\n  requestsPerSecond: 0.1\n  burst: 1\n  when: {{alert: UpstreamFailing, labels: {{destination_service_name: upstream}}}}\n  cooldown: 1s\n"
    )
}

pub fn run(lumen: &Path, dir: &Path, s: &Settings) -> Result<Outcome> {
    peers::check_installed(&["nginx"])?;
    let ports = peers::free_ports(8)?;
    let (app, otlp, otlp_http, query, control, outbound, admin) = (
        ports[0], ports[1], ports[2], ports[3], ports[4], ports[5], ports[6],
    );
    let _nginx = peers::start_nginx(dir, app)?;
    let config_dir = dir.join("config");
    std::fs::create_dir_all(&config_dir)?;
    std::fs::write(config_dir.join("mesh.yaml"), config(app))?;
    let rules = dir.join("rules.yaml");
    std::fs::write(&rules, RULES)?;

    let mut up = Command::new(lumen);
    up.arg("up")
        .arg("-f")
        .arg(&config_dir)
        .arg("--rules")
        .arg(&rules)
        .args(["--evaluation-interval", &s.evaluation_interval])
        .arg("--data-dir")
        .arg(dir.join("lumen-data"))
        .args(["--otlp-grpc", &local(otlp).to_string()])
        .args(["--otlp-http", &local(otlp_http).to_string()])
        .args(["--query-addr", &local(query).to_string()])
        .args(["--control-addr", &local(control).to_string()])
        .args([
            "--pg-addr",
            "127.0.0.1:0",
            "--flight-sql-addr",
            "127.0.0.1:0",
        ]);
    let mut up = Proc::spawn("lumen up", up, dir.join("lumen-up.log"))?;
    up.wait_http_ok(local(query), "/ready")?;

    let mut sidecar = Command::new(lumen);
    sidecar
        .arg("proxy")
        .args(["--service", "client", "--version", "v1"])
        .args(["--control", &local(control).to_string()])
        .args(["--outbound", &local(outbound).to_string(), "--no-inbound"])
        .args(["--admin", &local(admin).to_string()])
        .args(["--collector", &format!("http://{}", local(otlp))]);
    let mut sidecar = Proc::spawn("lumen proxy", sidecar, dir.join("sidecar.log"))?;
    sidecar.wait_http_ok(local(admin), "/ready")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(trials(outbound, s))?;
    up.check_alive()?;
    sidecar.check_alive()?;
    Ok(outcome)
}

/// The steady load: one call every `1/rate` s; a call fails on purpose
/// (half of them) while `failing`. Each answer's status goes to `seen`.
async fn trials(outbound: u16, s: &Settings) -> Result<Outcome> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    let url = format!("http://{}/", local(outbound));
    let failing = Arc::new(AtomicBool::new(false));
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(Instant, u16)>();
    let load = {
        let (client, url, failing) = (client.clone(), url.clone(), failing.clone());
        let period = Duration::from_secs_f64(1.0 / f64::from(s.rate.max(1)));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut n = 0u64;
            loop {
                tick.tick().await;
                n += 1;
                let fail = failing.load(Ordering::Relaxed) && n.is_multiple_of(2);
                let req = client
                    .get(&url)
                    .header("host", "upstream:8080")
                    .header("x-fail", if fail { "1" } else { "0" });
                let tx = seen_tx.clone();
                tokio::spawn(async move {
                    if let Ok(r) = req.send().await {
                        let _ = tx.send((Instant::now(), r.status().as_u16()));
                    }
                });
            }
        })
    };
    // Warm up: the load shows in the live tier, nothing fires.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut reactions = Vec::new();
    let mut from_breach = Vec::new();
    let mut lifts = Vec::new();
    // What the client saw in the last 5 s: (when, a 5xx).
    let mut window: std::collections::VecDeque<(Instant, bool)> = Default::default();
    for trial in 0..s.trials {
        // The calls of the last seconds (all fine) are the window's start.
        window.clear();
        while let Ok((at, status)) = seen.try_recv() {
            window.push_back((at, status >= 500));
        }
        failing.store(true, Ordering::Relaxed);
        let mut first_503 = None;
        let mut breach = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        let reaction = loop {
            let (at, status) = tokio::time::timeout_at(deadline.into(), seen.recv())
                .await
                .with_context(|| format!("trial {trial}: no 429 within 30 s"))?
                .context("load stopped")?;
            window.push_back((at, status >= 500));
            while window
                .front()
                .is_some_and(|(t, _)| at.saturating_duration_since(*t) > Duration::from_secs(5))
            {
                window.pop_front();
            }
            let errors = window.iter().filter(|(_, e)| *e).count();
            if breach.is_none() && errors * 10 > window.len() {
                breach = Some(at);
            }
            match status {
                503 if first_503.is_none() => first_503 = Some(at),
                429 => {
                    if let Some(f) = first_503 {
                        from_breach.push(at.saturating_duration_since(breach.unwrap_or(at)));
                        break at.saturating_duration_since(f);
                    }
                    bail!(
                        "trial {trial}: 429 before any failure (the last trial's limit still on)"
                    );
                }
                _ => {}
            }
        };
        failing.store(false, Ordering::Relaxed);
        let stopped = Instant::now();
        let deadline = stopped + Duration::from_secs(60);
        loop {
            let (at, status) = tokio::time::timeout_at(deadline.into(), seen.recv())
                .await
                .with_context(|| format!("trial {trial}: the limit never lifted"))?
                .context("load stopped")?;
            if status == 200 && at > stopped {
                lifts.push(at.saturating_duration_since(stopped));
                break;
            }
        }
        reactions.push(reaction);
        eprintln!(
            "trial {}/{}: reacted in {:.0} ms ({:.0} ms after the condition held), lifted after {:.1} s",
            trial + 1,
            s.trials,
            reaction.as_secs_f64() * 1e3,
            from_breach.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
            lifts.last().map_or(0.0, Duration::as_secs_f64)
        );
        // The 5 s window clears of this trial's failures before the next.
        // A random phase, so trials do not lock onto the evaluation ticks.
        let phase = Duration::from_millis(rand::random_range(0..1000));
        tokio::time::sleep(Duration::from_secs(6) + phase).await;
    }
    load.abort();
    Ok(Outcome {
        reactions,
        from_breach,
        lifts,
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest rank, as a percentile of ≥ 20 trials is stated.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

pub fn render(command: &str, machine: &str, s: &Settings, o: &Outcome) -> String {
    let mut r = o.reactions.clone();
    r.sort();
    let mut l = o.lifts.clone();
    l.sort();
    let mut b = o.from_breach.clone();
    b.sort();
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    let mut out = crate::report::header(
        "Policy reaction time: breach in traffic → first 429 at the proxy",
        command,
        &crate::report::now(),
        machine,
    );
    let _ = writeln!(
        out,
        "Load: {} calls/s through one Lumen sidecar; a trial makes half of them fail (503, injected by a \
         VirtualService match), the rule `errors / requests > 10 %` over `[5s]` fires, the conditional \
         RateLimit switches on. Reaction: first 503 the client sees → first 429. Evaluation interval {}; \
         {} trials.\n",
        s.rate,
        s.evaluation_interval,
        o.reactions.len()
    );
    let _ = writeln!(out, "| | p50 | p99 | max |\n|---|---|---|---|");
    let _ = writeln!(
        out,
        "| Lumen: breach → first 429 | {} | {} | {} |",
        ms(percentile(&r, 50.0)),
        ms(percentile(&r, 99.0)),
        ms(r.last().copied().unwrap_or_default())
    );
    let _ = writeln!(
        out,
        "| Lumen: condition holds in traffic (5xx > 10 % of the last 5 s) → first 429 | {} | {} | {} |",
        ms(percentile(&b, 50.0)),
        ms(percentile(&b, 99.0)),
        ms(b.last().copied().unwrap_or_default())
    );
    let _ = writeln!(
        out,
        "| Lumen: failures stop → limit lifted (cooldown 1 s) | {} | {} | {} |",
        ms(percentile(&l, 50.0)),
        ms(percentile(&l, 99.0)),
        ms(l.last().copied().unwrap_or_default())
    );
    let _ = writeln!(
        out,
        "| Prometheus + Alertmanager, defaults (computed, not measured) | ≈ 90 s | ≈ 149 s | 150 s |"
    );
    let _ = writeln!(
        out,
        "\nThe Prometheus + Alertmanager row is computed from their default settings, not run: a breach \
         shows after the next scrape (`scrape_interval` 1 m: 0–60 s, a `rate()` needs two samples), is \
         seen by the next rule evaluation (`evaluation_interval` 1 m: 0–60 s), and Alertmanager sends \
         a new group after `group_wait` (30 s): 30–150 s, ≈ 90 s on average, before a webhook could \
         switch anything; with Istio's usual 15 s scrapes it is still ≈ 68 s on average."
    );
    out
}
