//! Plain types and pure rules: no I/O here, so everything is unit-tested directly.

pub mod message;
pub mod queue;
pub mod schema;
pub mod validation;
