"""The embedded cluster: a real PostgreSQL 15 started by EmbeddedCluster, with pgvector and
PL/Python importing themis_pl and psycopg inside the server."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from themis_pg.cluster import ClusterError, EmbeddedCluster, auth_files, find_bin_dir


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _new_home() -> Path:
    """A fresh state directory the server's OS user can reach: pytest's tmp_path lives under
    a 0700 directory of root's, which the ``postgres`` user cannot traverse."""
    path = Path(tempfile.mkdtemp(prefix="themis-cluster-"))
    path.chmod(0o755)
    return path / "home"  # not created yet: the cluster creates it


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    home = _new_home()
    c = EmbeddedCluster(home, _free_port(), max_connections=50)
    c.start()
    try:
        yield c
    finally:
        c.destroy()
        home.parent.rmdir()
        assert not home.exists()


def test_status_reports_running(cluster: EmbeddedCluster) -> None:
    st = cluster.status()
    assert st.initialized and st.running
    assert st.pid is not None and st.pid > 0
    assert st.port == cluster.port
    assert st.socket_dir == cluster.home / "run"
    assert st.data_dir == cluster.home / "data"
    assert (st.socket_dir / f".s.PGSQL.{cluster.port}").is_socket()
    assert st.url == cluster.url()


def test_url_connects_and_settings_apply(cluster: EmbeddedCluster) -> None:
    with psycopg.connect(cluster.url("postgres")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        version = conn.execute("SHOW server_version_num").fetchone()
        assert version is not None and version[0].startswith("15")
        assert conn.execute("SHOW max_connections").fetchone() == ("50",)
        assert conn.execute("SHOW client_connection_check_interval").fetchone() == ("1s",)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)
        assert conn.execute("SHOW fsync").fetchone() == ("on",)


def test_ensure_database_is_idempotent(cluster: EmbeddedCluster) -> None:
    assert cluster.ensure_database("themis") is True
    assert cluster.ensure_database("themis") is False
    with psycopg.connect(cluster.url()) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("themis",)


def test_extensions_and_server_python_imports(cluster: EmbeddedCluster) -> None:
    cluster.ensure_database("ext")
    with psycopg.connect(cluster.url("ext"), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("CREATE EXTENSION IF NOT EXISTS plpython3u")
        assert conn.execute("SELECT '[1,2,3]'::vector <-> '[1,2,4]'::vector").fetchone() == (1.0,)
        conn.execute(
            """
            CREATE FUNCTION pl_probe() RETURNS text LANGUAGE plpython3u AS $$
            import os, psycopg, themis_pl
            return "|".join([os.path.dirname(list(themis_pl.__path__)[0]),
                             psycopg.__name__, os.environ["PYTHONPATH"]])
            $$
            """
        )
        row = conn.execute("SELECT pl_probe()").fetchone()
        assert row is not None
        pkg_parent, psycopg_name, pythonpath = row[0].split("|")
        assert Path(pkg_parent) == cluster.pylib_dir
        assert psycopg_name == "psycopg"
        assert Path(pythonpath) == cluster.pylib_dir
        conn.execute("DO $$ import themis_pl, psycopg $$ LANGUAGE plpython3u")


def test_install_pl_package_mirrors_source(cluster: EmbeddedCluster) -> None:
    from themis_pg.resources import pl_package_dir

    target = cluster.install_pl_package()
    assert target == cluster.pylib_dir / "themis_pl"
    expected = {
        p.relative_to(pl_package_dir())
        for p in pl_package_dir().rglob("*")
        if "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    }
    got = {p.relative_to(target) for p in target.rglob("*") if "__pycache__" not in p.parts}
    assert got == expected
    assert not [p for p in cluster.pylib_dir.iterdir() if p.name.startswith(".")]


def test_start_twice_is_a_noop(cluster: EmbeddedCluster) -> None:
    pid = cluster.status().pid
    assert cluster.start() is False
    assert cluster.init() is False
    assert cluster.status().pid == pid


def test_stop_then_restart(cluster: EmbeddedCluster) -> None:
    assert cluster.stop() is True
    st = cluster.status()
    assert st.initialized and not st.running and st.pid is None
    assert cluster.stop() is False
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(cluster.url("postgres"), connect_timeout=2)
    assert cluster.start() is True
    assert cluster.status().running
    with psycopg.connect(cluster.url()) as conn:  # data survived the restart
        assert conn.execute("SELECT 1").fetchone() == (1,)


NO_PASSFILE = "/nonexistent/.pgpass"  # never fall back on ~/.pgpass (/dev/null draws a warning)


def _rules(text: str) -> list[list[str]]:
    """The non-comment lines of a pg_hba.conf / pg_ident.conf, split into fields."""
    return [line.split() for line in text.splitlines() if line.strip() and line[0] != "#"]


def _server_os_user() -> str:
    """Who runs the server: the current user, or (as root) postgres/themis, see _os_user()."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    return "postgres" if _user_exists("postgres") else "themis"


def test_auth_files_as_root_map_each_password_less_role_to_one_os_user() -> None:
    files = auth_files("root", "postgres")
    assert set(files) == {"pg_hba.conf", "pg_ident.conf"}
    assert _rules(files["pg_hba.conf"]) == [
        ["local", "all", "postgres", "peer", "map=themis"],
        ["local", "all", "themis_bus", "peer", "map=themis"],
        ["local", "all", "all", "scram-sha-256"],
        ["host", "all", "all", "all", "scram-sha-256"],
    ]
    assert _rules(files["pg_ident.conf"]) == [
        ["themis", "root", "postgres"],
        ["themis", "postgres", "themis_bus"],  # the server's OS user: the bus role, not more
    ]
    assert {
        rule[-2] if rule[-1].startswith("map=") else rule[-1]
        for rule in _rules(files["pg_hba.conf"])
    } == {"peer", "scram-sha-256"}
    for text in files.values():  # no password-less method anywhere, and every line explained
        assert "trust" not in text
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line and line[0] != "#":
                assert lines[i - 1].startswith("#"), f"no comment above {line!r}"


def test_auth_files_for_one_user_give_it_both_roles() -> None:
    files = auth_files("alice", "alice")
    assert _rules(files["pg_ident.conf"]) == [
        ["themis", "alice", "postgres"],
        ["themis", "alice", "themis_bus"],
    ]
    assert _rules(files["pg_hba.conf"]) == _rules(auth_files("root", "postgres")["pg_hba.conf"])


def test_auth_files_quote_odd_os_user_names_and_refuse_unwritable_ones() -> None:
    assert ["themis", '"ad.min@corp"', "postgres"] in _rules(
        auth_files("ad.min@corp", "postgres")["pg_ident.conf"]
    )
    for bad in ('a"b', "a\nlocal all all trust", "/regex"):
        with pytest.raises(ClusterError):
            auth_files(bad, "postgres")


def test_server_accepts_the_auth_files_it_was_started_with(cluster: EmbeddedCluster) -> None:
    server_user = pwd.getpwnam(_server_os_user())
    caller = pwd.getpwuid(os.geteuid()).pw_name
    expected = auth_files(caller, server_user.pw_name)
    for name, text in expected.items():
        path = cluster.data_dir / name
        assert path.read_text() == text
        st = path.stat()
        assert (st.st_mode & 0o777, st.st_uid) == (0o600, server_user.pw_uid), name
    with psycopg.connect(cluster.url("postgres")) as conn:
        hba = conn.execute(
            "SELECT type, database, user_name, auth_method, options, error FROM pg_hba_file_rules"
            " ORDER BY line_number"
        ).fetchall()
        ident = conn.execute(
            "SELECT map_name, sys_name, pg_username, error FROM pg_ident_file_mappings"
            " ORDER BY line_number"
        ).fetchall()
    assert [row[-1] for row in hba + ident] == [None] * (len(hba) + len(ident))
    assert [row[3] for row in hba] == ["peer", "peer", "scram-sha-256", "scram-sha-256"]
    assert [row[:3] for row in ident] == [tuple(r) for r in _rules(expected["pg_ident.conf"])]


def _passwordless_role(cluster: EmbeddedCluster) -> str:
    """A LOGIN role without a password and its DSN (never .pgpass) over the socket."""
    role = f"nopw_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cluster.url("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
    return make_conninfo(cluster.url("postgres"), user=role, passfile=NO_PASSFILE)


def _write_trusting_hba(cluster: EmbeddedCluster) -> None:
    """What clusters initialised by earlier versions had: everyone trusted on the socket."""
    path = cluster.data_dir / "pg_hba.conf"
    st = path.stat()
    path.write_text("local all all trust\n")
    os.chown(path, st.st_uid, st.st_gid)


def _refused_within(dsn: str, seconds: float) -> str:
    """Poll until a connection to ``dsn`` is refused (a reload is a signal, not a handshake);
    returns the error message."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            return str(exc)
        assert time.monotonic() < deadline, f"{dsn} still gets in after {seconds} s"
        time.sleep(0.1)


def test_start_locks_down_a_running_cluster_that_trusted_everyone(
    cluster: EmbeddedCluster,
) -> None:
    dsn = _passwordless_role(cluster)
    _write_trusting_hba(cluster)
    assert cluster.reload() is True
    deadline = time.monotonic() + 10
    while True:  # the old, trusting rules are in force: a password-less role gets in
        try:
            psycopg.connect(dsn, connect_timeout=5).close()
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "the trusting pg_hba.conf never applied"
            time.sleep(0.1)
    pid = cluster.status().pid
    assert cluster.start() is False  # running: rewrites the files and reloads, no restart
    assert cluster.status().pid == pid
    assert "no password supplied" in _refused_within(dsn, 10)
    with psycopg.connect(cluster.url("postgres")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def test_start_locks_down_a_stopped_cluster_that_trusted_everyone(
    cluster: EmbeddedCluster,
) -> None:
    dsn = _passwordless_role(cluster)
    cluster.stop()
    _write_trusting_hba(cluster)
    assert cluster.start() is True
    assert "no password supplied" in _refused_within(dsn, 0)
    with psycopg.connect(cluster.url("postgres")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def test_tcp_needs_a_scram_password_for_every_role() -> None:
    home = _new_home()
    port = _free_port()
    c = EmbeddedCluster(home, port, listen_addresses="127.0.0.1", max_connections=20)
    tcp = f"host=127.0.0.1 port={port} dbname=postgres passfile={NO_PASSFILE} connect_timeout=5"
    try:
        c.init()  # initdb's own files, before start() replaces them: nothing password-less
        initdb_rules = _rules((c.data_dir / "pg_hba.conf").read_text())
        assert initdb_rules and all(r[-1] in ("peer", "scram-sha-256") for r in initdb_rules)
        c.start()
        password = uuid.uuid4().hex
        with psycopg.connect(c.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE app LOGIN PASSWORD '{password}'")
        with psycopg.connect(f"{tcp} user=app password={password}") as conn:
            row = conn.execute("SELECT current_user, inet_client_addr() IS NOT NULL").fetchone()
            assert row == ("app", True)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(f"{tcp} user=app password=wrong")
        for role in ("postgres", "themis_bus", "app"):  # no password, no entry
            with pytest.raises(psycopg.OperationalError, match="no password supplied"):
                psycopg.connect(f"{tcp} user={role}")
    finally:
        c.destroy()
        home.parent.rmdir()


def test_url_encodes_socket_dir() -> None:
    c = EmbeddedCluster(Path("/var/lib/my themis"), 5555)
    assert (
        c.url() == "postgresql://postgres@/themis?host=%2Fvar%2Flib%2Fmy%20themis%2Frun&port=5555"
    )
    assert c.url("other db").startswith("postgresql://postgres@/other%20db?")


def test_failed_start_reports_the_server_log() -> None:
    home = _new_home()
    c = EmbeddedCluster(home, _free_port(), max_connections=-5)  # the server rejects this
    try:
        with pytest.raises(ClusterError) as info:
            c.start()
        assert "max_connections" in str(info.value)
        assert not c.status().running
    finally:
        c.destroy()
        home.parent.rmdir()


def test_non_empty_foreign_data_dir_is_refused() -> None:
    home = _new_home()
    (home / "data").mkdir(parents=True)
    (home / "data" / "stray").write_text("x")
    if os.geteuid() == 0:  # data must belong to the server's OS user, as init() would leave it
        owner = "postgres" if _user_exists("postgres") else "themis"
        for p in (home, home / "data"):
            shutil.chown(p, owner, owner)
    c = EmbeddedCluster(home, _free_port())
    try:
        with pytest.raises(ClusterError, match="holds no PostgreSQL cluster"):
            c.init()
    finally:
        c.destroy()
        home.parent.rmdir()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the cluster to another user")
def test_untraversable_home_is_refused_clearly() -> None:
    private = Path(tempfile.mkdtemp(prefix="themis-private-"))  # mode 0700, owned by root
    c = EmbeddedCluster(private / "home", _free_port())
    try:
        with pytest.raises(ClusterError, match="cannot enter"):
            c.init()
        assert not (private / "home").exists()
    finally:
        shutil.rmtree(private)


def test_bin_dir_has_server_tools() -> None:
    bin_dir = find_bin_dir()
    assert (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file()
