-- 0008 — the review that sent a task back travels with its next attempt (see the Postgres
-- migration of the same name).
ALTER TABLE tasks ADD COLUMN review_comments text;
