-- themis-pg schema, revision 0005: LoRA adapters as table rows.
--
-- An adapter is a GGUF LoRA file for one registered generation model.  Its bytes live here
-- (themis.lora_adapter_chunks, 1 MiB per row, in order), so every worker on every host gets
-- them from the database and caches them on local disk by sha256.  Callers read the registry
-- as themselves: which adapters a role may use is decided by GRANT and row-level security on
-- themis.lora_adapters, as for themis.documents.  Only workers (and the owner) read the bytes.
CREATE TABLE themis.lora_adapters (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$'),
    domain        text,
    base_model    text NOT NULL REFERENCES themis.models (name) ON UPDATE CASCADE,
    rank          integer NOT NULL CHECK (rank > 0),
    alpha         real NOT NULL,
    default_scale real NOT NULL DEFAULT 1.0 CHECK (default_scale >= 0),
    description   text NOT NULL DEFAULT '',
    sha256        text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size_bytes    bigint NOT NULL CHECK (size_bytes > 0),
    centroid      vector,                  -- embedding of the description and examples
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX lora_adapters_domain_idx ON themis.lora_adapters (domain);

CREATE TABLE themis.lora_adapter_chunks (
    adapter_id bigint NOT NULL REFERENCES themis.lora_adapters (id) ON DELETE CASCADE,
    seq        integer NOT NULL CHECK (seq >= 0),
    data       bytea NOT NULL,
    PRIMARY KEY (adapter_id, seq)
);

GRANT SELECT ON themis.lora_adapters TO themis_user;
GRANT SELECT ON themis.lora_adapters, themis.lora_adapter_chunks TO themis_worker;

-- Row-level security is off until an administrator turns it on; these permissive policies
-- keep every row visible to callers and workers then, so restrictive policies alone decide
-- (e.g. CREATE POLICY ... AS RESTRICTIVE FOR SELECT TO some_role USING (domain = 'legal')).
CREATE POLICY lora_adapters_visible ON themis.lora_adapters FOR SELECT
    TO themis_user, themis_worker USING (true);

-- Automatic adapter selection (themis_rag(..., auto_adapters => true), themis_pl/adapters.py).
INSERT INTO themis.config (key, value, description) VALUES
    ('lora_auto_threshold', '0.3', 'least cosine between a query and an adapter centroid for the adapter to be chosen'),
    ('lora_auto_temperature', '0.05', 'softmax temperature over the chosen adapters'' similarities'),
    ('lora_auto_max', '2', 'most adapters fused for one query');
