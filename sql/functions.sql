-- User-facing functions.  Idempotent: re-applied by every revision.
--
-- Each body is a few lines that hand over to the themis_pl package (themis_pg/pl in the
-- source tree), which the server's Python imports.  They run as the caller (SECURITY
-- INVOKER) so that GRANTs and row-level security decide which documents a call may use,
-- with a pinned search_path.  EXECUTE is for themis_user (and the owner) only.

CREATE OR REPLACE FUNCTION public.themis_rag(
    query text, k integer DEFAULT 5, max_tokens integer DEFAULT NULL,
    temperature double precision DEFAULT 0, timeout_s double precision DEFAULT NULL
) RETURNS text
LANGUAGE plpython3u VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
from themis_pl import api
return api.rag(plpy, GD, query, k, max_tokens=max_tokens, temperature=temperature,
               timeout_s=timeout_s)["answer"]
$$;

CREATE OR REPLACE FUNCTION public.themis_rag_json(
    query text, k integer DEFAULT 5, max_tokens integer DEFAULT NULL,
    temperature double precision DEFAULT 0, timeout_s double precision DEFAULT NULL
) RETURNS jsonb
LANGUAGE plpython3u VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
import json
from themis_pl import api
return json.dumps(api.rag(plpy, GD, query, k, max_tokens=max_tokens,
                          temperature=temperature, timeout_s=timeout_s))
$$;

CREATE OR REPLACE FUNCTION public.themis_search(
    query text, k integer DEFAULT 5, timeout_s double precision DEFAULT NULL
) RETURNS TABLE (id bigint, score real, content text, metadata jsonb)
LANGUAGE plpython3u VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
from themis_pl import api
return api.search_rows(plpy, GD, query, k, timeout_s=timeout_s)
$$;

CREATE OR REPLACE FUNCTION public.themis_embed(
    input text, timeout_s double precision DEFAULT NULL
) RETURNS vector
LANGUAGE plpython3u VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
from themis_pl import api
return api.embed(plpy, GD, input, timeout_s=timeout_s)
$$;

CREATE OR REPLACE FUNCTION public.themis_generate(
    prompt text, max_tokens integer DEFAULT NULL, temperature double precision DEFAULT 0,
    timeout_s double precision DEFAULT NULL
) RETURNS text
LANGUAGE plpython3u VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
from themis_pl import api
return api.generate(plpy, GD, prompt, max_tokens=max_tokens, temperature=temperature,
                    timeout_s=timeout_s)["answer"]
$$;

REVOKE ALL ON FUNCTION
    public.themis_rag(text, integer, integer, double precision, double precision),
    public.themis_rag_json(text, integer, integer, double precision, double precision),
    public.themis_search(text, integer, double precision),
    public.themis_embed(text, double precision),
    public.themis_generate(text, integer, double precision, double precision)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    public.themis_rag(text, integer, integer, double precision, double precision),
    public.themis_rag_json(text, integer, integer, double precision, double precision),
    public.themis_search(text, integer, double precision),
    public.themis_embed(text, double precision),
    public.themis_generate(text, integer, double precision, double precision)
TO themis_user;
