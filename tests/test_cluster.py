"""The embedded cluster: a real PostgreSQL 15 started by EmbeddedCluster, with pgvector and
PL/Python importing themis_pl and psycopg inside the server."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from themis_pg.cluster import ClusterError, EmbeddedCluster, find_bin_dir


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
