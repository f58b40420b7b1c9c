-- 0010 — active_tasks carries every task column again.
--
-- Postgres froze the view's `t.*` at the columns tasks had when 0002 created it, so the
-- columns added since (pruned_at, claimed_at, review_comments) were missing, where SQLite,
-- which expands `t.*` when the view is read, shows them. The view is created anew, as in
-- 0002, so that both schemas have the same columns in the same order.
DROP VIEW active_tasks;

CREATE VIEW active_tasks AS
SELECT t.*,
       p.name AS project_name,
       (SELECT count(*) FROM task_updates tu WHERE tu.task_id = t.id) AS update_count
FROM tasks t
LEFT JOIN projects p ON p.id = t.project_id
WHERE t.status IN ('pending', 'in_progress', 'blocked')
ORDER BY t.priority DESC NULLS LAST, t.created_at ASC;
