-- Pending tasks by assignee, in claim order. A batch claim looks up, for each waiting agent,
-- the tasks assigned to it by name, and for its pool the tasks assigned to the role: each is
-- an index seek here. Without it every lookup walked all pending tasks (idx_tasks_dispatch)
-- filtering on the assignee, which at 20,000 pending tasks and 50 agents cost a second per
-- claim round.
CREATE INDEX idx_tasks_pending_assignee ON tasks (assignee, priority DESC NULLS LAST, created_at)
    WHERE status = 'pending';

-- The tasks an agent holds. Every report of an agent asks whether it still holds any (to keep
-- its status busy or idle); without this that was a scan of every task, per agent, per batch.
CREATE INDEX idx_tasks_held ON tasks (lease_owner) WHERE status = 'in_progress';
