-- 0006 — fewer writes per dispatched task (see the Postgres migration of the same name).

-- The outbox: every inserted event is queued here; the relay deletes what it published.
CREATE TABLE event_outbox (
    -- AUTOINCREMENT: without it an emptied table numbers from 1 again, and the relay, which
    -- reads on from the last entry it published, would not see the new entries for a while.
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
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
CREATE INDEX idx_tasks_attention ON tasks (status, priority DESC)
    WHERE status IN ('blocked', 'review', 'failed', 'cancelled');
