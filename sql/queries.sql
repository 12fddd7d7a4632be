-- Named queries of the worker's side of the job bus, loaded by themis_pg/bus/queries.py.
-- Each starts with a "-- name: <name>" line.  Parameters are psycopg %(name)s placeholders.
-- Rule: NOTIFY wakes, the table decides.  Every state change is one statement, guarded by
-- the state it expects, so two workers can never both finish a job.

-- name: claim
-- Take up to %(limit)s queued jobs of the given kinds, oldest first, skipping rows another
-- worker is claiming right now.  The lease must be renewed by heartbeats.
WITH picked AS (
    SELECT id FROM themis.jobs
     WHERE status = 'queued' AND kind = ANY (%(kinds)s) AND deadline > now()
     ORDER BY id
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
UPDATE themis.jobs j
   SET status = 'running', worker_id = %(worker_id)s, attempts = j.attempts + 1,
       started_at = now(), lease_until = now() + make_interval(secs => %(lease)s)
  FROM picked
 WHERE j.id = picked.id
RETURNING j.id, j.kind, j.payload, j.attempts, j.max_attempts,
          extract(epoch FROM j.deadline - now())::float8 AS remaining_s;

-- name: finish
-- Fenced on the claim: only the worker that holds this attempt can finish it, so a worker
-- that lost its lease (and whose job another worker re-ran) can never overwrite the result.
-- Many jobs at once: one round trip for a whole batch of searches.
WITH finished AS (
    UPDATE themis.jobs j
       SET status = 'done', result = f.result, answer = f.answer, finished_at = now(),
           lease_until = NULL
      FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[], %(results)s::jsonb[],
                  %(answers)s::text[]) AS f(id, attempt, result, answer)
     WHERE j.id = f.id AND j.attempts = f.attempt AND j.worker_id = %(worker_id)s
       AND j.status = 'running'
    RETURNING j.id, j.reply_channel
)
SELECT id, pg_notify(reply_channel, id::text) FROM finished;

-- name: add_pieces
-- Streamed pieces of running jobs we hold (fenced like finish), then one notification per job.
WITH added AS (
    INSERT INTO themis.job_pieces (job_id, seq, piece)
    SELECT p.id, p.seq, p.piece
      FROM unnest(%(ids)s::bigint[], %(seqs)s::integer[], %(pieces)s::text[]) AS p(id, seq, piece)
      JOIN themis.jobs j ON j.id = p.id AND j.worker_id = %(worker_id)s AND j.status = 'running'
    ON CONFLICT (job_id, seq) DO NOTHING
    RETURNING job_id
)
SELECT pg_notify(j.reply_channel, j.id::text)
  FROM themis.jobs j WHERE j.id IN (SELECT DISTINCT job_id FROM added);

-- name: fail
WITH failed AS (
    UPDATE themis.jobs
       SET status = 'failed', error = %(error)s, error_sqlstate = %(sqlstate)s,
           error_hint = %(hint)s, finished_at = now(), lease_until = NULL
     WHERE id = %(id)s AND attempts = %(attempt)s AND worker_id = %(worker_id)s
       AND status = 'running'
    RETURNING id, reply_channel
)
SELECT id, pg_notify(reply_channel, id::text) FROM failed;

-- name: release
-- Clean shutdown: hand our running jobs back without counting the attempt.
WITH released AS (
    UPDATE themis.jobs
       SET status = 'queued', worker_id = NULL, lease_until = NULL,
           attempts = greatest(attempts - 1, 0)
     WHERE worker_id = %(worker_id)s AND status = 'running'
       AND (%(ids)s::bigint[] IS NULL OR id = ANY (%(ids)s::bigint[]))
    RETURNING kind
)
SELECT pg_notify('themis_jobs', kind) FROM released;

-- name: register
INSERT INTO themis.workers (id, host, pid, kinds, started_at, heartbeat_at, watermark, stats)
VALUES (%(worker_id)s, %(host)s, %(pid)s, %(kinds)s, now(), now(),
        %(watermark)s::text::xid8, %(stats)s)
ON CONFLICT (id) DO UPDATE
   SET host = EXCLUDED.host, pid = EXCLUDED.pid, kinds = EXCLUDED.kinds,
       started_at = now(), heartbeat_at = now(), watermark = EXCLUDED.watermark,
       stats = EXCLUDED.stats;

-- name: deregister
DELETE FROM themis.workers WHERE id = %(worker_id)s;

-- name: heartbeat
-- Renew the leases of the jobs we are really working on (a job a lane lost track of lapses
-- and is re-queued) and say we are alive; returns whether our row still exists.
WITH leases AS (
    UPDATE themis.jobs
       SET lease_until = now() + make_interval(secs => %(lease)s)
     WHERE worker_id = %(worker_id)s AND status = 'running' AND id = ANY (%(active)s)
)
UPDATE themis.workers
   SET heartbeat_at = now(), stats = %(stats)s,
       watermark = coalesce(%(watermark)s::text::xid8, watermark)
 WHERE id = %(worker_id)s
RETURNING id;

-- name: cancelled_among
-- Which of the jobs we are running were cancelled by their callers.
SELECT id FROM themis.jobs WHERE id = ANY (%(ids)s) AND status = 'cancelled';

-- name: reap_lost
-- Jobs whose worker stopped renewing the lease: back to the queue, or failed for good
-- after max_attempts.  Waiters of failed jobs and idle workers are woken.
WITH lost AS (
    UPDATE themis.jobs
       SET status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END,
           error = CASE WHEN attempts >= max_attempts
                        THEN format('the worker running this job was lost %%s times '
                                    '(last: %%s)', attempts, worker_id) END,
           error_sqlstate = CASE WHEN attempts >= max_attempts THEN 'XX000' END,
           finished_at = CASE WHEN attempts >= max_attempts THEN now() END,
           worker_id = CASE WHEN attempts >= max_attempts THEN worker_id END,
           lease_until = NULL
     WHERE status = 'running' AND lease_until < now()
    RETURNING id, status, kind, reply_channel
)
SELECT id, status,
       pg_notify(CASE WHEN status = 'failed' THEN reply_channel ELSE 'themis_jobs' END,
                 CASE WHEN status = 'failed' THEN id::text ELSE kind END)
  FROM lost;

-- name: cancel_orphans
-- Jobs nobody waits for any more: the calling backend is gone (client disconnected,
-- backend killed) or the deadline passed.
WITH orphans AS (
    UPDATE themis.jobs j
       SET status = 'cancelled',
           error = CASE WHEN j.deadline < now() THEN 'deadline passed'
                        ELSE 'calling session went away' END,
           error_sqlstate = '57014', result = NULL, finished_at = now()
     WHERE j.status IN ('queued', 'running')
       AND (j.deadline < now()
            -- fail closed: a backend whose start time we may not see counts as the caller
            OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                            WHERE a.pid = j.caller_pid
                              AND (a.backend_start IS NULL
                                   OR a.backend_start = j.caller_started)))
    RETURNING j.id
)
SELECT id, pg_notify('themis_cancel', id::text) FROM orphans;

-- name: prune_jobs
DELETE FROM themis.jobs
 WHERE finished_at < now() - make_interval(secs => %(retention)s);

-- name: prune_workers
DELETE FROM themis.workers WHERE heartbeat_at < now() - interval '1 day';

-- name: prune_changes
-- Changes below every live worker's watermark are needed by no one.  The horizon records how
-- far pruning went: a worker whose watermark is below it (it was loading, or stalled) sees
-- that on its next sync and reloads instead of missing changes.
-- Index snapshots younger than a day count as workers (a restarted worker reads the changes
-- since its snapshot instead of the whole table); older ones are forgotten.
WITH horizon AS (
    UPDATE themis.change_horizon
       SET xid = greatest(xid, coalesce(
               least((SELECT min(watermark) FROM themis.workers
                       WHERE heartbeat_at > now() - interval '1 hour'),
                     (SELECT min(watermark) FROM themis.index_snapshots
                       WHERE created_at > now() - interval '1 day')),
               pg_snapshot_xmin(pg_current_snapshot())))
    RETURNING xid
)
DELETE FROM themis.changes WHERE xid < (SELECT xid FROM horizon);

-- name: prune_snapshots
DELETE FROM themis.index_snapshots WHERE created_at < now() - interval '1 day';

-- name: snapshot_token
-- Whether this database vouches for a snapshot file (schema_0003.sql says why that is enough).
SELECT embedding_model, dim, watermark::text::bigint, rows
  FROM themis.index_snapshots WHERE token = %(token)s;

-- name: record_snapshot
-- Run with synchronous_commit on: its commit flushes the WAL of every change the file reflects.
WITH gone AS (
    DELETE FROM themis.index_snapshots
     WHERE host = %(host)s AND snapshot_key = %(key)s AND token <> %(token)s
)
INSERT INTO themis.index_snapshots (token, host, snapshot_key, embedding_model, dim, watermark,
                                    rows)
VALUES (%(token)s, %(host)s, %(key)s, %(model)s, %(dim)s, %(watermark)s::text::xid8, %(rows)s);

-- name: document_rows
-- Rows the matrix will hold, for the memory plan: the planner's estimate when the table was
-- analysed (a count of 10M rows takes a while), else a count.
SELECT CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint
            ELSE (SELECT count(*) FROM themis.documents) END
  FROM pg_class c WHERE c.oid = 'themis.documents'::regclass;

-- name: snapshot_state
-- First statement of a load or sync transaction: its snapshot's xmin (the next watermark),
-- the prune horizon, and the server's start time (a restart can lose async commits).
SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint,
       (SELECT xid::text::bigint FROM themis.change_horizon),
       pg_postmaster_start_time();

-- name: unembedded_documents
SELECT id FROM themis.documents WHERE embedding IS NULL;

-- name: changes_since
SELECT seq, xid::text::bigint AS xid, doc_id, op FROM themis.changes
 WHERE xid >= %(watermark)s::text::xid8
 ORDER BY seq;

-- name: store_embedding
-- Written only if the row still holds the text we embedded.
UPDATE themis.documents SET embedding = %(embedding)s, updated_at = now()
 WHERE id = %(id)s AND embedding IS NULL AND content = %(content)s;

-- name: corpus
SELECT embedding_model, dim FROM themis.corpus;

-- name: claim_corpus
-- Record our model for a corpus that has none yet; returns the corpus's model either way.
WITH claimed AS (
    INSERT INTO themis.corpus (embedding_model, dim) VALUES (%(model)s, %(dim)s)
    ON CONFLICT (singleton) DO NOTHING
    RETURNING embedding_model, dim
)
SELECT embedding_model, dim FROM claimed
UNION ALL SELECT embedding_model, dim FROM themis.corpus
LIMIT 1;

-- name: index_delta
-- Everything one index sync needs, in one statement (one snapshot, one round trip): the
-- snapshot's xmin (the next watermark), the prune horizon, the server's start time (a restart
-- can lose async commits), the corpus's model, the changes at or above the watermark not yet
-- applied, and the current rows of the documents they name plus those still waiting for an
-- embedding.  A document named but not returned was deleted.
WITH state AS (
    SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin,
           (SELECT xid::text::bigint FROM themis.change_horizon) AS horizon,
           pg_postmaster_start_time() AS server_start,
           c.embedding_model, c.dim
      FROM (SELECT 1) AS one LEFT JOIN themis.corpus c ON true
), fresh AS (
    SELECT ch.seq, ch.xid::text::bigint AS xid, ch.doc_id, ch.op
      FROM themis.changes ch
     WHERE ch.xid >= %(watermark)s::text::xid8
       AND ch.seq <> ALL (%(seen)s::bigint[])
), wanted AS (
    SELECT doc_id AS id FROM fresh WHERE doc_id IS NOT NULL
    UNION
    SELECT unnest(%(pending)s::bigint[])
)
SELECT 'state' AS tag, s.xmin, s.horizon, s.server_start, s.embedding_model, s.dim,
       NULL::bigint AS seq, NULL::bigint AS xid, NULL::bigint AS doc_id, NULL::text AS op,
       NULL::vector AS embedding, NULL::text AS content
  FROM state s
UNION ALL
SELECT 'change', NULL, NULL, NULL, NULL, NULL, f.seq, f.xid, f.doc_id, f.op::text, NULL, NULL
  FROM fresh f
UNION ALL
SELECT 'doc', NULL, NULL, NULL, NULL, NULL, NULL, NULL, d.id, NULL, d.embedding,
       CASE WHEN d.embedding IS NULL THEN d.content END
  FROM wanted w JOIN themis.documents d ON d.id = w.id;

-- name: filter_matches
-- The documents a metadata filter admits (jsonb containment, GIN index from revision 0002).
SELECT coalesce(array_agg(id), '{}') FROM themis.documents WHERE metadata @> %(filter)s::jsonb;

-- name: config
SELECT key, value FROM themis.config;
