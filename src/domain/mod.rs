//! Plain types and pure rules: no I/O here, so everything is unit-tested directly.

pub mod ack_token;
pub mod filter;
pub mod message;
pub mod queue;
pub mod retry;
pub mod schema;
pub mod signature;
pub mod subscription;
pub mod validation;
