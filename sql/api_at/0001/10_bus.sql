-- The job bus as seen from the SQL functions' autonomous connection (role themis_bus).
-- Idempotent: re-applied by every revision.  These SECURITY DEFINER functions are all that
-- role may do: it has no rights on any table.

CREATE OR REPLACE FUNCTION themis.config_value(p_key text) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'themis_bus,themis_user' AS $$
    SELECT value FROM themis.config WHERE key = p_key
$$;

CREATE OR REPLACE FUNCTION themis.live_worker_exists(p_kind text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'themis_bus,themis_user' AS $$
    SELECT EXISTS (
        SELECT 1 FROM themis.workers w
        WHERE p_kind = ANY (w.kinds)
          AND w.heartbeat_at > now()
              - make_interval(secs => (themis.config_value('worker_stale_s') #>> '{}')::float8))
$$;

-- Queue a job and wake the workers.  Fails at once (no waiting) when no worker is alive or
-- the queue is full, so a caller never waits on work nobody will do.
CREATE OR REPLACE FUNCTION themis.bus_submit(
    p_kind text, p_payload jsonb, p_requested_by name, p_caller_pid integer,
    p_caller_started timestamptz, p_reply_channel text, p_reply_token text,
    p_timeout_s double precision
) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'themis_bus' AS $$
DECLARE
    v_depth bigint;
    v_max   bigint := (themis.config_value('max_queue_depth') #>> '{}')::bigint;
    v_id    bigint;
BEGIN
    IF NOT themis.live_worker_exists(p_kind) THEN
        RAISE EXCEPTION 'no themis worker is running for % jobs', p_kind
            USING ERRCODE = '55000',
                  HINT = 'Start one with `themis worker` (or `themis demo`); themis_status() lists live workers.';
    END IF;
    SELECT count(*) INTO v_depth FROM themis.jobs WHERE status = 'queued';
    IF v_depth >= v_max THEN
        RAISE EXCEPTION 'themis job queue is full (% queued jobs, limit %)', v_depth, v_max
            USING ERRCODE = '53000',
                  HINT = 'Retry later, add workers, or raise max_queue_depth in themis.config.';
    END IF;
    -- A submit re-sent after a dropped connection finds its first attempt by token.
    INSERT INTO themis.jobs (kind, payload, requested_by, caller_pid, caller_started,
                             reply_channel, reply_token, deadline, max_attempts)
    VALUES (p_kind, p_payload, p_requested_by, p_caller_pid, p_caller_started,
            p_reply_channel, p_reply_token, now() + make_interval(secs => p_timeout_s),
            (themis.config_value('max_attempts') #>> '{}')::integer)
    ON CONFLICT (reply_token) DO UPDATE SET reply_token = EXCLUDED.reply_token
    RETURNING id INTO v_id;
    PERFORM pg_notify('themis_jobs', p_kind);
    RETURN v_id;
END
$$;

-- The job's state for its waiter.  Only the waiter (who knows the token) reads the internal
-- result, and acknowledges it with bus_ack, which clears it: it may hold ids of rows the
-- caller cannot see.
CREATE OR REPLACE FUNCTION themis.bus_take(p_id bigint, p_token text)
RETURNS TABLE (status text, result jsonb, answer text, error text, error_sqlstate text,
               error_hint text, worker_alive boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'themis_bus' AS $$
DECLARE
    r themis.jobs%ROWTYPE;
BEGIN
    SELECT * INTO r FROM themis.jobs j WHERE j.id = p_id AND j.reply_token = p_token;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF r.status IN ('done', 'failed', 'cancelled') THEN
        RETURN QUERY SELECT r.status, r.result, r.answer, r.error, r.error_sqlstate,
                            r.error_hint, true;
    ELSE
        RETURN QUERY SELECT r.status, NULL::jsonb, NULL::text, NULL::text, NULL::text,
                            NULL::text, themis.live_worker_exists(r.kind);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION themis.bus_ack(p_id bigint, p_token text) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'themis_bus' AS $$
    UPDATE themis.jobs SET result = NULL
     WHERE id = p_id AND reply_token = p_token AND result IS NOT NULL
       AND status IN ('done', 'failed', 'cancelled')
$$;

-- The calling backend's start time, for the worker's "is the caller still there" check.
-- SECURITY DEFINER: after SET ROLE, pg_stat_activity hides it from the caller itself.
CREATE OR REPLACE FUNCTION themis.caller_backend_start() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'themis_user' AS $$
    SELECT to_char(backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
      FROM pg_stat_get_activity(pg_backend_pid())
$$;

-- Where the SQL functions' autonomous connection goes: bus_dsn from themis.config, else this
-- server's own unix socket.  SECURITY DEFINER because unix_socket_directories is readable only
-- with pg_read_all_settings.
CREATE OR REPLACE FUNCTION themis.bus_endpoint(
    OUT dsn text, OUT socket_dir text, OUT port text, OUT dbname text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'themis_user' AS $$
    SELECT (SELECT value #>> '{}' FROM themis.config WHERE key = 'bus_dsn'),
           trim(split_part(current_setting('unix_socket_directories'), ',', 1)),
           current_setting('port'), current_database()
$$;

-- The waiter gave up (cancel, timeout, no worker): free the worker's slot.
CREATE OR REPLACE FUNCTION themis.bus_cancel(p_id bigint, p_token text, p_reason text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'themis_bus' AS $$
BEGIN
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
              FROM themis.workers w
             WHERE w.heartbeat_at > now()
                   - make_interval(secs => (themis.config_value('worker_stale_s') #>> '{}')::float8)
        ), '[]'::jsonb),
        'queued', (SELECT count(*) FROM themis.jobs WHERE status = 'queued'),
        'running', (SELECT count(*) FROM themis.jobs WHERE status = 'running'),
        'embedding_model', (SELECT embedding_model FROM themis.corpus),
        'models', COALESCE((SELECT jsonb_agg(jsonb_build_object('name', name, 'kind', kind,
                                   'default', is_default) ORDER BY kind, name)
                              FROM themis.models), '[]'::jsonb))
$$;
