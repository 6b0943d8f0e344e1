//! Fault injection for the integration tests: each point makes one real code path fail the
//! way a crash or a dependency error would at that spot. Nothing is armed unless a test arms
//! it; an armed point fires once per arming.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use uuid::Uuid;

#[derive(Default)]
pub struct Faults {
    recorder_ack_failures: AtomicU32,
    serving_panics: Mutex<HashSet<Uuid>>,
}

impl Faults {
    /// The recorder's next `count` batches fail after they were written and before their
    /// ack, as a Redis failure at that moment would.
    pub fn fail_recorder_acks(&self, count: u32) {
        self.recorder_ack_failures.store(count, Ordering::SeqCst);
    }

    /// Whether this recorder batch fails before its ack (spending one armed failure).
    pub fn recorder_ack_fails(&self) -> bool {
        self.recorder_ack_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// The task serving webhook subscription `subscription` panics at its next turn.
    pub fn panic_serving(&self, subscription: Uuid) {
        self.serving_panics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(subscription);
    }

    /// Whether a panic is armed for `subscription` and has not fired yet.
    pub fn serving_panic_armed(&self, subscription: Uuid) -> bool {
        self.serving_panics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&subscription)
    }

    /// Whether the serving task of `subscription` panics now (disarming it).
    pub fn serving_panics(&self, subscription: Uuid) -> bool {
        self.serving_panics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&subscription)
    }
}
