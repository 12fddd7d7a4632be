"""Only callers and workers get in (issue #6): over the unix socket the OS user running themis
(the test process) is the superuser ``postgres``, the server's own backends are ``themis_bus``
(the SQL functions' bus connection), and every other role needs its scram password.  Any other
OS user is refused for every role whose password it does not have.

Runs against the session's ``server``.  The OS-user tests need the embedded cluster (reached
through a local unix socket, pg_hba.conf and pg_ident.conf written by themis_pg.cluster) and
root (they create a second OS user with useradd); they skip otherwise.  The pure pg_hba /
pg_ident text is tested in test_cluster.py.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .helpers import TLS

PEER_REFUSED = "Peer authentication failed"
NO_PASSWORD = "no password supplied"
BAD_PASSWORD = "password authentication failed"
NO_PASSFILE = "/nonexistent/.pgpass"  # no ~/.pgpass to fall back on (/dev/null draws a warning)


def _params(dsn: str) -> dict[str, str]:
    return {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}


def _without_password(dsn: str) -> str:
    """``dsn`` with no password and no ~/.pgpass to fall back on."""
    params = _params(dsn)
    params.pop("password", None)
    return make_conninfo("", **{**params, "passfile": NO_PASSFILE})


@pytest.fixture(scope="module")
def ours() -> None:
    if os.environ.get("THEMIS_TEST_DSN"):
        pytest.skip("THEMIS_TEST_DSN names an external server: its pg_hba.conf is not ours")


@pytest.fixture(scope="module")
def embedded(ours: None, server) -> Path:
    """The embedded cluster's socket directory (skip for a container reached over TCP)."""
    host = _params(server.admin_dsn).get("host", "")
    if not host.startswith("/"):
        pytest.skip("the test server is not reached through a local unix socket (a container)")
    return Path(host)


@pytest.fixture(scope="module")
def psql() -> str:
    from themis_pg.cluster import ClusterError, find_bin_dir

    try:
        path = str(find_bin_dir() / "psql")
    except ClusterError:
        path = shutil.which("psql") or ""
    if not os.access(path, os.X_OK):
        pytest.skip("psql not found")
    return path


@pytest.fixture(scope="module")
def stranger(embedded: Path) -> Iterator[pwd.struct_passwd]:
    """A second OS user, created for this module and removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating a second OS user (useradd) needs root")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("useradd/userdel not installed")
    name = f"thx{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--no-user-group",
         "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=60)
        with pytest.raises(KeyError):
            pwd.getpwnam(name)


def _psql_as(
    psql: str, user: pwd.struct_passwd, dsn: str, password: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``SELECT current_user`` through psql run as OS user ``user``; ``password`` (if any) is
    the only credential it has (no .pgpass, never a prompt)."""
    env = {
        "PATH": os.defpath,
        "LC_ALL": "C.UTF-8",
        "HOME": user.pw_dir,
        "PGPASSFILE": NO_PASSFILE,
        "PGCONNECT_TIMEOUT": "10",
    }
    if password is not None:
        env["PGPASSWORD"] = password
    params = _params(dsn)
    params.pop("password", None)
    return subprocess.run(
        [psql, "-X", "-w", "-At", "-d", make_conninfo("", **params), "-c", "SELECT current_user"],
        user=user.pw_uid, group=user.pw_gid, extra_groups=[], env=env, cwd="/",
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_another_os_user_is_refused_for_every_role(
    psql: str, stranger: pwd.struct_passwd, migrated_db: str, user_role
) -> None:
    member = user_role(migrated_db)  # a themis_user member with a password it does not know
    role = _params(member)["user"]
    for who, expected in (
        ("postgres", PEER_REFUSED),
        ("themis_bus", PEER_REFUSED),
        (role, NO_PASSWORD),
    ):
        done = _psql_as(psql, stranger, make_conninfo(migrated_db, user=who))
        assert done.returncode != 0 and expected in done.stderr, (who, done.stdout, done.stderr)
    # A password does not open the password-less roles: peer decides, whatever is sent.
    for who in ("postgres", "themis_bus"):
        done = _psql_as(psql, stranger, make_conninfo(migrated_db, user=who), password=who)
        assert done.returncode != 0 and PEER_REFUSED in done.stderr, (who, done.stderr)
    done = _psql_as(psql, stranger, member, password="not-" + _params(member)["password"])
    assert done.returncode != 0 and BAD_PASSWORD in done.stderr, done.stderr


def test_another_os_user_with_a_roles_password_gets_that_role_only(
    psql: str, stranger: pwd.struct_passwd, migrated_db: str, user_role
) -> None:
    """The socket directory stays 0755 on purpose: a local user with a password may connect."""
    member = user_role(migrated_db)
    params = _params(member)
    done = _psql_as(psql, stranger, member, password=params["password"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == params["user"]


def test_the_test_process_is_the_superuser(embedded: Path, server, migrated_db: str) -> None:
    with psycopg.connect(server.admin_dsn) as conn:
        row = conn.execute(
            "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        data_dir = conn.execute("SHOW data_directory").fetchone()[0]
    assert row == ("postgres", True)
    me = pwd.getpwuid(os.geteuid()).pw_name
    server_os_user = pwd.getpwuid(Path(data_dir).stat().st_uid).pw_name
    if me != server_os_user:  # root in CI: themis_bus belongs to the server's OS user only
        with pytest.raises(psycopg.OperationalError, match=PEER_REFUSED):
            psycopg.connect(_without_password(make_conninfo(migrated_db, user="themis_bus")))


def test_a_role_logs_in_with_its_password_only(ours: None, migrated_db: str, user_role) -> None:
    member = user_role(migrated_db)
    with psycopg.connect(member) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (_params(member)["user"],)
    with pytest.raises(psycopg.OperationalError, match=NO_PASSWORD):
        psycopg.connect(_without_password(member))
    with pytest.raises(psycopg.OperationalError, match=BAD_PASSWORD):
        psycopg.connect(make_conninfo(member, password="wrong"))


def test_a_themis_call_opens_its_bus_connection_as_themis_bus(
    ours: None, corpus_db: str, start_worker, user_role
) -> None:
    """The call's backend connects back through the socket as themis_bus, with no password:
    only the peer map (the server's OS user -> themis_bus) lets it in."""
    start_worker(corpus_db)
    member = user_role(corpus_db)
    with psycopg.connect(member, autocommit=True) as conn:
        count = conn.execute("SELECT count(*) FROM themis_search(%s, 2)", (TLS,)).fetchone()
        assert count == (2,)
        # The backend keeps its bus connection (cached in GD) while this session lives.
        with psycopg.connect(corpus_db, autocommit=True) as admin:
            bus = admin.execute(
                "SELECT usename, client_addr, client_port FROM pg_stat_activity"
                " WHERE application_name = 'themis_bus' AND datname = current_database()"
            ).fetchall()
    assert bus == [("themis_bus", None, -1)]  # one connection, role themis_bus, unix socket
