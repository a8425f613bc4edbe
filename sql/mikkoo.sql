CREATE SCHEMA IF NOT EXISTS mikkoo;

CREATE TABLE IF NOT EXISTS mikkoo.dead_letter (
    id          BIGSERIAL PRIMARY KEY,
    ev_id       BIGINT NOT NULL,
    ev_time     TIMESTAMP WITH TIME ZONE NOT NULL,
    ev_txid     BIGINT,
    ev_retry    INTEGER,
    ev_type     TEXT,
    ev_data     TEXT,
    ev_extra1   TEXT,
    ev_extra2   TEXT,
    ev_extra3   TEXT,
    ev_extra4   TEXT,
    queue       TEXT NOT NULL,
    consumer    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    failed_at   TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE INDEX IF NOT EXISTS dead_letter_queue_failed_at ON mikkoo.dead_letter (queue, failed_at);

COMMENT ON TABLE mikkoo.dead_letter IS 'PgQ events mikkoo could not deliver, with the reason; see mikkoo dead-letter list/replay.';
COMMENT ON COLUMN mikkoo.dead_letter.ev_retry IS 'Retries at the last attempt: max_failures after exhausted retries, NULL or 0 for a rejected event';
COMMENT ON COLUMN mikkoo.dead_letter.reason IS 'What went wrong: the broker''s reply (NO_ROUTE, NOT_FOUND - no exchange ...) or the offending column and property';
