"""Private, throw-away PostgreSQL and NATS servers for tests that must kill or restart one."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, Literal, Self

__all__ = [
    "MissingBinaryError",
    "PrivateNats",
    "PrivatePostgres",
    "ServerError",
    "StopMode",
    "find_nats_server",
    "find_postgres_bindir",
    "free_port",
    "stop_processes",
    "wait_until",
]

START_TIMEOUT = 30.0
"""Seconds a server gets to answer after being started (crash recovery included)."""
STOP_TIMEOUT = 30.0
"""Seconds a server gets to exit after being asked to."""
POLL_INTERVAL = 0.05
"""Seconds between two checks of a condition being waited for."""

StopMode = Literal["smart", "fast", "immediate"]
_STOP_SIGNALS: dict[StopMode, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}


class ServerError(RuntimeError):
    """A private server could not be started or stopped."""


class MissingBinaryError(ServerError):
    """The programs a private server needs are not installed on this machine."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = POLL_INTERVAL,
) -> None:
    """Poll ``condition`` every ``interval`` s until it holds; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (-1,)


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_postgres_bindir() -> Path:
    """Find the directory holding ``initdb`` and ``postgres``: pg_config, /usr/lib, then PATH."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False, timeout=10
        )
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))
    candidates.extend(
        sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda path: _version_key(path.parent.name),
            reverse=True,
        )
    )
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if _is_executable(bindir / "initdb") and _is_executable(bindir / "postgres"):
            return bindir
    raise MissingBinaryError(
        "PostgreSQL server programs (initdb, postgres) not found; "
        "install PostgreSQL 15: sudo apt-get install postgresql"
    )


def _find_pg_isready(bindir: Path) -> Path:
    if _is_executable(bindir / "pg_isready"):
        return bindir / "pg_isready"
    found = shutil.which("pg_isready")
    if found is None:
        raise MissingBinaryError("pg_isready not found; install: sudo apt-get install postgresql")
    return Path(found)


def find_nats_server() -> Path:
    """Find the ``nats-server`` program: PATH, then the usual install locations."""
    found = shutil.which("nats-server")
    candidates = [Path(found)] if found is not None else []
    candidates += [Path("/usr/sbin/nats-server"), Path("/usr/local/bin/nats-server")]
    for candidate in candidates:
        if _is_executable(candidate):
            return candidate
    raise MissingBinaryError("nats-server not found; install: sudo apt-get install nats-server")


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _stop_process(process: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> None:
    """Send ``sig`` and reap the process; SIGKILL it if it outlives ``timeout``."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
        raise ServerError(
            f"pid {process.pid} did not exit within {timeout:g} s of {sig.name}; killed it"
        ) from None


# Linux process table: children of a process, and whether they are gone.
_Proc = tuple[int, str]  # (pid, start time) so that a recycled pid is not mistaken for ours


def _proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    return raw[raw.rindex(")") + 2 :].split()


def _children(pid: int) -> list[_Proc]:
    children: list[_Proc] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return children
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields is not None and len(fields) > 19 and fields[1] == str(pid):
            children.append((int(entry.name), fields[19]))
    return children


def _is_gone(proc: _Proc) -> bool:
    fields = _proc_stat(proc[0])
    # a zombie is gone for our purposes: nobody may reap orphans in a container
    return fields is None or fields[0] in ("Z", "X") or fields[19] != proc[1]


def _postgres_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError(
            "running as root, which initdb refuses, and there is no 'postgres' user to run "
            "the server as: create one (useradd --system postgres) or run as a normal user"
        ) from None


class _PrivateServer(ABC):
    """One server process of its own on a free port of 127.0.0.1, with a throw-away work dir.

    Subclasses say how to prepare the work dir, the command line, and when the server answers;
    this class starts, stops, kills and cleans up. Use as a context manager: entering starts
    it, leaving stops it and deletes its work dir. The log stays in ``base_dir``.
    """

    _name: ClassVar[str]
    """Prefix of the log file and work dir names."""
    _program: ClassVar[str]
    """The server program, as named in error messages."""
    _awaited: ClassVar[str]
    """What :meth:`start` waits for, as named in its timeout message."""

    def __init__(self, base_dir: Path) -> None:
        self._base_dir = Path(base_dir)
        self._account: pwd.struct_passwd | None = None  # user to run the server as; None: us
        self._work_dir: Path | None = None
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- addresses ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port it listens on (fixed for its lifetime, restarts included)."""
        if self._port is None:
            raise ServerError("the server was never started")
        return self._port

    @property
    @abstractmethod
    def url(self) -> str:
        """The URL clients connect to."""

    @property
    def log_path(self) -> Path:
        """The server's log file (inside ``base_dir``; kept after cleanup)."""
        return self._base_dir / f"{self._name}-{self.port}.log"

    @property
    def is_running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        """The server process id."""
        if self._process is None:
            raise ServerError("the server is not running")
        return self._process.pid

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start it (same port and data as before, if it ran already); wait until it answers."""
        if self.is_running:
            raise ServerError("the server is already running")
        if self._work_dir is None:
            self._base_dir.mkdir(parents=True, exist_ok=True)
            self._work_dir = self._make_work_dir()
            self._port = free_port()
            self._initialise()
        self._launch()

    def stop(self) -> None:
        """SIGTERM it and wait for it to exit."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Crash it: SIGKILL, and reap the process."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Start it again on the same port with the same data (after :meth:`kill`: recovery)."""
        if self.is_running:
            self.stop()
        self.start()

    def close(self) -> None:
        """Stop it (killing it if it won't stop) and delete its work dir."""
        try:
            if self.is_running:
                try:
                    self.stop()
                except ServerError:
                    if self.is_running:
                        self.kill()
        finally:
            self._close_log()
            self._process = None
            if self._work_dir is not None:
                shutil.rmtree(self._work_dir, ignore_errors=True)
                self._work_dir = None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- what differs -----------------------------------------------------------------------

    @abstractmethod
    def _command(self) -> list[str]:
        """The command line that runs the server in the foreground."""

    @abstractmethod
    def _answers(self) -> bool:
        """Whether the (running) server answers clients yet."""

    @abstractmethod
    def _initialise(self) -> None:
        """Prepare the fresh work dir, before the first start."""

    def _make_work_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{self._name}-", dir=self._base_dir))

    # -- internals ------------------------------------------------------------------------

    def _in_work_dir(self, name: str) -> Path:
        if self._work_dir is None:
            raise ServerError("the server was never started")
        return self._work_dir / name

    def _run_as(self) -> tuple[int | None, int | None, list[int] | None]:
        if self._account is None:
            return None, None, None
        return self._account.pw_uid, self._account.pw_gid, []

    def _launch(self) -> None:
        assert self._work_dir is not None
        user, group, extra_groups = self._run_as()
        self._log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                self._command(),
                cwd=self._work_dir,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=user,
                group=group,
                extra_groups=extra_groups,
            )
        except BaseException:
            self._close_log()
            raise
        try:
            wait_until(self._ready, timeout=START_TIMEOUT, what=self._awaited)
        except TimeoutError as exc:
            self.kill()
            raise ServerError(f"{exc}; log:\n{_log_tail(self.log_path)}") from exc

    def _ready(self) -> bool:
        process = self._process
        assert process is not None
        if process.poll() is not None:
            code = process.returncode
            self._close_log()
            self._process = None
            tail = _log_tail(self.log_path)
            raise ServerError(f"{self._program} exited with status {code} during startup:\n{tail}")
        return self._answers()

    def _end(self, sig: signal.Signals) -> None:
        """Send ``sig``, reap the process, wait for its orphaned children, close the log."""
        process = self._process
        children = [] if process is None else _children(process.pid)
        try:
            if process is not None:
                _stop_process(process, sig, STOP_TIMEOUT)
        finally:
            self._reaped(children)

    def _reaped(self, children: list[_Proc]) -> None:
        """After the server exited: wait for its children, close the log."""
        try:
            try:
                wait_until(
                    lambda: all(_is_gone(child) for child in children),
                    timeout=10,
                    what="the server's children to exit",
                )
            except TimeoutError:
                for child in children:
                    if not _is_gone(child):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(child[0], signal.SIGKILL)
                wait_until(
                    lambda: all(_is_gone(child) for child in children),
                    timeout=5,
                    what="the server's children to die",
                )
        finally:
            self._close_log()
            self._process = None

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class PrivatePostgres(_PrivateServer):
    """A PostgreSQL server of its own: fresh cluster, free port on 127.0.0.1, trust auth.

    Use as a context manager: entering starts it, leaving stops it and deletes its data. The
    log stays in ``base_dir``. When running as root the server runs as the ``postgres`` user,
    with its data in a directory made with :mod:`tempfile` (``base_dir`` may not be reachable
    by that user). Durability settings are PostgreSQL's defaults (fsync on): tests kill it.
    """

    _name = "postgres"
    _program = "postgres"
    _awaited = "postgres to accept"

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir)
        self._bindir = find_postgres_bindir()
        self._pg_isready = _find_pg_isready(self._bindir)
        self._account = _postgres_account() if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        """Connection URL of the ``postgres`` database, as the ``postgres`` superuser."""
        return self.dsn_for("postgres")

    def dsn_for(self, dbname: str) -> str:
        """Connection URL of database ``dbname``, as the ``postgres`` superuser."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self._in_work_dir("data")

    @property
    def pid(self) -> int:
        """The postmaster's pid, as written in ``postmaster.pid``."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return super().pid

    def stop(self, mode: StopMode = "fast") -> None:
        """Shut down like ``pg_ctl stop -m MODE`` and wait for the postmaster to exit."""
        self._end(_STOP_SIGNALS[mode])

    def kill(self) -> None:
        """Crash it: SIGKILL the postmaster, then wait until its orphaned children have exited.

        The children (backends, checkpointer, ...) exit on their own when they notice the
        postmaster is gone; until they have, a new postmaster would refuse the data directory.
        """
        process = self._process
        if process is None or process.poll() is not None:
            raise ServerError("the server is not running")
        pid = self.pid
        if pid != process.pid:
            raise ServerError(f"postmaster.pid says {pid}, but the postmaster is {process.pid}")
        super().kill()

    def _command(self) -> list[str]:
        return [str(self._bindir / "postgres"), "-D", str(self.data_dir)]

    def _answers(self) -> bool:
        command = [str(self._pg_isready), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        command += ["-U", "postgres", "-d", "postgres", "-t", "1"]
        return subprocess.run(command, check=False, timeout=10).returncode == 0

    def _make_work_dir(self) -> Path:
        # Unix socket paths are limited to ~107 bytes, and when root the server's user must be
        # able to reach the directory: then use a fresh directory in the system temp dir.
        parent = self._base_dir
        if self._account is not None or len(str(parent.resolve())) > 60:
            parent = Path(tempfile.gettempdir())
        work_dir = Path(tempfile.mkdtemp(prefix="ledgerflow-pg-", dir=parent))
        if self._account is not None:
            os.chown(work_dir, self._account.pw_uid, self._account.pw_gid)
        return work_dir

    def _initialise(self) -> None:
        """Run initdb, and append this server's settings to ``postgresql.conf``."""
        assert self._work_dir is not None
        user, group, extra_groups = self._run_as()
        command = [
            str(self._bindir / "initdb"),
            *("-D", str(self.data_dir), "-U", "postgres", "-E", "UTF8", "--no-locale"),
            *("--auth-local=trust", "--auth-host=trust"),
        ]
        result = subprocess.run(
            command,
            cwd=self._work_dir,
            capture_output=True,
            check=False,
            timeout=120,
            user=user,
            group=group,
            extra_groups=extra_groups,
        )
        with self.log_path.open("ab") as log:
            log.write(result.stdout + result.stderr)
        if result.returncode != 0:
            raise ServerError(f"initdb failed ({result.returncode}):\n{_log_tail(self.log_path)}")
        socket_dir = str(self._work_dir).replace("'", "''")
        settings = (
            "\n# tests.support.servers.PrivatePostgres\n"
            "listen_addresses = '127.0.0.1'\n"
            f"port = {self.port}\n"
            f"unix_socket_directories = '{socket_dir}'\n"
            "shared_buffers = '16MB'\n"
            "max_connections = 50\n"
            "fsync = on\n"
            "synchronous_commit = on\n"
            "full_page_writes = on\n"
        )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(settings)


class PrivateNats(_PrivateServer):
    """A nats-server of its own with JetStream: free port on 127.0.0.1, store in ``base_dir``.

    Use as a context manager: entering starts it, leaving stops it and deletes its store. The
    log stays in ``base_dir``.
    """

    _name = "nats"
    _program = "nats-server"
    _awaited = "nats-server to answer"

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir)
        self._binary = find_nats_server()

    @property
    def url(self) -> str:
        """Its ``nats://`` URL."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def store_dir(self) -> Path:
        """JetStream's storage directory (``-sd``)."""
        return self._in_work_dir("jetstream")

    def _initialise(self) -> None:
        """Nothing to do: nats-server creates its store when it first starts."""

    def _command(self) -> list[str]:
        command = [str(self._binary), "-js", "-a", "127.0.0.1", "-p", str(self.port)]
        return [*command, "-sd", str(self.store_dir)]

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                return conn.recv(4096).startswith(b"INFO ")
        except OSError:
            return False


def stop_processes(processes: Iterable[subprocess.Popen[Any]], grace: float = 10.0) -> None:
    """SIGTERM every process still running, wait up to ``grace`` s each, then SIGKILL."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
