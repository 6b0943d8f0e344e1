//! What the recorder writes for each stream entry and journal event: reading one entry into
//! its contribution, merging a batch's contributions into one `RecordBatch`, and describing an
//! entry that cannot be written for the quarantine.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::broker::keys::KeyLayout;
use crate::broker::recorder::StreamEntry;
use crate::domain::message::Envelope;
use crate::service::partitions::PartitionRef;
use crate::service::publish_audit::Published;
use crate::store::records::{
    NewConsumptionRecord, NewMessageRecord, PayloadEncoding, QuarantinedEntry, RecordBatch,
    RecordStatusChange,
};

/// What one entry adds to the record.
#[derive(Debug)]
pub enum Contribution {
    /// A message stored in the stream (`published`) or waiting for its time (`scheduled`).
    Record(NewMessageRecord),
    /// A later status of a message (expired, cancelled).
    Status(RecordStatusChange),
    /// A delivery attempt, and the message status it leads to (none for a filtered one).
    Attempt(NewConsumptionRecord, Option<RecordStatusChange>),
}

/// Reads one entry of `owner`'s stream or journal; an entry that cannot be read says why.
pub fn read(owner: &PartitionRef, entry: &StreamEntry) -> Result<Contribution, String> {
    let envelope = || -> Result<Envelope, String> {
        let text = entry.field("e").ok_or("the entry has no envelope")?;
        serde_json::from_str(text).map_err(|error| format!("unreadable envelope: {error}"))
    };
    if !KeyLayout::is_journal(&entry.stream) {
        return Ok(Contribution::Record(to_record(
            owner,
            "published",
            Some(&entry.id),
            envelope()?,
        )));
    }
    match entry.field("k") {
        Some("scheduled") => Ok(Contribution::Record(to_record(
            owner,
            "scheduled",
            None,
            envelope()?,
        ))),
        Some(event @ ("expired" | "cancelled")) => {
            let status = if event == "expired" {
                "expired"
            } else {
                "cancelled"
            };
            let message_id = message_id_field(entry)?;
            Ok(Contribution::Status(status_change(
                owner,
                message_id,
                status,
                0,
                event_time(entry),
            )))
        }
        Some("delivery") => {
            let attempt = delivery_attempt(owner, entry)?;
            // A guest's outcome is the guest's: the owner's record of the message is
            // untouched by it.
            if attempt.tenant_id != owner.tenant_id {
                return Ok(Contribution::Attempt(attempt, None));
            }
            let retries = if attempt.status == "failed" {
                attempt.attempt
            } else {
                attempt.attempt - 1
            };
            let change = message_status_after(attempt.status).map(|status| {
                status_change(
                    owner,
                    &attempt.message_id,
                    status,
                    retries,
                    attempt.created_at,
                )
            });
            Ok(Contribution::Attempt(attempt, change))
        }
        Some(other) => Err(format!("unknown journal event '{other}'")),
        None => Err("a journal entry without an event kind".into()),
    }
}

/// Merges contributions into one batch: one record per message (a message released in this
/// very batch is written as published, not also as scheduled), and of several status changes
/// of a message the highest.
pub fn plan(contributions: Vec<Contribution>) -> RecordBatch {
    let mut records: HashMap<(Uuid, String), NewMessageRecord> = HashMap::new();
    let mut changes: HashMap<(Uuid, String), RecordStatusChange> = HashMap::new();
    let mut attempts = Vec::new();
    let mut note = |change: RecordStatusChange| {
        let key = (change.topic_id, change.message_id.clone());
        match changes.get_mut(&key) {
            Some(known) => {
                if supersedes(change.status, known.status) {
                    known.status = change.status;
                    known.at = change.at;
                }
                known.retries = known.retries.max(change.retries);
            }
            None => {
                changes.insert(key, change);
            }
        }
    };
    for contribution in contributions {
        match contribution {
            Contribution::Record(record) => {
                let key = (record.topic_id, record.message_id.clone());
                if record.status == "published" || !records.contains_key(&key) {
                    records.insert(key, record);
                }
            }
            Contribution::Status(change) => note(change),
            Contribution::Attempt(attempt, change) => {
                if let Some(change) = change {
                    note(change);
                }
                attempts.push(attempt);
            }
        }
    }
    RecordBatch {
        records: records.into_values().collect(),
        attempts,
        changes: changes.into_values().collect(),
    }
}

/// The messages of a batch that were just published, for the `message_published` audit:
/// stored now, or scheduled for later (a release of a scheduled message is not a publish).
pub fn newly_published(
    readable: &[(&StreamEntry, PartitionRef, Option<Contribution>)],
) -> Vec<Published> {
    readable
        .iter()
        .filter_map(|(_, owner, contribution)| {
            let Some(Contribution::Record(record)) = contribution else {
                return None;
            };
            let released = record.status == "published"
                && record
                    .scheduled_at
                    .is_some_and(|due| due > record.published_at);
            (!released).then(|| Published {
                tenant_id: owner.tenant_id,
                queue_id: owner.queue_id,
                message_id: record.message_id.clone(),
                partition: record.partition,
                offset: record.stream_offset.clone(),
                size: record.payload_bytes,
                producer_id: record.producer_id.clone(),
                published_at: record.published_at,
            })
        })
        .collect()
}

/// An entry set aside, described so that PostgreSQL can always store the description:
/// control characters (NUL among them) are escaped.
pub fn quarantined(owner: &PartitionRef, entry: &StreamEntry, error: &str) -> QuarantinedEntry {
    let message_id = entry
        .field("e")
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .and_then(|envelope| envelope["messageId"].as_str().map(str::to_owned))
        .or_else(|| entry.field("id").map(str::to_owned));
    QuarantinedEntry {
        tenant_id: owner.tenant_id,
        topic_id: owner.queue_id,
        partition: i32::from(owner.partition),
        source: if KeyLayout::is_journal(&entry.stream) {
            "journal"
        } else {
            "stream"
        },
        entry_id: escape_control(&entry.id),
        message_id: message_id.as_deref().map(escape_control),
        entry: entry.fields_json(),
        error: escape_control(error),
    }
}

/// `text` with control characters written as `\u{..}` escapes.
pub fn escape_control(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn message_id_field(entry: &StreamEntry) -> Result<&str, String> {
    entry
        .field("id")
        .filter(|id| !id.is_empty())
        .ok_or_else(|| "the event names no message".into())
}

/// The message status a delivery outcome leads to (a filtered message is unchanged).
fn message_status_after(outcome: &str) -> Option<&'static str> {
    match outcome {
        "acked" => Some("consumed"),
        "failed" => Some("failed"),
        "dead_letter" => Some("dead_letter"),
        "expired" => Some("expired"),
        _ => None,
    }
}

/// Whether a message's status becomes `new` where it was `old`, by the store's rule: a
/// higher status wins, except that expiry and cancellation only end a message that was
/// never delivered (a message consumed by one subscription and expired for another stays
/// consumed, whether the two are written in one batch or two).
fn supersedes(new: &str, old: &str) -> bool {
    rank(new) > rank(old)
        && (!matches!(new, "expired" | "cancelled") || matches!(old, "scheduled" | "published"))
}

/// Status precedence, matching the store's rule.
fn rank(status: &str) -> u8 {
    match status {
        "scheduled" => 0,
        "published" => 1,
        "failed" => 2,
        "dead_letter" => 3,
        "consumed" => 4,
        _ => 5,
    }
}

fn status_change(
    owner: &PartitionRef,
    message_id: &str,
    status: &'static str,
    retries: i32,
    at: DateTime<Utc>,
) -> RecordStatusChange {
    RecordStatusChange {
        topic_id: owner.queue_id,
        tenant_id: owner.tenant_id,
        partition: i32::from(owner.partition),
        message_id: message_id.to_owned(),
        status,
        retries,
        at,
    }
}

/// When a journal event happened (`t`, ms), or now for events written without it.
fn event_time(entry: &StreamEntry) -> DateTime<Utc> {
    entry
        .field("t")
        .and_then(|t| t.parse::<i64>().ok())
        .and_then(DateTime::from_timestamp_millis)
        .unwrap_or_else(Utc::now)
}

/// A `delivery` journal event as a consumption record.
fn delivery_attempt(
    owner: &PartitionRef,
    entry: &StreamEntry,
) -> Result<NewConsumptionRecord, String> {
    let status = match entry.field("o") {
        Some("acked") => "acked",
        Some("failed") => "failed",
        Some("filtered") => "filtered",
        Some("expired") => "expired",
        Some("dead_letter") => "dead_letter",
        Some("set_aside") => "set_aside",
        other => return Err(format!("unknown delivery outcome {other:?}")),
    };
    let subscription_id = entry
        .field("sub")
        .and_then(|id| id.parse().ok())
        .ok_or("the delivery names no subscription")?;
    let at = event_time(entry);
    let text = |name: &str| {
        entry
            .field(name)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    Ok(NewConsumptionRecord {
        consumer_instance: text("ci"),
        offset_value: text("off"),
        next_retry_at: entry
            .field("ra")
            .and_then(|t| t.parse::<i64>().ok())
            .and_then(DateTime::from_timestamp_millis),
        // The guest tenant whose subscription it was, or the queue's owner.
        tenant_id: entry
            .field("gt")
            .and_then(|tenant| tenant.parse().ok())
            .unwrap_or(owner.tenant_id),
        topic_id: owner.queue_id,
        partition: i32::from(owner.partition),
        journal_id: entry.id.clone(),
        subscription_id,
        message_id: entry.field("id").unwrap_or_default().to_owned(),
        attempt: entry
            .field("n")
            .and_then(|n| n.parse().ok())
            .unwrap_or(1)
            .max(1),
        status,
        processing_ms: entry
            .field("ms")
            .and_then(|ms| ms.parse::<i64>().ok())
            .map(|ms| i32::try_from(ms.max(0)).unwrap_or(i32::MAX)),
        error: entry
            .field("err")
            .filter(|e| !e.is_empty())
            .map(str::to_owned),
        created_at: at,
    })
}

fn to_record(
    owner: &PartitionRef,
    status: &'static str,
    offset: Option<&str>,
    envelope: Envelope,
) -> NewMessageRecord {
    // A sealed payload is recorded sealed: PostgreSQL never holds an encrypted queue's
    // plaintext.
    let (payload, payload_encoding, payload_bytes) = match &envelope.sealed {
        Some(sealed) => (
            serde_json::to_string(sealed).unwrap_or_default(),
            PayloadEncoding::Sealed,
            sealed.original_bytes,
        ),
        None => {
            let text = envelope.payload.to_string();
            let length = text.len();
            // jsonb refuses the NUL character, which JSON text writes as \u0000: such a
            // payload is kept as its JSON text (a false match, an escaped backslash before
            // "u0000", only costs the same faithful form).
            if text.contains("\\u0000") {
                (
                    Value::String(text).to_string(),
                    PayloadEncoding::JsonText,
                    length,
                )
            } else {
                (text, PayloadEncoding::Json, length)
            }
        }
    };
    let timestamp = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or_default();
    NewMessageRecord {
        topic_id: owner.queue_id,
        tenant_id: owner.tenant_id,
        partition: i32::from(owner.partition),
        status,
        stream_offset: offset.map(str::to_owned),
        message_key: envelope.key,
        correlation_id: envelope.correlation_id,
        headers: serde_json::to_string(&envelope.headers).unwrap_or_else(|_| "{}".into()),
        payload_bytes: i32::try_from(payload_bytes).unwrap_or(i32::MAX),
        payload,
        payload_encoding,
        content_type: envelope.content_type,
        producer_id: envelope.producer_id,
        trace_id: envelope.trace_id,
        published_at: timestamp(envelope.published_at),
        scheduled_at: envelope.scheduled_at.map(timestamp),
        expires_at: timestamp(envelope.expires_at),
        message_id: envelope.message_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expiry_and_cancellation_end_only_a_message_never_delivered() {
        assert!(supersedes("expired", "published"));
        assert!(supersedes("cancelled", "scheduled"));
        assert!(supersedes("consumed", "failed"));
        assert!(!supersedes("expired", "consumed"));
        assert!(!supersedes("expired", "dead_letter"));
        assert!(!supersedes("cancelled", "failed"));
        assert!(!supersedes("published", "consumed"));
    }

    fn owner() -> PartitionRef {
        PartitionRef {
            queue_id: Uuid::from_u128(1),
            tenant_id: Uuid::from_u128(2),
            partition: 0,
        }
    }

    fn envelope(payload: Value) -> String {
        json!({"messageId": "m\u{0}1", "tenantId": "t", "headers": {}, "contentType": "x",
               "publishedAt": 1, "expiresAt": 2, "payload": payload})
        .to_string()
    }

    #[test]
    fn payloads_jsonb_cannot_hold_are_kept_as_text() {
        let entry = StreamEntry::new(
            "p{q.0}:stream",
            "1-0",
            [("e", envelope(json!({"a": "x\u{0}y"})))],
        );
        let Ok(Contribution::Record(record)) = read(&owner(), &entry) else {
            panic!("a record");
        };
        assert_eq!(record.payload_encoding, PayloadEncoding::JsonText);
        let text: String = serde_json::from_str(&record.payload).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({"a": "x\u{0}y"})
        );
        let plain = StreamEntry::new(
            "p{q.0}:stream",
            "1-1",
            [("e", envelope(json!({"$sealed": 1})))],
        );
        let Ok(Contribution::Record(record)) = read(&owner(), &plain) else {
            panic!("a record");
        };
        assert_eq!(record.payload_encoding, PayloadEncoding::Json);
    }

    #[test]
    fn unreadable_entries_say_why_and_quarantine_escapes_them() {
        let broken = StreamEntry::new("p{q.0}:stream", "1-0", [("e", "{not json".to_owned())]);
        assert!(read(&owner(), &broken)
            .unwrap_err()
            .contains("unreadable envelope"));
        let odd = StreamEntry::new("p{q.0}:journal", "2-0", [("k", "mystery".to_owned())]);
        assert!(read(&owner(), &odd).is_err());
        let described = quarantined(&owner(), &broken, "bad\u{0}");
        assert_eq!(described.source, "stream");
        assert_eq!(described.error, "bad\\u{0}");
        let poisoned = StreamEntry::new("p{q.0}:stream", "3-0", [("e", envelope(json!(1)))]);
        let described = quarantined(&owner(), &poisoned, "refused");
        assert_eq!(described.message_id.as_deref(), Some("m\\u{0}1"));
        assert!(!described.entry.contains('\u{0}'));
    }

    #[test]
    fn a_release_in_the_same_batch_wins_over_scheduled() {
        let scheduled = StreamEntry::new(
            "p{q.0}:journal",
            "1-0",
            [("k", "scheduled".to_owned()), ("e", envelope(json!(1)))],
        );
        let released = StreamEntry::new("p{q.0}:stream", "2-0", [("e", envelope(json!(1)))]);
        let contributions = [released, scheduled]
            .iter()
            .map(|entry| read(&owner(), entry).unwrap())
            .collect();
        let batch = plan(contributions);
        assert_eq!(batch.records.len(), 1);
        assert_eq!(batch.records[0].status, "published");
    }
}
