//! The retry schedule of failed deliveries (API.md): `retryDelayMs × 2^(attempt-1)`, capped at
//! 15 minutes, with ±10 % jitter so that failures of many messages do not retry in lockstep.

/// The longest wait before a retry.
pub const MAX_RETRY_DELAY_MS: u64 = 15 * 60 * 1000;

/// The wait before retrying after failed delivery number `attempt` (1 for the first
/// delivery). `jitter` is uniform in [-1, 1].
pub fn retry_delay_ms(retry_delay_ms: u64, attempt: u32, jitter: f64) -> u64 {
    let exponent = attempt.saturating_sub(1).min(40);
    let base = retry_delay_ms
        .saturating_mul(1u64 << exponent)
        .min(MAX_RETRY_DELAY_MS);
    let jittered = base as f64 * (1.0 + 0.1 * jitter.clamp(-1.0, 1.0));
    (jittered.round() as u64).min(MAX_RETRY_DELAY_MS)
}

/// Whether a message delivered `deliveries` times may be delivered again.
pub fn may_retry(deliveries: u32, max_retry_attempts: u32) -> bool {
    deliveries <= max_retry_attempts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_per_attempt_and_caps() {
        assert_eq!(retry_delay_ms(1000, 1, 0.0), 1000);
        assert_eq!(retry_delay_ms(1000, 2, 0.0), 2000);
        assert_eq!(retry_delay_ms(1000, 4, 0.0), 8000);
        assert_eq!(retry_delay_ms(1000, 30, 0.0), MAX_RETRY_DELAY_MS);
        assert_eq!(retry_delay_ms(u64::MAX, 3, 1.0), MAX_RETRY_DELAY_MS);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        assert_eq!(retry_delay_ms(1000, 1, 1.0), 1100);
        assert_eq!(retry_delay_ms(1000, 1, -1.0), 900);
        assert_eq!(retry_delay_ms(1000, 1, 7.0), 1100);
    }

    #[test]
    fn retries_are_bounded() {
        // maxRetryAttempts 3: deliveries 1..=3 may be followed by another, the 4th may not.
        assert!(may_retry(3, 3));
        assert!(!may_retry(4, 3));
        assert!(!may_retry(1, 0));
    }
}
