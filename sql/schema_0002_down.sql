-- Undo revision 0002 (see schema_0002.sql).
DO $$
BEGIN
    EXECUTE format('ALTER ROLE themis_bus IN DATABASE %I RESET idle_session_timeout',
                   current_database());
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'not allowed to ALTER ROLE themis_bus: reset its idle_session_timeout yourself';
END
$$;
DELETE FROM themis.config WHERE key IN ('max_candidates', 'max_context_chars');
ALTER TABLE themis.workers SET LOGGED;
ALTER TABLE themis.jobs SET LOGGED;
