"""The Docker Compose stack, checked without a Docker engine: the file's structure, the
Dockerfiles' inputs, and (where the compose CLI exists) `docker compose config`."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from themis_pg.cluster import auth_files

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
AUTH_DIR = "/etc/themis"  # where the db image keeps pg_hba.conf and pg_ident.conf


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


def _dockerfile(service: dict[str, Any]) -> Path:
    build = service["build"]
    return COMPOSE_FILE.parent / str(build["context"]) / str(build["dockerfile"])


def _copy_sources(dockerfile: Path) -> list[str]:
    """Build-context paths a Dockerfile COPYs (not COPY --from=stage)."""
    sources = []
    for line in dockerfile.read_text().splitlines():
        if not re.match(r"COPY\s", line.strip(), re.I):
            continue
        words = shlex.split(line)[1:]
        if any(w.startswith("--from") for w in words):
            continue
        sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


def _dockerfile_cmd(dockerfile: Path) -> list[str]:
    """The exec-form CMD of a Dockerfile (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    cmd = re.search(r"^CMD (\[.*\])\s*$", joined, re.M)
    assert cmd, f"{dockerfile} has no exec-form CMD"
    words = json.loads(cmd.group(1))
    assert isinstance(words, list)
    return [str(w) for w in words]


def _rules(text: str) -> list[list[str]]:
    """The non-comment lines of a pg_hba.conf / pg_ident.conf, split into fields."""
    return [line.split() for line in text.splitlines() if line.strip() and line[0] != "#"]


def _command_text(service: dict[str, Any]) -> str:
    command = service["command"]
    return command if isinstance(command, str) else " ".join(command)


def test_both_services_build_from_files_in_the_repository(services: dict[str, Any]):
    assert {"db", "worker"} <= set(services)
    for name in ("db", "worker"):
        build = services[name]["build"]
        assert (COMPOSE_FILE.parent / build["context"]).resolve() == REPO
        assert _dockerfile(services[name]).is_file(), f"{name}: {build['dockerfile']} missing"


def test_worker_waits_for_a_healthy_db(services: dict[str, Any]):
    assert services["worker"]["depends_on"]["db"]["condition"] == "service_healthy"
    check = services["db"]["healthcheck"]
    assert "pg_isready" in " ".join(check["test"])
    assert check.get("retries", 0) > 0


def test_db_image_has_pgvector_plpython_and_themis_pl(services: dict[str, Any]):
    text = _dockerfile(services["db"]).read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert base and re.fullmatch(r"pgvector/pgvector:[\d.]+-pg15-bookworm", base.group(1))
    assert "postgresql-plpython3-" in text and "python3-psycopg" in text
    copy = re.search(r"^COPY themis_pg/pl (\S+)$", text, re.M)
    assert copy, "the db image must install the server-side package"
    # Debian's system Python 3.11 (the one PL/Python embeds) searches these directories.
    assert re.fullmatch(r"/usr/(local/)?lib/python3(\.11)?/dist-packages/themis_pl", copy.group(1))


def test_db_settings_and_storage(compose: dict[str, Any], services: dict[str, Any]):
    db = services["db"]
    command = _command_text(db)
    assert "client_connection_check_interval=1s" in command
    assert "max_connections=" in command
    password = str(db["environment"]["POSTGRES_PASSWORD"])
    assert password.startswith("${POSTGRES_PASSWORD:-"), "overridable, default for local use"
    volume = db["volumes"][0].split(":")
    assert volume[1] == "/var/lib/postgresql/data" and volume[0] in compose["volumes"]
    assert all(str(p).startswith("127.0.0.1:") for p in db.get("ports", []))


def test_nothing_is_trusted(services: dict[str, Any]):
    """No password-less method anywhere in the stack (issue #6): peer + scram only."""
    paths = [COMPOSE_FILE, REPO / ".dockerignore", *sorted((REPO / "docker").iterdir())]
    for path in paths:
        assert not re.search(r"\btrust\b", path.read_text(), re.I), f"{path} mentions trust"
    db_env = services["db"]["environment"]
    assert "POSTGRES_HOST_AUTH_METHOD" not in db_env
    assert "POSTGRES_INITDB_ARGS" not in db_env  # the image's peer/scram initdb arguments hold


def test_db_auth_files_are_the_embedded_clusters_rules_for_os_user_postgres():
    """Over the socket OS user postgres (server and admin in the container) gets exactly the
    roles postgres and themis_bus by peer; every other role and all TCP need scram."""
    expected = auth_files("postgres", "postgres")
    for name in ("pg_hba.conf", "pg_ident.conf"):
        assert _rules((REPO / "docker" / name).read_text()) == _rules(expected[name]), name
    hba = _rules((REPO / "docker" / "pg_hba.conf").read_text())
    assert [r for r in hba if r[0] == "local" and r[-1] == "map=themis"] == [
        ["local", "all", "postgres", "peer", "map=themis"],
        ["local", "all", "themis_bus", "peer", "map=themis"],
    ]
    assert hba[-1] == ["host", "all", "all", "all", "scram-sha-256"]
    assert _rules((REPO / "docker" / "pg_ident.conf").read_text()) == [
        ["themis", "postgres", "postgres"],
        ["themis", "postgres", "themis_bus"],
    ]


def test_db_server_reads_the_image_auth_files(services: dict[str, Any]):
    """hba_file/ident_file on the command line (image CMD and compose command alike) name the
    files the image copies in, so the pg_hba.conf the entrypoint writes into PGDATA (on a new
    volume, or one from an earlier image) is never read."""
    dockerfile = _dockerfile(services["db"])
    text = dockerfile.read_text()
    copy = re.search(r"^COPY docker/pg_hba\.conf docker/pg_ident\.conf (\S+)$", text, re.M)
    assert copy and copy.group(1).rstrip("/") == AUTH_DIR
    flags = {f"hba_file={AUTH_DIR}/pg_hba.conf", f"ident_file={AUTH_DIR}/pg_ident.conf"}
    image_cmd = _dockerfile_cmd(dockerfile)
    compose_cmd = [str(w) for w in services["db"]["command"]]
    for cmd in (image_cmd, compose_cmd):
        assert cmd[0] == "postgres"
        settings = [cmd[i + 1] for i, w in enumerate(cmd[:-1]) if w == "-c"]
        assert flags <= set(settings), cmd
    assert re.search(
        r'^ENV POSTGRES_INITDB_ARGS="--auth-local=peer --auth-host=scram-sha-256"$', text, re.M
    )


def test_compose_header_runs_psql_as_os_user_postgres():
    header = [line for line in COMPOSE_FILE.read_text().splitlines() if line.startswith("#")]
    execs = [line for line in header if "docker compose exec" in line]
    assert execs and all("exec -u postgres db psql" in line for line in execs), execs


def test_worker_prepares_the_database_then_serves(
    compose: dict[str, Any], services: dict[str, Any]
):
    worker = services["worker"]
    env = worker["environment"]
    assert "@db:5432/" in env["THEMIS_DSN"]
    cache_volumes = [v.split(":") for v in worker["volumes"]]
    assert [env["THEMIS_MODEL_CACHE"]] == [v[1] for v in cache_volumes]
    assert all(v[0] in compose["volumes"] for v in cache_volumes)

    script = _command_text(worker)
    steps = ["themis migrate", "themis models fetch", "themis ingest", "exec themis worker"]
    positions = [script.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), script
    corpus = re.search(r"themis ingest (\S+)", script)
    assert corpus
    dockerfile = _dockerfile(worker).read_text()
    assert re.search(
        rf"^COPY themis_pg/data/sample_corpus {re.escape(corpus.group(1))}$", dockerfile, re.M
    )
    assert "LLAVA_BUILD=OFF" in dockerfile


def test_dockerignore_keeps_every_copied_path(services: dict[str, Any]):
    build = pytest.importorskip(
        "docker.utils.build", reason="docker SDK (testcontainers) needed to evaluate .dockerignore"
    )
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    included = build.exclude_paths(str(REPO), patterns)
    for name in ("db", "worker"):
        for source in _copy_sources(_dockerfile(services[name])):
            if source == ".":
                continue
            assert (REPO / source).exists(), f"{name} copies missing {source}"
            assert source in included, f".dockerignore excludes {source} ({name})"
    # What the worker's `pip install` needs from the whole-tree COPY, and what it must not get.
    for path in (
        "pyproject.toml",
        "README.md",
        "alembic.ini",
        "sql/api/20_functions.sql",
        "migrations/env.py",
        "themis_pg/pl/__init__.py",
    ):
        assert path in included, f".dockerignore excludes {path}"
    assert not any(p.startswith((".git/", "tests/", ".venv/")) for p in included)


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_accepts_the_file():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    done = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "config", "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
