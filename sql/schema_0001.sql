-- themis-pg schema, revision 0001: tables, roles, grants, row-level security, triggers.
-- Tables change only in new revisions; functions live in the function set (sql/api/, see
-- sql/README.md), applied after the last revision of a migration run.

CREATE EXTENSION IF NOT EXISTS vector;
CREATE EXTENSION IF NOT EXISTS plpython3u;

-- Roles are cluster-wide: create them once, keep them across downgrades (other databases of
-- the same cluster may use them).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'themis_user') THEN
        CREATE ROLE themis_user NOLOGIN;      -- may call the user-facing functions
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'themis_bus') THEN
        CREATE ROLE themis_bus LOGIN;         -- the functions' autonomous connection: bus only
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'themis_worker') THEN
        CREATE ROLE themis_worker NOLOGIN;    -- grant it to the role the worker logs in as
    END IF;
END
$$;

CREATE SCHEMA themis;
REVOKE ALL ON SCHEMA themis FROM PUBLIC;
GRANT USAGE ON SCHEMA themis TO themis_user, themis_bus, themis_worker;

-- Settings enforced inside the database (callers cannot override them with SET).
CREATE TABLE themis.config (
    key         text PRIMARY KEY,
    value       jsonb NOT NULL,
    description text NOT NULL
);
INSERT INTO themis.config (key, value, description) VALUES
    ('max_k', '100', 'largest k a caller may ask for'),
    ('max_query_chars', '4000', 'longest query text, in characters'),
    ('max_prompt_chars', '200000', 'longest themis_generate prompt, in characters'),
    ('max_tokens_limit', '2048', 'largest max_tokens a caller may ask for'),
    ('max_queue_depth', '1000', 'queued jobs beyond which a call fails at once'),
    ('default_timeout_s', '120', 'how long a call waits for its answer unless it says otherwise'),
    ('worker_stale_s', '15', 'a worker silent this long counts as gone'),
    ('max_attempts', '3', 'claims of a job before a lost worker fails it for good');

-- Models the workers may load: a GGUF path on the worker's host, verified by sha256.
CREATE TABLE themis.models (
    name       text PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('generation', 'embedding')),
    path       text NOT NULL,
    sha256     text CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    params     jsonb NOT NULL DEFAULT '{}',
    is_default boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX models_one_default_per_kind ON themis.models (kind) WHERE is_default;

-- Which embedding model the stored document embeddings come from (one row at most).
CREATE TABLE themis.corpus (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    embedding_model text NOT NULL,
    dim             integer NOT NULL CHECK (dim > 0),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Ingested files; re-ingesting a file whose sha256 is unchanged does nothing.
CREATE TABLE themis.sources (
    id          bigserial PRIMARY KEY,
    uri         text NOT NULL UNIQUE,
    sha256      text NOT NULL,
    metadata    jsonb NOT NULL DEFAULT '{}',
    ingested_at timestamptz NOT NULL DEFAULT now()
);

-- Chunks that retrieval searches.  A row with a NULL embedding is embedded by the worker
-- before the next search, so plain INSERTs of content are searchable too.
CREATE TABLE themis.documents (
    id          bigserial PRIMARY KEY,
    source_id   bigint REFERENCES themis.sources (id) ON DELETE CASCADE,
    chunk_index integer NOT NULL DEFAULT 0,
    content     text NOT NULL CHECK (content <> ''),
    metadata    jsonb NOT NULL DEFAULT '{}',
    embedding   vector,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX documents_source_idx ON themis.documents (source_id, chunk_index);

-- Change log read by the workers to keep their in-memory index current.  xid is the writing
-- transaction: a worker re-reads every change at or above the oldest transaction that was
-- still running at its previous read, so late commits of lower seq are never missed.
CREATE TABLE themis.changes (
    seq    bigserial PRIMARY KEY,
    xid    xid8 NOT NULL DEFAULT pg_current_xact_id(),
    doc_id bigint,
    op     "char" NOT NULL CHECK (op IN ('I', 'U', 'D', 'T'))
);
CREATE INDEX changes_xid_idx ON themis.changes (xid);

-- Changes below this xid have been pruned: a worker whose watermark is older must reload.
CREATE TABLE themis.change_horizon (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    xid       xid8 NOT NULL DEFAULT '0'
);
INSERT INTO themis.change_horizon DEFAULT VALUES;

-- SECURITY DEFINER: writers of documents need no rights on the change log (and cannot forge
-- entries in it).
CREATE FUNCTION themis.log_document_changes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO themis.changes (doc_id, op) VALUES (NULL, 'T');
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO themis.changes (doc_id, op) SELECT id, 'D' FROM old_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO themis.changes (doc_id, op) SELECT id, 'U' FROM new_rows;
        INSERT INTO themis.changes (doc_id, op)           -- an id changed: drop the old one
            SELECT o.id, 'D' FROM old_rows o WHERE NOT EXISTS (SELECT 1 FROM new_rows n WHERE n.id = o.id);
    ELSE
        INSERT INTO themis.changes (doc_id, op) SELECT id, 'I' FROM new_rows;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER documents_log_insert AFTER INSERT ON themis.documents
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION themis.log_document_changes();
CREATE TRIGGER documents_log_update AFTER UPDATE ON themis.documents
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION themis.log_document_changes();
CREATE TRIGGER documents_log_delete AFTER DELETE ON themis.documents
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION themis.log_document_changes();
CREATE TRIGGER documents_log_truncate AFTER TRUNCATE ON themis.documents
    FOR EACH STATEMENT EXECUTE FUNCTION themis.log_document_changes();

-- Live workers; a worker whose heartbeat is older than config.worker_stale_s is gone.
CREATE TABLE themis.workers (
    id           text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    kinds        text[] NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    watermark    xid8,                    -- oldest change this worker may still need
    stats        jsonb NOT NULL DEFAULT '{}'
);

-- The job bus.  Callers reach it only through the SECURITY DEFINER bus functions (as
-- themis_bus); they may read their own rows (RLS), but never the internal result column.
CREATE TABLE themis.jobs (
    id             bigserial PRIMARY KEY,
    kind           text NOT NULL CHECK (kind IN ('search', 'embed', 'generate')),
    payload        jsonb NOT NULL,
    status         text NOT NULL DEFAULT 'queued'
                   CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    requested_by   name NOT NULL,
    caller_pid     integer NOT NULL,
    caller_started timestamptz NOT NULL,
    reply_channel  text NOT NULL,
    reply_token    text NOT NULL UNIQUE,      -- also makes a re-sent submit idempotent
    deadline       timestamptz NOT NULL,
    attempts       integer NOT NULL DEFAULT 0,
    max_attempts   integer NOT NULL DEFAULT 3,
    worker_id      text,
    lease_until    timestamptz,
    answer         text,
    result         jsonb,
    error          text,
    error_sqlstate text,
    error_hint     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    finished_at    timestamptz
);
CREATE INDEX jobs_queued_idx ON themis.jobs (kind, id) WHERE status = 'queued';
CREATE INDEX jobs_running_idx ON themis.jobs (worker_id) WHERE status = 'running';
CREATE INDEX jobs_finished_idx ON themis.jobs (finished_at) WHERE finished_at IS NOT NULL;

ALTER TABLE themis.jobs ENABLE ROW LEVEL SECURITY;
CREATE POLICY jobs_own_rows ON themis.jobs FOR SELECT TO themis_user
    USING (requested_by = current_user);
CREATE POLICY jobs_worker_all ON themis.jobs FOR ALL TO themis_worker USING (true) WITH CHECK (true);

-- What callers may read.  Candidate ids (result) stay hidden: they may name rows the
-- caller cannot see.
GRANT SELECT ON themis.documents, themis.sources, themis.corpus, themis.models, themis.config
    TO themis_user;
GRANT SELECT (id, kind, payload, status, requested_by, deadline, attempts, answer, error,
              error_sqlstate, error_hint, created_at, started_at, finished_at)
    ON themis.jobs TO themis_user;

-- The worker's rights, for deployments where it does not log in as the owner.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA themis TO themis_worker;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA themis TO themis_worker;
GRANT pg_read_all_stats TO themis_worker;  -- to see whether a job's caller is still connected

-- A client that disconnects mid-call is noticed only if this is in force when the statement
-- starts (a function-level SET does not work), so set it for the whole database.
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET client_connection_check_interval = %L',
                   current_database(), '1s');
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'not the database owner: set client_connection_check_interval yourself (README)';
END
$$;
