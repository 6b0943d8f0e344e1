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

/// The setting `start_with_allocator_settings` adds.
const ARENA_EAGER_COMMIT: &str = "MIMALLOC_ARENA_EAGER_COMMIT";

/// Arenas should be committed as they are used, not when reserved: with eager commit
/// (mimalloc's default on Linux) freed pages of the arena are never handed back, and 2 000
/// short-lived tenants left about 18 MB of RSS behind against 4–8 MB without it, for no
/// measurable throughput (docs/PERFORMANCE.md, "Memory under tenant churn"). mimalloc reads
/// this setting when it reserves its first arena, before `main` runs, so `mi_option_set`
/// comes too late: unless the environment already has it, the binary replaces itself once
/// (same process, same arguments) with it set. Returns only when it did not.
pub fn start_with_allocator_settings() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os(ARENA_EAGER_COMMIT).is_some() {
        return;
    }
    // `/proc/self/exe` still names a binary replaced on disk since it started.
    let proc_exe = std::path::Path::new("/proc/self/exe");
    let binary = if proc_exe.exists() {
        proc_exe.to_path_buf()
    } else if let Ok(binary) = std::env::current_exe() {
        binary
    } else {
        return;
    };
    let mut arguments = std::env::args_os();
    let error = std::process::Command::new(binary)
        .arg0(arguments.next().unwrap_or_default())
        .args(arguments)
        .env(ARENA_EAGER_COMMIT, "0")
        .exec();
    eprintln!("starting with {ARENA_EAGER_COMMIT}=0 failed ({error}); going on without it");
}

/// Hands pages freed after bursts (many short-lived tenants, large payloads, sweeps over many
/// queues) back to the OS, so the resident size follows what is live.
pub fn release_freed() {
    // SAFETY: mi_collect has no preconditions and may be called from any thread.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
