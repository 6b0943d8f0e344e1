//! Wake-ups between instances: how an instance learns, without polling, that another one
//! stored messages, scheduled a retry or changed a queue or a subscription.
//!
//! Announcements go out on one Redis Pub/Sub channel (`KeyLayout::wake_channel`). The Lua
//! scripts that change a queue publish them in the same atomic step as the change, so a
//! consumer that looked at a queue before the change always hears about it:
//!
//! - `r <origin> <queue id>`: messages are ready now (published, or released by the
//!   scheduler). Sent only when the queue's `announced` key was absent: a consumer that finds
//!   the queue empty removes that key in the same script, so the next publish announces again
//!   while busy queues announce nothing.
//! - `w <origin> <queue id> <due ms>`: a delayed message (or an expiry) is due then, sooner
//!   than anything else the partition waited for (the scheduler's timer).
//! - `t <origin> <queue id> <due ms>`: a failed delivery is retried then (the consumers'
//!   timer), sooner than any other retry of its group on the partition.
//! - `s <origin>`: a subscription was created, changed or deleted.
//! - `x <origin> <subscription id>`: a subscription was deleted (its in-process state goes).
//! - `c <origin> <queue id> <tenant id> <name>`: a queue was changed.
//! - `d <origin> <queue id> <tenant id> <name>`: a queue was deleted (its timers, signals and
//!   in-process state go).
//!
//! - `h <origin>`: a heartbeat, every `HEARTBEAT`: an instance that hears nothing (not even
//!   its own) for `SILENCE_LIMIT` after Redis accepted one of its heartbeats takes its
//!   connection for lost (a half-open TCP connection delivers nothing and reports nothing),
//!   reconnects and catches up. A stalled Redis accepts no heartbeat, so it is not mistaken
//!   for a lost connection.
//!
//! `<origin>` is the announcing instance's id: an instance acts on its own changes directly
//! and skips their echo. Pub/Sub delivers at most once; an instance whose connection drops
//! treats every queue as changed when it is back (`workers::waker`), and each worker keeps a
//! slow safety look for what a lost announcement could leave behind.

use std::time::Duration;

use uuid::Uuid;

/// How often each instance sends a heartbeat on the wake channel.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Hearing nothing for this long after Redis accepted a heartbeat means the wake channel
/// connection is lost.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    Heartbeat,
    Ready {
        queue_id: Uuid,
    },
    Waiting {
        queue_id: Uuid,
        due_ms: i64,
    },
    Retry {
        queue_id: Uuid,
        due_ms: i64,
    },
    /// One subscription was created or changed (`None`: any may have).
    SubscriptionsChanged {
        subscription_id: Option<Uuid>,
    },
    SubscriptionDeleted {
        subscription_id: Uuid,
    },
    QueueChanged {
        queue_id: Uuid,
        tenant_id: Uuid,
        name: String,
    },
    QueueDeleted {
        queue_id: Uuid,
        tenant_id: Uuid,
        name: String,
    },
}

/// An announcement and the instance that sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    pub origin: String,
    pub announcement: Announcement,
}

impl Announcement {
    /// The message text, as `origin` sends it.
    pub fn encode(&self, origin: &str) -> String {
        match self {
            Announcement::Ready { queue_id } => format!("r {origin} {queue_id}"),
            Announcement::Waiting { queue_id, due_ms } => format!("w {origin} {queue_id} {due_ms}"),
            Announcement::Retry { queue_id, due_ms } => format!("t {origin} {queue_id} {due_ms}"),
            Announcement::Heartbeat => format!("h {origin}"),
            Announcement::SubscriptionsChanged {
                subscription_id: Some(id),
            } => format!("s {origin} {id}"),
            Announcement::SubscriptionsChanged {
                subscription_id: None,
            } => format!("s {origin}"),
            Announcement::SubscriptionDeleted { subscription_id } => {
                format!("x {origin} {subscription_id}")
            }
            Announcement::QueueChanged {
                queue_id,
                tenant_id,
                name,
            } => format!("c {origin} {queue_id} {tenant_id} {name}"),
            Announcement::QueueDeleted {
                queue_id,
                tenant_id,
                name,
            } => format!("d {origin} {queue_id} {tenant_id} {name}"),
        }
    }

    /// Reads a message; `None` for anything this release does not know.
    pub fn decode(text: &str) -> Option<Heard> {
        let mut parts = text.splitn(5, ' ');
        let kind = parts.next()?;
        let origin = parts.next()?.to_owned();
        let mut queue = || parts.next()?.parse::<Uuid>().ok();
        let announcement = match kind {
            "r" => Announcement::Ready { queue_id: queue()? },
            "w" | "t" => {
                let queue_id = queue()?;
                let due_ms = parts.next()?.parse::<f64>().ok()? as i64;
                if kind == "w" {
                    Announcement::Waiting { queue_id, due_ms }
                } else {
                    Announcement::Retry { queue_id, due_ms }
                }
            }
            "h" => Announcement::Heartbeat,
            "s" => Announcement::SubscriptionsChanged {
                subscription_id: queue(),
            },
            "x" => Announcement::SubscriptionDeleted {
                subscription_id: queue()?,
            },
            "c" | "d" => {
                let queue_id = queue()?;
                let tenant_id = parts.next()?.parse().ok()?;
                let name = parts.next()?.to_owned();
                if kind == "c" {
                    Announcement::QueueChanged {
                        queue_id,
                        tenant_id,
                        name,
                    }
                } else {
                    Announcement::QueueDeleted {
                        queue_id,
                        tenant_id,
                        name,
                    }
                }
            }
            _ => return None,
        };
        Some(Heard {
            origin,
            announcement,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_read_back_as_sent() {
        let queue_id = Uuid::from_u128(7);
        for announcement in [
            Announcement::Heartbeat,
            Announcement::Ready { queue_id },
            Announcement::Waiting {
                queue_id,
                due_ms: 1_700_000_000_123,
            },
            Announcement::Retry {
                queue_id,
                due_ms: 5,
            },
            Announcement::SubscriptionsChanged {
                subscription_id: None,
            },
            Announcement::SubscriptionsChanged {
                subscription_id: Some(Uuid::from_u128(8)),
            },
            Announcement::SubscriptionDeleted {
                subscription_id: Uuid::from_u128(8),
            },
            Announcement::QueueChanged {
                queue_id,
                tenant_id: Uuid::from_u128(9),
                name: "orders.v2".into(),
            },
            Announcement::QueueDeleted {
                queue_id,
                tenant_id: Uuid::from_u128(9),
                name: "orders.v2".into(),
            },
        ] {
            let heard = Announcement::decode(&announcement.encode("abc")).expect("decodes");
            assert_eq!(heard.origin, "abc");
            assert_eq!(heard.announcement, announcement);
        }
    }

    #[test]
    fn scripts_send_due_times_as_lua_numbers() {
        // Lua may print a large score in exponent form.
        let heard = Announcement::decode(&format!("t x {} 1.7e+12", Uuid::nil()))
            .expect("a time in Lua's float notation decodes");
        assert_eq!(
            heard.announcement,
            Announcement::Retry {
                queue_id: Uuid::nil(),
                due_ms: 1_700_000_000_000
            }
        );
    }

    #[test]
    fn unknown_or_broken_messages_are_ignored() {
        for text in [
            "",
            "x a",
            "r a not-a-uuid",
            "t a 00000000-0000-0000-0000-000000000000",
        ] {
            assert_eq!(Announcement::decode(text), None, "{text}");
        }
    }
}
