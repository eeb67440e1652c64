-- haoyuan 0003: knowing whether Redis's state is whole, and the session as
-- it was loaded.
--
-- redis_partitions: one row per partition that PostgreSQL has seen opened in
-- Redis. `epoch` is the value of the partition's recovery marker in Redis
-- (hy:{p}:epoch): Redis loses the marker with its data, and a marker that is
-- absent or different says the partition needs `haoyuan rebuild` before it
-- sells again. `applied_ms`/`applied_seq` is the newest outbox entry of the
-- partition that the writer committed here (a stream id): when Redis no
-- longer has that entry although it has older ones, Redis lost writes that
-- PostgreSQL saw (a lost AOF tail, a failover to a lagging replica).
CREATE TABLE redis_partitions (
    partition   integer PRIMARY KEY CHECK (partition >= 0),
    epoch       text NOT NULL DEFAULT '',
    opened_at   timestamptz NOT NULL DEFAULT now(),
    applied_ms  bigint NOT NULL DEFAULT 0,
    applied_seq bigint NOT NULL DEFAULT 0
);

-- The session exactly as loaded (engine.model.SessionSpec JSON: pools,
-- waitlist, re-release window, pool return, night window, time zone, kind),
-- so that a rebuild loads it again as it was. Slot capacities changed later
-- live in slots.capacity.
ALTER TABLE sessions ADD COLUMN spec jsonb;
