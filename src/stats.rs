//! In-process rates and latency percentiles for the JSON monitoring views: rates over the
//! last minute (one-second buckets), publish→ack latency over the last five minutes
//! (one-minute HDR histograms). Cheap to update on every message and to read every second;
//! nothing here scans PostgreSQL.
//!
//! They are this instance's view: with several instances, each reports what it handled
//! (Prometheus sums the counters across instances).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use chrono::Utc;
use hdrhistogram::Histogram;
use uuid::Uuid;

const RATE_WINDOW_SECS: usize = 60;
const LATENCY_WINDOW_MINUTES: usize = 5;
const MAX_LATENCY_MS: u64 = 24 * 3600 * 1000;

/// Events per second over the last minute: one bucket per second that had events, oldest
/// first, so an idle window holds nothing and a busy one at most sixty buckets.
#[derive(Clone, Default)]
struct RollingCounter {
    buckets: VecDeque<(i64, u64)>,
}

impl RollingCounter {
    fn add(&mut self, now_s: i64, amount: u64) {
        // Callers may arrive a second out of order: find the second from the newest end.
        match self
            .buckets
            .iter()
            .rposition(|(second, _)| *second <= now_s)
        {
            Some(at) if self.buckets[at].0 == now_s => self.buckets[at].1 += amount,
            Some(at) => self.buckets.insert(at + 1, (now_s, amount)),
            None => self.buckets.push_front((now_s, amount)),
        }
        let newest = self.buckets.back().map_or(now_s, |(second, _)| *second);
        while self
            .buckets
            .front()
            .is_some_and(|(second, _)| *second <= newest - RATE_WINDOW_SECS as i64)
        {
            self.buckets.pop_front();
        }
    }

    fn total(&self, now_s: i64) -> u64 {
        self.buckets
            .iter()
            .filter(|(second, _)| *second > now_s - RATE_WINDOW_SECS as i64 && *second <= now_s)
            .map(|(_, count)| count)
            .sum()
    }

    fn per_second(&self, now_s: i64) -> f64 {
        self.total(now_s) as f64 / RATE_WINDOW_SECS as f64
    }

    /// The last second anything was counted (-1 for never).
    fn last_active(&self) -> i64 {
        self.buckets.back().map_or(-1, |(second, _)| *second)
    }
}

/// Latencies (ms) over the last five minutes. The histograms (tens of kilobytes) are made at
/// the first latency recorded: most windows never record one.
#[derive(Default)]
struct RollingLatency {
    minutes: Vec<(i64, Histogram<u32>)>,
}

fn histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, MAX_LATENCY_MS, 2).expect("valid histogram bounds")
}

impl RollingLatency {
    fn record(&mut self, now_s: i64, latency_ms: u64) {
        if self.minutes.is_empty() {
            self.minutes = (0..LATENCY_WINDOW_MINUTES)
                .map(|_| (-1, histogram()))
                .collect();
        }
        let minute = now_s.div_euclid(60);
        let slot = &mut self.minutes[minute.rem_euclid(LATENCY_WINDOW_MINUTES as i64) as usize];
        if slot.0 != minute {
            slot.0 = minute;
            slot.1.reset();
        }
        slot.1
            .saturating_record(latency_ms.clamp(1, MAX_LATENCY_MS));
    }

    fn merged(&self, now_s: i64) -> Histogram<u32> {
        let minute = now_s.div_euclid(60);
        let mut merged = histogram();
        for (slot_minute, slot) in &self.minutes {
            if *slot_minute > minute - LATENCY_WINDOW_MINUTES as i64 {
                let _ = merged.add(slot);
            }
        }
        merged
    }
}

#[derive(Default)]
struct QueueWindow {
    published: RollingCounter,
    consumed: RollingCounter,
}

#[derive(Default)]
struct SubscriptionWindow {
    acked: RollingCounter,
    failed: RollingCounter,
    processing_ms: RollingCounter,
    timed: RollingCounter,
}

#[derive(Default)]
struct TenantWindow {
    published: RollingCounter,
    acked: RollingCounter,
    failed: RollingCounter,
    latency: RollingLatency,
}

impl RollingLatency {
    /// The last minute (as a second) a latency was recorded in (-1 for never).
    fn last_active(&self) -> i64 {
        self.minutes
            .iter()
            .map(|(minute, _)| *minute * 60 + 59)
            .max()
            .unwrap_or(-1)
    }
}

impl QueueWindow {
    fn last_active(&self) -> i64 {
        self.published
            .last_active()
            .max(self.consumed.last_active())
    }
}

impl SubscriptionWindow {
    fn last_active(&self) -> i64 {
        self.acked.last_active().max(self.failed.last_active())
    }
}

impl TenantWindow {
    /// Whether anything counted since `rates_from`, or a latency since `latency_from`.
    fn active(&self, rates_from: i64, latency_from: i64) -> bool {
        let counted = [&self.published, &self.acked, &self.failed]
            .iter()
            .any(|counter| counter.last_active() > rates_from);
        counted || self.latency.last_active() > latency_from
    }
}

/// How often idle windows are looked for.
const PRUNE_EVERY_SECS: i64 = 30;

#[derive(Default)]
struct Windows {
    tenants: HashMap<Uuid, TenantWindow>,
    queues: HashMap<Uuid, QueueWindow>,
    subscriptions: HashMap<Uuid, SubscriptionWindow>,
    pruned_at: i64,
}

impl Windows {
    /// Drops windows with nothing left in them (idle longer than they look back), so the
    /// memory kept grows with recent activity, not with every queue or tenant ever seen.
    fn prune(&mut self, now_s: i64) {
        if now_s - self.pruned_at < PRUNE_EVERY_SECS {
            return;
        }
        self.pruned_at = now_s;
        let rates_from = now_s - RATE_WINDOW_SECS as i64;
        let latency_from = now_s - (LATENCY_WINDOW_MINUTES as i64 + 1) * 60;
        self.tenants
            .retain(|_, w| w.active(rates_from, latency_from));
        self.queues.retain(|_, w| w.last_active() > rates_from);
        self.subscriptions
            .retain(|_, w| w.last_active() > rates_from);
    }
}

#[derive(Default)]
pub struct Stats {
    windows: Mutex<Windows>,
}

/// Latency and rates of one tenant (or of all), as `GET /metrics` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Performance {
    pub average_latency_ms: f64,
    pub p95_latency_ms: f64,
    pub p99_latency_ms: f64,
    /// Messages published per second.
    pub throughput: f64,
    /// Messages acked per second.
    pub processing_rate: f64,
    /// Failed attempts / (acked + failed attempts), 0–1.
    pub error_rate: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ConsumerRates {
    pub processing_rate: f64,
    pub error_rate: f64,
    pub avg_processing_ms: f64,
}

fn now_s() -> i64 {
    Utc::now().timestamp()
}

fn error_rate(acked: u64, failed: u64) -> f64 {
    if acked + failed == 0 {
        0.0
    } else {
        failed as f64 / (acked + failed) as f64
    }
}

impl Stats {
    fn with<R>(&self, f: impl FnOnce(&mut Windows) -> R) -> R {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        windows.prune(now_s());
        f(&mut windows)
    }

    /// A deleted queue's window goes with it.
    pub fn forget_queue(&self, queue_id: Uuid) {
        self.with(|w| w.queues.remove(&queue_id));
    }

    /// A deleted subscription's window goes with it.
    pub fn forget_subscription(&self, subscription_id: Uuid) {
        self.with(|w| w.subscriptions.remove(&subscription_id));
    }

    pub fn published(&self, tenant_id: Uuid, queue_id: Uuid, count: u64) {
        let now = now_s();
        self.with(|w| {
            w.tenants
                .entry(tenant_id)
                .or_default()
                .published
                .add(now, count);
            w.queues
                .entry(queue_id)
                .or_default()
                .published
                .add(now, count);
        });
    }

    /// A delivery was acked: `processing_ms` from delivery to ack, `latency_ms` from publish
    /// to ack.
    pub fn acked(
        &self,
        tenant_id: Uuid,
        queue_id: Option<Uuid>,
        subscription_id: Uuid,
        processing_ms: Option<i64>,
        latency_ms: Option<i64>,
    ) {
        let now = now_s();
        self.with(|w| {
            let tenant = w.tenants.entry(tenant_id).or_default();
            tenant.acked.add(now, 1);
            if let Some(latency) = latency_ms {
                tenant.latency.record(now, latency.max(0) as u64);
            }
            if let Some(queue_id) = queue_id {
                w.queues.entry(queue_id).or_default().consumed.add(now, 1);
            }
            let subscription = w.subscriptions.entry(subscription_id).or_default();
            subscription.acked.add(now, 1);
            if let Some(ms) = processing_ms {
                subscription.processing_ms.add(now, ms.max(0) as u64);
                subscription.timed.add(now, 1);
            }
        });
    }

    pub fn failed(&self, tenant_id: Uuid, subscription_id: Uuid) {
        let now = now_s();
        self.with(|w| {
            w.tenants.entry(tenant_id).or_default().failed.add(now, 1);
            w.subscriptions
                .entry(subscription_id)
                .or_default()
                .failed
                .add(now, 1);
        });
    }

    /// One tenant's performance, or all tenants' together (`None`).
    pub fn performance(&self, tenant_id: Option<Uuid>) -> Performance {
        let now = now_s();
        self.with(|w| {
            let mut latency = histogram();
            let (mut published, mut acked, mut failed) = (0.0, 0, 0);
            for (id, tenant) in &w.tenants {
                if tenant_id.is_some_and(|wanted| wanted != *id) {
                    continue;
                }
                let _ = latency.add(tenant.latency.merged(now));
                published += tenant.published.per_second(now);
                acked += tenant.acked.total(now);
                failed += tenant.failed.total(now);
            }
            let quantile = |q: f64| {
                if latency.is_empty() {
                    0.0
                } else {
                    latency.value_at_quantile(q) as f64
                }
            };
            Performance {
                average_latency_ms: if latency.is_empty() {
                    0.0
                } else {
                    latency.mean()
                },
                p95_latency_ms: quantile(0.95),
                p99_latency_ms: quantile(0.99),
                throughput: published,
                processing_rate: acked as f64 / RATE_WINDOW_SECS as f64,
                error_rate: error_rate(acked, failed),
            }
        })
    }

    /// (publish rate, consume rate) of a queue, per second over the last minute.
    pub fn queue_rates(&self, queue_id: Uuid) -> (f64, f64) {
        let now = now_s();
        self.with(|w| {
            w.queues.get(&queue_id).map_or((0.0, 0.0), |q| {
                (q.published.per_second(now), q.consumed.per_second(now))
            })
        })
    }

    pub fn consumer_rates(&self, subscription_id: Uuid) -> ConsumerRates {
        let now = now_s();
        self.with(|w| {
            w.subscriptions
                .get(&subscription_id)
                .map_or(ConsumerRates::default(), |s| {
                    let (acked, failed, timed) =
                        (s.acked.total(now), s.failed.total(now), s.timed.total(now));
                    ConsumerRates {
                        processing_rate: acked as f64 / RATE_WINDOW_SECS as f64,
                        error_rate: error_rate(acked, failed),
                        avg_processing_ms: if timed == 0 {
                            0.0
                        } else {
                            s.processing_ms.total(now) as f64 / timed as f64
                        },
                    }
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_counter_forgets_after_a_minute() {
        let mut counter = RollingCounter::default();
        counter.add(100, 30);
        counter.add(130, 30);
        assert_eq!(counter.total(130), 60);
        assert_eq!(counter.total(165), 30);
        assert_eq!(counter.total(200), 0);
        assert!((counter.per_second(130) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn latency_percentiles_cover_five_minutes() {
        let mut latency = RollingLatency::default();
        for ms in 1..=100 {
            latency.record(600, ms);
        }
        let merged = latency.merged(600);
        assert_eq!(merged.len(), 100);
        assert!((94..=96).contains(&merged.value_at_quantile(0.95)));
        assert_eq!(
            latency.merged(600 + 6 * 60).len(),
            0,
            "older than five minutes"
        );
    }

    #[test]
    fn out_of_order_seconds_land_in_their_bucket() {
        let mut counter = RollingCounter::default();
        counter.add(101, 1);
        counter.add(100, 2);
        counter.add(101, 3);
        counter.add(99, 1);
        assert_eq!(counter.buckets, [(99, 1), (100, 2), (101, 4)]);
        assert_eq!(counter.total(101), 7);
        counter.add(160, 1);
        assert_eq!(
            counter.buckets,
            [(101, 4), (160, 1)],
            "older than a minute: gone"
        );
    }

    #[test]
    fn idle_windows_are_dropped() {
        let mut windows = Windows::default();
        windows
            .tenants
            .entry(Uuid::from_u128(1))
            .or_default()
            .published
            .add(1000, 1);
        windows
            .queues
            .entry(Uuid::from_u128(2))
            .or_default()
            .published
            .add(1000, 1);
        windows
            .tenants
            .entry(Uuid::from_u128(3))
            .or_default()
            .latency
            .record(1000, 5);
        windows.prune(1030);
        assert_eq!((windows.tenants.len(), windows.queues.len()), (2, 1));
        windows.prune(1100);
        assert_eq!(windows.queues.len(), 0, "no rate left after a minute");
        assert_eq!(windows.tenants.len(), 1, "latencies are kept five minutes");
        windows.prune(1000 + 7 * 60);
        assert!(windows.tenants.is_empty());
    }

    #[test]
    fn error_rate_is_a_fraction() {
        assert_eq!(error_rate(0, 0), 0.0);
        assert_eq!(error_rate(3, 1), 0.25);
    }
}
