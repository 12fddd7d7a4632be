-- Remove everything themis-pg created in this database (run by the downgrade of 0001, after
-- the marked functions were dropped from the catalog).  Roles are cluster-wide and stay
-- (other databases may use them); the vector and plpython3u extensions stay too.
DROP SCHEMA IF EXISTS themis CASCADE;
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I RESET client_connection_check_interval', current_database());
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'could not reset client_connection_check_interval on this database';
END
$$;
