"""What the benchmarks share: the throwaway cluster, the worker process, the machine's facts.

Everything here works on the ``themis_pg`` package this process imported, wherever that is:
the worker subprocess runs with that package's checkout as its working directory (so
``python -m themis_pg.cli`` imports the same code, with ``PYTHONPATH`` passed on), the
server-side package is copied from it (``EmbeddedCluster.install_pl_package``), and the
revision reported is that checkout's.  So a script of this folder can measure another
checkout (a ``git worktree`` of an older revision) with ``PYTHONPATH=<that checkout>``;
:func:`code_origin` says which code each process really runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

import themis_pg
from themis_pg.config import Settings
from themis_pg.db import connect, migrate
from themis_pg.embedding import Embedder
from themis_pg.models.registry import get_model, register_defaults
from themis_pg.resources import pl_package_dir, sample_corpus_dir

log = logging.getLogger("bench.setup")

#: The checkout (or site-packages directory) of the imported themis_pg package.
PACKAGE_ROOT = Path(themis_pg.__file__).resolve().parent.parent
QUESTIONS = Path(themis_pg.__file__).resolve().parent / "data" / "sample_questions.jsonl"
BENCH_DB = "themis"
WORKER_START_TIMEOUT_S = 300.0


# -- the machine and the code ---------------------------------------------------------------
def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def git_revision(where: Path = PACKAGE_ROOT) -> str | None:
    """Short commit of the checkout ``where`` (default: the imported package's), marked
    when tracked files have uncommitted changes."""
    try:
        rev = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + (" (with uncommitted changes)" if dirty else "")


def _tree_digest(root: Path) -> str:
    """sha256 over the relative paths and contents of the .py files under ``root``."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def code_origin(worker_env: Mapping[str, str] | None = None,
                installed_pl: Path | None = None) -> dict[str, Any]:
    """Where the code of each process comes from: this process's themis_pg, what a worker
    started like :func:`worker_process` imports, and whether the server-side package
    installed in the cluster is a copy of this checkout's ``themis_pg/pl``."""
    env = dict(worker_env if worker_env is not None else os.environ)
    probe = subprocess.run(
        [sys.executable, "-c", "import themis_pg; print(themis_pg.__file__)"],
        env=env, cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=60)
    worker_file = probe.stdout.strip() or f"(failed: {probe.stderr.strip()[-300:]})"
    out: dict[str, Any] = {
        "themis_pg": str(Path(themis_pg.__file__).resolve()),
        "worker_themis_pg": worker_file,
        "revision": git_revision(),
        "pl_source": str(pl_package_dir()),
        "pl_source_digest": _tree_digest(pl_package_dir()),
    }
    if installed_pl is not None:
        out["pl_installed"] = str(installed_pl)
        out["pl_installed_digest"] = _tree_digest(installed_pl)
    same_worker = Path(worker_file).resolve() == Path(themis_pg.__file__).resolve() \
        if not worker_file.startswith("(") else False
    out["consistent"] = same_worker and (installed_pl is None
                                         or out["pl_installed_digest"] == out["pl_source_digest"])
    return out


def load_questions(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as fh:
        questions = [str(json.loads(line)["question"]) for line in fh if line.strip()]
    if len(questions) < 2:
        raise SystemExit(f"{path}: need at least 2 questions (consecutive prompts must differ)")
    return questions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the worker -------------------------------------------------------------------------------
def wait_for_worker(dsn: str, proc: subprocess.Popen[bytes], log_path: Path,
                    timeout: float = WORKER_START_TIMEOUT_S) -> None:
    """Until ``themis.live_worker_exists`` says yes for search and generate (``dsn`` must be
    allowed to call it: the owner or a themis_user/themis_bus member)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise SystemExit(f"the worker exited with {proc.returncode} during start-up:\n{tail}")
        with connect(dsn) as conn:
            try:
                row = conn.execute("SELECT themis.live_worker_exists('search') "
                                   "AND themis.live_worker_exists('generate')").fetchone()
            except psycopg.errors.UndefinedFunction:  # a schema without it: the table says
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE 'search' = ANY (kinds)) > 0 AND "
                    "count(*) FILTER (WHERE 'generate' = ANY (kinds)) > 0 "
                    "FROM themis.workers").fetchone()
            if row is not None and row[0]:
                return
        time.sleep(0.5)
    raise SystemExit(f"no worker came up within {timeout:.0f} s; see {log_path}")


def worker_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a bench worker: this process's (PYTHONPATH included), the run's
    model and thread settings, and ``extra`` (THEMIS_* overrides) on top."""
    env = {**os.environ, "THEMIS_WORKER_ID": f"bench-{os.getpid()}",
           "THEMIS_N_CTX": str(settings.n_ctx), "THEMIS_N_GPU_LAYERS": str(settings.n_gpu_layers),
           "THEMIS_GENERATION_MODEL": settings.generation_model,
           "THEMIS_EMBEDDING_MODEL": settings.embedding_model}
    env.pop("THEMIS_N_THREADS", None)
    if settings.n_threads is not None:
        env["THEMIS_N_THREADS"] = str(settings.n_threads)
    env.update(extra or {})
    return env


@contextlib.contextmanager
def worker_process(dsn: str, log_dir: Path, settings: Settings, *,
                   extra_env: Mapping[str, str] | None = None,
                   check_dsn: str | None = None,
                   flights_out: Path | None = None) -> Iterator[int]:
    """A ``themis worker`` subprocess connecting with ``dsn``, stopped on exit; yields its pid.

    It runs ``python -m themis_pg.cli`` with this interpreter, in the imported package's
    checkout, so it imports the same themis_pg as this process.  ``check_dsn`` (default
    ``dsn``) is used to wait until it is live.  With ``flights_out`` it runs under
    ``_flights.py``, which counts its client-side round trips into that file."""
    env = worker_env(settings, extra_env)
    log_path = log_dir / "worker.log"
    entry = ["-m", "themis_pg.cli"] if flights_out is None else \
        [str(Path(__file__).with_name("_flights.py")), str(flights_out)]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *entry, "--dsn", dsn, "worker"],
            env=env, cwd=PACKAGE_ROOT, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    log.info("started worker pid %d (log %s)", proc.pid, log_path)
    try:
        wait_for_worker(check_dsn or dsn, proc, log_path)
        log.info("worker is live")
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.info("worker stopped (exit status %s)", proc.returncode)


# -- the throwaway cluster -------------------------------------------------------------------
@dataclass(frozen=True)
class Throwaway:
    """A running throwaway cluster: its state directory, superuser DSN, installed
    server-side package, server log, data directory and server binaries."""

    home: Path
    dsn: str
    pl_installed: Path
    log_file: Path
    data_dir: Path
    bin_dir: Path


def _conf_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


@contextlib.contextmanager
def throwaway_cluster(settings: Settings,
                      server_conf: Mapping[str, str | int | float | bool] | None = None,
                      ) -> Iterator[Throwaway]:
    """A throwaway embedded cluster under /tmp with the schema, the default models and the
    sample corpus (no worker); removed on exit.  ``server_conf`` settings are appended to
    its postgresql.conf before the first start."""
    from themis_pg.cluster import PL_PACKAGE, EmbeddedCluster
    from themis_pg.ingest import ingest_paths

    # Under /tmp, world-traversable: as root the server runs as another OS user.
    home = Path(tempfile.mkdtemp(prefix="themis-bench-", dir="/tmp"))
    home.chmod(0o755)
    cluster = EmbeddedCluster(home, free_port())
    try:
        cluster.init()
        if server_conf:
            with (cluster.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
                conf.write("\n# bench settings\n" + "".join(
                    f"{k} = {_conf_value(v)}\n" for k, v in server_conf.items()))
        cluster.start()
        cluster.ensure_database(BENCH_DB)
        dsn = cluster.url(BENCH_DB)
        log.info("migrating %s", dsn)
        migrate(dsn)
        with connect(dsn) as conn:
            register_defaults(conn, settings.model_cache)
            emb = get_model(conn, "embedding", settings.embedding_model or None)
            with Embedder(emb.path, emb.name, n_threads=settings.n_threads) as embedder:
                report = ingest_paths(conn, [sample_corpus_dir()], embedder, progress=False)
        log.info("ingested the sample corpus: %s", vars(report))
        yield Throwaway(home, dsn, cluster.pylib_dir / PL_PACKAGE, cluster.log_file,
                        cluster.data_dir, cluster.bin_dir)
    finally:
        log.info("removing the throwaway cluster in %s", home)
        cluster.destroy()


@contextlib.contextmanager
def self_contained_database(settings: Settings) -> Iterator[tuple[str, int]]:
    """A throwaway embedded cluster with the schema, the default models, the sample corpus
    and one worker; everything is removed on exit.  Yields the DSN and the worker's pid."""
    with throwaway_cluster(settings) as db, \
            worker_process(db.dsn, db.home, settings) as worker_pid:
        yield db.dsn, worker_pid
