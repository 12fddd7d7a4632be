-- Undo revision 0004 (see schema_0004.sql).
DROP TABLE themis.job_pieces;
