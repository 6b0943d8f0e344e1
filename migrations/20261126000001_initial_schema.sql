-- Queue (topic), subscription and message metadata. Messages themselves live in Redis
-- Streams; these tables hold configuration and the delivery record.

CREATE TABLE message_topics (
    id                 UUID PRIMARY KEY,
    tenant_id          UUID        NOT NULL,
    -- "C" collation so the (tenant_id, name) index also serves name-prefix searches.
    name               TEXT COLLATE "C" NOT NULL,
    display_name       TEXT,
    description        TEXT,
    topic_type         TEXT        NOT NULL DEFAULT 'redis_stream'
                       CHECK (topic_type IN ('redis_stream')),
    partition_count    INTEGER     NOT NULL DEFAULT 1 CHECK (partition_count BETWEEN 1 AND 64),
    replication_factor INTEGER     NOT NULL DEFAULT 1 CHECK (replication_factor >= 1),
    retention_ms       BIGINT      NOT NULL CHECK (retention_ms > 0),
    max_length         BIGINT      NOT NULL CHECK (max_length > 0),
    message_format     TEXT        NOT NULL DEFAULT 'json'
                       CHECK (message_format IN ('json', 'text', 'binary')),
    schema_definition  JSONB,
    compression_type   TEXT        NOT NULL DEFAULT 'none'
                       CHECK (compression_type IN ('none', 'gzip', 'zstd')),
    encrypted          BOOLEAN     NOT NULL DEFAULT FALSE,
    is_public          BOOLEAN     NOT NULL DEFAULT FALSE,
    allowed_producers  TEXT[]      NOT NULL DEFAULT '{}',
    allowed_consumers  TEXT[]      NOT NULL DEFAULT '{}',
    status             TEXT        NOT NULL DEFAULT 'active'
                       CHECK (status IN ('active', 'paused', 'archived')),
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Names are unique per tenant: two tenants may both own "orders".
    CONSTRAINT message_topics_tenant_name_key UNIQUE (tenant_id, name)
);

CREATE INDEX message_topics_tenant_status_idx ON message_topics (tenant_id, status, name);

CREATE TABLE message_subscriptions (
    id                    UUID PRIMARY KEY,
    tenant_id             UUID        NOT NULL,
    topic_id              UUID        NOT NULL REFERENCES message_topics (id) ON DELETE CASCADE,
    consumer_group        TEXT COLLATE "C" NOT NULL,
    consumer_name         TEXT COLLATE "C" NOT NULL,
    subscription_type     TEXT        NOT NULL
                          CHECK (subscription_type IN ('webhook', 'redis_consumer')),
    offset_reset_policy   TEXT        NOT NULL DEFAULT 'latest'
                          CHECK (offset_reset_policy IN ('latest', 'earliest')),
    max_poll_records      INTEGER     NOT NULL DEFAULT 500,
    session_timeout_ms    BIGINT      NOT NULL DEFAULT 30000,
    heartbeat_interval_ms BIGINT      NOT NULL DEFAULT 3000,
    handler_config        JSONB       NOT NULL DEFAULT '{}',
    dead_letter_queue     TEXT,
    max_retry_attempts    INTEGER     NOT NULL DEFAULT 3,
    retry_delay_ms        BIGINT      NOT NULL DEFAULT 1000,
    message_filter        JSONB,
    status                TEXT        NOT NULL DEFAULT 'active'
                          CHECK (status IN ('active', 'paused')),
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_consumed_at      TIMESTAMPTZ,
    CONSTRAINT message_subscriptions_member_key UNIQUE (topic_id, consumer_group, consumer_name)
);

CREATE INDEX message_subscriptions_tenant_idx ON message_subscriptions (tenant_id, created_at);

-- One row per message, written behind the publish path by the batched record writer.
CREATE TABLE message_records (
    topic_id      UUID        NOT NULL REFERENCES message_topics (id) ON DELETE CASCADE,
    message_id    TEXT        NOT NULL,
    tenant_id     UUID        NOT NULL,
    partition     INTEGER     NOT NULL,
    stream_offset TEXT,
    message_key   TEXT,
    correlation_id TEXT,
    headers       JSONB       NOT NULL DEFAULT '{}',
    payload       JSONB,
    payload_bytes INTEGER     NOT NULL DEFAULT 0,
    status        TEXT        NOT NULL
                  CHECK (status IN ('scheduled', 'published', 'consumed', 'failed',
                                    'dead_letter', 'expired', 'cancelled')),
    trace_id      TEXT,
    retry_count   INTEGER     NOT NULL DEFAULT 0,
    published_at  TIMESTAMPTZ NOT NULL,
    scheduled_at  TIMESTAMPTZ,
    expires_at    TIMESTAMPTZ,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic_id, message_id)
);

CREATE INDEX message_records_published_idx ON message_records (topic_id, published_at);

-- One row per delivery attempt of a message to a subscription.
CREATE TABLE consumption_records (
    id              BIGSERIAL PRIMARY KEY,
    tenant_id       UUID        NOT NULL,
    topic_id        UUID        NOT NULL REFERENCES message_topics (id) ON DELETE CASCADE,
    subscription_id UUID        NOT NULL REFERENCES message_subscriptions (id) ON DELETE CASCADE,
    message_id      TEXT        NOT NULL,
    attempt         INTEGER     NOT NULL,
    status          TEXT        NOT NULL
                    CHECK (status IN ('delivered', 'acked', 'failed', 'filtered', 'dead_letter')),
    processing_ms   INTEGER,
    error           TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX consumption_records_message_idx ON consumption_records (topic_id, message_id);
CREATE INDEX consumption_records_subscription_idx ON consumption_records (subscription_id, created_at);
