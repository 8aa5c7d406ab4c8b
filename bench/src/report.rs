//! The Markdown report: one table row per scenario, the Lumen/Envoy and
//! telemetry-on/off ratios, and the details a reader needs to trust them.

use std::fmt::Write;

use crate::procstat::{KernelCounts, Memory};
use crate::scenario::{Measured, Scenario, Stress};

pub struct Context {
    pub command: String,
    pub date: String,
    pub machine: String,
    pub versions: Vec<(String, String)>,
    pub duration: u64,
    pub warmup: u64,
    pub rate: u32,
    pub wrk_connections: u32,
    pub oha_connections: u32,
    pub rounds: u32,
    /// Requests POSTed a body this large (GET without).
    pub body_bytes: Option<usize>,
    /// gRPC calls over HTTP/2 to a gRPC app, to this method.
    pub grpc: Option<&'static str>,
    pub workers: u16,
    pub fresh_connections: bool,
}

/// One scenario's rounds reduced to medians: a single run on a shared
/// 2-core machine swings by ±10 %, more than the differences measured.
pub struct Summary {
    pub scenario: Scenario,
    pub stress: Stress,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub cpu_s_per_1000: Option<f64>,
    pub saturated_cpu_s_per_1000: Option<f64>,
    pub memory: Option<Memory>,
    pub idle_memory: Option<Memory>,
    pub kernel: Option<KernelCounts>,
}

impl Summary {
    /// `rounds` holds the runs of one scenario, at least one.
    pub fn of(rounds: &[Measured]) -> Summary {
        let opt_median = |f: fn(&Measured) -> Option<f64>| {
            let xs: Vec<f64> = rounds.iter().filter_map(f).collect();
            (!xs.is_empty()).then(|| median(&xs))
        };
        let all = |f: fn(&Measured) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        Summary {
            scenario: rounds[0].scenario,
            stress: rounds[0].stress,
            rps: all(|m| m.wrk.rps),
            p50_ms: all(|m| m.oha.p50_ms),
            p99_ms: all(|m| m.oha.p99_ms),
            cpu_s_per_1000: opt_median(|m| m.cpu_s_per_1000),
            saturated_cpu_s_per_1000: opt_median(|m| m.saturated_cpu_s_per_1000),
            memory: rounds.iter().filter_map(|m| m.memory).reduce(Memory::max),
            idle_memory: rounds
                .iter()
                .filter_map(|m| m.idle_memory)
                .reduce(Memory::max),
            kernel: opt_median(|m| m.kernel.map(|k| k.syscalls))
                .zip(opt_median(|m| m.kernel.map(|k| k.context_switches)))
                .map(|(syscalls, context_switches)| KernelCounts {
                    syscalls,
                    context_switches,
                }),
        }
    }
}

/// The middle value (mean of the two middle ones for an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The opening every bench report shares: title, command, date, machine.
pub fn header(title: &str, command: &str, date: &str, machine: &str) -> String {
    format!("# {title}\n\n- command: `{command}`\n- date: {date}\n- machine: {machine}\n")
}

/// The date a report is written, as its header shows it.
pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string()
}

/// `runs` holds, per scenario, its rounds in the order they ran.
pub fn render(ctx: &Context, runs: &[Vec<Measured>]) -> String {
    let mut out = header(
        "Lumen proxy benchmark",
        &ctx.command,
        &ctx.date,
        &ctx.machine,
    );
    let w = &mut out;
    let versions: Vec<String> = ctx
        .versions
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let _ = writeln!(w, "- versions: {}", versions.join("; "));
    let _ = writeln!(
        w,
        "- load: wrk -t1 -c{} for {} s (after {} s warm-up) for throughput; \
         oha -q {} -c{} --latency-correction for {} s for latency and CPU",
        ctx.wrk_connections, ctx.duration, ctx.warmup, ctx.rate, ctx.oha_connections, ctx.duration
    );
    if ctx.fresh_connections {
        let _ = writeln!(
            w,
            "- connections: every request between the two proxies on a new connection \
             (Lumen: DestinationRule `maxRequestsPerConnection: 1`; Envoy: \
             `max_requests_per_connection: 1`); with mTLS, requests per second are new TLS \
             handshakes per second and CPU per request is CPU per handshake"
        );
    }
    match ctx.grpc {
        Some(crate::grpc::STREAM_PATH) => {
            let _ = writeln!(
                w,
                "- requests: gRPC server-streaming calls (Arrow Flight DoGet, answered with {} messages \
                 of {} bytes; one call through each topology checked message by message with a Flight \
                 client) over HTTP/2 (h2c) to a tonic app; throughput by closed-loop `oha --http2 -c{}` \
                 instead of wrk; (a) is oha → the gRPC app",
                crate::grpc::STREAM_MESSAGES,
                crate::grpc::STREAM_MESSAGE_BYTES,
                ctx.wrk_connections
            );
        }
        Some(_) => {
            let _ = writeln!(
                w,
                "- requests: gRPC unary calls (OTLP trace Export, ~400 bytes) over HTTP/2 (h2c) to a tonic app; \
                 throughput by closed-loop `oha --http2 -c{}` instead of wrk; (a) is oha → the gRPC app",
                ctx.wrk_connections
            );
        }
        None => {}
    }
    let _ = writeln!(
        w,
        "- workers: {} per proxy (Lumen `--workers {0}`, Envoy `--concurrency {0}`)",
        ctx.workers
    );
    if let Some(n) = ctx.body_bytes {
        let _ = writeln!(
            w,
            "- requests: POST with a {n}-byte body (wrk by script, oha -D), answered by nginx"
        );
    }
    let _ = writeln!(
        w,
        "- rounds: {} (scenarios interleaved, a b c d a b c d …); each figure is the median of its rounds\n",
        ctx.rounds
    );

    let rows: Vec<Summary> = runs
        .iter()
        .filter(|r| !r.is_empty())
        .map(|r| Summary::of(r))
        .collect();
    let _ = writeln!(
        w,
        "| scenario | throughput rps | p50 ms | p99 ms @{}rps | CPU s/1000 req/hop | syscalls /req/hop | context switches /req/hop | RSS (private) MiB | idle RSS (private) MiB |",
        ctx.rate
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in &rows {
        let _ = writeln!(
            w,
            "| {}{} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
            m.scenario.label(),
            m.stress.label(),
            m.rps,
            m.p50_ms,
            m.p99_ms,
            opt(m.cpu_s_per_1000.map(|c| c / 2.0), 4),
            opt(m.kernel.map(|k| k.syscalls), 1),
            opt(m.kernel.map(|k| k.context_switches), 1),
            memory(m.memory),
            memory(m.idle_memory),
        );
    }
    let get = |s: Scenario| {
        rows.iter()
            .find(|m| m.scenario == s && m.stress == Stress::None)
    };
    let both = |x: Option<f64>, y: Option<f64>, f: fn(f64, f64) -> String| match (x, y) {
        (Some(x), Some(y)) => f(x, y),
        _ => "-".into(),
    };
    let mut comparisons = Vec::new();
    if let (Some(b), Some(d)) = (get(Scenario::B), get(Scenario::D)) {
        comparisons.push(format!(
            "- Lumen (telemetry on) / Envoy: throughput {}, p99 {}, CPU per request {}",
            ratio(b.rps, d.rps),
            ratio(b.p99_ms, d.p99_ms),
            both(b.cpu_s_per_1000, d.cpu_s_per_1000, ratio),
        ));
    }
    if let (Some(b), Some(c)) = (get(Scenario::B), get(Scenario::C)) {
        comparisons.push(format!(
            "- telemetry cost, (b) vs (c): throughput {}, CPU per request {} at {} rps, {} saturated",
            percent(b.rps, c.rps),
            both(b.cpu_s_per_1000, c.cpu_s_per_1000, percent),
            ctx.rate,
            both(
                b.saturated_cpu_s_per_1000,
                c.saturated_cpu_s_per_1000,
                percent
            ),
        ));
    }
    if let (Some(e), Some(f)) = (get(Scenario::E), get(Scenario::F)) {
        comparisons.push(format!(
            "- Lumen with mTLS / Envoy with mTLS: throughput {}, p99 {}, CPU per request {}",
            ratio(e.rps, f.rps),
            ratio(e.p99_ms, f.p99_ms),
            both(e.cpu_s_per_1000, f.cpu_s_per_1000, ratio),
        ));
    }
    if let (Some(g), Some(i)) = (get(Scenario::G), get(Scenario::I)) {
        let kernel = |f: fn(KernelCounts) -> f64| both(g.kernel.map(f), i.kernel.map(f), ratio);
        comparisons.push(format!(
            "- Lumen / Envoy, every feature on ((g) / (i)): throughput {}, p99 {}, CPU per request {}, \
             syscalls {}, context switches {}, RSS {}, idle RSS {}",
            ratio(g.rps, i.rps),
            ratio(g.p99_ms, i.p99_ms),
            both(g.cpu_s_per_1000, i.cpu_s_per_1000, ratio),
            kernel(|k| k.syscalls),
            kernel(|k| k.context_switches),
            both(rss(g.memory), rss(i.memory), ratio),
            both(rss(g.idle_memory), rss(i.idle_memory), ratio),
        ));
    }
    if let (Some(g), Some(h)) = (get(Scenario::G), get(Scenario::H)) {
        comparisons.push(format!(
            "- telemetry on / off with every feature ((g) / (h)): throughput {}, CPU per request {} saturated, {} at {} rps",
            ratio(g.rps, h.rps),
            both(g.saturated_cpu_s_per_1000, h.saturated_cpu_s_per_1000, ratio),
            both(g.cpu_s_per_1000, h.cpu_s_per_1000, ratio),
            ctx.rate,
        ));
    }
    for (plain, tls, who) in [
        (Scenario::B, Scenario::E, "Lumen, (e) vs (b)"),
        (Scenario::D, Scenario::F, "Envoy, (f) vs (d)"),
    ] {
        if let (Some(p), Some(t)) = (get(plain), get(tls)) {
            comparisons.push(format!(
                "- cost of mTLS in {who}: throughput {}, p99 {}, CPU per request {} at {} rps, {} saturated",
                percent(t.rps, p.rps),
                percent(t.p99_ms, p.p99_ms),
                both(t.cpu_s_per_1000, p.cpu_s_per_1000, percent),
                ctx.rate,
                both(t.saturated_cpu_s_per_1000, p.saturated_cpu_s_per_1000, percent),
            ));
        }
    }
    for stressed in rows.iter().filter(|m| m.stress != Stress::None) {
        if let Some(calm) = get(stressed.scenario) {
            comparisons.push(format!(
                "- {}{} / without: p99 {}, p50 {}, CPU per request {}",
                stressed.scenario.label(),
                stressed.stress.label(),
                ratio(stressed.p99_ms, calm.p99_ms),
                ratio(stressed.p50_ms, calm.p50_ms),
                both(stressed.cpu_s_per_1000, calm.cpu_s_per_1000, ratio),
            ));
        }
    }
    if !comparisons.is_empty() {
        let _ = writeln!(w, "\n{}", comparisons.join("\n"));
    }
    let _ = writeln!(w, "\n## Details\n");
    for rounds in runs.iter().filter(|r| !r.is_empty()) {
        let _ = writeln!(
            w,
            "- {}{}:",
            rounds[0].scenario.label(),
            rounds[0].stress.label()
        );
        for (i, m) in rounds.iter().enumerate() {
            details(w, i + 1, m);
        }
    }
    let _ = writeln!(
        w,
        "\nCPU is utime+stime of the proxy processes (all threads) from /proc, \
         per hop = both proxies / 2. System calls (the raw_syscalls:sys_enter tracepoint) and \
         context switches are `perf stat`'s counts over both proxies' threads during the oha run, \
         per request and per hop. RSS is the larger VmRSS of the two proxies after the runs, \
         private its RssAnon (heap and stacks; the rest is mapped files, mostly the binary's code, \
         which every proxy running that binary shares); idle RSS the same once started and one \
         request served. Lumen's proxies are the sidecar binary `lumen-proxy`. \
         Load generator, proxies and nginx share the machine's cores."
    );
    if ctx.grpc.is_some() {
        // The gRPC case swaps nginx for a gRPC app and wrk for closed-loop
        // oha; the shared wording says so.
        for (from, to) in [
            ("(a) nginx direct", "(a) gRPC app direct"),
            ("- wrk:", "- oha, closed loop:"),
            ("during the wrk run", "during the closed-loop run"),
            ("proxies and nginx", "proxies and the gRPC app"),
        ] {
            out = out.replace(from, to);
        }
    }
    out
}

fn details(w: &mut String, round: usize, m: &Measured) {
    let _ = writeln!(
        w,
        "  - round {round}: {:.0} rps, p50 {:.2} ms, p99 {:.2} ms",
        m.wrk.rps, m.oha.p50_ms, m.oha.p99_ms
    );
    let _ = writeln!(
        w,
        "    - wrk: {} requests, {} socket errors, {} non-2xx/3xx",
        m.wrk.requests, m.wrk.socket_errors, m.wrk.non_2xx_3xx
    );
    let _ = writeln!(
        w,
        "    - oha: {} responses ({} 2xx), success rate {:.2}%{}{}",
        m.oha.responses,
        m.oha.ok,
        m.oha.success_rate * 100.0,
        counts(", statuses", &m.oha.bad_statuses),
        counts(", errors", &m.oha.errors),
    );
    if let (Some(c), Some(s)) = (m.cpu_s_per_1000, m.saturated_cpu_s_per_1000) {
        let _ = writeln!(
            w,
            "    - CPU of both proxies per 1000 requests: {c:.4} s during the oha run, \
             {s:.4} s during the wrk run (saturated)"
        );
    }
    if let Some(k) = m.kernel {
        let _ = writeln!(
            w,
            "    - per request per hop during the oha run: {:.1} system calls, {:.1} context switches",
            k.syscalls, k.context_switches
        );
    }
    if let Some(c) = m.collector_cores {
        let _ = writeln!(
            w,
            "    - collector (`lumen up`) used {c:.2} cores during the wrk run"
        );
    }
    let [wb, ob] = m.background;
    let _ = writeln!(
        w,
        "    - CPU used outside the benchmark: {:.0}% of the machine during wrk, {:.0}% during \
         oha; hypervisor steal {:.0}% / {:.0}%{}",
        wb.other * 100.0,
        ob.other * 100.0,
        wb.steal * 100.0,
        ob.steal * 100.0,
        if m.noisy() {
            " — NOISY: another workload ran, these numbers are suspect"
        } else {
            ""
        }
    );
    if let Some(t) = &m.telemetry {
        let _ = writeln!(w, "    - telemetry: {}", t.summary());
    }
}

fn rss(m: Option<Memory>) -> Option<f64> {
    m.map(|m| m.rss_mib)
}

/// "RSS (private)", as the table shows memory.
fn memory(m: Option<Memory>) -> String {
    m.map_or_else(
        || "-".into(),
        |m| format!("{:.1} ({:.1})", m.rss_mib, m.anon_mib),
    )
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

fn ratio(x: f64, y: f64) -> String {
    if y == 0.0 {
        return "-".into();
    }
    format!("{:.2}×", x / y)
}

fn percent(x: f64, base: f64) -> String {
    if base == 0.0 {
        return "-".into();
    }
    format!("{:+.1}%", (x - base) / base * 100.0)
}

fn counts(label: &str, m: &std::collections::BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = m.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    format!("{label} {{{}}}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{OhaResult, WrkResult};

    fn row(scenario: Scenario, rps: f64, p99_ms: f64, cpu: Option<f64>) -> Measured {
        Measured {
            scenario,
            stress: Stress::None,
            wrk: WrkResult {
                requests: 1000,
                rps,
                socket_errors: 0,
                non_2xx_3xx: 0,
            },
            oha: OhaResult {
                p50_ms: 0.5,
                p99_ms,
                responses: 100,
                ok: 100,
                success_rate: 1.0,
                bad_statuses: Default::default(),
                errors: Default::default(),
            },
            cpu_s_per_1000: cpu,
            saturated_cpu_s_per_1000: cpu,
            memory: cpu.map(|_| Memory {
                rss_mib: 12.0,
                anon_mib: 4.0,
            }),
            idle_memory: cpu.map(|_| Memory {
                rss_mib: 8.0,
                anon_mib: 3.0,
            }),
            kernel: cpu.map(|c| KernelCounts {
                syscalls: c * 100.0,
                context_switches: c * 10.0,
            }),
            telemetry: None,
            background: Default::default(),
            collector_cores: None,
        }
    }

    fn context(grpc: Option<&'static str>, workers: u16, rounds: u32) -> Context {
        Context {
            command: "lumen-bench proxy".into(),
            date: "today".into(),
            machine: "test".into(),
            versions: vec![],
            duration: 10,
            warmup: 2,
            rate: 1000,
            wrk_connections: 32,
            oha_connections: 16,
            body_bytes: None,
            grpc,
            workers,
            fresh_connections: false,
            rounds,
        }
    }

    #[test]
    fn table_and_comparisons() {
        let ctx = context(None, 1, 3);
        let rows = [
            vec![row(Scenario::A, 20000.0, 1.0, None)],
            // The median of each figure, not one round's.
            vec![
                row(Scenario::B, 9000.0, 3.0, Some(0.2)),
                row(Scenario::B, 1000.0, 9.0, Some(0.1)),
                row(Scenario::B, 9500.0, 1.0, Some(0.3)),
            ],
            vec![row(Scenario::C, 10000.0, 2.0, Some(0.1))],
            vec![row(Scenario::D, 6000.0, 4.0, Some(0.4))],
        ];
        let text = render(&ctx, &rows);
        assert!(
            text.contains("| (a) nginx direct | 20000 | 0.50 | 1.00 | - | - |"),
            "{text}"
        );
        assert!(
            text.contains(
                "| (b) Lumen, telemetry on | 9000 | 0.50 | 3.00 | 0.1000 | 20.0 | 2.0 | 12.0 (4.0) | 8.0 (3.0) |"
            ),
            "{text}"
        );
        assert!(
            text.contains("Envoy: throughput 1.50×, p99 0.75×, CPU per request 0.50×"),
            "{text}"
        );
        assert!(
            text.contains("(b) vs (c): throughput -10.0%, CPU per request +100.0% at 1000 rps"),
            "{text}"
        );
    }

    #[test]
    fn every_feature_and_stress_comparisons() {
        let ctx = context(Some(crate::grpc::STREAM_PATH), 2, 1);
        let mut stopped = row(Scenario::G, 9000.0, 2.2, Some(0.2));
        stopped.stress = Stress::CollectorStopped;
        let rows = [
            vec![row(Scenario::G, 9000.0, 2.0, Some(0.2))],
            vec![stopped],
            vec![row(Scenario::H, 10000.0, 2.0, Some(0.1))],
            vec![row(Scenario::I, 6000.0, 4.0, Some(0.4))],
        ];
        let text = render(&ctx, &rows);
        assert!(
            text.contains(
                "((g) / (i)): throughput 1.50×, p99 0.50×, CPU per request 0.50×, syscalls 0.50×, \
                 context switches 0.50×, RSS 1.00×, idle RSS 1.00×"
            ),
            "{text}"
        );
        assert!(
            text.contains("((g) / (h)): throughput 0.90×, CPU per request 2.00× saturated"),
            "{text}"
        );
        assert!(
            text.contains("| (g) Lumen, every feature, telemetry on [collector stopped] | 9000 |"),
            "{text}"
        );
        assert!(
            text.contains("[collector stopped] / without: p99 1.10×"),
            "{text}"
        );
        assert!(text.contains("Arrow Flight DoGet"), "{text}");
        assert!(text.contains("- workers: 2 per proxy"), "{text}");
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn ratios_and_percents() {
        assert_eq!(ratio(3.0, 2.0), "1.50×");
        assert_eq!(ratio(1.0, 0.0), "-");
        assert_eq!(percent(90.0, 100.0), "-10.0%");
        assert_eq!(percent(125.0, 100.0), "+25.0%");
    }
}
