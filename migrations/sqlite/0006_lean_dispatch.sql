-- 0006 — fewer writes per dispatched task (see the Postgres migration of the same name).

-- The outbox: every inserted event is queued here; the relay deletes what it published.
CREATE TABLE event_outbox (
    seq      INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL
) STRICT;

INSERT INTO event_outbox (event_id)
    SELECT id FROM events WHERE processed_at IS NULL ORDER BY created_at, id;

CREATE TRIGGER events_to_outbox AFTER INSERT ON events
FOR EACH ROW
BEGIN
    INSERT INTO event_outbox (event_id) VALUES (new.id);
END;

DROP INDEX idx_events_unprocessed;
DROP INDEX idx_events_event_type;
DROP INDEX idx_task_updates_update_type;

CREATE INDEX idx_tasks_pending_deps ON tasks (id)
    WHERE status = 'pending' AND depends_on <> '[]';
