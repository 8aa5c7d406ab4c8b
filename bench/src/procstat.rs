//! CPU time and resident memory of a process, read from /proc.
//!
//! /proc covers every thread of the process (proxies run worker, I/O and
//! telemetry threads), which is what "cost of the proxy" should mean.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// utime + stime in clock ticks, from the text of `/proc/<pid>/stat`.
pub fn parse_cpu_ticks(stat: &str) -> Result<u64> {
    // The command name (field 2) is in parentheses and may itself contain
    // spaces or parentheses, so fields are counted from the last ')'.
    let close = stat
        .rfind(')')
        .context("no ')' after the command name in /proc/<pid>/stat")?;
    let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let field = |n: usize| -> Result<u64> {
        let s = rest
            .get(n - 3)
            .with_context(|| format!("/proc/<pid>/stat has no field {n}"))?;
        s.parse()
            .with_context(|| format!("field {n} of /proc/<pid>/stat is not a number: {s:?}"))
    };
    Ok(field(14)? + field(15)?)
}

/// VmRSS in KiB, from the text of `/proc/<pid>/status`.
pub fn parse_vmrss_kib(status: &str) -> Result<u64> {
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("VmRSS:") {
            let mut parts = v.split_whitespace();
            let n: u64 = parts
                .next()
                .context("empty VmRSS line")?
                .parse()
                .context("VmRSS is not a number")?;
            match parts.next() {
                Some("kB") | None => return Ok(n),
                Some(unit) => bail!("unexpected VmRSS unit {unit:?}"),
            }
        }
    }
    bail!("no VmRSS line in /proc/<pid>/status (process gone or a zombie?)")
}

pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_cpu_ticks(&text).with_context(|| format!("parsing {path}"))
}

pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vmrss_kib(&text).with_context(|| format!("parsing {path}"))
}

/// The kernel's USER_HZ; 100 on nearly every Linux, but asked rather than assumed.
pub fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from a running `lumen proxy` (utime 16, stime 7 ticks).
    const STAT: &str = "29427 (lumen-debug) S 1 29423 17235 0 -1 4194304 2263 0 1 0 16 7 0 0 \
        20 0 3 0 348290 310304768 10478 18446744073709551615 94096859041344 94096978665840 \
        140733794178992 0 0 0 0 4096 17474 0 0 0 17 0 0 0 0 0 0 94096985946880 94096986010648 \
        94097153818624 140733794183779 140733794183915 140733794183915 140733794185194 0\n";

    #[test]
    fn stat_sums_utime_and_stime() {
        assert_eq!(parse_cpu_ticks(STAT).unwrap(), 16 + 7);
    }

    #[test]
    fn stat_survives_spaces_and_parens_in_the_command_name() {
        let odd = STAT.replace("(lumen-debug)", "(tokio (worker) 1)");
        assert_eq!(parse_cpu_ticks(&odd).unwrap(), 23);
    }

    #[test]
    fn stat_rejects_truncated_text() {
        assert!(parse_cpu_ticks("4242 (lumen) S 4200 4242").is_err());
        assert!(parse_cpu_ticks("garbage").is_err());
    }

    #[test]
    fn status_vmrss() {
        let status = "Name:\tenvoy\nUmask:\t0022\nState:\tS (sleeping)\n\
            VmPeak:\t 2257412 kB\nVmSize:\t 2191876 kB\nVmHWM:\t   48120 kB\n\
            VmRSS:\t   45312 kB\nRssAnon:\t   20220 kB\nThreads:\t15\n";
        assert_eq!(parse_vmrss_kib(status).unwrap(), 45312);
    }

    #[test]
    fn status_without_vmrss_is_an_error() {
        // Zombies have no memory lines.
        assert!(parse_vmrss_kib("Name:\tlumen\nState:\tZ (zombie)\n").is_err());
    }
}
