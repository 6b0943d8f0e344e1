//! Work that many tenants share, served in turns: each round takes one item of every tenant
//! with work waiting before it takes a second of any, so a tenant with a thousand queues
//! waits as long as one with a single queue, not a thousand times longer. The shared
//! workers (recorder, scheduler, reclaimer, retention) take a bounded share per cycle.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;

use uuid::Uuid;

use super::partitions::QueueRef;
use crate::state::AppState;

pub struct TenantTurns<T> {
    by_tenant: HashMap<Uuid, VecDeque<T>>,
    /// Tenants with work waiting, in the order they are served next.
    order: VecDeque<Uuid>,
    queued: HashSet<T>,
}

impl<T> Default for TenantTurns<T> {
    fn default() -> Self {
        TenantTurns {
            by_tenant: HashMap::new(),
            order: VecDeque::new(),
            queued: HashSet::new(),
        }
    }
}

impl<T: Copy + Eq + Hash> TenantTurns<T> {
    /// Queues `item` for `tenant`, unless it is waiting already.
    pub fn push(&mut self, tenant: Uuid, item: T) {
        if !self.queued.insert(item) {
            return;
        }
        let items = self.by_tenant.entry(tenant).or_default();
        if items.is_empty() {
            self.order.push_back(tenant);
        }
        items.push_back(item);
    }

    /// Takes items in turns, one per tenant per round, until their weights reach `budget`
    /// (at least one item when any waits, however heavy).
    pub fn take(&mut self, budget: usize, weight: impl Fn(&T) -> usize) -> Vec<(Uuid, T)> {
        let mut taken = Vec::new();
        let mut spent = 0;
        while let Some(tenant) = self.order.pop_front() {
            let Some(items) = self.by_tenant.get_mut(&tenant) else {
                continue;
            };
            let Some(item) = items.front() else {
                self.by_tenant.remove(&tenant);
                continue;
            };
            let cost = weight(item).max(1);
            if !taken.is_empty() && spent + cost > budget {
                self.order.push_front(tenant);
                break;
            }
            let item = items.pop_front().expect("an item is waiting");
            if items.is_empty() {
                self.by_tenant.remove(&tenant);
            } else {
                self.order.push_back(tenant);
            }
            self.queued.remove(&item);
            spent += cost;
            taken.push((tenant, item));
        }
        if self.queued.is_empty() {
            // A sweep of many queues leaves no large allocation behind.
            *self = TenantTurns::default();
        }
        taken
    }

    pub fn len(&self) -> usize {
        self.queued.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }
}

/// Work of two kinds: what is due now (written partitions, timers that fell due) goes
/// before what a safety look or sweep queued, so a tenant's fresh work never waits behind
/// its own sweep; the sweep fills whatever budget is left.
pub struct Lanes<T> {
    pub due: TenantTurns<T>,
    pub swept: TenantTurns<T>,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Lanes {
            due: TenantTurns::default(),
            swept: TenantTurns::default(),
        }
    }
}

impl<T: Copy + Eq + Hash> Lanes<T> {
    pub fn take(&mut self, budget: usize, weight: impl Fn(&T) -> usize) -> Vec<(Uuid, T)> {
        let mut taken = self.due.take(budget, &weight);
        let spent: usize = taken.iter().map(|(_, item)| weight(item).max(1)).sum();
        if taken.is_empty() || spent < budget {
            let left = budget.saturating_sub(spent).max(1);
            let mut swept = self.swept.take(left, &weight);
            if !taken.is_empty() {
                // A heavy swept item that does not fit goes back to wait for a turn of its own.
                swept.retain(|(tenant, item)| {
                    let fits = weight(item).max(1) <= left;
                    if !fits {
                        self.swept.push(*tenant, *item);
                    }
                    fits
                });
            }
            taken.extend(swept);
        }
        taken
    }

    pub fn is_empty(&self) -> bool {
        self.due.is_empty() && self.swept.is_empty()
    }
}

/// Queues the queues of `ids` for their tenants' turns; returns the ids of those that no
/// longer exist.
pub async fn push_queues(
    state: &AppState,
    turns: &mut TenantTurns<QueueRef>,
    mut ids: Vec<Uuid>,
) -> Vec<Uuid> {
    if ids.is_empty() {
        return ids;
    }
    ids.sort_unstable();
    ids.dedup();
    let (found, missing) = state.queue_directory.lookup(&state.store, &ids).await;
    for queue in found {
        turns.push(queue.tenant_id, queue);
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn a_wide_tenant_waits_its_turn_like_everyone_else() {
        let mut turns = TenantTurns::default();
        for queue in 0..1000u32 {
            turns.push(tenant(1), queue);
        }
        turns.push(tenant(2), 5000);
        turns.push(tenant(3), 6000);
        let first = turns.take(3, |_| 1);
        let tenants: Vec<Uuid> = first.iter().map(|(t, _)| *t).collect();
        assert_eq!(tenants, [tenant(1), tenant(2), tenant(3)]);
        assert_eq!(turns.len(), 999);
        let next = turns.take(10, |_| 1);
        assert!(next.iter().all(|(t, _)| *t == tenant(1)));
        assert_eq!(next.len(), 10);
    }

    #[test]
    fn weights_bound_a_take_but_one_heavy_item_still_goes() {
        let mut turns = TenantTurns::default();
        turns.push(tenant(1), (1u32, 64usize));
        turns.push(tenant(2), (2, 1));
        let taken = turns.take(8, |(_, weight)| *weight);
        assert_eq!(taken, [(tenant(1), (1, 64))]);
        let taken = turns.take(8, |(_, weight)| *weight);
        assert_eq!(taken, [(tenant(2), (2, 1))]);
        assert!(turns.is_empty());
    }

    #[test]
    fn due_work_goes_before_a_sweep_and_the_sweep_fills_the_rest() {
        let mut lanes = Lanes::default();
        for queue in 0..100u32 {
            lanes.swept.push(tenant(1), queue);
        }
        lanes.due.push(tenant(1), 500);
        let taken = lanes.take(4, |_| 1);
        assert_eq!(taken[0], (tenant(1), 500), "the written partition first");
        assert_eq!(taken.len(), 4, "the sweep fills the turn");
        assert_eq!(lanes.swept.len(), 97);
    }

    #[test]
    fn an_item_waiting_already_is_not_queued_twice() {
        let mut turns = TenantTurns::default();
        turns.push(tenant(1), 7u32);
        turns.push(tenant(1), 7);
        assert_eq!(turns.len(), 1);
        assert_eq!(turns.take(10, |_| 1).len(), 1);
        turns.push(tenant(1), 7);
        assert_eq!(turns.len(), 1, "taken items can be queued again");
    }
}
