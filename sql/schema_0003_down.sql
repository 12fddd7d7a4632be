-- Undo revision 0003 (see schema_0003.sql); snapshot files left on workers' disks are never
-- trusted without their token, so they are simply rebuilt.
DROP TABLE themis.index_snapshots;
