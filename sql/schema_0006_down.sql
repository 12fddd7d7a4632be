-- Undo revision 0006 (see schema_0006.sql).  The role and its membership of themis_user stay:
-- both are cluster-wide, and another database of the cluster may still be at 0006.
DROP POLICY lora_adapters_admin ON themis.lora_adapters;
REVOKE USAGE ON SEQUENCE themis.lora_adapters_id_seq FROM themis_admin;
REVOKE ALL ON themis.lora_adapters, themis.lora_adapter_chunks FROM themis_admin;
ALTER TABLE themis.models DROP COLUMN gguf_header;
