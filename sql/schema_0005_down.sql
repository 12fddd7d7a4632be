-- Undo revision 0005 (see schema_0005.sql).
DROP TABLE themis.lora_adapter_chunks;
DROP TABLE themis.lora_adapters;
DELETE FROM themis.config WHERE key LIKE 'lora\_auto\_%';
