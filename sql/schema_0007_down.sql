-- Undo revision 0007 (see schema_0007.sql).
DROP INDEX themis.documents_unembedded_idx;
