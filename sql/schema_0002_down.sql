-- Undo revision 0002 (see schema_0002.sql).
-- themis_bus keeps its idle_session_timeout: roles are cluster-wide and outlive a downgrade
-- (other databases of the cluster may use them).
DROP INDEX themis.documents_metadata_idx;
DELETE FROM themis.config WHERE key IN ('max_candidates', 'max_context_chars');
ALTER TABLE themis.workers SET LOGGED;
ALTER TABLE themis.jobs SET LOGGED;
