//! The allocator, and returning freed memory to the operating system.
//!
//! The service allocates and frees small buffers at a high rate on every request; glibc's
//! malloc spent about a third of the publish path's CPU on them (docs/PERFORMANCE.md), so
//! the binary uses mimalloc (`main.rs`). Left to its defaults, mimalloc holds freed pages
//! for a while and the resident size under load rises by tens of MB; purging them at once
//! costs no measurable throughput here and keeps the resident size near what is live.

/// `mi_option_purge_delay` in mimalloc's option enumeration (`mimalloc.h`, v2 and v3 alike);
/// the Rust bindings do not name it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Called once at start-up, before the runtime starts. `MIMALLOC_PURGE_DELAY` in the
/// environment (milliseconds) still wins, for measuring the trade-off.
pub fn configure_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set only stores an option value; mimalloc reads it when it purges.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
    }
}

/// Hands pages freed after bursts (many short-lived tenants, large payloads, sweeps over many
/// queues) back to the OS, so the resident size follows what is live.
pub fn release_freed() {
    // SAFETY: mi_collect has no preconditions and may be called from any thread.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
