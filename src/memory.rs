//! Returning freed memory to the operating system.
//!
//! glibc's allocator keeps what the program frees in its per-thread arenas for reuse and
//! rarely gives it back. After bursts (many short-lived tenants, large payloads, sweeps over
//! many queues) the process would keep its high-water mark for good; trimming now and then
//! lets the resident size follow what is live.

/// Hands free pages of every malloc arena back to the OS (a no-op off glibc).
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it has no preconditions
    // and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
