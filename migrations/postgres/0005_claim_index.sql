-- Pending tasks by assignee, in claim order. A batch claim looks up, for each waiting agent,
-- the tasks assigned to it by name, and for its pool the tasks assigned to the role: each is
-- an index seek here. Without it every lookup walked all pending tasks (idx_tasks_dispatch)
-- filtering on the assignee, which at 20,000 pending tasks and 50 agents cost a second per
-- claim round.
CREATE INDEX idx_tasks_pending_assignee ON tasks (assignee, priority DESC NULLS LAST, created_at)
    WHERE status = 'pending';
