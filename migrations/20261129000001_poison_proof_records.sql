-- How a record's payload is stored. The service decides it, never the producer, so no payload
-- shape can be mistaken for another:
--   json       payload holds the message's JSON value;
--   json_text  payload holds the JSON text of the value as a string, for values jsonb cannot
--              hold (a NUL character: jsonb refuses "\u0000");
--   sealed     payload holds the sealed form (compressed and/or encrypted; see src/crypto.rs).
ALTER TABLE message_records ADD COLUMN payload_encoding TEXT NOT NULL DEFAULT 'json'
    CHECK (payload_encoding IN ('json', 'json_text', 'sealed'));

-- Records written before this column held sealed payloads in band as {"$sealed": {...}}.
-- Only queues that seal (compressed or encrypted) ever wrote that shape on purpose.
UPDATE message_records r
   SET payload_encoding = 'sealed', payload = r.payload -> '$sealed'
  FROM message_topics t
 WHERE t.id = r.topic_id
   AND (t.encrypted OR t.compression_type <> 'none')
   AND jsonb_typeof(r.payload) = 'object'
   AND r.payload ? '$sealed'
   AND (SELECT count(*) FROM jsonb_object_keys(r.payload)) = 1
   AND jsonb_typeof(r.payload -> '$sealed') = 'object'
   AND r.payload -> '$sealed' ? 'codec'
   AND r.payload -> '$sealed' ? 'data';

-- A consumption row is the record of one journal event (partition, journal entry id), so a
-- batch the recorder writes twice (it failed between writing and acknowledging) adds nothing.
-- Rows written before this change have NULLs, which never conflict.
ALTER TABLE consumption_records ADD COLUMN partition_id INTEGER, ADD COLUMN journal_id TEXT;
CREATE UNIQUE INDEX consumption_records_journal_key
    ON consumption_records (topic_id, partition_id, journal_id);

-- Stream entries and journal events PostgreSQL refused, one row each, so the recorder goes on
-- with every other entry and the operator can see what was set aside and why.
CREATE TABLE record_quarantine (
    id           BIGSERIAL PRIMARY KEY,
    tenant_id    UUID        NOT NULL,
    topic_id     UUID        NOT NULL REFERENCES message_topics (id) ON DELETE CASCADE,
    partition_id INTEGER     NOT NULL,
    source       TEXT        NOT NULL CHECK (source IN ('stream', 'journal')),
    entry_id     TEXT        NOT NULL,
    -- Control characters escaped, so any id fits.
    message_id   TEXT,
    -- The entry's fields as JSON text (control characters escaped).
    entry        TEXT        NOT NULL,
    error        TEXT        NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT record_quarantine_entry_key UNIQUE (topic_id, partition_id, source, entry_id)
);
CREATE INDEX record_quarantine_tenant_idx ON record_quarantine (tenant_id, created_at);
