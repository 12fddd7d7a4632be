-- Remove everything themis-pg created in this database.  Roles are cluster-wide and stay
-- (other databases may use them); the vector and plpython3u extensions stay too.
DROP FUNCTION IF EXISTS public.themis_rag(text, integer, integer, double precision, double precision);
DROP FUNCTION IF EXISTS public.themis_rag_json(text, integer, integer, double precision, double precision);
DROP FUNCTION IF EXISTS public.themis_search(text, integer, double precision);
DROP FUNCTION IF EXISTS public.themis_embed(text, double precision);
DROP FUNCTION IF EXISTS public.themis_generate(text, integer, double precision, double precision);
DROP FUNCTION IF EXISTS public.themis_status();
DROP SCHEMA IF EXISTS themis CASCADE;
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I RESET client_connection_check_interval', current_database());
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'could not reset client_connection_check_interval on this database';
END
$$;
