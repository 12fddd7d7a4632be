"""One fixture layer gives every test a real PostgreSQL (pgvector + plpython3u), real models
and, where asked, real ``themis worker`` processes.

The server, in order: ``THEMIS_TEST_DSN`` (a superuser DSN; tests create databases), else a
testcontainers PostgreSQL built from docker/db.Dockerfile when a Docker engine answers, else a
throwaway embedded cluster (themis_pg.cluster, the code `themis db up` uses) in a temp dir.

Databases: a template is migrated, given the default models and the sample corpus once per
session; each test that needs a database gets a clone (CREATE DATABASE ... TEMPLATE, ~0.1 s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from themis_pg.config import get_settings

REPO = Path(__file__).resolve().parent.parent
TEMPLATE_CORPUS = "themis_tpl_corpus"
TEMPLATE_EMPTY = "themis_tpl_empty"

# Fast timings for tests: leases and heartbeats in seconds, not tens of seconds.
WORKER_ENV = {
    "THEMIS_HEARTBEAT_INTERVAL": "0.5",
    "THEMIS_LEASE": "3",
    "THEMIS_POLL_INTERVAL": "0.5",
    "THEMIS_N_CTX": "2048",
    "THEMIS_MAX_SEQUENCES": "4",  # the batch engine: 4 streams of 2048 cells (+ the prefix)
    "THEMIS_LOG_LEVEL": "INFO",
}


@dataclass
class Server:
    """A PostgreSQL server tests may create databases on, as a superuser."""

    admin_dsn: str
    _stop: Callable[[], None] = field(default=lambda: None)

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)

    def create_database(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            tpl = f" TEMPLATE {template}" if template else ""
            conn.execute(f'CREATE DATABASE "{name}"{tpl}')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        import docker

        docker.from_env().ping()  # type: ignore[attr-defined]
        return True
    except Exception:
        return False


def _container_server() -> Server:
    from testcontainers.core.image import DockerImage
    from testcontainers.postgres import PostgresContainer

    image = DockerImage(path=str(REPO), dockerfile_path="docker/db.Dockerfile",
                        tag="themis-pg-db:test")
    image.build()
    container = PostgresContainer(str(image), username="postgres", password="postgres",
                                  dbname="postgres", driver=None)
    container.start()
    url = container.get_connection_url()
    return Server(admin_dsn=url, _stop=container.stop)


def _embedded_server() -> Server:
    from themis_pg.cluster import EmbeddedCluster

    home = Path(tempfile.mkdtemp(prefix="themis-test-", dir="/tmp"))
    home.chmod(0o755)
    cluster = EmbeddedCluster(home, _free_port(), max_connections=200)
    cluster.init()
    cluster.start()

    def stop() -> None:
        cluster.destroy()

    return Server(admin_dsn=cluster.url("postgres"), _stop=stop)


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    if os.environ.get("THEMIS_TEST_DSN"):
        srv = Server(admin_dsn=os.environ["THEMIS_TEST_DSN"])
    elif _docker_available():
        srv = _container_server()
    else:
        srv = _embedded_server()
    try:
        with psycopg.connect(srv.admin_dsn, connect_timeout=10):
            pass
    except psycopg.OperationalError as exc:
        srv._stop()
        pytest.exit(f"test database server unreachable: {exc}", returncode=3)
    yield srv
    srv._stop()


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Persistent across runs (downloads are ~180 MB): THEMIS_MODEL_CACHE or the default."""
    return get_settings().model_cache


@pytest.fixture(scope="session")
def default_models(model_cache: Path) -> list[Any]:
    from themis_pg.models.fetch import ensure_default_models

    return ensure_default_models(model_cache)


@pytest.fixture(scope="session")
def embedder(default_models: list[Any]) -> Any:
    from themis_pg.embedding import Embedder

    emb = next(m for m in default_models if m.kind == "embedding")
    return Embedder(emb.path, emb.name)


def _register(dsn: str, default_models: list[Any]) -> None:
    from themis_pg.models.registry import register_model

    with psycopg.connect(dsn, autocommit=True) as conn:
        for m in default_models:
            register_model(conn, m.name, m.kind, m.path, sha256=m.sha256, params=m.params,
                           default=True)


@pytest.fixture(scope="session")
def templates(server: Server, default_models: list[Any], embedder: Any) -> dict[str, str]:
    """Two migrated template databases: with models only, and with the sample corpus too."""
    from themis_pg.db import migrate
    from themis_pg.ingest import ingest_paths
    from themis_pg.resources import sample_corpus_dir

    for name in (TEMPLATE_EMPTY, TEMPLATE_CORPUS):
        server.drop_database(name)
        dsn = server.create_database(name)
        migrate(dsn)
        _register(dsn, default_models)
        if name == TEMPLATE_CORPUS:
            with psycopg.connect(dsn, autocommit=True) as conn:
                ingest_paths(conn, [sample_corpus_dir()], embedder, progress=False)
    return {"empty": TEMPLATE_EMPTY, "corpus": TEMPLATE_CORPUS}


@contextlib.contextmanager
def _clone(server: Server, template: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = server.create_database(name, template=template)
    try:
        yield dsn
    finally:
        server.drop_database(name)


@pytest.fixture
def migrated_db(server: Server, templates: dict[str, str]) -> Iterator[str]:
    """A freshly migrated database with the default models registered and no documents."""
    with _clone(server, templates["empty"]) as dsn:
        yield dsn


@pytest.fixture
def corpus_db(server: Server, templates: dict[str, str]) -> Iterator[str]:
    """Like migrated_db, with the sample corpus ingested."""
    with _clone(server, templates["corpus"]) as dsn:
        yield dsn


class WorkerProcess:
    """A real `themis worker` subprocess."""

    def __init__(self, dsn: str, log_dir: Path, env: dict[str, str] | None = None,
                 kinds: str | None = None) -> None:
        self.dsn = dsn
        self.id = f"test-worker-{uuid.uuid4().hex[:8]}"
        self.log_path = log_dir / f"{self.id}.log"
        full_env = {**os.environ, **WORKER_ENV, "THEMIS_WORKER_ID": self.id,
                    "THEMIS_INDEX_SNAPSHOT_DIR": str(log_dir / "snapshots"),
                    # every worker starts with an empty LoRA cache: it fetches from the database
                    "THEMIS_LORA_CACHE": str(log_dir / f"lora-{self.id}"), **(env or {})}
        args = [sys.executable, "-m", "themis_pg.cli", "--dsn", dsn, "worker"]
        if kinds:
            args += ["--kinds", kinds]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, env=full_env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                if conn.execute("SELECT 1 FROM themis.workers WHERE id = %s",
                                (self.id,)).fetchone() and "ready" in self.log():
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout} s:\n{self.log()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, as an operator would; a worker that does not exit promptly is a bug."""
        hung = False
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                hung = True
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if hung:
            raise AssertionError(f"worker {self.id} ignored SIGTERM for 20 s:\n{self.log()}")


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real worker processes against a database; all are stopped afterwards."""
    started: list[WorkerProcess] = []

    def start(dsn: str, *, env: dict[str, str] | None = None, kinds: str | None = None,
              wait: bool = True) -> WorkerProcess:
        w = WorkerProcess(dsn, tmp_path, env, kinds)
        started.append(w)
        return w.wait_ready() if wait else w

    yield start
    for w in started:
        w.stop()


@pytest.fixture(scope="module")
def rag_db(server: Server, templates: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A corpus database with one worker, shared by a module's read-only tests."""
    with _clone(server, templates["corpus"]) as dsn:
        w = WorkerProcess(dsn, tmp_path_factory.mktemp("worker"))
        try:
            w.wait_ready()
            yield dsn
        finally:
            w.stop()


@pytest.fixture
def user_role(server: Server) -> Iterator[Callable[[str, str], str]]:
    """Create LOGIN roles (members of themis_user unless told otherwise), each with a random
    password, and get their DSN (which carries the password)."""
    made: list[str] = []

    def make(dsn: str, name: str | None = None, member_of: str = "themis_user") -> str:
        role = name or f"r_{uuid.uuid4().hex[:8]}"
        # Roles other than postgres and themis_bus log in with a scram password (pg_hba.conf
        # of the embedded cluster); uuid4 is random (os.urandom) and needs no quoting.
        password = uuid.uuid4().hex
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE \"{role}\" WITH LOGIN PASSWORD '{password}'")
            if member_of:
                conn.execute(f'GRANT {member_of} TO "{role}"')
        made.append(role)
        return make_conninfo(dsn, user=role, password=password)

    yield make

    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        for role in made:  # roles whose grants live in a dropped clone drop cleanly
            with contextlib.suppress(psycopg.Error):
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')
