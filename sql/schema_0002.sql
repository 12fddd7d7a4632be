-- themis-pg schema, revision 0002: a bus without WAL, limits for the payload checks, bus_dsn
-- out of callers' sight, idle bus connections closed by the server.

-- Jobs and worker rows never outlive the sessions that use them (a crash restart ends every
-- session, the waiting callers' included), so they need no WAL: each bus commit used to wait
-- for a WAL flush.  The id sequence stays logged so that ids never repeat after a crash.
ALTER TABLE themis.jobs SET UNLOGGED;
ALTER SEQUENCE themis.jobs_id_seq SET LOGGED;
ALTER TABLE themis.workers SET UNLOGGED;

-- Metadata filters (themis_search(..., filter => '{"lang": "en"}')) are jsonb containment;
-- the worker finds the matching ids with this index.
CREATE INDEX documents_metadata_idx ON themis.documents USING gin (metadata jsonb_path_ops);

INSERT INTO themis.config (key, value, description) VALUES
    ('max_candidates', '100000', 'most candidate ids one search job may ask for'),
    ('max_context_chars', '16000', 'longest document text handed to generation, in characters');

-- The bus DSN may hold a password; themis.config is readable by every themis_user, so it moved
-- to the server's side (THEMIS_BUS_DSN in the server's environment, or the file
-- themis_bus.dsn in its data directory; README "Existing PostgreSQL servers").
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM themis.config WHERE key = 'bus_dsn') THEN
        RAISE EXCEPTION 'themis.config holds bus_dsn, which callers could read'
            USING ERRCODE = '55000',
                  HINT = 'Move its value to THEMIS_BUS_DSN in the PostgreSQL server''s '
                         'environment or to the file themis_bus.dsn in its data directory, '
                         'then DELETE FROM themis.config WHERE key = ''bus_dsn'' and migrate again.';
    END IF;
END
$$;

-- A backend keeps its bus connection between calls (it saves a connection per call); the
-- server closes one idle for a minute, so sessions that stopped calling themis give their
-- second connection back.  A waiting caller re-reads its job every second, so it is never idle
-- that long.  The SQL functions reconnect on their next call.
-- A role setting, not a per-database one: the role is cluster-wide and serves only themis
-- (and a database cloned from a template keeps it).
DO $$
BEGIN
    ALTER ROLE themis_bus SET idle_session_timeout = '60s';
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'not allowed to ALTER ROLE themis_bus: set its idle_session_timeout yourself (README)';
END
$$;
