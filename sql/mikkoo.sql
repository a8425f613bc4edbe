-- mikkoo helper schema: functions for producers, the audit table, the dead-letter table.
--
-- Install or upgrade with `mikkoo sql | psql DATABASE`. Running it again is harmless,
-- and it upgrades an install of the Python relay's schema in place. Needs PostgreSQL 13
-- or later and the pgq extension, nothing else (UUIDs come from gen_random_uuid()).
--
-- Events follow mikkoo's wire contract: pgq.insert_event(queue, ev_type = routing key,
-- ev_data = payload, ev_extra1 = exchange, ev_extra2 = content type,
-- ev_extra3 = JSON properties, ev_extra4 = JSON headers).

-- One transaction: the schema is installed whole or not at all. The advisory lock is the
-- one a relay takes to create mikkoo.dead_letter, so the two never race.
BEGIN;
SELECT pg_advisory_xact_lock(7883950731863982081);

-- The schema and the dead letters (sql/dead_letter.sql, verbatim: the relay runs it when
-- a worker with dead_letter: table finds the table missing)

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

-- Auditing: one row per audited event, from insert to confirm to receipt

CREATE TABLE IF NOT EXISTS mikkoo.audit (
    message_id   UUID NOT NULL,
    event_id     BIGINT NOT NULL,
    queue        TEXT NOT NULL,
    exchange     TEXT,
    routing_key  TEXT,
    payload      TEXT,
    content_type TEXT,
    properties   TEXT,
    headers      TEXT,
    published_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- Upgrading the Python relay's table: the timestamps of the later stages, and the
-- optional columns may be NULL (its STRICT functions silently skipped such calls).
ALTER TABLE mikkoo.audit ADD COLUMN IF NOT EXISTS confirmed_at TIMESTAMP WITH TIME ZONE;
ALTER TABLE mikkoo.audit ADD COLUMN IF NOT EXISTS received_at TIMESTAMP WITH TIME ZONE;
ALTER TABLE mikkoo.audit ALTER COLUMN exchange DROP NOT NULL;
ALTER TABLE mikkoo.audit ALTER COLUMN routing_key DROP NOT NULL;
ALTER TABLE mikkoo.audit ALTER COLUMN payload DROP NOT NULL;

CREATE UNIQUE INDEX IF NOT EXISTS audit_message_id ON mikkoo.audit (message_id);
CREATE INDEX IF NOT EXISTS audit_queue_event_id ON mikkoo.audit (queue, event_id);
CREATE INDEX IF NOT EXISTS audit_unconfirmed ON mikkoo.audit (published_at) WHERE confirmed_at IS NULL;
CREATE INDEX IF NOT EXISTS audit_unreceived ON mikkoo.audit (published_at) WHERE received_at IS NULL;

COMMENT ON TABLE mikkoo.audit IS 'Audited events: queued (published_at), confirmed by RabbitMQ (confirmed_at, set by a relay with audit: true), received by a consumer (received_at, set by mikkoo audit consume). mikkoo audit report lists the stragglers.';
COMMENT ON COLUMN mikkoo.audit.message_id IS 'The AMQP message_id the event carries (in its ev_extra3)';
COMMENT ON COLUMN mikkoo.audit.event_id IS 'The PgQ event id';
COMMENT ON COLUMN mikkoo.audit.queue IS 'The PgQ queue';
COMMENT ON COLUMN mikkoo.audit.exchange IS 'AMQP exchange';
COMMENT ON COLUMN mikkoo.audit.routing_key IS 'AMQP routing key';
COMMENT ON COLUMN mikkoo.audit.payload IS 'Message body';
COMMENT ON COLUMN mikkoo.audit.content_type IS 'AMQP content_type property';
COMMENT ON COLUMN mikkoo.audit.properties IS 'AMQP properties (JSON, as in ev_extra3)';
COMMENT ON COLUMN mikkoo.audit.headers IS 'AMQP headers (JSON, as in ev_extra4)';
COMMENT ON COLUMN mikkoo.audit.published_at IS 'When the event was queued';
COMMENT ON COLUMN mikkoo.audit.confirmed_at IS 'When RabbitMQ confirmed the message (set in the transaction that finished its batch)';
COMMENT ON COLUMN mikkoo.audit.received_at IS 'When a consumer received it (mikkoo audit consume)';

-- Functions. Not STRICT: a NULL optional argument is a NULL column, never a skipped
-- call. SECURITY DEFINER so producers need EXECUTE only; search_path pinned for it.

CREATE OR REPLACE FUNCTION mikkoo.new_audit_record(
    in_message_id UUID, in_event_id BIGINT, in_queue TEXT, in_exchange TEXT, in_routing_key TEXT,
    in_payload TEXT, in_content_type TEXT, in_properties TEXT, in_headers TEXT)
RETURNS mikkoo.audit
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
VOLATILE
AS $body$
    INSERT INTO mikkoo.audit (message_id, event_id, queue, exchange, routing_key, payload,
                              content_type, properties, headers)
         VALUES (in_message_id, in_event_id, in_queue, in_exchange, in_routing_key, in_payload,
                 in_content_type, in_properties, in_headers)
      RETURNING *;
$body$;

COMMENT ON FUNCTION mikkoo.new_audit_record(UUID, BIGINT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT) IS
'Inserts a row into mikkoo.audit and returns it.';

CREATE OR REPLACE FUNCTION mikkoo.delete_audit_record(in_message_id UUID)
RETURNS BOOLEAN
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
VOLATILE
AS $body$
BEGIN
    DELETE FROM mikkoo.audit WHERE message_id = in_message_id;
    RETURN FOUND;
END;
$body$;

COMMENT ON FUNCTION mikkoo.delete_audit_record(UUID) IS
'Deletes the mikkoo.audit row of a message (the Python relay''s downstream-consumer protocol); true when there was one.';

CREATE OR REPLACE FUNCTION mikkoo.insert_event(
    in_queue TEXT, in_exchange TEXT, in_routing_key TEXT, in_payload TEXT, in_content_type TEXT,
    in_properties TEXT, in_headers TEXT)
RETURNS BIGINT
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
VOLATILE
AS $body$
    SELECT pgq.insert_event(in_queue, in_routing_key, in_payload, in_exchange, in_content_type,
                            in_properties, in_headers);
$body$;

COMMENT ON FUNCTION mikkoo.insert_event(TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT) IS
'Queues an event with the given AMQP properties and headers (JSON objects as text; NULL for none). Returns the PgQ event id.';

CREATE OR REPLACE FUNCTION mikkoo.insert_event(
    in_queue TEXT, in_exchange TEXT, in_routing_key TEXT, in_payload TEXT, in_content_type TEXT)
RETURNS BIGINT
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
VOLATILE
AS $body$
    SELECT pgq.insert_event(in_queue, in_routing_key, in_payload, in_exchange, in_content_type,
                            json_build_object('message_id', gen_random_uuid())::text,
                            json_build_object('pgq_queue', in_queue)::text);
$body$;

COMMENT ON FUNCTION mikkoo.insert_event(TEXT, TEXT, TEXT, TEXT, TEXT) IS
'Queues an event with a new random message_id property and the header pgq_queue. Returns the PgQ event id.';

CREATE OR REPLACE FUNCTION mikkoo.insert_audited_event(
    in_queue TEXT, in_exchange TEXT, in_routing_key TEXT, in_payload TEXT, in_content_type TEXT)
RETURNS BIGINT
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
VOLATILE
AS $body$
DECLARE
    v_message_id UUID := gen_random_uuid();
    v_properties TEXT := json_build_object('message_id', v_message_id)::text;
    v_headers    TEXT := json_build_object('pgq_queue', in_queue)::text;
    v_event_id   BIGINT;
BEGIN
    v_event_id := pgq.insert_event(in_queue, in_routing_key, in_payload, in_exchange,
                                   in_content_type, v_properties, v_headers);
    PERFORM mikkoo.new_audit_record(v_message_id, v_event_id, in_queue, in_exchange,
                                    in_routing_key, in_payload, in_content_type,
                                    v_properties, v_headers);
    RETURN v_event_id;
END;
$body$;

COMMENT ON FUNCTION mikkoo.insert_audited_event(TEXT, TEXT, TEXT, TEXT, TEXT) IS
'As mikkoo.insert_event(5), plus a mikkoo.audit row, in the same transaction. Returns the PgQ event id.';

COMMIT;
