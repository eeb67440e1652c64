-- Statistics for the hospital's management (haoyuan stats, engine/stats.py).
--
-- The first instant a session had no free unit left (Redis keeps it in the
-- session hash, soldout_ms; engine.stats.fold copies it here, so it survives
-- a Redis rebuild).
ALTER TABLE sessions ADD COLUMN sold_out_at timestamptz;

-- Demand, one row per account and session: who pressed "book" after the
-- release (tried), who was told sold out (refused), who joined the waitlist
-- (joined). The API collects it in Redis sets without a PostgreSQL write per
-- request; engine.stats.fold moves it here. Accounts, never patients' data.
CREATE TABLE demand (
    session_id text NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('tried', 'refused', 'joined')),
    account_id text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, kind, account_id)
);
