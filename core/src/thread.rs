//! Thread scheduling hints shared by the components that run background
//! work beside a latency-sensitive path.

/// Lowers the calling thread's scheduling priority to nice 10, so that when
/// the machine is busy the threads left at the default priority (requests in
/// a sidecar, ingest and health checks in the collector) run first and this
/// thread's work catches up after. Failing leaves the thread as it was,
/// which only costs latency, so errors are ignored.
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take no pointers; on Linux
        // PRIO_PROCESS with a thread id sets that thread's nice value only.
        unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
        }
    }
}
