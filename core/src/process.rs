//! What this process holds, for every server's `/metrics`: the live heap
//! — the bytes the [`Counted`] global allocator has handed out and not had
//! back, as Envoy's `server.memory_allocated` — and, read from /proc at
//! the moment they are asked for, the `process_*` figures Prometheus's
//! client libraries export (CPU, resident and virtual memory, open and
//! allowed file descriptors, threads, start time). Tests read another
//! process's figures the same way ([`Figures::of`]). After
//! work that frees far more than it keeps, [`release_free_memory`] asks
//! the binary's allocator to give what it keeps free back to the OS.
//!
//! Resident memory alone cannot tell a leak from an allocator keeping
//! freed pages for reuse; beside the live heap it can: a leak raises both,
//! retention only the first.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering::Relaxed};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A global allocator that counts the bytes `A` has live.
///
/// ```ignore
/// #[global_allocator]
/// static ALLOCATOR: Counted<mimalloc::MiMalloc> = Counted(mimalloc::MiMalloc);
/// ```
///
/// Every allocation and free adds to a counter, so the counters are
/// sharded: a thread adds to its own of [`SHARDS`] cache lines, never
/// bouncing one between cores on the request path; a scrape sums them.
pub struct Counted<A>(pub A);

/// More than the threads that allocate on the request path (a sidecar's
/// workers); threads beyond share, which costs only a contended add.
const SHARDS: usize = 16;

/// One counter on a cache line (128 bytes: adjacent-line prefetch pairs
/// 64-byte lines on x86).
#[repr(align(128))]
struct Shard(AtomicIsize);

static LIVE: [Shard; SHARDS] = [const { Shard(AtomicIsize::new(0)) }; SHARDS];
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Const-initialised and without a destructor: reading it never
    // allocates, which the allocator's own path requires.
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

#[inline]
fn count(bytes: isize) {
    let shard = SHARD
        .try_with(|s| match s.get() {
            usize::MAX => {
                let i = NEXT_SHARD.fetch_add(1, Relaxed) % SHARDS;
                s.set(i);
                i
            }
            i => i,
        })
        // A thread past its thread-locals' teardown still frees.
        .unwrap_or(0);
    LIVE[shard].0.fetch_add(bytes, Relaxed);
}

/// Bytes allocated through [`Counted`] and not yet freed; 0 in a binary
/// whose global allocator is not [`Counted`].
pub fn allocated_bytes() -> u64 {
    let live: isize = LIVE.iter().map(|s| s.0.load(Relaxed)).sum();
    // Shards are read one after another while other threads move memory
    // between them, so a sum taken mid-move can dip for a moment.
    live.max(0) as u64
}

/// How this binary's allocator hands the memory it keeps free back to the
/// OS: only the binary knows which allocator it links.
static RELEASE: OnceLock<fn()> = OnceLock::new();

/// Says how [`release_free_memory`] reaches this binary's allocator; the
/// first call wins.
pub fn set_release(release: fn()) {
    let _ = RELEASE.set(release);
}

/// Asks the allocator to hand back to the OS the memory it keeps free for
/// reuse — the calling thread's and what its arenas hold — after work that
/// freed far more than it keeps (a compaction). Nothing unless the binary
/// said how ([`set_release`]).
pub fn release_free_memory() {
    if let Some(release) = RELEASE.get() {
        release();
    }
}

// SAFETY: every call goes to `A` unchanged, with the caller's pointer,
// layout and size, so `A`'s guarantees are the caller's; counting touches
// only atomics and a thread-local that neither allocates nor is dropped.
#[allow(unsafe_code)]
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counted<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller's contract for `GlobalAlloc::alloc`.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller's contract for `GlobalAlloc::alloc_zeroed`.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as the caller's contract for `GlobalAlloc::dealloc`.
        unsafe { self.0.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as the caller's contract for `GlobalAlloc::realloc`.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// The process's figures now, in OpenMetrics text, for a server to append
/// to its own.
pub fn exposition() -> String {
    let mut registry = Registry::default();
    let gauge = |v: f64| {
        let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        g.set(v);
        g
    };
    registry.register(
        "lumen_memory_allocated_bytes",
        "Bytes the process has allocated and not freed (its live heap); resident memory beyond it is the allocator's free pages kept for reuse, and code",
        gauge(allocated_bytes() as f64),
    );
    if let Some(p) = Figures::of_self() {
        let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        cpu.inc_by(p.cpu_seconds);
        registry.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            cpu,
        );
        let figures = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                p.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                p.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                p.max_fds,
            ),
            ("process_threads", "Number of OS threads", p.threads),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                p.start_time_seconds,
            ),
        ];
        for (name, help, value) in figures {
            registry.register(name, help, gauge(value));
        }
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// A process's figures from /proc: this one's for `/metrics`, another's
/// for a test or benchmark watching it; `None` where there is no procfs
/// or no such process.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    pub cpu_seconds: f64,
    pub resident_bytes: f64,
    pub virtual_bytes: f64,
    pub open_fds: f64,
    pub max_fds: f64,
    pub threads: f64,
    pub start_time_seconds: f64,
}

/// Linux reports CPU times and start times in USER_HZ ticks, which is 100
/// in the kernel's ABI on every architecture Lumen builds for.
const TICKS_PER_SECOND: f64 = 100.0;

impl Figures {
    pub fn of_self() -> Option<Figures> {
        Self::read("/proc/self")
    }

    pub fn of(pid: u32) -> Option<Figures> {
        Self::read(&format!("/proc/{pid}"))
    }

    fn read(dir: &str) -> Option<Figures> {
        let text = |file: &str| std::fs::read_to_string(format!("{dir}/{file}")).ok();
        let open_fds = std::fs::read_dir(format!("{dir}/fd")).ok()?.count();
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        Self::parse(
            &text("stat")?,
            &text("status")?,
            &text("limits")?,
            &boot,
            open_fds,
        )
    }

    /// From the texts of `/proc/PID/stat`, `/proc/PID/status`,
    /// `/proc/PID/limits` and `/proc/stat`, and the entries of
    /// `/proc/PID/fd`.
    pub fn parse(
        stat: &str,
        status: &str,
        limits: &str,
        proc_stat: &str,
        open_fds: usize,
    ) -> Option<Figures> {
        // The command name (field 2) is in parentheses and may hold
        // spaces or parentheses; the fields after the last `)` are plain.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // Fields 14 (utime), 15 (stime) and 22 (starttime) of the line,
        // counted from 1, are 11, 12 and 19 after the command.
        let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
        let cpu_seconds = (ticks(11)? + ticks(12)?) as f64 / TICKS_PER_SECOND;
        let kib = |field: &str| -> Option<f64> {
            let v = status.lines().find_map(|l| l.strip_prefix(field))?;
            v.split_whitespace().next()?.parse::<f64>().ok()
        };
        let boot_time: f64 = proc_stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        let max_fds = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))?
            .split_whitespace()
            .next()?;
        Some(Figures {
            cpu_seconds,
            resident_bytes: kib("VmRSS:")? * 1024.0,
            virtual_bytes: kib("VmSize:")? * 1024.0,
            open_fds: open_fds as f64,
            // "unlimited" has no number; Prometheus's clients report it so.
            max_fds: max_fds.parse().unwrap_or(f64::INFINITY),
            threads: kib("Threads:")?,
            start_time_seconds: boot_time + ticks(19)? as f64 / TICKS_PER_SECOND,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_read_from_the_kernels_texts() {
        let stat = "4242 (lumen (demo) x) S 1 4242 4242 0 -1 4194560 9000 0 0 0 \
                    1234 566 0 0 20 0 42 0 98765 1000000000 70000 18446744073709551615";
        let status = "Name:\tlumen\nVmSize:\t  976564 kB\nVmRSS:\t  286720 kB\nThreads:\t42\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1048576              1048576              files     \n";
        let proc_stat = "cpu  1 2 3\nbtime 1796000000\nprocesses 9\n";
        let p = Figures::parse(stat, status, limits, proc_stat, 301).expect("parses");
        assert_eq!(p.cpu_seconds, 18.0);
        assert_eq!(p.resident_bytes, 286_720.0 * 1024.0);
        assert_eq!(p.virtual_bytes, 976_564.0 * 1024.0);
        assert_eq!(p.threads, 42.0);
        assert_eq!(p.open_fds, 301.0);
        assert_eq!(p.max_fds, 1_048_576.0);
        assert_eq!(p.start_time_seconds, 1_796_000_000.0 + 987.65);
        assert_eq!(
            Figures::parse("garbage", status, limits, proc_stat, 1),
            None
        );
    }

    #[test]
    fn this_process_has_figures_and_the_exposition_names_them() {
        let text = exposition();
        for family in [
            "lumen_memory_allocated_bytes",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_threads",
            "process_start_time_seconds",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{family} "))),
                "{family} missing from\n{text}"
            );
        }
        let p = Figures::of_self().expect("/proc/self");
        assert!(p.resident_bytes > 0.0 && p.threads >= 1.0 && p.open_fds >= 3.0);
        let by_pid = Figures::of(std::process::id()).expect("/proc/PID");
        assert_eq!(by_pid.start_time_seconds, p.start_time_seconds);
        assert_eq!(Figures::of(u32::MAX), None, "no such process");
    }

    #[test]
    #[allow(unsafe_code)] // calls the allocator directly
    fn the_counted_allocator_counts_what_is_live() {
        let counted = Counted(std::alloc::System);
        let before = allocated_bytes();
        let layout = Layout::from_size_align(1 << 20, 8).expect("layout");
        // SAFETY: a non-zero layout; the block is freed below with the
        // layout it was grown to.
        unsafe {
            let p = counted.alloc(layout);
            assert!(!p.is_null());
            let grown = counted.realloc(p, layout, 3 << 20);
            assert!(!grown.is_null());
            // Other tests' threads allocate through the test binary's own
            // allocator, not this one, so the counters move only here.
            assert_eq!(allocated_bytes() - before, 3 << 20);
            counted.dealloc(grown, Layout::from_size_align(3 << 20, 8).expect("layout"));
        }
        assert_eq!(allocated_bytes(), before);
    }
}
