//! Operations that combine the store (PostgreSQL) and the broker (Redis). Handlers call one
//! function here after parsing and authorizing; these functions hold no HTTP types.

pub mod activity;
pub mod audit;
pub mod byte_quota;
pub mod changes;
pub mod consume;
pub mod dead_letters;
pub mod due;
pub mod health;
pub mod messages;
pub mod monitoring;
pub mod partitions;
pub mod publish;
pub mod publish_audit;
pub mod queue_cache;
pub mod queues;
pub mod signals;
pub mod subscriptions;
pub mod system_queues;
pub mod tenant_limits;
pub mod turns;
pub mod unrecorded;
pub mod upgrade;
pub mod wake;
pub mod webhook;
