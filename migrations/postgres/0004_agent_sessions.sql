-- 0004 — agent sessions: the protocol's bearer tokens.
--
-- Registration issues a token; only its SHA-256 is stored, so a leaked database does not
-- leak working credentials. A new registration of the same agent replaces its sessions.
CREATE TABLE agent_sessions (
    token_hash   text PRIMARY KEY,
    agent_name   text NOT NULL REFERENCES agents (name) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz
);
CREATE INDEX idx_agent_sessions_agent_name ON agent_sessions (agent_name);

-- When the task was last leased: pick-up latency and `status` age of a running attempt.
ALTER TABLE tasks ADD COLUMN claimed_at timestamptz;
