//! Pushes messages to every active webhook subscription.
//!
//! The dispatcher keeps one serving task per active webhook subscription, reconciled with
//! the subscription list whenever a subscription changes on any instance (`service::wake`),
//! so a subscription starts or stops being served at once after its creation, pause,
//! resume, update or deletion. Each serving task takes messages of its consumer group (due
//! retries first) and pushes them with at most `handlerConfig.concurrency` requests in
//! flight (a semaphore), so a slow or dead endpoint only ever holds its own subscription's
//! permits. An idle serving task costs nothing: it sleeps until its queue gets messages
//! (announced by whichever instance stored them) or one of its retries falls due.
//! Failures go through the same retry policy and dead-lettering as pull subscriptions
//! (`service::consume::record_failure`).
//!
//! Several instances may serve one subscription: a message is taken by one of them at a time
//! (the group's delivery state in Redis), and an instance that dies leaves its in-flight
//! deliveries to be reclaimed after their deadline. At shutdown a serving task stops taking,
//! lets in-flight pushes finish (each bounded by its timeout and its settlement's Redis
//! call) and leaves the rest pending.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::consume::{Delivery, Outcome, Settlement};
use crate::domain::message::Envelope;
use crate::domain::queue::QueueStatus;
use crate::domain::subscription::{Subscription, SubscriptionStatus, SubscriptionType};
use crate::service::consume::{
    record_failure, screen, settle, take_limit, watch_times, Books, Failure,
};
use crate::service::webhook::PushOutcome;
use crate::service::{queues, subscriptions};
use crate::state::AppState;

/// Changes are announced: this only bounds what a lost announcement leaves unserved.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);
/// An idle serving task is woken by announcements and timers; it also looks on its own this
/// often (plus up to a tenth more, so that the looks of many tasks spread out), in case an
/// announcement was lost.
const SAFETY_LOOK: Duration = Duration::from_secs(300);
/// How soon a serving task tries again when its queue cannot be read (PostgreSQL down) or a
/// take failed.
const RESOLVE_RETRY: Duration = Duration::from_secs(1);
/// A serving task held back by its queue (paused, private, ACLs) is woken by the change that
/// lifts it; it also looks this often, in case the announcement was lost.
const QUEUE_STATE_LOOK: Duration = Duration::from_secs(30);
/// The ack deadline of a push outlives its timeout by this much, so the reclaimer never
/// takes a push that is still running.
const DEADLINE_MARGIN_MS: i64 = 5000;

struct Served {
    updated_at: DateTime<Utc>,
    stop: CancellationToken,
    task: tokio::task::Id,
}

/// Push permits per tenant, shared by all its subscriptions (`WEBHOOK_TENANT_CONCURRENCY`):
/// a tenant whose endpoints hang holds at most that many pushes, however many subscriptions
/// it has.
#[derive(Default)]
struct TenantPermits {
    tenants: std::sync::Mutex<HashMap<Uuid, Arc<Semaphore>>>,
}

impl TenantPermits {
    /// Drops the pools no serving task holds (their tenants have no webhook served here).
    fn prune(&self) {
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        tenants.retain(|_, permits| Arc::strong_count(permits) > 1);
    }

    fn of(&self, tenant_id: Uuid, capacity: usize) -> Arc<Semaphore> {
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        tenants
            .entry(tenant_id)
            .or_insert_with(|| Arc::new(Semaphore::new(capacity)))
            .clone()
    }
}

pub async fn run(state: AppState, shutdown: CancellationToken) {
    let tenant_permits = Arc::new(TenantPermits::default());
    let mut served: HashMap<Uuid, Served> = HashMap::new();
    let mut tasks: JoinSet<Uuid> = JoinSet::new();
    loop {
        let changes = state.subscriptions.changes();
        let subscriptions = state.subscriptions.current(&state.store).await;
        let wanted: HashMap<Uuid, &Subscription> = subscriptions
            .iter()
            .filter(|s| {
                s.subscription_type == SubscriptionType::Webhook
                    && s.status == SubscriptionStatus::Active
            })
            .map(|s| (s.id, &**s))
            .collect();
        served.retain(|id, serving| {
            let keep = wanted
                .get(id)
                .is_some_and(|s| s.updated_at == serving.updated_at);
            if !keep {
                serving.stop.cancel();
            }
            keep
        });
        for (id, subscription) in wanted {
            if served.contains_key(&id) {
                continue;
            }
            let stop = shutdown.child_token();
            let tenant = tenant_permits.of(
                subscription.tenant_id,
                state.config.webhook_tenant_concurrency,
            );
            let task = tasks
                .spawn(serve(
                    state.clone(),
                    subscription.clone(),
                    tenant,
                    stop.clone(),
                ))
                .id();
            served.insert(
                id,
                Served {
                    updated_at: subscription.updated_at,
                    stop,
                    task,
                },
            );
        }
        tenant_permits.prune();
        tokio::select! {
            () = tokio::time::sleep(RECONCILE_EVERY) => {}
            () = state.subscriptions.changed_since(changes) => {}
            Some(ended) = tasks.join_next_with_id() => supervise(ended, &mut served),
            () = shutdown.cancelled() => break,
        }
        while let Some(ended) = tasks.try_join_next_with_id() {
            supervise(ended, &mut served);
        }
    }
    // Serving tasks watch child tokens of `shutdown`: they are stopping; wait for their pushes.
    while tasks.join_next().await.is_some() {}
}

/// A serving task ended. One that was stopped (its subscription changed) is done; one that
/// panicked, or ended on its own, leaves its subscription unserved: it is dropped from
/// `served`, so the reconciliation that follows starts it again.
fn supervise(
    ended: Result<(tokio::task::Id, Uuid), tokio::task::JoinError>,
    served: &mut HashMap<Uuid, Served>,
) {
    let (task, panic) = match &ended {
        Ok((task, _)) => (*task, None),
        Err(error) => (error.id(), error.is_panic().then_some(error)),
    };
    let Some((&subscription, serving)) = served.iter().find(|(_, s)| s.task == task) else {
        return;
    };
    if serving.stop.is_cancelled() {
        return;
    }
    match panic {
        Some(error) => {
            tracing::error!(subscription = %subscription, error = %error, "webhook serving task panicked; restarting it")
        }
        None => {
            tracing::warn!(subscription = %subscription, "webhook serving task ended on its own; restarting it")
        }
    }
    served.remove(&subscription);
}

/// Serves one webhook subscription until `stop`.
async fn serve(
    state: AppState,
    subscription: Subscription,
    tenant_permits: Arc<Semaphore>,
    stop: CancellationToken,
) -> Uuid {
    let concurrency = subscription
        .handler_config
        .concurrency
        .map_or(state.config.max_concurrent_consumers, |c| c as usize)
        .max(1);
    let timeout = Duration::from_millis(
        subscription
            .handler_config
            .timeout_ms
            .unwrap_or(state.config.processing_timeout_ms),
    );
    let permits = Arc::new(Semaphore::new(concurrency));
    let filter = subscription.filter();
    let consumer = subscription.id.to_string();
    let mut pushes = JoinSet::new();
    let in_order = concurrency == 1;
    let (mut acks, mut settling) = start_settling(&state, &subscription, concurrency);
    let mut first_partition = 0u16;
    let mut denied = false;
    // A tenant permit this task waited for, kept for its next take.
    let mut waited_for: Option<OwnedSemaphorePermit> = None;
    let safety_look = SAFETY_LOOK + SAFETY_LOOK.mul_f64(fastrand::f64() / 10.0);
    let signal = state.signals.subscribe(subscription.queue_id);
    while !stop.is_cancelled() {
        if state.faults.serving_panics(subscription.id) {
            panic!(
                "injected fault: the serving task of {} panics",
                subscription.id
            );
        }
        while pushes.try_join_next().is_some() {}
        if settling.is_finished() {
            // Only a panic outside its settle calls ends it early (those are caught): what it
            // held is reclaimed after its deadline and delivered again, never lost.
            let ended = (&mut settling).await;
            tracing::error!(subscription = %subscription.id, ended = ?ended.err(), "the settler of a webhook ended; starting another");
            (acks, settling) = start_settling(&state, &subscription, concurrency);
        }
        // Listening before looking: whatever arrives, or changes the queue, after this wakes
        // the wait below.
        let arrived = signal.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        let Ok(resolved) =
            queues::resolve(&state, subscription.queue_tenant_id, &subscription.queue).await
        else {
            idle(&stop, Some(arrived), &mut pushes, None, RESOLVE_RETRY).await;
            continue;
        };
        let queue = resolved.queue;
        // The queue's consumer rules apply to pushes as to pulls: a queue made private, or a
        // principal taken off `allowedConsumers`, stops the pushes (the change is announced
        // to every instance, which looks at the queue again).
        match subscriptions::subscription_may_consume(&queue, &subscription) {
            Ok(()) if denied => {
                denied = false;
                tracing::info!(subscription = %subscription.id, "webhook delivery allowed again");
            }
            Ok(()) => {}
            Err(error) => {
                if !denied {
                    denied = true;
                    tracing::warn!(subscription = %subscription.id, reason = error.message, "webhook delivery stopped: the queue no longer admits this subscriber");
                }
                idle(&stop, Some(arrived), &mut pushes, None, QUEUE_STATE_LOOK).await;
                continue;
            }
        }
        if queue.status == QueueStatus::Paused {
            idle(&stop, Some(arrived), &mut pushes, None, QUEUE_STATE_LOOK).await;
            continue;
        }
        // Permits are reserved before taking, so a taken message never waits for one.
        let (mut reserved, tenant_short) = reserve(
            &permits,
            &tenant_permits,
            waited_for.take(),
            state.config.message_batch_size,
        );
        if reserved.is_empty() {
            // Own permits all pushing: a finished push ends the wait. The tenant's all held by
            // its other subscriptions: the next one freed goes to this task.
            let tenant = tenant_short.then_some(&tenant_permits);
            waited_for = idle(&stop, Some(arrived), &mut pushes, tenant, safety_look).await;
            continue;
        }
        let now = Utc::now().timestamp_millis();
        let deadline = now
            + (subscription.session_timeout_ms as i64)
                .max(timeout.as_millis() as i64 + DEADLINE_MARGIN_MS);
        let taken = state
            .broker
            .take(
                queue.id,
                queue.partition_count,
                first_partition,
                &subscription.delivery_group,
                &consumer,
                take_limit(&state, reserved.len()),
                now,
                deadline,
                in_order,
            )
            .await;
        first_partition = first_partition.wrapping_add(1) % queue.partition_count.max(1);
        let taken = match taken {
            Ok(taken) if taken.gone => {
                drop(reserved);
                match subscriptions::restore_lost_group(&state, &subscription, &queue).await {
                    // Made again: looked at after a pause, so a group that cannot be made
                    // costs a look a second, not a busy loop.
                    Ok(true) => {
                        idle(&stop, Some(arrived), &mut pushes, None, RESOLVE_RETRY).await;
                    }
                    // Deleted: nothing more to take; the dispatcher stops this task once it
                    // hears of it.
                    Ok(false) => stop.cancelled().await,
                    Err(error) => {
                        tracing::warn!(error = %error, subscription = %subscription.id, "checking a missing consumer group failed");
                        idle(&stop, Some(arrived), &mut pushes, None, RESOLVE_RETRY).await;
                    }
                }
                continue;
            }
            Ok(taken) => taken,
            Err(error) => {
                tracing::warn!(error = %error, subscription = %subscription.id, "taking messages failed");
                drop(reserved);
                idle(&stop, Some(arrived), &mut pushes, None, RESOLVE_RETRY).await;
                continue;
            }
        };
        watch_times(&state, queue.id, &taken, deadline);
        if taken.deliveries.is_empty() {
            drop(reserved);
            idle(&stop, Some(arrived), &mut pushes, None, safety_look).await;
            continue;
        }
        // Whatever screening leaves, the take may have left more behind: no wait after it.
        let screened = screen(
            &state,
            &subscription,
            &queue,
            filter.as_ref(),
            taken.deliveries,
            now,
        )
        .await;
        match screened {
            Ok(deliverable) => {
                for ((delivery, envelope), permits) in
                    deliverable.into_iter().zip(reserved.drain(..))
                {
                    pushes.spawn(push(
                        state.clone(),
                        subscription.clone(),
                        queue.clone(),
                        delivery,
                        envelope,
                        timeout,
                        (permits, acks.clone(), in_order),
                    ));
                }
            }
            Err(error) => {
                // Left in flight: the reclaimer settles them when their deadline passes.
                tracing::warn!(error = %error, subscription = %subscription.id, "screening taken messages failed");
                drop(reserved);
                idle(&stop, Some(arrived), &mut pushes, None, RESOLVE_RETRY).await;
            }
        }
    }
    // Let in-flight pushes finish (each is bounded by its timeout and its settlement's Redis
    // call); the rest stays pending.
    while pushes.join_next().await.is_some() {}
    drop(acks);
    let _ = settling.await;
    subscription.id
}

/// Reserves up to `most` pairs of permits (this subscription's, its tenant's), starting with
/// a tenant permit already held; and whether the tenant's permits ran out first.
fn reserve(
    permits: &Arc<Semaphore>,
    tenant_permits: &Arc<Semaphore>,
    mut held: Option<OwnedSemaphorePermit>,
    most: usize,
) -> (Vec<PushPermits>, bool) {
    let mut reserved = Vec::new();
    while reserved.len() < most.max(1) {
        let Ok(own) = permits.clone().try_acquire_owned() else {
            return (reserved, false);
        };
        let tenant = match held.take() {
            Some(tenant) => tenant,
            None => match tenant_permits.clone().try_acquire_owned() {
                Ok(tenant) => tenant,
                Err(_) => return (reserved, true),
            },
        };
        reserved.push((own, tenant));
    }
    (reserved, false)
}

/// A push's permits: its subscription's and its tenant's, held while it pushes (and, in order
/// mode, until it is settled).
type PushPermits = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// Waits for a reason to look again: a message arrived or the queue changed, a push
/// finished, a permit of the tenant was freed (when `tenant_permits` is given: the permit is
/// returned, held for the next take), or `at_most` passed.
async fn idle(
    stop: &CancellationToken,
    arrived: Option<std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>>,
    pushes: &mut JoinSet<()>,
    tenant_permits: Option<&Arc<Semaphore>>,
    at_most: Duration,
) -> Option<OwnedSemaphorePermit> {
    let arrived = async {
        match arrived {
            Some(arrived) => arrived.await,
            None => std::future::pending().await,
        }
    };
    let finished = async {
        if pushes.is_empty() {
            std::future::pending::<()>().await;
        } else {
            let _ = pushes.join_next().await;
        }
    };
    let permit_freed = async {
        match tenant_permits {
            Some(permits) => permits.clone().acquire_owned().await.ok(),
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = arrived => None,
        () = finished => None,
        permit = permit_freed => permit,
        () = tokio::time::sleep(at_most) => None,
        () = stop.cancelled() => None,
    }
}

/// Settlements of successful pushes gathered per call, at most (the settler's queue holds at
/// most `concurrency`): this only bounds one script call's length.
const ACKS_PER_SETTLE: usize = 256;

/// A successful push, to be settled.
#[derive(Clone)]
struct Pushed {
    queue: Arc<crate::domain::queue::Queue>,
    /// Without its envelope: settling needs only where it is and which delivery it was.
    delivery: Delivery,
    message_id: String,
    published_at_ms: i64,
    elapsed_ms: i64,
}

impl Pushed {
    fn settlement<'a>(&'a self, subscription: &'a Subscription) -> Settlement<'a> {
        Settlement {
            group: &subscription.delivery_group,
            partition: self.delivery.partition,
            entry_id: &self.delivery.entry_id,
            outcome: Outcome::Acked,
            expected_deadline: Some(&self.delivery.deadline),
            expected_attempt: None,
            message_id: &self.message_id,
            subscription_id: subscription.id,
            processing_ms: Some(self.elapsed_ms),
            error: None,
            now_ms: Utc::now().timestamp_millis(),
            published_at_ms: Some(self.published_at_ms),
        }
    }
}

/// A successful push for the settler; `settled`, for a push that waits, says it was settled
/// (or settling failed: then the reclaimer settles it when its deadline passes).
struct Ack {
    pushed: Pushed,
    settled: Option<oneshot::Sender<()>>,
}

/// Starts the task that settles a serving task's successful pushes: the acks that finish
/// while one settle call is out go together in the next, one script call for all of them
/// (a settle per push cost Redis more than the push's own work). At most `waiting` acks
/// queue for it: past that, a finished push keeps its permits until there is room. So a
/// serving task has at most about three times `concurrency` deliveries taken and not
/// settled (the pushes, the queue, the batch being settled), which a crash leaves to be
/// reclaimed. It ends when every sender is dropped.
fn start_settling(
    state: &AppState,
    subscription: &Subscription,
    waiting: usize,
) -> (mpsc::Sender<Ack>, tokio::task::JoinHandle<()>) {
    let (acks, mut arriving) = mpsc::channel::<Ack>(waiting.max(1));
    let (state, subscription) = (state.clone(), subscription.clone());
    let task = tokio::spawn(async move {
        let mut batch = Vec::new();
        while arriving.recv_many(&mut batch, ACKS_PER_SETTLE).await > 0 {
            let pushed: Arc<Vec<Pushed>> =
                Arc::new(batch.iter().map(|ack: &Ack| ack.pushed.clone()).collect());
            // Settled in a task of its own, so that a panic there cannot take the queued
            // acks with it: the batch is then settled one by one here.
            let settling = tokio::spawn(settle_batch(
                state.clone(),
                subscription.clone(),
                pushed.clone(),
            ));
            if let Err(error) = settling.await {
                tracing::error!(error = %error, subscription = %subscription.id, "settling pushes panicked; settling them one by one");
                for one in pushed.iter() {
                    if let Err(error) = settle_alone(&state, &subscription, one).await {
                        tracing::warn!(error = %error, subscription = %subscription.id, "settling a push failed");
                    }
                }
            }
            for ack in batch.drain(..) {
                if let Some(settled) = ack.settled {
                    let _ = settled.send(());
                }
            }
        }
    });
    (acks, task)
}

/// One settle call for a batch of successful pushes.
async fn settle_batch(state: AppState, subscription: Subscription, pushed: Arc<Vec<Pushed>>) {
    let Some(last) = pushed.last() else {
        return;
    };
    let settlements: Vec<Settlement> = pushed
        .iter()
        .map(|one| one.settlement(&subscription))
        .collect();
    // The queue as the latest push saw it (its id is the subscription's).
    if let Err(error) = settle(&state, &subscription, &last.queue, &settlements).await {
        // Left in flight: the reclaimer settles them when their deadline passes.
        tracing::warn!(error = %error, subscription = %subscription.id, "settling pushes failed");
    }
}

/// Hands a successful push to the serving task's settler. Its permits are freed then: the
/// endpoint answered, so the next push may start while this one waits in the settler's
/// queue. In order mode (`wait`) the push keeps them until it is settled, so that the next
/// take finds the partition free. When the settler is gone (it panicked) the push is
/// settled alone: a success is never left to be reclaimed as a failure.
async fn settle_pushed(
    state: &AppState,
    subscription: &Subscription,
    acks: &mpsc::Sender<Ack>,
    pushed: Pushed,
    permits: PushPermits,
    wait: bool,
) -> crate::error::ApiResult<()> {
    // Kept only by a push that waits: it settles alone if the settler fails it.
    let copy = wait.then(|| pushed.clone());
    let (settled, settling) = if wait {
        let (settled, settling) = oneshot::channel();
        (Some(settled), Some(settling))
    } else {
        (None, None)
    };
    let pushed = match acks.send(Ack { pushed, settled }).await {
        Err(mpsc::error::SendError(ack)) => ack.pushed,
        Ok(()) => match (settling, copy) {
            (Some(settling), Some(copy)) => {
                if settling.await.is_ok() {
                    return Ok(());
                }
                copy
            }
            _ => {
                drop(permits);
                return Ok(());
            }
        },
    };
    tracing::warn!(subscription = %subscription.id, "the settler of this webhook is gone; settling the push alone");
    settle_alone(state, subscription, &pushed).await
}

/// Settles one successful push with a call of its own.
async fn settle_alone(
    state: &AppState,
    subscription: &Subscription,
    pushed: &Pushed,
) -> crate::error::ApiResult<()> {
    settle(
        state,
        subscription,
        &pushed.queue,
        &[pushed.settlement(subscription)],
    )
    .await
    .map(|_| ())
}

/// One push and its settlement.
async fn push(
    state: AppState,
    subscription: Subscription,
    queue: Arc<crate::domain::queue::Queue>,
    delivery: Delivery,
    envelope: Envelope,
    timeout: Duration,
    (permits, acks, in_order): (PushPermits, mpsc::Sender<Ack>, bool),
) {
    let books = Books::of(&subscription, &queue);
    state
        .metrics
        .count_messages(books.tenant_id, &books.metric_queue, "delivered", 1);
    let outcome = state
        .webhooks
        .push(&subscription, &queue.name, &delivery, &envelope, timeout)
        .await;
    let settled = match outcome {
        PushOutcome::Delivered { elapsed_ms } => {
            let pushed = Pushed {
                queue,
                message_id: envelope.message_id,
                published_at_ms: envelope.published_at,
                delivery: Delivery {
                    envelope: None,
                    ..delivery
                },
                elapsed_ms,
            };
            settle_pushed(&state, &subscription, &acks, pushed, permits, in_order).await
        }
        PushOutcome::Failed {
            error,
            retry_after_ms,
            elapsed_ms,
        } => {
            let message_id = envelope.message_id.clone();
            let failure = Failure {
                partition: delivery.partition,
                entry_id: &delivery.entry_id,
                message_id: &message_id,
                attempt: delivery.attempt,
                expected_deadline: Some(&delivery.deadline),
                expected_attempt: None,
                error: &error,
                delay_override_ms: retry_after_ms,
                processing_ms: Some(elapsed_ms),
            };
            record_failure(&state, &subscription, &queue, failure, Some(envelope))
                .await
                .map(|_| ())
        }
    };
    if let Err(error) = settled {
        // Left in flight: the reclaimer settles it when its deadline passes.
        tracing::warn!(error = %error, subscription = %subscription.id, "settling a push failed");
    }
}
