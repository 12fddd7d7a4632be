"""The Docker Compose stack, checked without a Docker engine: the file's structure, the
Dockerfiles' inputs, and (where the compose CLI exists) `docker compose config`."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"


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
