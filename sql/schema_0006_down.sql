-- Undo revision 0006 (see schema_0006.sql); the role stays, as roles do.
DROP POLICY lora_adapters_admin ON themis.lora_adapters;
REVOKE USAGE ON SEQUENCE themis.lora_adapters_id_seq FROM themis_admin;
REVOKE ALL ON themis.lora_adapters, themis.lora_adapter_chunks FROM themis_admin;
REVOKE themis_user FROM themis_admin;
ALTER TABLE themis.models DROP COLUMN gguf_header;
