-- 0009 — an outbox entry holds a list of event ids, as on Postgres (its migration of the
-- same name).
--
-- SQLite triggers fire per row, so each entry still lists one event; the column has the same
-- name and shape as Postgres's (a JSON array here, an array there), so that both schemas have
-- the same columns and the relay reads an entry the same way on both.
DROP TRIGGER events_to_outbox;

ALTER TABLE event_outbox RENAME COLUMN event_id TO event_ids;
UPDATE event_outbox SET event_ids = json_array(event_ids);

CREATE TRIGGER events_to_outbox AFTER INSERT ON events
FOR EACH ROW
BEGIN
    INSERT INTO event_outbox (event_ids) VALUES (json_array(new.id));
END;
