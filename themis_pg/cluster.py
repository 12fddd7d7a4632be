"""The embedded PostgreSQL cluster the ``themis`` CLI manages under ``Settings.home``.

Layout of the state directory::

    <home>/data                 PGDATA (initdb'd once, never touched by Debian's pg_ctlcluster)
    <home>/run                  unix socket directory (the only listener unless listen_addresses)
    <home>/log/postgresql.log   server log (pg_ctl -l)
    <home>/pylib/themis_pl/     the server-side package, refreshed on every start()

The server's embedded Python (Debian's /usr/bin/python3 plus apt's python3-psycopg) finds
``themis_pl`` because the postmaster is started with ``PYTHONPATH=<home>/pylib``.

PostgreSQL refuses to run as root, so when this process is root every server command runs as an
unprivileged OS user (``postgres`` if it exists, else a system user ``themis`` created on
demand) and the state directories belong to that user.  Otherwise everything runs as the
current user.  Every method is idempotent: ``init()`` on an initialised cluster, ``start()`` on
a running one and ``stop()`` on a stopped one do nothing.

Who may connect (``pg_hba.conf`` and ``pg_ident.conf``, rewritten by every ``start()``, see
``auth_files``): over the unix socket, peer authentication with the ident map ``themis`` lets
the OS user running themis (the CLI, the worker, the tests; ``root`` in CI) in as the superuser
``postgres``, and the server's own OS user in as ``themis_bus`` (the SQL functions connect back
through the socket for their bus connection).  Every other role, and every connection over TCP
(only when ``listen_addresses`` is set), needs its scram-sha-256 password.  No other OS user
gets in as ``postgres`` or ``themis_bus``.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import psycopg
from psycopg import sql

from themis_pg.errors import ThemisError
from themis_pg.resources import pl_package_dir

if TYPE_CHECKING:
    from themis_pg.config import Settings

log = logging.getLogger(__name__)

#: OS users that may run the server when we are root, in order; the last is created if needed.
SERVER_OS_USERS = ("postgres", "themis")
#: Database superuser that initdb creates; reached over the socket by peer authentication.
SUPERUSER = "postgres"
#: The role of the SQL functions' autonomous (bus) connection (sql/schema_0001.sql).
BUS_ROLE = "themis_bus"
#: The pg_ident.conf map that peer authentication uses for SUPERUSER and BUS_ROLE.
IDENT_MAP = "themis"
#: Authentication files in PGDATA, rewritten by every start() (see auth_files).
HBA_FILE = "pg_hba.conf"
IDENT_FILE = "pg_ident.conf"
#: Included from postgresql.conf and rewritten by every start(); ALTER SYSTEM still wins.
CONF_FILE = "themis.conf"
PL_PACKAGE = "themis_pl"
_SETUP_HINT = "Run `bash setup.sh deps` (as root) to install PostgreSQL 15, PL/Python and pgvector."
_PG_CTL_TIMEOUT_S = 60


class ClusterError(ThemisError):
    """The embedded cluster could not be found, initialised, started or stopped."""

    sqlstate = "58000"  # system_error


@dataclass(frozen=True)
class ClusterStatus:
    """A snapshot of the cluster; ``pid`` is the postmaster's, None when it is not running."""

    initialized: bool
    running: bool
    pid: int | None
    port: int
    socket_dir: Path
    data_dir: Path
    url: str


@dataclass(frozen=True)
class _OsUser:
    """Who runs initdb/pg_ctl (None fields = the current process user)."""

    name: str
    uid: int
    gid: int
    home: str


def _current_os_user_name() -> str:
    """The OS user name peer authentication sees for this process (its effective uid)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError as exc:
        raise ClusterError(
            f"uid {os.geteuid()} has no entry in the user database; peer authentication "
            "(and initdb) need one"
        ) from exc


def find_bin_dir() -> Path:
    """PostgreSQL's server bin directory: ``pg_config --bindir``, else the newest
    ``/usr/lib/postgresql/<major>/bin``.  Raises ClusterError naming setup.sh when none has
    ``initdb`` and ``pg_ctl``."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("pg_config --bindir failed: %s", exc)
    debian_root = Path("/usr/lib/postgresql")
    if debian_root.is_dir():
        majors = sorted(
            (p for p in debian_root.iterdir() if re.fullmatch(r"\d+", p.name)),
            key=lambda p: int(p.name),
            reverse=True,
        )
        candidates.extend(p / "bin" for p in majors)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise ClusterError("PostgreSQL server binaries (initdb, pg_ctl) not found", hint=_SETUP_HINT)


def _auth_token(name: str) -> str:
    """An OS user name as a pg_hba/pg_ident token: bare when plain, else double-quoted."""
    if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        return name
    if any(c in name for c in '"\r\n\0') or name.startswith("/"):
        raise ClusterError(f"OS user name {name!r} cannot be written to {IDENT_FILE}")
    return f'"{name}"'


def auth_files(caller_os_user: str, server_os_user: str) -> dict[str, str]:
    """The text of ``pg_hba.conf`` and ``pg_ident.conf`` (keyed by file name) for a cluster
    whose clients (CLI, worker, tests) run as ``caller_os_user`` and whose server runs as
    ``server_os_user`` (the same user unless themis runs as root).

    PostgreSQL 15's pg_ident.conf cannot wildcard the database-user column, so the map names
    exactly the two password-less roles; every other role logs in with its password."""
    caller, server = _auth_token(caller_os_user), _auth_token(server_os_user)
    header = (
        "# Written by themis on every start of the embedded cluster "
        "(themis_pg/cluster.py); edits are lost.\n"
    )
    hba = f"""{header}\
# The first line whose type, database and user match decides; a failed authentication does
# not fall through to later lines.
# TYPE  DATABASE  USER        ADDRESS  METHOD

# The superuser, over the unix socket, only for the OS user(s) that map {IDENT_MAP} gives it
# ({caller}: the CLI, the worker and the tests connect this way, without a password).
local   all       {SUPERUSER}             peer map={IDENT_MAP}
# The SQL functions' bus connection: opened by server backends (OS user {server}) through the
# socket, without a password; map {IDENT_MAP} gives {BUS_ROLE} to that OS user only.
local   all       {BUS_ROLE}           peer map={IDENT_MAP}
# Every other role (applications, test roles), over the socket: its scram password.
local   all       all                  scram-sha-256
# TCP (only where listen_addresses enables it): a scram password for every role; {SUPERUSER}
# and {BUS_ROLE} have none, so they cannot log in this way unless someone gives them one.
host    all       all         all      scram-sha-256
# No replication line: "all" does not match replication connections, so none are accepted.
"""
    ident = header + "# MAPNAME  SYSTEM-USERNAME  PG-USERNAME\n\n"
    if caller == server:
        ident += f"""\
# {caller} runs both themis (CLI, worker, tests) and the server: the superuser for the
# former, the bus role for the SQL functions' connection back through the socket.
{IDENT_MAP}     {caller}  {SUPERUSER}
{IDENT_MAP}     {caller}  {BUS_ROLE}
"""
    else:
        ident += f"""\
# {caller} runs themis (CLI, worker, tests): the superuser.
{IDENT_MAP}     {caller}  {SUPERUSER}
# {server} runs the server: its backends open the SQL functions' bus connection as
# {BUS_ROLE}.  Not {SUPERUSER}: whatever can run code as this OS user inside the server
# (COPY ... TO PROGRAM for pg_execute_server_program members) must not become superuser.
{IDENT_MAP}     {server}  {BUS_ROLE}
"""
    return {HBA_FILE: hba, IDENT_FILE: ident}


def _conf_literal(value: str | int) -> str:
    """A postgresql.conf value: integers bare, strings single-quoted with quotes doubled."""
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class EmbeddedCluster:
    """A local PostgreSQL cluster under ``home`` (see the module docstring for the layout).

    ``port`` names the unix socket (``.s.PGSQL.<port>``) and, when ``listen_addresses`` is not
    empty, the TCP port.  Over the socket the current OS user gets in as the superuser by peer
    authentication (see ``auth_files``); other roles and TCP connections need a scram-sha-256
    password, which the superuser does not have until someone sets one.
    """

    def __init__(
        self,
        home: Path,
        port: int,
        *,
        listen_addresses: str = "",
        max_connections: int = 300,
        bin_dir: Path | None = None,
    ) -> None:
        self.home = Path(home).absolute()
        self.port = port
        self.listen_addresses = listen_addresses
        self.max_connections = max_connections
        self._bin_dir = bin_dir

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddedCluster:
        """The cluster described by THEMIS_HOME, THEMIS_PORT, THEMIS_LISTEN_ADDRESSES and
        THEMIS_MAX_CONNECTIONS."""
        return cls(
            settings.home,
            settings.port,
            listen_addresses=settings.listen_addresses,
            max_connections=settings.max_connections,
        )

    # -- layout ---------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def socket_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "postgresql.log"

    @property
    def pylib_dir(self) -> Path:
        return self.home / "pylib"

    @property
    def bin_dir(self) -> Path:
        """Resolved lazily so that constructing a cluster (e.g. for ``url()``) never fails."""
        if self._bin_dir is None:
            self._bin_dir = find_bin_dir()
        return self._bin_dir

    # -- public API -----------------------------------------------------------------------

    def url(self, dbname: str = "themis") -> str:
        """libpq URL reaching ``dbname`` as the superuser through this cluster's unix socket."""
        return (
            f"postgresql://{SUPERUSER}@/{quote(dbname, safe='')}"
            f"?host={quote(str(self.socket_dir), safe='')}&port={self.port}"
        )

    def is_initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def status(self) -> ClusterStatus:
        """Reads postmaster.pid; a pid file whose process is gone counts as stopped."""
        pid = self._postmaster_pid()
        return ClusterStatus(
            initialized=self.is_initialized(),
            running=pid is not None,
            pid=pid,
            port=self.port,
            socket_dir=self.socket_dir,
            data_dir=self.data_dir,
            url=self.url(),
        )

    def init(self) -> bool:
        """Create the state directories and run initdb unless PGDATA already holds a cluster.
        Returns True when initdb ran."""
        user = self._os_user()
        self._prepare_dirs(user)
        if self.is_initialized():
            log.debug("cluster at %s already initialised", self.data_dir)
            return False
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise ClusterError(
                f"{self.data_dir} is not empty but holds no PostgreSQL cluster (no PG_VERSION)",
                hint="Move it away or point THEMIS_HOME at another directory.",
            )
        log.info("initialising PostgreSQL cluster in %s", self.data_dir)
        self._run(
            [
                str(self.bin_dir / "initdb"),
                "--pgdata", str(self.data_dir),
                "--username", SUPERUSER,
                "--encoding", "UTF8",
                "--locale", "C.UTF-8",
                # Nothing password-less from the first moment; start() replaces these files
                # with the managed ones (auth_files) before the server first runs anyway.
                "--auth-local", "peer",
                "--auth-host", "scram-sha-256",
            ],
            user,
            what="initdb",
        )  # fmt: skip
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(f"\n# Managed by themis\ninclude_if_exists = '{CONF_FILE}'\n")
        return True

    def start(self, wait: bool = True) -> bool:
        """Initialise if needed, refresh ``themis_pl`` and the authentication files, and start
        the server unless it runs (a running one reloads if the authentication files changed).

        Returns True when this call started it.  With ``wait`` the call returns once the server
        accepts connections; a failed start raises ClusterError with the server log's tail.
        """
        self.init()
        self.install_pl_package()
        user = self._os_user()
        # On every start, running or not: a cluster initialised by an older themis (trust on
        # the socket) is locked down by its next `themis db up`, without a restart.
        auth_changed = self._write_auth_files(user)
        pid = self._postmaster_pid()
        if pid is not None:
            log.debug("cluster at %s already running (pid %s)", self.data_dir, pid)
            if auth_changed:
                self.reload()
            return False
        self._write_conf(user)
        log.info(
            "starting PostgreSQL (%s, port %s, log %s)", self.data_dir, self.port, self.log_file
        )
        try:
            self._run(
                [
                    str(self.bin_dir / "pg_ctl"), "start",
                    "-D", str(self.data_dir),
                    "-l", str(self.log_file),
                    "-t", str(_PG_CTL_TIMEOUT_S),
                    "-w" if wait else "-W",
                ],
                user,
                what="pg_ctl start",
                env=self._server_env(user),
            )  # fmt: skip
        except ClusterError as exc:
            raise ClusterError(
                f"{exc.message}\n--- last lines of {self.log_file} ---\n{self.log_tail()}",
                hint=exc.hint,
            ) from exc
        return True

    def reload(self) -> bool:
        """Make the running server re-read its configuration files (pg_ctl reload, SIGHUP:
        pg_hba.conf and pg_ident.conf apply to the next connection).  False if not running."""
        if self._postmaster_pid() is None:
            return False
        log.info("reloading the configuration of PostgreSQL at %s", self.data_dir)
        self._run(
            [str(self.bin_dir / "pg_ctl"), "reload", "-D", str(self.data_dir), "-s"],
            self._os_user(),
            what="pg_ctl reload",
        )
        return True

    def stop(self, mode: str = "fast") -> bool:
        """Stop the server (``mode``: smart, fast or immediate) and wait until it is gone.
        Returns True when this call stopped it."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"stop mode must be smart, fast or immediate, not {mode!r}")
        if self._postmaster_pid() is None:
            return False
        log.info("stopping PostgreSQL at %s (%s)", self.data_dir, mode)
        self._run(
            [
                str(self.bin_dir / "pg_ctl"), "stop",
                "-D", str(self.data_dir),
                "-m", mode,
                "-t", str(_PG_CTL_TIMEOUT_S),
                "-w",
            ],
            self._os_user(),
            what="pg_ctl stop",
        )  # fmt: skip
        return True

    def ensure_database(self, name: str) -> bool:
        """Create database ``name`` (owned by the superuser) unless it exists; True if created.
        The cluster must be running."""
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                return False
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except psycopg.errors.DuplicateDatabase:
                return False  # created concurrently: the contract (it exists) holds
        log.info("created database %s", name)
        return True

    def install_pl_package(self) -> Path:
        """Copy ``themis_pg/pl`` to ``<home>/pylib/themis_pl`` for the server's Python.

        The new copy is built beside the old one and renamed into place, so a backend that
        imports ``themis_pl`` meanwhile sees either the old or the new package, never a half.
        Backends that already imported it keep their copy until they end.
        """
        source = pl_package_dir()
        if not source.is_dir():
            raise ClusterError(f"server-side package {source} not found (broken installation?)")
        user = self._os_user()
        self._make_dir(self.pylib_dir, 0o755, user)
        target = self.pylib_dir / PL_PACKAGE
        staging = self.pylib_dir / f".{PL_PACKAGE}.new-{os.getpid()}"
        retired = self.pylib_dir / f".{PL_PACKAGE}.old-{os.getpid()}"
        for leftover in (staging, retired):
            shutil.rmtree(leftover, ignore_errors=True)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))
        for path in (staging, *staging.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
            if user is not None:
                os.chown(path, user.uid, user.gid)
        if target.exists():
            target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
        log.debug("installed %s into %s", source, target)
        return target

    def destroy(self) -> None:
        """Stop the server (immediately if a fast stop fails) and delete ``home``; for tests."""
        try:
            self.stop("fast")
        except ClusterError:
            log.warning("fast stop failed, stopping %s immediately", self.data_dir)
            self.stop("immediate")
        shutil.rmtree(self.home, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log ('' when there is none yet)."""
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- internals ------------------------------------------------------------------------

    def _postmaster_pid(self) -> int | None:
        """The live postmaster's pid from postmaster.pid, or None."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first.strip())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ClusterError(f"cannot read {self.data_dir / 'postmaster.pid'}: {exc}") from exc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # stale pid file left by a crash; pg_ctl start copes with it
        except PermissionError:
            pass  # alive, owned by another user
        return pid

    def _os_user(self) -> _OsUser | None:
        """The unprivileged user that runs the server when we are root; None otherwise."""
        if os.geteuid() != 0:
            return None
        for name in SERVER_OS_USERS:
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
        name = SERVER_OS_USERS[-1]
        log.info("creating system user %s to run PostgreSQL (it refuses to run as root)", name)
        args = ["useradd", "--system", "--user-group", "--no-create-home",
                "--home-dir", str(self.home), "--shell", "/usr/sbin/nologin", name]  # fmt: skip
        try:
            subprocess.run(args, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            raise ClusterError(f"cannot create OS user {name}: {exc.stderr.strip()}") from exc
        except OSError as exc:
            raise ClusterError(f"cannot create OS user {name}: {exc}") from exc
        entry = pwd.getpwnam(name)
        return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def _make_dir(self, path: Path, mode: int, user: _OsUser | None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
        if user is not None:
            os.chown(path, user.uid, user.gid)

    def _prepare_dirs(self, user: _OsUser | None) -> None:
        """Create home and its subdirectories, owned by the server's OS user."""
        if user is not None:
            self._check_traversable(user)
        self._make_dir(self.home, 0o755, user)
        # 0755: the socket is no door of its own, pg_hba.conf decides who gets in (peer for
        # postgres and themis_bus, a scram password for every other role).  Other local users
        # with a role and its password may then connect over the socket; 0700 would only
        # force them onto TCP, which is off by default.
        self._make_dir(self.socket_dir, 0o755, user)
        self._make_dir(self.log_dir, 0o750, user)
        self._make_dir(self.pylib_dir, 0o755, user)
        if not self.data_dir.exists():
            self._make_dir(self.data_dir, 0o700, user)
        elif user is not None and self.data_dir.stat().st_uid != user.uid:
            raise ClusterError(
                f"{self.data_dir} belongs to uid {self.data_dir.stat().st_uid}, "
                f"not to {user.name} who runs the server"
            )

    def _check_traversable(self, user: _OsUser) -> None:
        """Fail early (not with a cryptic initdb error) when ``user`` cannot reach home."""
        for parent in self.home.parents:
            if not parent.exists():
                continue  # created by us with mode 0755
            st = parent.stat()
            if st.st_uid == user.uid:
                ok = bool(st.st_mode & stat.S_IXUSR)
            elif st.st_gid == user.gid:
                ok = bool(st.st_mode & stat.S_IXGRP)
            else:
                ok = bool(st.st_mode & stat.S_IXOTH)
            if not ok:
                raise ClusterError(
                    f"OS user {user.name}, who runs PostgreSQL, cannot enter {parent} "
                    f"(mode {stat.filemode(st.st_mode)}), a parent of THEMIS_HOME={self.home}",
                    hint="Choose a THEMIS_HOME under a directory others can traverse, "
                    "e.g. /var/lib/themis.",
                )

    def _write_conf(self, user: _OsUser | None) -> None:
        """Rewrite the included conf file so THEMIS_* changes apply at the next start."""
        settings: Sequence[tuple[str, str | int]] = (
            ("port", self.port),
            ("unix_socket_directories", str(self.socket_dir)),
            ("listen_addresses", self.listen_addresses),
            ("max_connections", self.max_connections),
            # A PL/Python call whose client went away is noticed only through this check
            # (it must be in force before the statement starts; see DESIGN.md section 2).
            ("client_connection_check_interval", "1s"),
            ("shared_buffers", "128MB"),
            ("logging_collector", "off"),
        )
        body = "".join(f"{key} = {_conf_literal(value)}\n" for key, value in settings)
        path = self.data_dir / CONF_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text("# Written by themis on every start; use ALTER SYSTEM to override.\n" + body)
        if user is not None:
            os.chown(tmp, user.uid, user.gid)
        tmp.replace(path)

    def _write_auth_files(self, user: _OsUser | None) -> bool:
        """Rewrite pg_hba.conf and pg_ident.conf (``auth_files``) atomically, owned by the
        server's OS user, mode 0600.  Returns True when either file's text changed."""
        caller = _current_os_user_name()
        server = user.name if user is not None else caller
        changed = False
        for name, text in auth_files(caller, server).items():
            path = self.data_dir / name
            try:
                changed |= path.read_text(encoding="utf-8") != text
            except FileNotFoundError:
                changed = True
            tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                os.fchmod(out.fileno(), 0o600)  # whatever the umask
                if user is not None:
                    os.fchown(out.fileno(), user.uid, user.gid)
            tmp.replace(path)
        if changed:
            log.info("wrote %s and %s in %s", HBA_FILE, IDENT_FILE, self.data_dir)
        return changed

    def _server_env(self, user: _OsUser | None) -> dict[str, str]:
        """Environment for initdb/pg_ctl/postgres: no libpq PG* variables or foreign Python
        paths, ``PYTHONPATH`` = pylib (how PL/Python finds themis_pl), a C.UTF-8 locale."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("PG")
            and key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        }
        env["PYTHONPATH"] = str(self.pylib_dir)
        env["LC_ALL"] = "C.UTF-8"
        if user is not None:
            env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
        return env

    def _run(
        self,
        args: list[str],
        user: _OsUser | None,
        *,
        what: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Run a PostgreSQL tool as the server's OS user; raise ClusterError with its output."""
        started = time.monotonic()
        try:
            result = subprocess.run(
                args,
                env=dict(env) if env is not None else self._server_env(user),
                cwd=self.home,  # the OS user may not be allowed into our cwd
                user=user.uid if user else None,
                group=user.gid if user else None,
                extra_groups=[] if user else None,
                capture_output=True,
                text=True,
                timeout=_PG_CTL_TIMEOUT_S + 30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ClusterError(f"{what} could not run: {exc}", hint=_SETUP_HINT) from exc
        log.debug(
            "%s took %.2f s, exit code %s", what, time.monotonic() - started, result.returncode
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise ClusterError(f"{what} failed (exit code {result.returncode}): {output}")
