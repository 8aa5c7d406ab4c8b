//! CPU time and resident memory of a process, read from /proc, and its
//! system calls and context switches, counted by `perf stat`.
//!
//! Both cover every thread of the process (proxies run worker, I/O and
//! telemetry threads), which is what "cost of the proxy" should mean.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// The fields of `/proc/<pid>/stat` the benchmark uses, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub ppid: u32,
    /// utime + stime: this process, all its threads.
    pub ticks: u64,
    /// cutime + cstime: its children that have exited and been waited for.
    pub reaped_children_ticks: u64,
}

pub fn parse_stat(stat: &str) -> Result<ProcStat> {
    // The command name (field 2) is in parentheses and may itself contain
    // spaces or parentheses, so fields are counted from the last ')'.
    let close = stat
        .rfind(')')
        .context("no ')' after the command name in /proc/<pid>/stat")?;
    let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // rest[0] is field 3 (state).
    let field = |n: usize| -> Result<u64> {
        let s = rest
            .get(n - 3)
            .with_context(|| format!("/proc/<pid>/stat has no field {n}"))?;
        s.parse()
            .with_context(|| format!("field {n} of /proc/<pid>/stat is not a number: {s:?}"))
    };
    Ok(ProcStat {
        ppid: field(4)? as u32,
        ticks: field(14)? + field(15)?,
        reaped_children_ticks: field(16)? + field(17)?,
    })
}

/// utime + stime in clock ticks, from the text of `/proc/<pid>/stat`.
pub fn parse_cpu_ticks(stat: &str) -> Result<u64> {
    Ok(parse_stat(stat)?.ticks)
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

/// Resident memory of a process in MiB: all of it (VmRSS), and the part
/// that is its own (RssAnon: heap, stacks) rather than pages of files it
/// maps, such as its binary's code, which every process running the same
/// binary shares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Memory {
    pub rss_mib: f64,
    pub anon_mib: f64,
}

impl Memory {
    pub fn of(pid: u32) -> Result<Memory> {
        let path = format!("/proc/{pid}/status");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        Memory::parse(&text).with_context(|| format!("parsing {path}"))
    }

    pub fn parse(status: &str) -> Result<Memory> {
        let anon = status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .context("no RssAnon line")?;
        Ok(Memory {
            rss_mib: parse_vmrss_kib(status)? as f64 / 1024.0,
            anon_mib: anon as f64 / 1024.0,
        })
    }

    /// The larger of each figure.
    pub fn max(self, other: Memory) -> Memory {
        Memory {
            rss_mib: self.rss_mib.max(other.rss_mib),
            anon_mib: self.anon_mib.max(other.anon_mib),
        }
    }
}

/// Machine-wide CPU time from the `cpu` line of `/proc/stat`, in ticks
/// summed over all CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SystemCpu {
    pub busy: u64,
    pub steal: u64,
    pub total: u64,
}

pub fn parse_system_cpu(stat: &str) -> Result<SystemCpu> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no aggregate cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("non-numeric cpu line in /proc/stat")?;
    if v.len() < 8 {
        bail!("short cpu line in /proc/stat: {line:?}");
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice];
    // guest time is already included in user and nice.
    let [user, nice, system, idle, iowait, irq, softirq, steal] = v[..8] else {
        unreachable!()
    };
    Ok(SystemCpu {
        busy: user + nice + system + irq + softirq,
        steal,
        total: user + nice + system + idle + iowait + irq + softirq + steal,
    })
}

/// CPU used by this process and everything it started: its own threads, its
/// children that are alive (proxies, nginx workers, the collector) and those
/// it has reaped (finished load generators).
fn own_tree_ticks() -> Result<u64> {
    let me = std::process::id();
    let mut stats = Vec::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // Processes come and go while we scan; a vanished one is not ours to count.
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Ok(st) = parse_stat(&text)
        {
            stats.push((pid, st));
        }
    }
    let parent: std::collections::HashMap<u32, u32> =
        stats.iter().map(|(pid, st)| (*pid, st.ppid)).collect();
    let descends_from_me = |mut pid: u32| {
        for _ in 0..64 {
            match parent.get(&pid) {
                Some(&pp) if pp == me => return true,
                Some(&pp) if pp > 1 => pid = pp,
                _ => return false,
            }
        }
        false
    };
    let mut sum = 0;
    for (pid, st) in &stats {
        if *pid == me {
            sum += st.ticks + st.reaped_children_ticks;
        } else if descends_from_me(*pid) {
            sum += st.ticks;
        }
    }
    Ok(sum)
}

/// A measurement window over which CPU used by processes outside this
/// benchmark is measured: on a shared machine a concurrent build silently
/// moves every number, so it is reported instead.
pub struct Window {
    system: SystemCpu,
    own: u64,
}

/// Share of the machine's CPU (0..1) over a window.
#[derive(Debug, Clone, Copy, Default)]
pub struct Background {
    /// Used by processes that are not part of the benchmark.
    pub other: f64,
    /// Taken by the hypervisor from this virtual machine.
    pub steal: f64,
}

impl Window {
    pub fn start() -> Result<Window> {
        Ok(Window {
            system: system_cpu()?,
            own: own_tree_ticks()?,
        })
    }

    pub fn finish(self) -> Result<Background> {
        let now = system_cpu()?;
        let own = own_tree_ticks()?.saturating_sub(self.own);
        let total = now.total.saturating_sub(self.system.total).max(1) as f64;
        let busy = now.busy.saturating_sub(self.system.busy);
        Ok(Background {
            other: busy.saturating_sub(own) as f64 / total,
            steal: now.steal.saturating_sub(self.system.steal) as f64 / total,
        })
    }
}

fn system_cpu() -> Result<SystemCpu> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_system_cpu(&text)
}

/// What the kernel did for the proxies, per request and per hop (both
/// proxies' counts halved).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelCounts {
    pub syscalls: f64,
    pub context_switches: f64,
}

/// `perf stat` counting the system calls (the `raw_syscalls:sys_enter`
/// tracepoint) and context switches of some processes, all their threads,
/// until [`KernelCounter::finish`].
pub struct KernelCounter {
    child: Child,
    out: PathBuf,
}

impl KernelCounter {
    pub fn start(pids: &[u32], dir: &Path) -> Result<Self> {
        let out = dir.join("perf-stat.csv");
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let child = Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                "raw_syscalls:sys_enter,context-switches",
                "-o",
            ])
            .arg(&out)
            .args(["-p", &pids.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running perf stat (apt-get install linux-perf)")?;
        // perf attaches to every thread before it counts; give it the time.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(KernelCounter { child, out })
    }

    /// Stops counting; the counts per request per hop over `requests`.
    pub fn finish(mut self, requests: u64) -> Result<KernelCounts> {
        // SIGINT makes perf print its counts and exit.
        signal("-INT", self.child.id()).context("signalling perf")?;
        let status = self.child.wait()?;
        let text = std::fs::read_to_string(&self.out)
            .with_context(|| format!("reading {}", self.out.display()))?;
        let count = |event: &str| -> Result<f64> {
            parse_perf_count(&text, event).with_context(|| {
                format!("perf stat ({status}) counted no {event}; its output:\n{text}")
            })
        };
        let per = 2.0 * requests.max(1) as f64;
        Ok(KernelCounts {
            syscalls: count("raw_syscalls:sys_enter")? / per,
            context_switches: count("context-switches")? / per,
        })
    }
}

impl Drop for KernelCounter {
    /// A run that failed before [`KernelCounter::finish`] leaves no perf
    /// behind; after it, perf has exited and this does nothing.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `sig` (`-STOP`, `-CONT`, `-INT`: std only offers SIGKILL) to `pid`.
pub fn signal(sig: &str, pid: u32) -> Result<()> {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill {sig} {pid} failed: {status}");
    }
    Ok(())
}

/// The value of `event` in `perf stat -x,` output (`value,unit,event,…`).
pub fn parse_perf_count(text: &str, event: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let mut f = l.split(',');
        let value = f.next()?;
        let _unit = f.next()?;
        (f.next()? == event).then(|| value.parse().ok())?
    })
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

    #[test]
    fn perf_counts_by_event_name() {
        let text = "# started on Mon Dec  7 03:01:02 2026\n\n\
            81234,,raw_syscalls:sys_enter,10012345,100.00,,\n\
            20411,,context-switches,10012345,100.00,,\n";
        assert_eq!(
            parse_perf_count(text, "raw_syscalls:sys_enter"),
            Some(81234.0)
        );
        assert_eq!(parse_perf_count(text, "context-switches"), Some(20411.0));
        assert_eq!(parse_perf_count(text, "cycles"), None);
        // perf writes this when it could not count.
        let text = "<not supported>,,raw_syscalls:sys_enter,0,100.00,,\n";
        assert_eq!(parse_perf_count(text, "raw_syscalls:sys_enter"), None);
    }

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
    fn stat_parent_and_reaped_children() {
        let st = parse_stat(STAT).unwrap();
        assert_eq!(st.ppid, 1);
        assert_eq!(st.reaped_children_ticks, 0);
        // A shell that has waited for children which used 30 + 12 ticks.
        let sh = "100 (bash) S 99 100 100 0 -1 4194304 1 0 0 0 5 3 30 12 20 0 1 0 1 1 1 0";
        let st = parse_stat(sh).unwrap();
        assert_eq!((st.ppid, st.ticks, st.reaped_children_ticks), (99, 8, 42));
    }

    #[test]
    fn system_cpu_line() {
        // The aggregate line is from the benchmark machine; per-CPU lines
        // must not be mistaken for it.
        let stat = "cpu  655797 0 72485 458447 9117 0 11029 7003 0 0\n\
            cpu0 327000 0 36000 229000 4500 0 5500 3500 0 0\nintr 1 2 3\n";
        let c = parse_system_cpu(stat).unwrap();
        assert_eq!(c.busy, 655797 + 72485 + 11029);
        assert_eq!(c.steal, 7003);
        assert_eq!(c.total, 655797 + 72485 + 458447 + 9117 + 11029 + 7003);
        assert!(parse_system_cpu("intr 1 2 3\n").is_err());
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
    fn memory_in_mib_with_the_private_part() {
        let status = "Name:\tlumen-proxy\nVmRSS:\t   16460 kB\nRssAnon:\t    5232 kB\nRssFile:\t   11228 kB\n";
        let m = Memory::parse(status).unwrap();
        assert!((m.rss_mib - 16.07).abs() < 0.01, "{m:?}");
        assert!((m.anon_mib - 5.11).abs() < 0.01, "{m:?}");
    }

    #[test]
    fn status_without_vmrss_is_an_error() {
        // Zombies have no memory lines.
        assert!(parse_vmrss_kib("Name:\tlumen\nState:\tZ (zombie)\n").is_err());
    }
}
