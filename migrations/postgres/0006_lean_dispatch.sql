-- 0006 — fewer writes per dispatched task.
--
-- A no-op task costs two `tasks` updates, two `events` rows and a `task_updates` row; on a
-- busy queue that write volume, not the queries, is what bounds throughput. This migration
-- removes what each of those writes dragged along.

-- The outbox. The relay used to find unpublished events through a partial index on
-- `events.processed_at` and then set `processed_at`: a second, non-HOT version of every event
-- row with three index insertions. Now every inserted event is queued here by a statement
-- trigger (so no writer can forget it), the relay reads the queue in order and deletes what
-- it published. `events` stays append-only. `processed_at` is no longer written.
CREATE TABLE event_outbox (
    seq      bigserial PRIMARY KEY,
    -- No foreign key: an events row is never updated, and a check per row would cost a lookup.
    event_id uuid NOT NULL
);

INSERT INTO event_outbox (event_id)
    SELECT id FROM events WHERE processed_at IS NULL ORDER BY created_at, id;

CREATE FUNCTION events_to_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_outbox (event_id) SELECT id FROM inserted;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_to_outbox AFTER INSERT ON events
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION events_to_outbox();

-- A queue table: rows are deleted soon after they are written, so vacuum it by the number of
-- dead rows, not by a fraction of a table that is small whenever the relay keeps up.
ALTER TABLE event_outbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000);

DROP INDEX idx_events_unprocessed;

-- Columns of a handful of values: an index on them is a write on every row and is never the
-- best way to read (a query by type reads most of the table, or filters a time range first).
DROP INDEX idx_events_event_type;
DROP INDEX idx_task_updates_update_type;

-- `updated_at` was set by a PL/pgSQL call for every updated row. The dispatch statements set
-- it themselves; the trigger now runs only for an update that leaves it alone.
DROP TRIGGER tasks_set_updated_at ON tasks;
CREATE TRIGGER tasks_set_updated_at
    BEFORE UPDATE ON tasks
    FOR EACH ROW WHEN (NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at)
    EXECUTE FUNCTION set_updated_at();

-- Pending tasks that wait on others: the only ones the "block dependents of failed work"
-- sweep has to look at. Without it the sweep walked every pending task each second.
CREATE INDEX idx_tasks_pending_deps ON tasks (id)
    WHERE status = 'pending' AND depends_on <> '[]'::jsonb;

-- Every claim and every completion writes a new version of the task row, and with it an
-- entry in each index of `tasks` (the changed columns are indexed, so the update cannot be
-- HOT). Three of the original indexes served no query the controller makes and cost three
-- entries on each of those writes:
-- - by status: pending tasks are found through idx_tasks_dispatch and
--   idx_tasks_pending_assignee, running ones through idx_tasks_held, and the rest now through
--   a partial index that neither a claim nor a completion enters. A lookup of `completed`
--   reads most of the table either way;
-- - by assigned_to: what an agent runs now is idx_tasks_held (lease_owner); what it ran is in
--   task_updates (agent_name);
-- - by created_at: listings sort a table they read whole anyway.
DROP INDEX idx_tasks_status_priority;
DROP INDEX idx_tasks_assigned_to;
DROP INDEX idx_tasks_created_at;
CREATE INDEX idx_tasks_attention ON tasks (status, priority DESC NULLS LAST)
    WHERE status IN ('blocked', 'review', 'failed', 'cancelled');
