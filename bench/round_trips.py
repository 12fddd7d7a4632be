"""Statements, round trips, row writes and WAL of one themis_search and one themis_rag call.

Counted, not estimated.  In a throwaway embedded cluster (the same set-up as
``rag_latency.py --self-contained``: schema, default models, sample corpus, one worker),
started with::

    shared_preload_libraries = 'pg_stat_statements'
    pg_stat_statements.track = all        # statements nested in functions too (toplevel = false)
    pg_stat_statements.track_utility = on # BEGIN, COMMIT, SET, LISTEN ...
    track_functions = all                 # pg_stat_user_functions: calls per function
    autovacuum = off                      # no vacuum WAL in the windows (--autovacuum: keep it)
    log_statement = 'all'                 # one log line per top-level statement, with its role

every statement is attributed by the role that ran it (``pg_stat_statements.userid``; the
log line's ``%u`` for top-level statements):

* the **caller** logs in as ``bench_caller`` (member of ``themis_user``) and sends the one
  top-level statement of the call (one network round trip); the statements the PL/Python and
  PL/pgSQL functions run through SPI are nested (``toplevel = false``) and run inside the
  caller's backend: no round trip;
* the **bus connection** (role ``themis_bus``), which the function opens from the caller's
  backend back to the server over the unix socket: each top-level statement is one round trip
  unless pipelined;
* the **worker** logs in as ``bench_worker`` (granted ``themis_worker``): each top-level
  statement (utility ones such as BEGIN/COMMIT included) is one round trip unless pipelined;
* statements in the body of a SECURITY DEFINER function are recorded under the function's
  owner (nested); they are given to the side whose statements call that function (directly
  or through other functions: function names are matched in the statement texts and the
  function sources in ``pg_proc``), and cost no round trip.

Statements and round trips are counted three ways:

* ``pg_stat_statements`` (track = all): every statement, nested ones included, with the text
  the report lists.  PostgreSQL 15 misses the repeated executions of a *utility* statement
  run as a prepared statement (psycopg prepares any statement on its 6th execution,
  ``SET TRANSACTION ...`` included), so for top-level statements
* the server log (``log_statement = 'all'``, one line per execution, with the role) gives
  the count of top-level statements, and the report says where the two differ;
* round trips are counted on the client side, by ``bench/_flights.py``: the worker runs
  under it, and the server's Python (the SQL functions' bus connection) loads it from a
  ``sitecustomize.py`` in the throwaway cluster's ``pylib``.  It counts the times a psycopg
  connection waits for the server after sending, so statements pipelined by psycopg
  (``conn.pipeline()``) count as one round trip, as they should, and one statement as one.
  The caller's round trip is its one statement.  ``--no-client-round-trips`` falls back to
  the server log's statement counts, which are an upper bound where a side pipelines.

A statement whose function does several things server-side is one round trip (its body shows
up as nested statements).  The default warm-up of 6 calls takes psycopg's one-off extra
Parse round trip of auto-preparing out of the window.

WAL per call: the bytes between ``pg_current_wal_insert_lsn()`` at the start and the end of
the window (everything written, by anyone), what they are (``pg_waldump`` over that range:
records by type, full-page images by relation), and ``pg_stat_wal`` beside them.  The LSN
figure is the one to publish: ``pg_stat_wal``'s counters are flushed by backends late, and in
practice it shows a few full-page images per window (even with a 25 s flush wait) that
``pg_waldump`` does not find between the window's LSNs, i.e. WAL from before the window.

Per call kind: warm-up calls, then the counters are reset (``pg_stat_statements_reset()``,
``pg_stat_reset()``, ``pg_stat_reset_shared('wal')``) and N sequential calls are made, each
followed by a short settle pause (the worker's last statements of the call come after the
caller has its answer), a marker statement in the log and a snapshot of
``pg_stat_statements`` (so the per-call minimum and maximum are known).  The cumulative
statistics (row writes from ``pg_stat_user_tables``, WAL from ``pg_stat_wal``, function
calls) are flushed by backends only when they go idle and at most every 10 s, so they are
read after a flush wait.

Background work that is not per call (the worker's heartbeats, reaping, pruning, idle polls)
is switched off for the measurement by default: the worker runs with
``THEMIS_HEARTBEAT_INTERVAL`` and ``THEMIS_POLL_INTERVAL`` of 3600 s and ``worker_stale_s``
is raised so that it still counts as live (``--heartbeat-interval``/``--poll-interval``
change that).  An idle window is measured all the same, after the calls: whatever the server
sees in it is scaled to each window's length and subtracted (with the product's defaults,
the subtraction of idle polls is only approximate: a lane busy with calls does not poll).

Usage (the Markdown report goes to stdout, progress to stderr)::

    python bench/round_trips.py --self-contained --runs 20 --json /tmp/round_trips.json

To measure another checkout (e.g. a ``git worktree`` of an older revision), run this script
with ``PYTHONPATH=<that checkout>`` from that checkout: the worker and the server-side
package then come from it; the report's "code" line says which files each process used.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from _flights import read_counts, sitecustomize_source
from _setup import (
    QUESTIONS,
    code_origin,
    cpu_model,
    load_questions,
    throwaway_cluster,
    worker_env,
    worker_process,
)
from psycopg import sql
from psycopg.conninfo import make_conninfo

from themis_pg.config import get_settings
from themis_pg.db import connect

log = logging.getLogger("bench.round_trips")

CALLER_ROLE = "bench_caller"
WORKER_ROLE = "bench_worker"
BUS_ROLE = "themis_bus"
#: Backends flush cumulative statistics when idle, at most every PGSTAT_IDLE_INTERVAL (10 s).
STATS_FLUSH_WAIT_S = 12.0

#: Sides, in report order: (key, label, whether each statement is a network round trip).
SIDES: list[tuple[str, str, bool]] = [
    ("caller", "caller (`bench_caller`), top-level: the client's statement", True),
    ("caller_nested", "caller's backend, nested (SPI; SECURITY INVOKER bodies)", False),
    ("caller_definer", "caller's backend, nested (SECURITY DEFINER bodies)", False),
    ("bus", "bus connection (`themis_bus`), top-level", True),
    ("bus_nested", "bus backend, nested (SECURITY DEFINER bodies)", False),
    ("worker", "worker (`bench_worker`), top-level", True),
    ("worker_nested", "worker's backends, nested", False),
    ("unattributed", "nested, side not found", False),
]
SIDE_LABEL = {key: label for key, label, _ in SIDES}
ROUND_TRIP_SIDES = [key for key, _, rt in SIDES if rt]

PGSS = """
SELECT s.userid::regrole::text, s.toplevel, s.queryid, s.query, s.calls, s.rows,
       s.wal_records, s.wal_fpi, s.wal_bytes, s.total_exec_time
  FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
 WHERE d.datname = current_database()
"""
TABLES = """
SELECT schemaname || '.' || relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del
  FROM pg_stat_user_tables
"""
FUNCTIONS = """
SELECT schemaname || '.' || funcname, calls FROM pg_stat_user_functions
 WHERE funcname NOT LIKE 'pg_stat_statements%'
"""
WAL = "SELECT wal_records, wal_fpi, wal_bytes::float8 FROM pg_stat_wal"
SOURCES = """
SELECT n.nspname, p.proname, p.prosecdef, p.prosrc
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname IN ('themis', 'public') AND p.proname NOT LIKE 'pg_stat_statements%'
"""


# -- snapshots and differences -------------------------------------------------------------
StmtKey = tuple[str, bool, int]  # role, toplevel, queryid
STMT_FIELDS = ("calls", "rows", "wal_records", "wal_fpi", "wal_bytes", "exec_ms")


@dataclass
class Cumulative:
    """The cumulative statistics that backends flush when idle."""

    tables: dict[str, list[float]]  # name -> ins, upd, hot_upd, del
    functions: dict[str, float]
    wal: list[float]  # records, fpi, bytes

    def minus(self, other: Cumulative) -> Cumulative:
        return Cumulative(
            tables={k: [a - b for a, b in zip(v, other.tables.get(k, [0, 0, 0, 0]),
                                               strict=True)] for k, v in self.tables.items()},
            functions={k: v - other.functions.get(k, 0) for k, v in self.functions.items()},
            wal=[a - b for a, b in zip(self.wal, other.wal, strict=True)])

    def scaled(self, factor: float) -> Cumulative:
        return Cumulative(tables={k: [x * factor for x in v] for k, v in self.tables.items()},
                          functions={k: v * factor for k, v in self.functions.items()},
                          wal=[x * factor for x in self.wal])


class Reader:
    """The statistics, read as the superuser (its own top-level statements are ignored)."""

    def __init__(self, dsn: str, flights_dir: Path | None = None) -> None:
        self.conn = connect(dsn, application_name="themis_bench_stats")
        self.texts: dict[StmtKey, str] = {}
        self.flights_dir = flights_dir

    def flights(self) -> dict[str, float]:
        """Client-side round trips so far (bench/_flights.py): ``worker:<thread>`` of the
        worker, ``bus`` of the SQL functions' bus connections (every backend's file)."""
        if self.flights_dir is None:
            return {}
        out = {f"worker:{name}": float(n)
               for name, n in read_counts([self.flights_dir / "worker.json"]).items()}
        backends = sorted(self.flights_dir.glob("backend-*.json"))
        if backends:
            out["bus"] = float(sum(read_counts(backends).values()))
        return out

    def close(self) -> None:
        self.conn.close()

    def statements(self) -> dict[StmtKey, list[float]]:
        out: dict[StmtKey, list[float]] = {}
        for role, top, qid, text, *values in self.conn.execute(PGSS).fetchall():
            key = (str(role), bool(top), int(qid))
            self.texts[key] = str(text)
            out[key] = [float(v) for v in values]
        return out

    def cumulative(self) -> Cumulative:
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        tables = {str(r[0]): [float(x) for x in r[1:]]
                  for r in self.conn.execute(TABLES).fetchall()}
        functions = {str(r[0]): float(r[1]) for r in self.conn.execute(FUNCTIONS).fetchall()}
        wal = self.conn.execute(WAL).fetchone()
        assert wal is not None
        return Cumulative(tables, functions, [float(x) for x in wal])

    def lsn(self) -> str:
        row = self.conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        return str(row[0])

    def relations(self) -> dict[int, str]:
        rows = self.conn.execute(
            "SELECT pg_relation_filenode(c.oid), c.oid::regclass::text FROM pg_class c "
            "WHERE pg_relation_filenode(c.oid) IS NOT NULL").fetchall()
        return {int(r[0]): str(r[1]) for r in rows}

    def lsn_bytes(self, start: str, end: str) -> float:
        row = self.conn.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)::float8",
                                (end, start)).fetchone()
        assert row is not None
        return float(row[0])

    def mark(self, label: str) -> None:
        """A marker statement in the server log (see ServerLog)."""
        self.conn.execute(sql.SQL("SELECT {}").format(sql.Literal(f"themis-bench-mark:{label}")))

    def reset(self) -> None:
        self.conn.execute("SELECT pg_stat_statements_reset()")
        self.conn.execute("SELECT pg_stat_reset()")
        self.conn.execute("SELECT pg_stat_reset_shared('wal')")

    def sources(self) -> list[tuple[str, str, bool, str]]:
        return [(str(r[0]), str(r[1]), bool(r[2]), str(r[3]))
                for r in self.conn.execute(SOURCES).fetchall()]


class ServerLog:
    """Top-level statements from the server log (``log_statement = 'all'``, our prefix).

    The second count of round trips, and the exact one: PostgreSQL 15's pg_stat_statements
    counts a utility statement that runs as a prepared statement (psycopg prepares any
    statement it has run 5 times, SET TRANSACTION ... included) only on its first
    execution, while the log has one line per execution.  The statistics reader writes
    marker statements into the log to cut it into windows.
    """

    RECORD = re.compile(r"^@@bench (\d+) (\S*) (\S*) @@ ([A-Z0-9]+):  (.*)$")
    STATEMENT = re.compile(r"^(?:statement|execute (?!fetch from)\S+): (.*)$", re.DOTALL)
    MARK = re.compile(r"themis-bench-mark:([\w:.-]+)")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = path.stat().st_size

    def records(self) -> list[tuple[str, str]]:
        """(role, statement text) of every statement logged since this object was made."""
        with self.path.open("rb") as fh:
            fh.seek(self.start)
            text = fh.read().decode("utf-8", errors="replace")
        out: list[tuple[str, str]] = []
        current: list[str] | None = None
        for line in text.split("\n"):
            m = self.RECORD.match(line)
            if m is None:
                if current is not None:
                    current[1] += "\n" + line
                continue
            if current is not None:
                out.append((current[0], current[1]))
            current = None
            if m.group(4) == "LOG":
                st = self.STATEMENT.match(m.group(5))
                if st is not None:
                    current = [m.group(2), st.group(1)]
        if current is not None:
            out.append((current[0], current[1]))
        return out

    @classmethod
    def windows(cls, records: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
        """The records before each marker (since the previous one), by marker label."""
        out: dict[str, list[tuple[str, str]]] = {}
        pending: list[tuple[str, str]] = []
        for role, text in records:
            m = cls.MARK.search(text)
            if m is not None and text.lstrip().lower().startswith("select"):
                out[m.group(1)] = pending
                pending = []
            else:
                pending.append((role, text))
        return out


LogKey = tuple[str, str]  # role, statement text (whitespace collapsed)


def log_counts(records: Iterable[tuple[str, str]]) -> dict[LogKey, float]:
    out: dict[LogKey, float] = defaultdict(float)
    for role, text in records:  # lines kept apart: "--" comments end at the line's end
        lines = (re.sub(r"\s+", " ", line).strip() for line in text.splitlines())
        out[(role, "\n".join(line for line in lines if line))] += 1
    return dict(out)


class WalDump:
    """What the WAL of a window consists of: ``pg_waldump`` over its LSN range, records
    summed by type and full-page images by relation."""

    RECORD = re.compile(r"^rmgr: (\S+)\s+len \(rec/tot\):\s*(\d+)/\s*(\d+), .*?desc: (\S+)(.*)$")
    BLOCK = re.compile(r"blkref #\d+: rel (\d+)/(\d+)/(\d+)(?: fork (\w+))? blk \d+( FPW)?")

    def __init__(self, bin_dir: Path, data_dir: Path) -> None:
        self.waldump = bin_dir / "pg_waldump"
        self.wal_dir = data_dir / "pg_wal"

    def summary(self, start: str, end: str, relations: dict[int, str]) -> dict[str, Any]:
        if not self.waldump.is_file():
            return {"error": f"{self.waldump} not found"}
        done = subprocess.run([str(self.waldump), "-p", str(self.wal_dir), "-s", start,
                               "-e", end], capture_output=True, text=True, timeout=120)
        types: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # count, bytes
        fpi: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # count, bytes
        for line in done.stdout.splitlines():
            m = self.RECORD.match(line)
            if m is None:
                continue
            rmgr, rec_len, tot_len, desc, rest = m.groups()
            key = f"{rmgr}/{desc.rstrip(':')}"
            types[key][0] += 1
            types[key][1] += int(tot_len)
            fpws = [b for b in self.BLOCK.finditer(rest) if b.group(5)]
            for b in fpws:
                rel = relations.get(int(b.group(3)), f"relfilenode {b.group(3)}")
                if b.group(4) and b.group(4) != "main":
                    rel += f" ({b.group(4)} fork)"
                fpi[rel][0] += 1
                fpi[rel][1] += (int(tot_len) - int(rec_len)) / len(fpws)
        return {"types": dict(types), "fpi": dict(fpi),
                "error": done.stderr.strip()[-300:] if not types else None}


def stmt_diff(after: dict[StmtKey, list[float]],
              before: dict[StmtKey, list[float]]) -> dict[StmtKey, list[float]]:
    out = {}
    for key, values in after.items():
        base = before.get(key, [0.0] * len(values))
        delta = [a - b for a, b in zip(values, base, strict=True)]
        if delta[0]:
            out[key] = delta
    return out


# -- who ran what --------------------------------------------------------------------------
def _norm(text: str) -> str:
    """Statement text for matching against function sources: literals and parameters as
    ``?``, PL/pgSQL's PERFORM as SELECT, INTO targets removed, whitespace collapsed."""
    t = text.lower()
    t = re.sub(r"'(?:[^']|'')*'", "?", t)
    t = re.sub(r"\$\d+|%\(\w+\)s", "?", t)
    t = re.sub(r"\b(?:null|true|false)\b", "?", t)  # pg_stat_statements shows some as $n
    t = re.sub(r"\b\d+(?:\.\d+)?\b", "?", t)
    t = re.sub(r"\bperform\b", "select", t)
    t = re.sub(r"(?<!insert )\binto\s+[\w.]+(?:\s*,\s*[\w.]+)*", " ", t)
    return re.sub(r"\s+", " ", t).strip().rstrip(";").strip()


class Attribution:
    """Sides of nested statements of SECURITY DEFINER functions (recorded under the owner)."""

    def __init__(self, sources: list[tuple[str, str, bool, str]]) -> None:
        self.sources = {f"{schema}.{name}": (definer, src, _norm(src))
                        for schema, name, definer, src in sources}

    def referenced(self, text: str) -> set[str]:
        """Functions of ours a statement or body calls (by name, any schema)."""
        found = set()
        for qualified in self.sources:
            name = qualified.split(".", 1)[1]
            if re.search(rf"\b{re.escape(name)}\s*\(", text, re.IGNORECASE):
                found.add(qualified)
        return found

    def closure(self, texts: Iterable[str]) -> set[str]:
        todo: set[str] = set()
        for t in texts:
            todo |= self.referenced(t)
        seen: set[str] = set()
        while todo:
            f = todo.pop()
            if f in seen:
                continue
            seen.add(f)
            todo |= self.referenced(self.sources[f][1]) - seen
        return seen

    def containing(self, text: str) -> list[str]:
        """Functions whose body holds this statement."""
        t = _norm(text)
        candidates = [t] + ([t[len("select "):]] if t.startswith("select ") else [])
        candidates = [c for c in candidates if len(c) >= 16]  # not "select ?"
        return sorted(f for f, (_, _, body) in self.sources.items()
                      if any(c in body for c in candidates))


def strip_comments(text: str) -> str:
    return re.sub(r"--[^\n]*|/\*.*?\*/", " ", text, flags=re.DOTALL)


def named_queries() -> dict[str, str]:
    """Normalized text -> name of the worker's named queries (sql/queries.sql), if this
    checkout has them, so that the report can say which one a statement is."""
    try:
        from themis_pg.bus.queries import queries
    except ImportError:
        return {}
    try:
        return {_norm(strip_comments(text)): name for name, text in queries().items()}
    except Exception:  # a checkout that keeps its queries elsewhere
        return {}


def classify(keys: Iterable[StmtKey], texts: dict[StmtKey, str], attribution: Attribution,
             owner_roles: set[str]) -> dict[StmtKey, tuple[str, list[str]]]:
    """side and containing functions of every statement key."""
    keys = list(keys)
    by_role: dict[str, list[str]] = defaultdict(list)
    for role, _top, qid in keys:
        by_role[role].append(texts[(role, _top, qid)])
    closures = {"caller": attribution.closure(by_role.get(CALLER_ROLE, [])),
                "bus": attribution.closure(by_role.get(BUS_ROLE, [])),
                "worker": attribution.closure(by_role.get(WORKER_ROLE, []))}
    out: dict[StmtKey, tuple[str, list[str]]] = {}
    for key in keys:
        role, top, _ = key
        text = texts[key]
        funcs = [] if top else attribution.containing(text)
        if role == CALLER_ROLE:
            side = "caller" if top else "caller_nested"
        elif role == BUS_ROLE:
            side = "bus" if top else "bus_nested"
        elif role == WORKER_ROLE:
            side = "worker" if top else "worker_nested"
        elif role in owner_roles and not top:
            sides = [s for s, c in closures.items() if set(funcs) & c]
            side = {"caller": "caller_definer", "bus": "bus_nested",
                    "worker": "worker_nested"}[sides[0]] if len(sides) == 1 else "unattributed"
        else:
            side = "other"  # the statistics reader's own statements, the bench's set-up
        out[key] = (side, funcs)
    return out


# -- the measurement -------------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    statement: str
    runs: int
    warmup: int
    duration_s: float = 0.0  # first to last pg_stat_statements snapshot
    cumulative_s: float = 0.0  # first to last cumulative snapshot (flush waits included)
    totals: dict[StmtKey, list[float]] = field(default_factory=dict)
    per_call: list[dict[StmtKey, list[float]]] = field(default_factory=list)
    cumulative: Cumulative | None = None
    call_ms: list[float] = field(default_factory=list)  # not for publishing: a shared CPU
    log_totals: dict[LogKey, float] = field(default_factory=dict)
    log_per_call: list[dict[LogKey, float]] = field(default_factory=list)
    flights_totals: dict[str, float] = field(default_factory=dict)
    flights_per_call: list[dict[str, float]] = field(default_factory=list)
    wal_dump: dict[str, Any] = field(default_factory=dict)
    wal_lsn_bytes: float = 0.0  # WAL written in the cumulative window, by anyone


def run_phase(caller: psycopg.Connection[Any], reader: Reader, name: str, statement: str,
              params: Callable[[int], tuple[Any, ...]], runs: int, warmup: int,
              settle_s: float, flush_s: float, waldump: WalDump | None = None) -> Phase:
    phase = Phase(name, statement, runs, warmup)
    reader.conn.execute("CHECKPOINT")  # no timed checkpoint in the window; warm-up takes
    for i in range(warmup):            # the first-touch full-page images after it
        caller.execute(statement, params(i)).fetchall()
        log.info("%s: warm-up %d/%d", name, i + 1, warmup)
    time.sleep(flush_s)
    reader.reset()
    cum0, prev = reader.cumulative(), reader.statements()
    first = prev
    f_first = f_prev = reader.flights()
    lsn0 = reader.lsn()
    reader.mark(f"{name}:start")
    t0 = time.monotonic()
    for i in range(runs):
        started = time.perf_counter()
        caller.execute(statement, params(warmup + i)).fetchall()
        phase.call_ms.append((time.perf_counter() - started) * 1000)
        time.sleep(settle_s)
        reader.mark(f"{name}:call:{i}")
        now = reader.statements()
        phase.per_call.append(stmt_diff(now, prev))
        prev = now
        f_now = reader.flights()
        phase.flights_per_call.append(flights_diff(f_now, f_prev))
        f_prev = f_now
        log.info("%s: call %d/%d", name, i + 1, runs)
    phase.duration_s = time.monotonic() - t0
    phase.totals = stmt_diff(prev, first)
    phase.flights_totals = flights_diff(f_prev, f_first)
    time.sleep(flush_s)
    phase.cumulative = reader.cumulative().minus(cum0)
    lsn1 = reader.lsn()
    phase.wal_lsn_bytes = reader.lsn_bytes(lsn0, lsn1)
    if waldump is not None:  # the same window as pg_stat_wal's; before the next CHECKPOINT
        phase.wal_dump = waldump.summary(lsn0, lsn1, reader.relations())
    phase.cumulative_s = time.monotonic() - t0
    return phase


@dataclass
class Idle:
    duration_s: float
    cumulative_s: float
    statements: dict[StmtKey, list[float]]
    cumulative: Cumulative
    log: dict[LogKey, float] = field(default_factory=dict)
    flights: dict[str, float] = field(default_factory=dict)
    wal_lsn_bytes: float = 0.0


def flights_diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def attach_log(phases: list[Phase], idle: Idle, server_log: ServerLog) -> None:
    """Fill in the server log's top-level statements of every window."""
    windows = ServerLog.windows(server_log.records())
    for phase in phases:
        phase.log_per_call = [log_counts(windows.get(f"{phase.name}:call:{i}", []))
                              for i in range(phase.runs)]
        total: dict[LogKey, float] = defaultdict(float)
        for per in phase.log_per_call:
            for key, n in per.items():
                total[key] += n
        phase.log_totals = dict(total)
    idle.log = log_counts(windows.get("idle:end", []))


def idle_window(reader: Reader, seconds: float, flush_s: float) -> Idle:
    """What the server sees while nobody calls: background work, to subtract."""
    log.info("idle window of %.0f s (+ %.0f s stats flush)", seconds, flush_s)
    time.sleep(flush_s)
    cum0, s0, f0 = reader.cumulative(), reader.statements(), reader.flights()
    lsn0 = reader.lsn()
    reader.mark("idle:start")
    t0 = time.monotonic()
    time.sleep(seconds)
    reader.mark("idle:end")
    s1, f1 = reader.statements(), reader.flights()
    duration = time.monotonic() - t0
    time.sleep(flush_s)
    return Idle(duration, time.monotonic() - t0, stmt_diff(s1, s0),
                reader.cumulative().minus(cum0), flights=flights_diff(f1, f0),
                wal_lsn_bytes=reader.lsn_bytes(lsn0, reader.lsn()))


# -- the report ---------------------------------------------------------------------------
def _fmt(x: float, digits: int = 2) -> str:
    if abs(x - round(x)) < 0.005:
        return str(round(x))
    return f"{x:.{digits}f}"


def _one_line(text: str, width: int = 150) -> str:
    t = re.sub(r"\s+", " ", text).strip()
    t = t if len(t) <= width else t[: width - 1] + "…"
    return t.replace("|", "\\|")


def analyse(phase: Phase, idle: Idle, sides: dict[StmtKey, tuple[str, list[str]]],
            texts: dict[StmtKey, str]) -> dict[str, Any]:
    """Per-call figures of one phase, background subtracted."""
    n = phase.runs
    names = named_queries()
    call_s = sum(phase.call_ms) / 1000
    k_stmt = phase.duration_s / idle.duration_s if idle.duration_s else 0.0
    k_cum = phase.cumulative_s / idle.cumulative_s if idle.cumulative_s else 0.0
    statements = []
    by_side: dict[str, dict[str, float]] = {s: {"statements": 0.0, "wal_bytes": 0.0,
                                                 "background": 0.0} for s, _, _ in SIDES}
    for key in sorted(set(phase.totals) | set(idle.statements)):
        side, funcs = sides.get(key, ("other", []))
        if side == "other":
            continue
        total = phase.totals.get(key, [0.0] * len(STMT_FIELDS))
        bg = [x * k_stmt for x in idle.statements.get(key, [0.0] * len(STMT_FIELDS))]
        net = [(a - b) / n for a, b in zip(total, bg, strict=True)]
        per_call_calls = [pc.get(key, [0.0])[0] for pc in phase.per_call]
        statements.append({
            "side": side, "role": key[0], "toplevel": key[1], "queryid": key[2],
            "query": texts[key], "functions": funcs,
            "named_query": names.get(_norm(strip_comments(texts[key]))),
            "per_call_second": net[0] * n / call_s if call_s else None,
            "calls_per_call": net[0], "min": min(per_call_calls), "max": max(per_call_calls),
            "background_subtracted": bg[0] / n,
            "rows_per_call": net[1], "wal_bytes_per_call": net[4],
        })
        by_side[side]["statements"] += net[0]
        by_side[side]["background"] += bg[0] / n
        if key[1]:  # a top-level statement's WAL includes its nested statements'
            by_side[side]["wal_bytes"] += net[4]
    side_minmax = {}
    for side, _, _ in SIDES:
        counts = [sum(v[0] for k, v in pc.items() if sides.get(k, ("other",))[0] == side)
                  for pc in phase.per_call]
        side_minmax[side] = (min(counts), max(counts))
    # Top-level statements again, from the server log: the exact count (see ServerLog).
    log_side = {CALLER_ROLE: "caller", BUS_ROLE: "bus", WORKER_ROLE: "worker"}
    logged: list[dict[str, Any]] = []
    log_by_side = {side: 0.0 for side in ROUND_TRIP_SIDES}
    log_minmax: dict[str, tuple[float, float]] = {}
    for lkey in sorted(set(phase.log_totals) | set(idle.log)):
        lside = log_side.get(lkey[0])
        if lside is None:
            continue
        lbg = idle.log.get(lkey, 0.0) * k_stmt
        lnet = (phase.log_totals.get(lkey, 0.0) - lbg) / n
        log_calls = [pc.get(lkey, 0.0) for pc in phase.log_per_call]
        logged.append({
            "side": lside, "role": lkey[0], "toplevel": True, "query": lkey[1], "functions": [],
            "named_query": names.get(_norm(strip_comments(lkey[1]))),
            "per_call_second": lnet * n / call_s if call_s else None,
            "calls_per_call": lnet, "min": min(log_calls), "max": max(log_calls),
            "background_subtracted": lbg / n, "source": "server log"})
        log_by_side[lside] += lnet
    for role, side in log_side.items():
        counts = [sum(v for k, v in pc.items() if k[0] == role) for pc in phase.log_per_call]
        log_minmax[side] = (min(counts), max(counts))
    assert phase.cumulative is not None
    cum = phase.cumulative.minus(idle.cumulative.scaled(k_cum)).scaled(1.0 / n)
    tables = {t: dict(zip(("ins", "upd", "hot_upd", "del"), v, strict=True))
              for t, v in sorted(cum.tables.items()) if any(abs(x) > 1e-9 for x in v)}
    functions = {f: c for f, c in sorted(cum.functions.items()) if abs(c) > 1e-9}
    # Client-side round trips of the bus and the worker (bench/_flights.py), where counted.
    flights: dict[str, dict[str, Any]] = {}
    for side in ("bus", "worker"):
        keys = sorted({k for k in phase.flights_totals if k == side or k.startswith(side + ":")})
        if not keys:
            continue
        fbg = {k: idle.flights.get(k, 0.0) * k_stmt for k in keys}
        per_key = {k: (phase.flights_totals[k] - fbg[k]) / n for k in keys}
        per_call = [sum(pc.get(k, 0.0) for k in keys) for pc in phase.flights_per_call]
        flights[side] = {"per_call": sum(per_key.values()), "min": min(per_call),
                         "max": max(per_call), "by_thread": {
                             k.split(":", 1)[1]: v for k, v in per_key.items() if ":" in k},
                         "background_subtracted": sum(fbg.values()) / n}
    side_out: dict[str, dict[str, Any]] = {}
    for side, _, is_rt in SIDES:
        entry: dict[str, Any] = {**by_side[side], "min": side_minmax[side][0],
                                 "max": side_minmax[side][1], "round_trips": 0.0}
        if is_rt:  # top-level: the server log's count; pg_stat_statements' kept beside it
            entry.update(pgss_statements=entry["statements"], statements=log_by_side[side],
                         round_trips=log_by_side[side], min=log_minmax[side][0],
                         max=log_minmax[side][1], round_trips_source="server log")
            if side in flights and flights[side]["per_call"] < 0.5 <= log_by_side[side]:
                entry["round_trips_source"] = ("server log (the client-side counter saw no "
                                               "waits: this side's I/O bypasses "
                                               "psycopg.waiting)")
            elif side in flights:
                entry.update(round_trips=flights[side]["per_call"],
                             rt_min=flights[side]["min"], rt_max=flights[side]["max"],
                             round_trips_by_thread=flights[side]["by_thread"],
                             round_trips_source="client (psycopg waits)")
        side_out[side] = entry
    return {
        "name": phase.name, "statement": phase.statement, "runs": n, "warmup": phase.warmup,
        "window_s": round(phase.duration_s, 2), "cumulative_window_s": round(phase.cumulative_s, 2),
        "sides": side_out,
        "statements": logged + [st for st in statements if not st["toplevel"]],
        "pgss_toplevel": [st for st in statements if st["toplevel"]],
        "tables": tables, "functions": functions,
        "wal": dict(zip(("records", "fpi", "bytes"), cum.wal, strict=True)),
        "wal_lsn_bytes": (phase.wal_lsn_bytes - idle.wal_lsn_bytes * k_cum) / n,
        "wal_records_per_call": {
            t: {"records": c / n, "bytes": b / n}
            for t, (c, b) in sorted(phase.wal_dump.get("types", {}).items(),
                                    key=lambda kv: -kv[1][1])},
        "wal_fpi_per_call": {
            r: {"images": c / n, "bytes": b / n}
            for r, (c, b) in sorted(phase.wal_dump.get("fpi", {}).items(),
                                    key=lambda kv: -kv[1][1])},
        "wal_dump_error": phase.wal_dump.get("error"),
        "call_ms_not_for_publishing": phase.call_ms,
        "mean_call_s_not_for_publishing": call_s / n,
    }


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines: list[str] = []
    for ph in result["phases"]:
        lines += [f"### `{ph['statement_sql']}`: per call ({ph['runs']} sequential calls after "
                  f"{ph['warmup']} warm-up; mean call {ph['mean_call_s_not_for_publishing']:.2f} "
                  "s on this machine)", "",
                  "| side | statements | round trips | min–max per call (statements; "
                  "round trips) |", "| --- | ---: | ---: | ---: |"]
        tot_s = tot_rt = 0.0
        for key, label, is_rt in SIDES:
            s = ph["sides"][key]
            if not s["statements"] and not s["max"]:
                continue
            tot_s += s["statements"]
            tot_rt += s["round_trips"]
            spread = f"{_fmt(s['min'])}–{_fmt(s['max'])}"
            if "rt_min" in s:
                spread += f"; {_fmt(s['rt_min'])}–{_fmt(s['rt_max'])}"
            lines.append(f"| {label} | {_fmt(s['statements'])} | "
                         f"{_fmt(s['round_trips']) if is_rt else '0'} | {spread} |")
        lines.append(f"| **total** | **{_fmt(tot_s)}** | **{_fmt(tot_rt)}** | |")
        missed = [f"{key} {_fmt(ph['sides'][key]['pgss_statements'])}"
                  for key in ROUND_TRIP_SIDES
                  if abs(ph["sides"][key].get("pgss_statements", ph["sides"][key]["statements"])
                         - ph["sides"][key]["statements"]) > 0.005]
        sources = [f"{key}: {ph['sides'][key]['round_trips_source']}"
                   for key in ROUND_TRIP_SIDES if key != "caller"]
        threads = ph["sides"]["worker"].get("round_trips_by_thread")
        lines += ["", "Round trips counted by " + "; ".join(sources)
                  + ("; the worker's by thread: " + ", ".join(
                      f"{t} {_fmt(v)}" for t, v in sorted(threads.items()) if abs(v) > 0.005)
                     if threads else "") + "."]
        if missed:
            lines += ["", "Top-level statements are counted from the server log; "
                      "pg_stat_statements saw fewer (" + ", ".join(missed) + " per call): "
                      "PostgreSQL 15 counts a utility statement run as a prepared statement "
                      "only on its first execution."]
        lines += ["", "| table | inserts | updates | of which HOT | deletes |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        tw = [0.0] * 4
        for table, v in ph["tables"].items():
            vals = [v["ins"], v["upd"], v["hot_upd"], v["del"]]
            tw = [a + b for a, b in zip(tw, vals, strict=True)]
            lines.append(f"| `{table}` | " + " | ".join(_fmt(x) for x in vals) + " |")
        if not ph["tables"]:
            lines.append("| (none) | 0 | 0 | 0 | 0 |")
        lines.append("| **row writes** | " + " | ".join(f"**{_fmt(x)}**" for x in tw) + " |")
        wal = ph["wal"]
        by_side = ", ".join(f"{key} {ph['sides'][key]['wal_bytes']:.0f}"
                            for key in ("caller", "bus", "worker"))
        lsn_bytes = ph.get("wal_lsn_bytes")
        lines += ["",
                  (f"- WAL per call: {lsn_bytes:.0f} bytes written in the window "
                   "(`pg_current_wal_insert_lsn()` before and after, whole cluster); "
                   if lsn_bytes is not None else "- WAL per call: ")
                  + f"`pg_stat_wal`: {wal['bytes']:.0f} bytes in "
                  f"{_fmt(wal['records'])} records, {_fmt(wal['fpi'])} full-page images (not "
                  "the figure to publish: backends flush these counters late, and WAL written "
                  "before the window, such as full-page images that pg_waldump does not find "
                  "between the window's LSNs, lands in it); during the sides' top-level "
                  "statements "
                  f"(`pg_stat_statements`, without commit records): {by_side} bytes",
                  "- WAL records per call by type (`pg_waldump` over the window, background "
                  "included): " + (", ".join(
                      f"{t} {_fmt(v['records'])} ({v['bytes']:.0f} B)"
                      for t, v in ph.get("wal_records_per_call", {}).items())
                      or f"n/a ({ph.get('wal_dump_error')})")
                  + ("; full-page images: " + ", ".join(
                      f"`{r}` {_fmt(v['images'])} ({v['bytes']:.0f} B)"
                      for r, v in ph["wal_fpi_per_call"].items())
                     if ph.get("wal_fpi_per_call") else ""),
                  "- functions called per call (`pg_stat_user_functions`): " + (", ".join(
                      f"`{f}` {_fmt(c)}" for f, c in ph["functions"].items()) or "none"),
                  "", "Distinct statements (calls per call, background subtracted; where "
                  "min < max the count depends on how long the call waits: see per s):", "",
                  "| side | per call | min–max | per s of call | statement |",
                  "| --- | ---: | ---: | ---: | --- |"]
        order = {key: i for i, (key, _, _) in enumerate(SIDES)}
        for st in sorted(ph["statements"], key=lambda s: (order[s["side"]],
                                                          -s["calls_per_call"])):
            if abs(st["calls_per_call"]) < 1e-9 and not st["max"]:
                continue
            where = f" *(in {', '.join(st['functions'])})*" if st["functions"] else ""
            named = f"**{st['named_query']}**: " if st.get("named_query") else ""
            rate = st["per_call_second"]
            lines.append(f"| {st['side']} | {_fmt(st['calls_per_call'])} | "
                         f"{_fmt(st['min'])}–{_fmt(st['max'])} | "
                         f"{'' if rate is None or st['min'] == st['max'] else f'{rate:.1f}'} | "
                         f"{named}`{_one_line(strip_comments(st['query']))}`{where} |")
        lines.append("")
    idle = result["idle"]
    code = meta["code"]
    lines += [
        "Notes:", "",
        "- statements: top-level ones from the server log (`log_statement = all`, one line "
        "per execution), nested ones from `pg_stat_statements` (track = all); nested "
        "statements run inside a backend and cost no round trip.  Round trips: the caller's "
        "one statement; for the bus connection and the worker, the times a psycopg "
        "connection waited for the server after sending (bench/_flights.py: pipelined "
        "statements count once) where counted, else their top-level statements (an upper "
        "bound where a side pipelines).",
        f"- background: worker heartbeat interval {meta['heartbeat_interval_s']:g} s, poll "
        f"interval {meta['poll_interval_s']:g} s, worker_stale_s {meta['worker_stale_s']:g}; "
        f"idle window {idle['duration_s']:.0f} s: {idle['statements']:.0f} statements "
        f"({idle['round_trips']:.0f} top-level), {idle['row_writes']:.0f} row writes, "
        f"{idle['wal_bytes']:.0f} WAL bytes, scaled and subtracted",
        f"- settle pause after each call {meta['settle_s']:g} s; autovacuum "
        f"{'on' if meta['autovacuum'] else 'off'}; questions cycled from "
        f"{meta['questions_file']}",
        f"- code: {code['revision']}; this process's themis_pg {code['themis_pg']}; the "
        f"worker's {code['worker_themis_pg']}; server-side package copied from "
        f"{code['pl_source']} (digest {code['pl_source_digest']}, installed "
        f"{code.get('pl_installed_digest')}); {'consistent' if code['consistent'] else 'MISMATCH'}",
        f"- machine: {meta['cpu']}, {meta['cores']} cores; PostgreSQL {meta['server_version']}; "
        f"date {meta['date']}",
        f"- command: `{meta['command']}`",
    ]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Statements, round trips, row writes and WAL per themis_search and "
        "themis_rag call, counted by the server in a throwaway cluster.")
    parser.add_argument("--self-contained", action="store_true", default=True,
                        help="the only mode (accepted for symmetry with rag_latency.py): "
                        "a throwaway cluster, corpus and worker, removed afterwards")
    parser.add_argument("--runs", type=int, default=20, help="measured calls per kind (20)")
    parser.add_argument("--warmup", type=int, default=6,
                        help="unmeasured calls per kind first (6: psycopg prepares a "
                        "statement on its 6th execution)")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16, help="themis_rag max_tokens (16)")
    parser.add_argument("--kinds", default="search,rag",
                        help="which calls to measure, comma-separated: search, rag")
    parser.add_argument("--settle", type=float, default=0.3,
                        help="pause after each call before its snapshot, s (0.3)")
    parser.add_argument("--heartbeat-interval", type=float, default=3600.0,
                        help="THEMIS_HEARTBEAT_INTERVAL of the worker (3600: none in the run)")
    parser.add_argument("--poll-interval", type=float, default=3600.0,
                        help="THEMIS_POLL_INTERVAL of the worker (3600: no idle polls)")
    parser.add_argument("--idle-window", type=float, default=None,
                        help="seconds of the idle window (default: as long as the longest "
                        "phase, at least 20 and at most 120)")
    parser.add_argument("--stats-flush-wait", type=float, default=STATS_FLUSH_WAIT_S,
                        help="seconds to wait for backends to flush their cumulative "
                        f"statistics (default: {STATS_FLUSH_WAIT_S:g})")
    parser.add_argument("--no-client-round-trips", dest="client_round_trips",
                        action="store_false",
                        help="do not count round trips on the client side (bench/_flights.py "
                        "in the worker and the server's Python); use the server log's "
                        "statement count for them")
    parser.add_argument("--autovacuum", action="store_true",
                        help="leave autovacuum on (its WAL then lands in the windows)")
    parser.add_argument("--n-threads", type=int, default=None)
    parser.add_argument("--questions", type=Path, default=QUESTIONS)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write everything measured here")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="print the report of an earlier --json file and exit")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - {"search", "rag"}:
        parser.error("--kinds takes search and/or rag")
    args.kinds = kinds
    if args.runs < 1 or args.warmup < 0 or args.k < 1 or args.max_tokens < 1:
        parser.error("--runs, --k and --max-tokens must be positive, --warmup not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(markdown(json.loads(args.render.read_text(encoding="utf-8"))))
        return 0
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
    settings = get_settings(n_threads=args.n_threads)
    questions = load_questions(args.questions)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None \
        else shlex.join(["round_trips.py", *argv])
    stale_s = max(15.0, 3 * args.heartbeat_interval + 60)
    extra_env = {"THEMIS_HEARTBEAT_INTERVAL": str(args.heartbeat_interval),
                 "THEMIS_POLL_INTERVAL": str(args.poll_interval),
                 "THEMIS_LEASE": str(max(15.0, 3 * args.heartbeat_interval))}
    conf: dict[str, str | int | float | bool] = {
        "shared_preload_libraries": "pg_stat_statements",
        "pg_stat_statements.track": "all", "pg_stat_statements.track_utility": True,
        "track_functions": "all", "autovacuum": bool(args.autovacuum),
        "log_statement": "all", "log_line_prefix": "@@bench %p %u %a @@ ",
        "log_parameter_max_length": 0}
    meta: dict[str, Any] = {
        "command": command, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "load_before": list(os.getloadavg()),
        "runs": args.runs, "warmup": args.warmup, "k": args.k, "max_tokens": args.max_tokens,
        "settle_s": args.settle, "heartbeat_interval_s": args.heartbeat_interval,
        "poll_interval_s": args.poll_interval, "worker_stale_s": stale_s,
        "autovacuum": bool(args.autovacuum), "questions_file": args.questions.name,
        "server_conf": conf, "worker_env": extra_env,
    }
    password = secrets.token_hex(16)
    with throwaway_cluster(settings, conf) as db:
        with connect(db.dsn) as admin:
            admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            # Passwords: a cluster whose pg_hba.conf trusts the socket ignores them, one that
            # asks every other role for its scram password gets them.
            for role, member_of in ((CALLER_ROLE, "themis_user"), (WORKER_ROLE, "themis_worker")):
                admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)))
                admin.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(member_of),
                                                               sql.Identifier(role)))
            admin.execute("UPDATE themis.config SET value = to_jsonb(%s::float8) "
                          "WHERE key = 'worker_stale_s'", (stale_s,))
            row = admin.execute("SELECT current_setting('server_version'), "
                                "current_user").fetchone()
            assert row is not None
            meta["server_version"], owner = str(row[0]), str(row[1])
        meta["code"] = code_origin(worker_env(settings, extra_env), db.pl_installed)
        log.info("code: %s", meta["code"])
        if not meta["code"]["consistent"]:
            log.error("the worker or the server-side package is not this process's code")
        caller_dsn = make_conninfo(db.dsn, user=CALLER_ROLE, password=password)
        worker_dsn = make_conninfo(db.dsn, user=WORKER_ROLE, password=password)
        flights_dir = None
        if args.client_round_trips:
            # Client-side round-trip counters (bench/_flights.py): the worker runs under
            # it, and the server's Python imports it from a sitecustomize.py in the pylib
            # directory, before any backend of the measurement starts PL/Python.
            flights_dir = db.home / "flights"
            flights_dir.mkdir()
            flights_dir.chmod(0o1777)  # backends write here as the server's OS user
            site = db.pl_installed.parent / "sitecustomize.py"
            site.write_text(sitecustomize_source(str(flights_dir / "backend-{pid}.json")),
                            encoding="utf-8")
            site.chmod(0o644)
        with worker_process(worker_dsn, db.home, settings, extra_env=extra_env,
                            check_dsn=db.dsn,
                            flights_out=None if flights_dir is None
                            else flights_dir / "worker.json"):
            reader = Reader(db.dsn, flights_dir)
            if flights_dir is not None:  # what the running worker really imported
                actual = (flights_dir / "worker.json.module").read_text(encoding="utf-8")
                meta["code"]["worker_themis_pg"] = actual
                meta["code"]["consistent"] &= Path(actual) == Path(meta["code"]["themis_pg"])
            caller = connect(caller_dsn, application_name="themis_bench_caller")
            server_log = ServerLog(db.log_file)
            try:
                phases = []
                for kind in args.kinds:
                    if kind == "search":
                        sql_text = "SELECT * FROM themis_search(%s, %s)"
                        shown = f"SELECT * FROM themis_search(q, {args.k})"

                        def params(i: int) -> tuple[Any, ...]:
                            return (questions[i % len(questions)], args.k)
                    else:
                        sql_text = "SELECT themis_rag(%s, %s, %s)"
                        shown = f"SELECT themis_rag(q, {args.k}, {args.max_tokens})"

                        def params(i: int) -> tuple[Any, ...]:
                            return (questions[i % len(questions)], args.k, args.max_tokens)
                    phase = run_phase(caller, reader, kind, sql_text, params, args.runs,
                                      args.warmup, args.settle, args.stats_flush_wait,
                                      WalDump(db.bin_dir, db.data_dir))
                    phases.append((phase, shown))
                longest = max(p.duration_s for p, _ in phases)
                idle = idle_window(reader, args.idle_window if args.idle_window is not None
                                   else min(max(longest, 20.0), 120.0), args.stats_flush_wait)
                attribution = Attribution(reader.sources())
                attach_log([p for p, _ in phases], idle, server_log)
            finally:
                caller.close()
                texts = dict(reader.texts)
                reader.close()
    keys = set(idle.statements).union(*(p.totals for p, _ in phases))
    sides = classify(keys, texts, attribution, {owner})
    analysed = []
    for phase, shown in phases:
        a = analyse(phase, idle, sides, texts)
        a["statement_sql"] = shown
        analysed.append(a)
    idle_sides = [sides.get(k, ("other", []))[0] for k in idle.statements]
    meta["load_after"] = list(os.getloadavg())
    result = {
        "meta": meta, "phases": analysed,
        "idle": {"duration_s": idle.duration_s,
                 "statements": sum(v[0] for k, v in idle.statements.items()
                                   if sides.get(k, ("other",))[0] != "other"),
                 "round_trips": sum(v[0] for (k, v), s in zip(idle.statements.items(),
                                                             idle_sides, strict=True)
                                    if s in ROUND_TRIP_SIDES),
                 "row_writes": sum(v[0] + v[1] + v[3] for v in idle.cumulative.tables.values()),
                 "wal_bytes": idle.cumulative.wal[2],
                 "by_statement": [{"side": sides.get(k, ("other",))[0], "query": texts[k],
                                   "calls": v[0]} for k, v in idle.statements.items()]},
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        log.info("written to %s", args.json)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
