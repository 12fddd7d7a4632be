-- themis-pg schema, revision 0004: streamed generation (themis_rag_stream).
--
-- A worker appends the pieces of a streamed answer here as it generates them and notifies the
-- caller's channel; the caller's bus function reads and deletes them (themis.bus_pieces,
-- fenced on the job's reply token).  Unlogged like themis.jobs, for the same reason: a piece
-- never outlives the session waiting for it.  Deleting a job deletes its pieces.
CREATE UNLOGGED TABLE themis.job_pieces (
    job_id bigint NOT NULL REFERENCES themis.jobs (id) ON DELETE CASCADE,
    seq    integer NOT NULL,
    piece  text NOT NULL,
    PRIMARY KEY (job_id, seq)
);

GRANT SELECT, INSERT, DELETE ON themis.job_pieces TO themis_worker;
