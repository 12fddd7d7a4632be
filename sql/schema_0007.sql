-- themis-pg schema, revision 0007: the documents still waiting for an embedding, indexed.
--
-- A worker's cold load asks for them (`unembedded_documents` in queries.sql) and embeds them at
-- its next sync.  Without an index that question is a sequential scan of the whole table,
-- about 0.2 s a million rows, paid on every load while the answer is almost always a few
-- rows.  The partial index holds only those rows, so it costs nothing once rows are embedded.
CREATE INDEX documents_unembedded_idx ON themis.documents (id) WHERE embedding IS NULL;
