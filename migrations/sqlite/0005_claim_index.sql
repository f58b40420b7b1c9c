-- Pending tasks by assignee, in claim order (see the Postgres twin).
CREATE INDEX idx_tasks_pending_assignee ON tasks (assignee, priority DESC, created_at)
    WHERE status = 'pending';
