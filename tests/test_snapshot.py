"""Index snapshots (warm restarts): the file format, when a snapshot is trusted and when not,
and a restarted worker that reads only what changed, against a real database and worker."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import psycopg
import pytest

from themis_pg.retrieval.index import EmbeddingIndex, normalize
from themis_pg.retrieval.snapshot import (
    SnapshotMeta,
    SnapshotStore,
    read_arrays,
    read_header,
    write_file,
)

from .helpers import one

DIM = 8
ROWS = 300


def _meta(rows: int = 3, **changes: object) -> SnapshotMeta:
    base = dict(token="00000000-0000-0000-0000-000000000001", model="m", dim=DIM, rows=rows,
                watermark=1234, seen={7: 1240, 9: 1300}, pending=[5])
    return SnapshotMeta(**{**base, **changes})


# -- the file (no database) -------------------------------------------------------------------
def test_file_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = np.array([3, 1, 99], np.int64)
    vectors = rng.standard_normal((3, DIM)).astype(np.float32)
    path = tmp_path / "a.snapshot"
    write_file(path, _meta(), ids, vectors)
    meta = read_header(path)
    assert meta == _meta()
    got_ids, got = read_arrays(path, meta, np.empty)
    assert got_ids.tolist() == [3, 1, 99]
    np.testing.assert_array_equal(got, vectors)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_file_cut_short_or_foreign_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "a.snapshot"
    write_file(path, _meta(), np.arange(3), np.zeros((3, DIM), np.float32))
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 4)
    with pytest.raises(ValueError, match="bytes"):
        read_header(path)
    path.write_bytes(b"PGDMP" + bytes(100))
    with pytest.raises(ValueError, match="not a themis index snapshot"):
        read_header(path)
    with pytest.raises(ValueError, match="do not match"):
        write_file(path, _meta(rows=4), np.arange(3), np.zeros((3, DIM), np.float32))


# -- trusted by the database, or not ----------------------------------------------------------
def _vec(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in v) + "]"


@pytest.fixture
def db(migrated_db: str) -> str:
    """A corpus of ROWS random DIM-dimensional documents."""
    rng = np.random.default_rng(1)
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        conn.execute("INSERT INTO themis.corpus (embedding_model, dim) VALUES ('m', %s)", (DIM,))
        with conn.cursor().copy("COPY themis.documents (id, content, embedding) FROM STDIN") as cp:
            for i, v in enumerate(rng.standard_normal((ROWS, DIM))):
                cp.write_row((i + 1, f"doc {i}", _vec(v)))
    return migrated_db


def _index(dsn: str, folder: Path | None, model: str = "m") -> EmbeddingIndex:
    snapshots = None if folder is None else SnapshotStore(folder, "key")
    return EmbeddingIndex(DIM, model, connect=lambda: psycopg.connect(dsn, autocommit=True),
                          snapshots=snapshots)


def _loaded(dsn: str, folder: Path | None, model: str = "m") -> EmbeddingIndex:
    index = _index(dsn, folder, model)
    with psycopg.connect(dsn, autocommit=True) as conn:
        index.load(conn)
    if index.snapshots is not None:
        index.snapshots.wait()  # the write after a full load runs on a thread
    return index


QUERIES = normalize(np.random.default_rng(2).standard_normal((5, DIM)).astype(np.float32))


def _same_answers(a: EmbeddingIndex, b: EmbeddingIndex) -> None:
    """Ids exactly; scores to 1e-6 (BLAS may round a row's dot product differently by where
    the row sits in the matrix, and a restored matrix orders its rows differently)."""
    got, want = a.search(QUERIES, 10), b.search(QUERIES, 10)
    assert [[i for i, _ in h] for h in got] == [[i for i, _ in h] for h in want]
    np.testing.assert_allclose([[s for _, s in h] for h in got],
                               [[s for _, s in h] for h in want], atol=1e-6)


def test_restart_reads_the_snapshot_and_only_the_changes_since(db: str, tmp_path: Path) -> None:
    first = _loaded(db, tmp_path)
    assert first.last_load_source == "database"
    assert one(db, "SELECT count(*) FROM themis.index_snapshots") == 1
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("INSERT INTO themis.documents (id, content, embedding) VALUES "
                     "(1001, 'new', %s), (1002, 'new', %s)", (_vec(QUERIES[0]), _vec(QUERIES[1])))
        conn.execute("UPDATE themis.documents SET embedding = %s WHERE id = 5",
                     (_vec(QUERIES[2]),))
        conn.execute("DELETE FROM themis.documents WHERE id IN (6, 7)")
        warm = _index(db, tmp_path)
        warm.load(conn)
        assert warm.last_load_source == "snapshot" and len(warm) == ROWS
        stats = warm.sync(conn)
        assert not stats.reloaded
        assert (stats.upserted, stats.deleted) == (3, 2), "only the changes since are read"
    cold = _loaded(db, None)
    _same_answers(warm, cold)
    assert warm.search(QUERIES[:1], 1)[0][0][0] == 1001


def _break_token(db: str, folder: Path) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DELETE FROM themis.index_snapshots")


def _pass_horizon(db: str, folder: Path) -> None:
    with psycopg.connect(db, autocommit=True) as conn:  # as pruning does once no one needs it
        conn.execute("UPDATE themis.change_horizon "
                     "SET xid = pg_snapshot_xmin(pg_current_snapshot())")
        conn.execute("INSERT INTO themis.documents (id, content, embedding) VALUES "
                     "(2000, 'x', %s)", (_vec(QUERIES[3]),))


def _cut_file(db: str, folder: Path) -> None:
    (path,) = folder.glob("*.snapshot")
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _other_database(db: str, folder: Path) -> None:
    # The same file name against a database that never recorded its token (as after a
    # restore from before the snapshot, or a re-created database).
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("UPDATE themis.index_snapshots SET token = gen_random_uuid()")


@pytest.mark.parametrize("spoil", [_break_token, _pass_horizon, _cut_file, _other_database])
def test_a_snapshot_the_database_does_not_vouch_for_is_rebuilt(db, tmp_path, spoil) -> None:
    _loaded(db, tmp_path)
    spoil(db, tmp_path)
    again = _loaded(db, tmp_path)
    assert again.last_load_source == "database"
    _same_answers(again, _loaded(db, None))
    # and it wrote a fresh one the next start trusts
    assert _loaded(db, tmp_path).last_load_source == "snapshot"


def test_a_snapshot_of_another_model_is_not_used(db: str, tmp_path: Path) -> None:
    _loaded(db, tmp_path)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("UPDATE themis.corpus SET embedding_model = 'other'")
    assert _loaded(db, tmp_path, model="other").last_load_source == "database"


def test_a_snapshot_that_fails_under_the_read_falls_back_to_the_database(
        db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The header and the token are checked before the rows are read; a disk that fails
    while the store reads them leaves the store undefined, so the load starts over from the
    database rather than serving half a matrix."""
    from themis_pg.retrieval import snapshot

    _loaded(db, tmp_path)
    calls = []

    def failing(self: snapshot.VectorFile, *args: object, **kwargs: object) -> None:
        calls.append(self.path)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(snapshot.VectorFile, "read", failing)
    again = _loaded(db, tmp_path)
    assert calls, "the snapshot was trusted and its rows read"
    assert again.last_load_source == "database" and len(again) == ROWS
    monkeypatch.undo()
    _same_answers(again, _loaded(db, None))


def test_shutdown_snapshot_carries_the_changes_and_holds_back_pruning(db, tmp_path) -> None:
    from themis_pg.bus.jobs import JobStore

    index = _loaded(db, tmp_path)
    assert not index.save_snapshot(), "nothing changed since the snapshot of the load"
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DELETE FROM themis.documents WHERE id = 9")
        index.sync(conn)
        assert index.save_snapshot()
        assert one(db, "SELECT count(*) FROM themis.index_snapshots") == 1, "old token kept"
        conn.execute("INSERT INTO themis.documents (id, content, embedding) VALUES "
                     "(3000, 'x', %s)", (_vec(QUERIES[4]),))
        JobStore(conn, "nobody").prune(retention_s=3600)  # no live worker, one snapshot
        assert conn.execute("SELECT count(*) FROM themis.changes").fetchone()[0] >= 1, \
            "pruning dropped changes a snapshot still needs"
        warm = _index(db, tmp_path)
        warm.load(conn)
        assert warm.last_load_source == "snapshot" and len(warm) == ROWS - 1
        assert warm.sync(conn).upserted == 1
    _same_answers(warm, _loaded(db, None))


# -- a real worker ----------------------------------------------------------------------------
def test_restarted_worker_starts_from_its_snapshot(corpus_db, start_worker, tmp_path) -> None:
    env = {"THEMIS_INDEX_SNAPSHOT_DIR": str(tmp_path / "snap")}
    question = "How do I rotate TLS keys?"
    first = start_worker(corpus_db, env=env, kinds="search,embed")
    before = [r[0] for r in _search(corpus_db, question)]
    first.stop()
    with psycopg.connect(corpus_db, autocommit=True) as conn:
        top = before[0]
        conn.execute("DELETE FROM themis.documents WHERE id = %s", (top,))
    second = start_worker(corpus_db, env=env, kinds="search,embed")
    after = [r[0] for r in _search(corpus_db, question)]
    assert "from the snapshot" in second.log()
    assert top not in after and after[0] == before[1], "the change while stopped was missed"
    time.sleep(1.2)  # a heartbeat carries the figures
    stats = one(corpus_db, "SELECT stats FROM themis.workers WHERE id = %s", (second.id,))
    assert stats["index"]["loaded_from"] == "snapshot"


def _search(dsn: str, question: str) -> list[tuple[int, float]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [(int(r[0]), float(r[1])) for r in conn.execute(
            "SELECT id, score FROM themis_search(%s, 5)", (question,))]
