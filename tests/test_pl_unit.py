"""The server-side package's logic, outside PostgreSQL: a fake ``plpy`` and a fake bus.

Fast unit tests beside the end-to-end ones: argument checks, the per-backend cache (one SPI
statement per call), where the bus connects, and paging through a ranking by what was seen.
"""

from __future__ import annotations

from typing import Any

import pytest

from themis_pg.pl import api
from themis_pg.pl.bus import JobOutcome, Submitted
from themis_pg.pl.errors import PLError
from themis_pg.pl.payloads import CURSOR_SLACK


class FakePlpy:
    """Records SPI statements; answers the few the package sends."""

    def __init__(self, visible: set[int] | None = None) -> None:
        self.executed: list[str] = []
        self.visible = visible
        self.errors: list[tuple[str, str | None]] = []

    def prepare(self, sql: str, types: list[str] | None = None) -> str:
        return sql

    def execute(self, plan: str, args: list[Any] | None = None) -> list[dict[str, Any]]:
        self.executed.append(plan)
        if "bus_endpoint" in plan:
            return [{"socket_dir": "/run/pg", "port": "5432", "dbname": "db",
                     "backend_start": "2026-12-01T00:00:00.000000Z", "pid": 4242}]
        if "current_user" in plan:
            return [{"role": "alice"}]
        if plan == "SELECT 1":
            return [{"?column?": 1}]
        if plan == api.VISIBLE_SQL:
            assert args is not None
            ids, limit = args
            rows = [{"id": i, "content": f"doc {i}", "metadata": "{}", "source": None}
                    for i in ids if self.visible is None or i in self.visible]
            return rows[:limit]
        raise AssertionError(f"unexpected SPI statement {plan!r}")

    def error(self, message: str, hint: str | None = None, sqlstate: str | None = None) -> None:
        self.errors.append((message, sqlstate))
        raise RuntimeError(f"{sqlstate}: {message}")


class FakeBus:
    """Serves search jobs from a fixed ranking, honouring the cursor like the worker does."""

    def __init__(self, ranking: list[tuple[int, float]]) -> None:
        self.ranking = ranking
        self.payloads: list[dict[str, Any]] = []
        self.embeddings = 0

    def submit(self, kind: str, payload: str, caller: Any, timeout_s: float | None) -> Submitted:
        import json

        self.payloads.append({"kind": kind, **json.loads(payload), "caller": caller})
        return Submitted(len(self.payloads), "tok", kind, timeout_s or 120.0, 15.0)

    def wait(self, job: Submitted, deadline: float, stated: float, check: Any) -> JobOutcome:
        p = self.payloads[job.id - 1]
        if job.kind == "generate":
            return JobOutcome("done", {"answer": "ok", "model": "m"}, "ok", None, None)
        if "vector_b64" not in p:
            self.embeddings += 1
        rows = self.ranking
        if (cur := p.get("cursor")) is not None:
            rows = [(i, s) for i, s in rows
                    if s <= cur["score"] + CURSOR_SLACK and i not in set(cur["exclude"])]
        found = rows[: p["n"]]
        result = {"candidates": [[i, s] for i, s in found], "exhausted": len(found) < p["n"],
                  "model": "emb", "vector_b64": "AAAA", "max_candidates": 100000}
        return JobOutcome("done", result, None, None, None)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    def make(ranking: list[tuple[int, float]], visible: set[int] | None = None):
        bus = FakeBus(ranking)
        plpy = FakePlpy(visible)
        gd: dict[str, Any] = {}
        monkeypatch.setattr(api, "BusClient", lambda dsn: bus)
        return plpy, gd, bus
    return make


def test_one_spi_statement_per_call_after_the_first(fake):
    plpy, gd, bus = fake([(i, 1.0 - i / 100) for i in range(1, 50)])
    api.search_rows(plpy, gd, "q", 3)
    first = list(plpy.executed)
    assert any("bus_endpoint" in s for s in first)
    plpy.executed.clear()
    api.search_rows(plpy, gd, "q", 3)
    # the caller's role, then the visibility read: nothing else from the database
    assert plpy.executed == ["SELECT current_user::text AS role", api.VISIBLE_SQL]
    assert bus.payloads[-1]["caller"].role == "alice"
    assert bus.payloads[-1]["caller"].pid == 4242


def test_paging_by_what_was_seen_with_ties_at_the_cut(fake):
    # 60 rows, every score tied in pairs; only ids divisible by 7 are visible.
    ranking = [(i, 1.0 - (i // 2) / 100) for i in range(1, 61)]
    plpy, gd, bus = fake(ranking, visible={i for i in range(1, 61) if i % 7 == 0})
    rows = api.search_rows(plpy, gd, "q", 5)
    ids = [r["id"] for r in rows]
    assert ids == [7, 14, 21, 28, 35]
    assert len(bus.payloads) > 1, "the test must need several rounds"
    assert bus.embeddings == 1, "later rounds reuse the first round's vector"
    offered = [c for p in bus.payloads for c in _offered(bus, p)]
    assert len(offered) == len(set(offered)), "a candidate was offered twice"


def _offered(bus: FakeBus, payload: dict[str, Any]) -> list[int]:
    rows = bus.ranking
    if (cur := payload.get("cursor")) is not None:
        rows = [(i, s) for i, s in rows
                if s <= cur["score"] + CURSOR_SLACK and i not in set(cur["exclude"])]
    return [i for i, _ in rows[: payload["n"]]]


def test_fewer_visible_than_k_stops_when_the_ranking_is_exhausted(fake):
    plpy, gd, bus = fake([(i, 1.0 - i / 1000) for i in range(1, 300)], visible={5, 250})
    rows = api.search_rows(plpy, gd, "q", 3)
    assert [r["id"] for r in rows] == [5, 250]
    assert bus.payloads[-1]["n"] > bus.payloads[0]["n"]


def test_next_cursor_excludes_only_the_boundary():
    seen = {1: 0.9, 2: 0.5, 3: 0.5, 4: 0.5 + CURSOR_SLACK / 2, 5: 0.7}
    cur = api.next_cursor(seen, 0.5)
    assert cur.score == 0.5 and cur.exclude == (2, 3, 4)


@pytest.mark.parametrize(("call", "state", "words"), [
    (lambda p, g: api.search_rows(p, g, None, 3), "22004", "query must not be NULL"),
    (lambda p, g: api.search_rows(p, g, "  ", 3), "22023", "query must not be empty"),
    (lambda p, g: api.search_rows(p, g, "q", None), "22004", "k must not be NULL"),
    (lambda p, g: api.search_rows(p, g, "q", 0), "22023", "k must be at least 1"),
    (lambda p, g: api.rag(p, g, "q", 3, max_tokens=0), "22023", "max_tokens must be at least"),
    (lambda p, g: api.rag(p, g, "q", 3, temperature=float("nan")), "22023", "temperature"),
    (lambda p, g: api.search_rows(p, g, "q", 3, timeout_s=0), "22023", "timeout_s"),
    (lambda p, g: api.generate(p, g, ""), "22023", "prompt must not be empty"),
    (lambda p, g: api.embed(p, g, None), "22004", "input must not be NULL"),
])
def test_argument_checks_raise_before_any_job(fake, call, state, words):
    plpy, gd, bus = fake([])
    with pytest.raises(RuntimeError):
        call(plpy, gd)
    message, sqlstate = plpy.errors[-1]
    assert sqlstate == state and words in message
    assert bus.payloads == []


def test_bus_dsn_comes_from_the_server_side_only(monkeypatch, tmp_path):
    endpoint = {"socket_dir": "/run/pg dir", "port": "5433", "dbname": "d'b"}
    monkeypatch.delenv("THEMIS_BUS_DSN", raising=False)
    monkeypatch.chdir(tmp_path)  # a backend's cwd is the data directory
    assert api.bus_dsn(endpoint) == ("host='/run/pg dir' port='5433' dbname='d\\'b' "
                                     "user='themis_bus'")
    (tmp_path / api.BUS_DSN_FILE).write_text("host=/x user=bus password=secret\n")
    assert api.bus_dsn(endpoint) == "host=/x user=bus password=secret"
    monkeypatch.setenv("THEMIS_BUS_DSN", "host=/env user=themis_bus")
    assert api.bus_dsn(endpoint) == "host=/env user=themis_bus"


def test_a_finished_search_without_result_is_a_clear_error():
    with pytest.raises(PLError) as info:
        api._result_or_raise("search", JobOutcome("done", None, None, None, None))
    assert info.value.sqlstate == "58000" and "retry" in (info.value.hint or "").lower()
