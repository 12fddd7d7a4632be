-- User-facing functions.  Part of the function set (sql/README.md): applied after the
-- migrations, dropped and re-created as a whole.
--
-- Each PL/Python body is a few lines that hand over to the themis_pl package (themis_pg/pl in
-- the source tree), which the server's Python imports.  The public functions are thin
-- PL/pgSQL wrappers around them that re-raise errors without PL/Python's exception-class
-- prefix and traceback, so callers see PostgreSQL's usual one-line message and SQLSTATE.
-- They run as the caller (SECURITY INVOKER) so that GRANTs and row-level security decide
-- which documents a call may use, with a pinned search_path.  EXECUTE is for themis_user
-- (and the owner) only: each function's `SET themis.execute` marker says so.

-- Re-raise an error caught by a wrapper with PL/Python's "plpy.Error: " (or
-- "spiexceptions.X: ") prefix removed, keeping its SQLSTATE and (non-empty) hint.
CREATE OR REPLACE FUNCTION themis.reraise(message text, state text, hint text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'themis_user' AS $$
BEGIN
    message := regexp_replace(message, '^(plpy\.Error|spiexceptions\.[A-Za-z]+): ', '');
    IF coalesce(hint, '') IN ('', 'None') THEN
        RAISE EXCEPTION USING MESSAGE = message, ERRCODE = state;
    END IF;
    RAISE EXCEPTION USING MESSAGE = message, ERRCODE = state, HINT = hint;
END
$$;

-- PL/Python implementations (internal).
CREATE OR REPLACE FUNCTION themis.rag_py(
    query text, k integer, max_tokens integer, temperature double precision,
    timeout_s double precision, as_json boolean, filter jsonb, adapters text[],
    adapter_weights real[], auto_adapters boolean, domains text[]
) RETURNS text
LANGUAGE plpython3u VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'themis_user' AS $$
import json
from themis_pl import api
result = api.rag(plpy, GD, query, k, max_tokens=max_tokens, temperature=temperature,
                 timeout_s=timeout_s, filter=filter, adapters=adapters,
                 adapter_weights=adapter_weights, auto_adapters=auto_adapters,
                 domains=domains)
return json.dumps(result) if as_json else result["answer"]
$$;

CREATE OR REPLACE FUNCTION themis.search_py(query text, k integer, timeout_s double precision,
                                            filter jsonb)
RETURNS TABLE (id bigint, score real, content text, metadata jsonb)
LANGUAGE plpython3u VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'themis_user' AS $$
from themis_pl import api
return api.search_rows(plpy, GD, query, k, timeout_s=timeout_s, filter=filter)
$$;

CREATE OR REPLACE FUNCTION themis.embed_py(input text, timeout_s double precision)
RETURNS text
LANGUAGE plpython3u VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'themis_user' AS $$
from themis_pl import api
return api.embed(plpy, GD, input, timeout_s=timeout_s)
$$;

CREATE OR REPLACE FUNCTION themis.generate_py(
    prompt text, max_tokens integer, temperature double precision, timeout_s double precision
) RETURNS text
LANGUAGE plpython3u VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'themis_user' AS $$
from themis_pl import api
return api.generate(plpy, GD, prompt, max_tokens=max_tokens, temperature=temperature,
                    timeout_s=timeout_s)["answer"]
$$;

-- Public functions.
CREATE OR REPLACE FUNCTION public.themis_rag(
    query text, k integer DEFAULT 5, max_tokens integer DEFAULT NULL,
    temperature double precision DEFAULT 0, timeout_s double precision DEFAULT NULL,
    filter jsonb DEFAULT NULL, adapters text[] DEFAULT NULL, adapter_weights real[] DEFAULT NULL,
    auto_adapters boolean DEFAULT false, domains text[] DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'themis_user' AS $$
DECLARE msg text; state text; hint text;
BEGIN
    RETURN themis.rag_py(query, k, max_tokens, temperature, timeout_s, false, filter, adapters,
                         adapter_weights, auto_adapters, domains);
EXCEPTION WHEN query_canceled OR others THEN
    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, state = RETURNED_SQLSTATE, hint = PG_EXCEPTION_HINT;
    PERFORM themis.reraise(msg, state, hint);
END
$$;

CREATE OR REPLACE FUNCTION public.themis_rag_json(
    query text, k integer DEFAULT 5, max_tokens integer DEFAULT NULL,
    temperature double precision DEFAULT 0, timeout_s double precision DEFAULT NULL,
    filter jsonb DEFAULT NULL, adapters text[] DEFAULT NULL, adapter_weights real[] DEFAULT NULL,
    auto_adapters boolean DEFAULT false, domains text[] DEFAULT NULL
) RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'themis_user' AS $$
DECLARE msg text; state text; hint text;
BEGIN
    RETURN themis.rag_py(query, k, max_tokens, temperature, timeout_s, true, filter, adapters,
                         adapter_weights, auto_adapters, domains)::jsonb;
EXCEPTION WHEN query_canceled OR others THEN
    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, state = RETURNED_SQLSTATE, hint = PG_EXCEPTION_HINT;
    PERFORM themis.reraise(msg, state, hint);
END
$$;

-- Streamed: the answer's pieces as the worker generates them.  A set-returning PL/Python
-- function runs value per call, so in the select list (SELECT themis_rag_stream(...)) and
-- through a cursor (DECLARE c CURSOR FOR SELECT themis_rag_stream(...); FETCH 1 FROM c) each
-- piece arrives as it is made; in FROM (SELECT * FROM themis_rag_stream(...)) PostgreSQL
-- collects every row first.  No PL/pgSQL wrapper (it would collect them too): errors carry
-- PL/Python's "plpy.Error: " prefix.  Closing the cursor early cancels the generation.
CREATE OR REPLACE FUNCTION public.themis_rag_stream(
    query text, k integer DEFAULT 5, max_tokens integer DEFAULT NULL,
    temperature double precision DEFAULT 0, timeout_s double precision DEFAULT NULL,
    filter jsonb DEFAULT NULL, adapters text[] DEFAULT NULL, adapter_weights real[] DEFAULT NULL,
    auto_adapters boolean DEFAULT false, domains text[] DEFAULT NULL
) RETURNS SETOF text
LANGUAGE plpython3u VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'themis_user' AS $$
from themis_pl import api
return api.rag_stream(plpy, GD, query, k, max_tokens=max_tokens, temperature=temperature,
                      timeout_s=timeout_s, filter=filter, adapters=adapters,
                      adapter_weights=adapter_weights, auto_adapters=auto_adapters,
                      domains=domains)
$$;

CREATE OR REPLACE FUNCTION public.themis_search(
    query text, k integer DEFAULT 5, timeout_s double precision DEFAULT NULL,
    filter jsonb DEFAULT NULL
) RETURNS TABLE (id bigint, score real, content text, metadata jsonb)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'themis_user' AS $$
DECLARE msg text; state text; hint text;
BEGIN
    RETURN QUERY SELECT * FROM themis.search_py(query, k, timeout_s, filter);
EXCEPTION WHEN query_canceled OR others THEN
    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, state = RETURNED_SQLSTATE, hint = PG_EXCEPTION_HINT;
    PERFORM themis.reraise(msg, state, hint);
END
$$;

CREATE OR REPLACE FUNCTION public.themis_embed(
    input text, timeout_s double precision DEFAULT NULL
) RETURNS vector
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, public, pg_temp
    SET themis.execute = 'themis_user' AS $$
DECLARE msg text; state text; hint text;
BEGIN
    RETURN themis.embed_py(input, timeout_s)::vector;
EXCEPTION WHEN query_canceled OR others THEN
    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, state = RETURNED_SQLSTATE, hint = PG_EXCEPTION_HINT;
    PERFORM themis.reraise(msg, state, hint);
END
$$;

CREATE OR REPLACE FUNCTION public.themis_generate(
    prompt text, max_tokens integer DEFAULT NULL, temperature double precision DEFAULT 0,
    timeout_s double precision DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'themis_user' AS $$
DECLARE msg text; state text; hint text;
BEGIN
    RETURN themis.generate_py(prompt, max_tokens, temperature, timeout_s);
EXCEPTION WHEN query_canceled OR others THEN
    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, state = RETURNED_SQLSTATE, hint = PG_EXCEPTION_HINT;
    PERFORM themis.reraise(msg, state, hint);
END
$$;


-- The LoRA registry through SQL (themis_pl/lora_registry.py): the file is checked in this
-- backend against the base model's recorded shapes, the row and its bytes are written as the
-- caller, inside the caller's transaction.  For themis_admin (and the owner).
CREATE OR REPLACE FUNCTION themis.lora_register_py(
    name text, adapter bytea, domain text, description text, examples text[],
    default_scale real, base_model text, timeout_s double precision
) RETURNS text
LANGUAGE plpython3u VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'themis_admin' AS $$
from themis_pl import api
return api.lora_register(plpy, GD, name, adapter, domain=domain, description=description,
                         examples=examples, default_scale=default_scale,
                         base_model=base_model, timeout_s=timeout_s)
$$;

CREATE OR REPLACE FUNCTION themis.lora_remove_py(name text) RETURNS void
LANGUAGE plpython3u VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'themis_admin' AS $$
from themis_pl import api
api.lora_remove(plpy, name)
$$;

CREATE OR REPLACE FUNCTION public.themis_lora_register(
    name text, adapter bytea, domain text DEFAULT NULL, description text DEFAULT '',
    examples text[] DEFAULT NULL, default_scale real DEFAULT 1.0, base_model text DEFAULT NULL,
    timeout_s double precision DEFAULT NULL
) RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'themis_admin' AS $$
DECLARE msg text; state text; hint text;
BEGIN
    RETURN themis.lora_register_py(name, adapter, domain, description, examples,
                                   default_scale, base_model, timeout_s)::jsonb;
EXCEPTION WHEN query_canceled OR others THEN
    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, state = RETURNED_SQLSTATE, hint = PG_EXCEPTION_HINT;
    PERFORM themis.reraise(msg, state, hint);
END
$$;

CREATE OR REPLACE FUNCTION public.themis_lora_remove(name text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp
    SET themis.execute = 'themis_admin' AS $$
DECLARE msg text; state text; hint text;
BEGIN
    PERFORM themis.lora_remove_py(name);
EXCEPTION WHEN query_canceled OR others THEN
    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, state = RETURNED_SQLSTATE, hint = PG_EXCEPTION_HINT;
    PERFORM themis.reraise(msg, state, hint);
END
$$;
