-- The job bus as seen from the SQL functions' autonomous connection (role themis_bus).
-- Part of the function set (sql/README.md): applied after the migrations, dropped and
-- re-created as a whole.  These SECURITY DEFINER functions are all that role may do: it has
-- no rights on any table.
--
-- Durability: a job never outlives the session that waits for it.  themis.jobs is UNLOGGED
-- (revision 0002) and every bus function says SET LOCAL synchronous_commit = off, so no bus
-- commit waits for a WAL flush (measured 3.6 ms per commit on a VM disk, paid 4-8 times per
-- call before).  What a crash can lose is exactly what nobody can still be waiting for: a
-- crash restart ends every session, the callers' included.  The job id sequence stays
-- logged, so ids never repeat and a late finish can never land on a newer job.

CREATE OR REPLACE FUNCTION themis.config_value(p_key text) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'none' AS $$
    SELECT value FROM themis.config WHERE key = p_key
$$;

CREATE OR REPLACE FUNCTION themis.live_worker_exists(p_kind text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'none' AS $$
    SELECT EXISTS (
        SELECT 1 FROM themis.workers w
        WHERE p_kind = ANY (w.kinds)
          AND w.heartbeat_at > now()
              - make_interval(secs => (themis.config_value('worker_stale_s') #>> '{}')::float8))
$$;

-- Payload checks: the same rules as themis_pg/pl/payloads.py (which the worker applies again),
-- enforced here for anyone who can log in as themis_bus.
CREATE OR REPLACE FUNCTION themis.check_text(p jsonb, p_key text, p_limit integer,
                                             p_limit_key text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'none' AS $$
BEGIN
    IF jsonb_typeof(p -> p_key) IS DISTINCT FROM 'string' OR btrim(p ->> p_key) = '' THEN
        RAISE EXCEPTION 'job payload needs a non-empty text %', quote_literal(p_key)
            USING ERRCODE = '22023';
    END IF;
    IF length(p ->> p_key) > p_limit THEN
        RAISE EXCEPTION '% is % characters long; the limit is %', p_key, length(p ->> p_key),
                        p_limit
            USING ERRCODE = '54000',
                  HINT = format('Shorten it, or raise %s in themis.config.', p_limit_key);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION themis.check_int(p jsonb, p_key text, p_low bigint, p_high bigint)
RETURNS bigint
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'none' AS $$
DECLARE
    v numeric;
BEGIN
    IF jsonb_typeof(p -> p_key) IS DISTINCT FROM 'number' THEN
        RAISE EXCEPTION 'job payload needs an integer %', quote_literal(p_key)
            USING ERRCODE = '22023';
    END IF;
    v := (p ->> p_key)::numeric;
    IF v <> trunc(v) THEN
        RAISE EXCEPTION 'job payload needs an integer %', quote_literal(p_key)
            USING ERRCODE = '22023';
    END IF;
    IF v < p_low OR v > p_high THEN
        RAISE EXCEPTION '% must be between % and %, got %', p_key, p_low, p_high, v
            USING ERRCODE = '22023';
    END IF;
    RETURN v::bigint;
END
$$;

-- Returns the payload with the defaults of themis.config filled in: max_tokens when a generate
-- job names none, and each context cut to max_context_chars.
CREATE OR REPLACE FUNCTION themis.check_payload(p_kind text, p jsonb, cfg jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'none' AS $$
DECLARE
    v_k      bigint;
    v_mode   text := coalesce(p ->> 'mode', 'rag');
    v_temp   jsonb := p -> 'temperature';
    v_total  bigint := 0;
    v_ctx    jsonb;
BEGIN
    IF jsonb_typeof(p) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'job payload must be a JSON object' USING ERRCODE = '22023';
    END IF;
    IF p_kind = 'search' THEN
        PERFORM themis.check_text(p, 'query', (cfg ->> 'max_query_chars')::int, 'max_query_chars');
        v_k := themis.check_int(p, 'k', 1, (cfg ->> 'max_k')::bigint);
        PERFORM themis.check_int(p, 'n', v_k, (cfg ->> 'max_candidates')::bigint);
        IF jsonb_typeof(p #> '{cursor,exclude}') = 'array'
           AND jsonb_array_length(p #> '{cursor,exclude}') > (cfg ->> 'max_candidates')::int THEN
            RAISE EXCEPTION 'cursor ''exclude'' must be a list of document ids'
                USING ERRCODE = '22023';
        END IF;
        IF p ? 'filter' AND jsonb_typeof(p -> 'filter') NOT IN ('object', 'null') THEN
            RAISE EXCEPTION 'filter must be a jsonb object, e.g. ''{"lang": "en"}'''
                USING ERRCODE = '22023';
        END IF;
        IF p ? 'vector_b64' AND (jsonb_typeof(p -> 'vector_b64') <> 'string'
                                 OR length(p ->> 'vector_b64') > 350000) THEN
            RAISE EXCEPTION 'job payload''s ''vector_b64'' must be a base64 text'
                USING ERRCODE = '22023';
        END IF;
    ELSIF p_kind = 'embed' THEN
        PERFORM themis.check_text(p, 'text', (cfg ->> 'max_query_chars')::int, 'max_query_chars');
    ELSIF p_kind = 'generate' THEN
        IF coalesce(p -> 'max_tokens', 'null') = 'null' THEN
            p := jsonb_set(p, '{max_tokens}',
                           to_jsonb(least(256, (cfg ->> 'max_tokens_limit')::int)));
        END IF;
        PERFORM themis.check_int(p, 'max_tokens', 1, (cfg ->> 'max_tokens_limit')::bigint);
        IF v_temp IS NOT NULL AND (jsonb_typeof(v_temp) <> 'number'
                                   OR (v_temp #>> '{}')::float8 NOT BETWEEN 0 AND 2) THEN
            RAISE EXCEPTION 'temperature must be between 0 and 2, got %', v_temp
                USING ERRCODE = '22023';
        END IF;
        IF v_mode = 'rag' THEN
            PERFORM themis.check_text(p, 'query', (cfg ->> 'max_query_chars')::int,
                                      'max_query_chars');
            IF jsonb_typeof(coalesce(p -> 'contexts', '[]')) <> 'array'
               OR jsonb_array_length(coalesce(p -> 'contexts', '[]')) > (cfg ->> 'max_k')::int THEN
                RAISE EXCEPTION 'job payload''s ''contexts'' must be a list of at most %',
                                cfg ->> 'max_k' USING ERRCODE = '22023';
            END IF;
            FOR v_ctx IN SELECT jsonb_array_elements(coalesce(p -> 'contexts', '[]')) LOOP
                IF jsonb_typeof(v_ctx -> 'content') IS DISTINCT FROM 'string' THEN
                    RAISE EXCEPTION 'each context needs a text ''content''' USING ERRCODE = '22023';
                END IF;
            END LOOP;
            p := jsonb_set(p, '{contexts}', coalesce((
                SELECT jsonb_agg(jsonb_set(c, '{content}', to_jsonb(
                           left(c ->> 'content', (cfg ->> 'max_context_chars')::int)))
                           ORDER BY ord)
                  FROM jsonb_array_elements(coalesce(p -> 'contexts', '[]'))
                       WITH ORDINALITY AS e(c, ord)), '[]'));
            SELECT coalesce(sum(length(c ->> 'content')), 0) INTO v_total
              FROM jsonb_array_elements(p -> 'contexts') AS e(c);
            IF v_total > (cfg ->> 'max_prompt_chars')::bigint THEN
                RAISE EXCEPTION 'the contexts hold % characters; the limit is %', v_total,
                                cfg ->> 'max_prompt_chars' USING ERRCODE = '54000';
            END IF;
        ELSIF v_mode = 'raw' THEN
            PERFORM themis.check_text(p, 'prompt', (cfg ->> 'max_prompt_chars')::int,
                                      'max_prompt_chars');
        ELSE
            RAISE EXCEPTION 'unknown generation mode %', quote_literal(v_mode)
                USING ERRCODE = '22023';
        END IF;
    ELSE
        RAISE EXCEPTION 'unknown job kind %; expected one of search, embed, generate',
                        quote_literal(p_kind) USING ERRCODE = '22023';
    END IF;
    RETURN p;
END
$$;

-- Check and queue a job and wake the workers.  Fails at once (no waiting) on a bad payload,
-- when no worker is alive or when the queue is full, so a caller never waits on work nobody
-- will do.  Returns the job id, the timeout in force (p_timeout_s, else default_timeout_s)
-- and worker_stale_s, so the caller needs nothing else from themis.config.
CREATE OR REPLACE FUNCTION themis.bus_submit(
    p_kind text, p_payload jsonb, p_requested_by name, p_caller_pid integer,
    p_caller_started timestamptz, p_reply_channel text, p_reply_token text,
    p_timeout_s double precision
) RETURNS TABLE (job_id bigint, timeout_s double precision, worker_stale_s double precision)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'themis_bus' AS $$
DECLARE
    cfg      jsonb := (SELECT jsonb_object_agg(key, value) FROM themis.config);
    v_max    bigint := (cfg ->> 'max_queue_depth')::bigint;
    v_depth  bigint;
    v_id     bigint;
    v_timeout double precision := coalesce(p_timeout_s, (cfg ->> 'default_timeout_s')::float8);
    v_payload jsonb;
BEGIN
    -- Losing this commit in a crash loses nothing (see the top of this file).
    SET LOCAL synchronous_commit = off;
    v_payload := themis.check_payload(p_kind, p_payload, cfg);
    IF v_timeout IS NULL OR v_timeout = 'NaN' OR v_timeout NOT BETWEEN 0.001 AND 86400 THEN
        RAISE EXCEPTION 'timeout_s must be between 0.001 and 86400, got %', v_timeout
            USING ERRCODE = '22023';
    END IF;
    IF NOT themis.live_worker_exists(p_kind) THEN
        RAISE EXCEPTION 'no themis worker is running for % jobs', p_kind
            USING ERRCODE = '55000',
                  HINT = 'Start one with `themis worker` (or `themis demo`); themis_status() lists live workers.';
    END IF;
    SELECT count(*) INTO v_depth
      FROM (SELECT 1 FROM themis.jobs WHERE status = 'queued' LIMIT v_max) queued;
    IF v_depth >= v_max THEN
        RAISE EXCEPTION 'themis job queue is full (% queued jobs, limit %)', v_depth, v_max
            USING ERRCODE = '53000',
                  HINT = 'Retry later, add workers, or raise max_queue_depth in themis.config.';
    END IF;
    -- A submit re-sent after a dropped connection finds its first attempt by token.
    INSERT INTO themis.jobs (kind, payload, requested_by, caller_pid, caller_started,
                             reply_channel, reply_token, deadline, max_attempts)
    VALUES (p_kind, v_payload, p_requested_by, p_caller_pid, p_caller_started,
            p_reply_channel, p_reply_token, now() + make_interval(secs => v_timeout),
            (cfg ->> 'max_attempts')::integer)
    ON CONFLICT (reply_token) DO UPDATE SET reply_token = EXCLUDED.reply_token
    RETURNING id INTO v_id;
    PERFORM pg_notify('themis_jobs', p_kind);
    RETURN QUERY SELECT v_id, v_timeout, (cfg ->> 'worker_stale_s')::float8;
END
$$;

-- The job's outcome for its waiter (who knows the token), in one statement: a finished search
-- hands over its candidates and clears them in the same UPDATE (they may name rows the caller
-- cannot see).  A job still running reports whether a worker for it is alive.
CREATE OR REPLACE FUNCTION themis.bus_take(p_id bigint, p_token text)
RETURNS TABLE (status text, result jsonb, answer text, error text, error_sqlstate text,
               error_hint text, worker_alive boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'themis_bus' AS $$
#variable_conflict use_column
BEGIN
    SET LOCAL synchronous_commit = off;
    RETURN QUERY
        WITH taken AS (
            UPDATE themis.jobs j SET result = NULL
              FROM (SELECT o.id, o.result FROM themis.jobs o
                     WHERE o.id = p_id AND o.reply_token = p_token AND o.kind = 'search'
                       AND o.status = 'done' AND o.result IS NOT NULL
                       FOR UPDATE) old
             WHERE j.id = old.id
            RETURNING j.status, old.result, j.answer, j.error, j.error_sqlstate, j.error_hint
        )
        SELECT t.*, true FROM taken t;
    IF FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT j.status,
               CASE WHEN j.status IN ('done', 'failed', 'cancelled') THEN j.result END,
               j.answer, j.error, j.error_sqlstate, j.error_hint,
               j.status IN ('done', 'failed', 'cancelled') OR themis.live_worker_exists(j.kind)
          FROM themis.jobs j WHERE j.id = p_id AND j.reply_token = p_token;
END
$$;

-- What the SQL functions need to know once per backend: where their own server's unix socket
-- is (SECURITY DEFINER: unix_socket_directories is readable only with pg_read_all_settings)
-- and this backend's start time, for the worker's "is the caller still there" check (after
-- SET ROLE, pg_stat_activity hides it from the caller itself).
CREATE OR REPLACE FUNCTION themis.bus_endpoint(
    OUT socket_dir text, OUT port text, OUT dbname text, OUT backend_start text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'themis_user' AS $$
    SELECT trim(split_part(current_setting('unix_socket_directories'), ',', 1)),
           current_setting('port'), current_database(),
           (SELECT to_char(backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
              FROM pg_stat_get_activity(pg_backend_pid()))
$$;

-- The waiter gave up (cancel, timeout, no worker): free the worker's slot.
-- The pieces of a streamed job generated since the last read, in order, for its waiter (who
-- knows the token); read once: they are deleted as they are handed over.
CREATE OR REPLACE FUNCTION themis.bus_pieces(p_id bigint, p_token text)
RETURNS TABLE (seq integer, piece text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'themis_bus' AS $$
#variable_conflict use_column
BEGIN
    SET LOCAL synchronous_commit = off;
    RETURN QUERY
        WITH taken AS (
            DELETE FROM themis.job_pieces p
             USING themis.jobs j
             WHERE p.job_id = p_id AND j.id = p_id AND j.reply_token = p_token
            RETURNING p.seq, p.piece
        )
        SELECT t.seq, t.piece FROM taken t ORDER BY t.seq;
END
$$;

CREATE OR REPLACE FUNCTION themis.bus_cancel(p_id bigint, p_token text, p_reason text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'themis_bus' AS $$
BEGIN
    SET LOCAL synchronous_commit = off;
    UPDATE themis.jobs j
       SET status = 'cancelled', error = p_reason, error_sqlstate = '57014',
           result = NULL, finished_at = now()
     WHERE j.id = p_id AND j.reply_token = p_token AND j.status IN ('queued', 'running');
    IF FOUND THEN
        PERFORM pg_notify('themis_cancel', p_id::text);
        RETURN true;
    END IF;
    RETURN false;
END
$$;

-- The workers whose heartbeat is recent enough, for the status views.  (bus_submit's
-- live_worker_exists keeps its own EXISTS: it runs on every call, where a function call
-- more would cost.)
CREATE OR REPLACE FUNCTION themis.live_workers() RETURNS SETOF themis.workers
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'none' AS $$
    SELECT * FROM themis.workers w
     WHERE w.heartbeat_at > now()
           - make_interval(secs => (themis.config_value('worker_stale_s') #>> '{}')::float8)
$$;

-- What any themis user may know about the service: no document counts (RLS may hide rows),
-- no other users' jobs.
CREATE OR REPLACE FUNCTION public.themis_status() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'themis_user' AS $$
    SELECT jsonb_build_object(
        'workers', COALESCE((
            SELECT jsonb_agg(jsonb_build_object(
                       'id', w.id, 'kinds', w.kinds, 'heartbeat_at', w.heartbeat_at,
                       'started_at', w.started_at,
                       -- the index size would count rows hidden from the caller by RLS
                       'stats', w.stats - 'index_size') ORDER BY w.id)
              FROM themis.live_workers() w
        ), '[]'::jsonb),
        'queued', (SELECT count(*) FROM themis.jobs WHERE status = 'queued'),
        'running', (SELECT count(*) FROM themis.jobs WHERE status = 'running'),
        'embedding_model', (SELECT embedding_model FROM themis.corpus),
        'models', COALESCE((SELECT jsonb_agg(jsonb_build_object('name', name, 'kind', kind,
                                   'default', is_default) ORDER BY kind, name)
                              FROM themis.models), '[]'::jsonb))
$$;

-- What the operators see: every live worker's own figures, the index size included (it
-- counts rows that RLS may hide from callers, hence pg_monitor, not themis_user).
CREATE OR REPLACE FUNCTION public.themis_stats() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'pg_monitor' AS $$
    SELECT jsonb_build_object(
        'workers', COALESCE((
            SELECT jsonb_agg(jsonb_build_object('id', w.id, 'host', w.host, 'kinds', w.kinds,
                                                'heartbeat_at', w.heartbeat_at,
                                                'stats', w.stats) ORDER BY w.id)
              FROM themis.live_workers() w
        ), '[]'::jsonb),
        'jobs', (SELECT jsonb_object_agg(status, n) FROM (
                    SELECT status, count(*) AS n FROM themis.jobs GROUP BY status) s))
$$;
