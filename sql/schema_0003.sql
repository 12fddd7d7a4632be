-- themis-pg schema, revision 0003: index snapshots for warm worker restarts.
--
-- A worker writes its resident matrix to a local file (ids, vectors, the change watermark it
-- reflects) and then records the file's random token here in a synchronously committed
-- transaction.  At its next start it trusts the file only if this database still holds the
-- token with the same model, dimension and watermark:
--   * another database (or a re-created one) has no such row;
--   * a database restored to a point before the snapshot was written has no such row;
--   * after a crash, the row survived only if its commit record reached disk, and WAL is
--     flushed in order, so every change the snapshot reflects (async commits included,
--     which a crash may otherwise lose) reached disk too.
-- Pruning of themis.changes keeps the changes a snapshot younger than a day still needs, so a
-- restarted worker reads only what changed since.
CREATE TABLE themis.index_snapshots (
    token           uuid PRIMARY KEY,
    host            text NOT NULL,
    snapshot_key    text NOT NULL,
    embedding_model text NOT NULL,
    dim             integer NOT NULL CHECK (dim > 0),
    watermark       xid8 NOT NULL,           -- the change watermark the file reflects
    rows            bigint NOT NULL CHECK (rows >= 0),
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX index_snapshots_key_idx ON themis.index_snapshots (host, snapshot_key);

GRANT SELECT, INSERT, DELETE ON themis.index_snapshots TO themis_worker;
