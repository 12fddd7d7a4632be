-- themis-pg schema, revision 0006: LoRA adapters registered through SQL.
--
-- themis_lora_register (the function set) checks an adapter inside the server, where the
-- base model's file may not be: registering a generation model now records what the check
-- needs of it, its architecture and matrix shapes (models.gguf_header, filled in for the
-- models already registered by this revision's Python part when their files are readable).
ALTER TABLE themis.models ADD COLUMN gguf_header jsonb;
COMMENT ON COLUMN themis.models.gguf_header IS
    'generation models: {"architecture": ..., "tensors": {name: [n_in, n_out]}} of the GGUF file, for checking LoRA adapters';

-- Who may register and remove adapters: themis_admin (a themis_user too).  Roles are
-- cluster-wide and kept across downgrades, like those of revision 0001.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'themis_admin') THEN
        CREATE ROLE themis_admin NOLOGIN;
    END IF;
END
$$;
GRANT themis_user TO themis_admin;
GRANT SELECT, INSERT, DELETE ON themis.lora_adapters, themis.lora_adapter_chunks TO themis_admin;
GRANT USAGE ON SEQUENCE themis.lora_adapters_id_seq TO themis_admin;
-- with row-level security turned on, admins still see and write every adapter unless a
-- restrictive policy says otherwise (as for callers in revision 0005)
CREATE POLICY lora_adapters_admin ON themis.lora_adapters FOR ALL TO themis_admin
    USING (true) WITH CHECK (true);
