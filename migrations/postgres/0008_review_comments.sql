-- 0008 — the review that sent a task back travels with its next attempt.
--
-- A result that a person closes without merging sends the task back to `pending` (attempt + 1)
-- with the review's comments recorded as an `info` task update. The agent that takes the next
-- attempt needs those comments to do better, and a claim should not search `task_updates` for
-- them (a lookup per claimed task on the busiest statement), so they are kept on the task.
-- Set by every closed review; the next rejection replaces them.
ALTER TABLE tasks ADD COLUMN review_comments text;
