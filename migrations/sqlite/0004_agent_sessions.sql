-- 0004 — agent sessions (see migrations/postgres/0004_agent_sessions.sql).
CREATE TABLE agent_sessions (
    token_hash   TEXT NOT NULL PRIMARY KEY,
    agent_name   TEXT NOT NULL REFERENCES agents (name) ON DELETE CASCADE,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
                 CHECK (created_at GLOB '????-??-??T??:??:??.???Z'),
    last_seen_at TEXT CHECK (last_seen_at GLOB '????-??-??T??:??:??.???Z')
) STRICT;
CREATE INDEX idx_agent_sessions_agent_name ON agent_sessions (agent_name);

ALTER TABLE tasks ADD COLUMN claimed_at TEXT CHECK (claimed_at GLOB '????-??-??T??:??:??.???Z');
