"""Private Redis, Redis Cluster and PostgreSQL servers started from the local binaries.

Used by the test suite and by ``haoyuan demo`` (which starts a private Redis and
PostgreSQL when no URL is configured). Everything binds to 127.0.0.1 only, lives
in a temporary directory owned by the server object, and every wait has a
timeout; a start that fails raises :class:`ServerError` with the tail of the
server's log.

    with RedisServer() as redis, PostgresServer() as pg:
        print(redis.url, pg.dsn)

Standard library only: no client library is needed to drive the servers.
PostgreSQL refuses to run as root, so when this process is root ``initdb``,
``postgres`` and ``pg_ctl`` run as the ``postgres`` OS user (the data directory
is chowned to it).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = [
    "Binaries",
    "PostgresServer",
    "RedisClusterServer",
    "RedisServer",
    "ServerError",
    "ensure_binaries",
    "find_postgres_bindir",
    "free_port",
]

LOCALHOST = "127.0.0.1"
_LOG_TAIL_LINES = 40
_ADDR_IN_USE = ("Address already in use", "could not bind", "could not create any TCP/IP sockets")


class ServerError(RuntimeError):
    """A private server could not be started, stopped or queried."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port that is free on ``host`` right now (bind to port 0 and release).

    There is an unavoidable race between releasing the port and the server binding
    it; the servers here retry on a fresh port when the bind fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    interval: float = 0.02,
    alive: Callable[[], bool] | None = None,
    log: Path | None = None,
) -> None:
    """Poll ``predicate`` until true; raise ServerError on timeout or if ``alive`` turns false."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if alive is not None and not alive():
            raise ServerError(f"{what}: the server process exited\n{_log_hint(log)}")
        if time.monotonic() >= deadline:
            raise ServerError(f"{what}: timed out after {timeout:.1f}s\n{_log_hint(log)}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.25)


def _log_hint(log: Path | None) -> str:
    if log is None:
        return ""
    return f"--- tail of {log} ---\n{_tail(log)}"


def _process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # state is the field after the ")" that ends the command name
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def _children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc scan; empty elsewhere)."""
    found: list[int] = []
    for entry in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(entry, encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.split("/")[2]))
    return found


def _resp_encode(args: Sequence[str | bytes | int]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _RespReader:
    """Just enough of RESP2 to read simple, error, integer, bulk and array replies."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self._buf) < n + 2:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n + 2 :]
        return data

    def read(self) -> object:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return _RedisReplyError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n).decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise ServerError(f"unexpected RESP reply: {line!r}")


class _RedisReplyError(Exception):
    pass


def redis_command(
    port: int, *args: str | bytes | int, host: str = LOCALHOST, timeout: float = 2.0
) -> object:
    """Send one command to a Redis server over a fresh connection and return the reply.

    An error reply raises ServerError. Used for PING, INFO, CLUSTER INFO.
    """
    return _redis_session(port, [args], host=host, timeout=timeout)[0]


def _redis_session(
    port: int,
    commands: Sequence[Sequence[str | bytes | int]],
    *,
    host: str = LOCALHOST,
    timeout: float = 2.0,
    expect_pid: int | None = None,
) -> list[object]:
    """Run ``commands`` one by one on a single fresh connection.

    With ``expect_pid`` the connection first checks (INFO server, process_id) that
    the server answering on ``port`` is that process, and raises ServerError
    otherwise: a server that failed to bind must never lead us to pause or shut
    down whatever else listens on that port.
    """
    replies: list[object] = []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        reader = _RespReader(sock)
        if expect_pid is not None:
            sock.sendall(_resp_encode(["INFO", "server"]))
            info = reader.read()
            if isinstance(info, _RedisReplyError):
                raise ServerError(f"redis INFO on port {port}: {info}")
            actual = _parse_info(str(info)).get("process_id")
            if actual != str(expect_pid):
                raise ServerError(
                    f"port {port} is answered by another redis-server (pid {actual}), "
                    f"not ours (pid {expect_pid})"
                )
        for args in commands:
            sock.sendall(_resp_encode(args))
            reply = reader.read()
            if isinstance(reply, _RedisReplyError):
                raise ServerError(f"redis {args[0]!r} on port {port}: {reply}")
            replies.append(reply)
    return replies


def _parse_info(text: str) -> dict[str, str]:
    info: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    return info


# ---------------------------------------------------------------- binaries


@dataclass(frozen=True)
class Binaries:
    redis_server: str
    redis_cli: str
    postgres_bindir: str


def _version_key(path: str) -> tuple[int, ...]:
    parts = Path(path).parent.name  # /usr/lib/postgresql/<version>/bin
    return tuple(int(p) for p in re.findall(r"\d+", parts)) or (0,)


def find_postgres_bindir() -> str:
    """Directory holding ``postgres``, ``initdb``, ``pg_ctl``: $HAOYUAN_PG_BINDIR,
    the newest /usr/lib/postgresql/*/bin, or the directory of ``postgres`` on PATH."""
    override = os.environ.get("HAOYUAN_PG_BINDIR")
    if override:
        if not os.access(os.path.join(override, "postgres"), os.X_OK):
            raise ServerError(f"HAOYUAN_PG_BINDIR={override!r} holds no executable 'postgres'")
        return override
    candidates = [
        d
        for d in glob.glob("/usr/lib/postgresql/*/bin")
        if os.access(os.path.join(d, "postgres"), os.X_OK)
        and os.access(os.path.join(d, "initdb"), os.X_OK)
    ]
    if candidates:
        return max(candidates, key=lambda d: _version_key(os.path.join(d, "postgres")))
    on_path = shutil.which("postgres")
    if on_path and shutil.which("initdb"):
        return str(Path(on_path).resolve().parent)
    raise ServerError(
        "PostgreSQL server binaries (postgres, initdb, pg_ctl) not found in "
        "/usr/lib/postgresql/*/bin or on PATH; install the Debian package 'postgresql' "
        "(apt-get install postgresql) or set HAOYUAN_PG_BINDIR"
    )


def _find_redis(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServerError(
            f"'{name}' not found on PATH; install the Debian package 'redis-server' "
            "(apt-get install redis-server, which brings redis-tools)"
        )
    return path


def ensure_binaries() -> Binaries:
    """Paths of redis-server, redis-cli and the PostgreSQL bin directory.

    Raises ServerError naming the Debian packages ``redis-server`` and ``postgresql``
    when something is missing.
    """
    missing: list[str] = []
    redis_server = redis_cli = pg_bindir = ""
    try:
        redis_server = _find_redis("redis-server")
        redis_cli = _find_redis("redis-cli")
    except ServerError:
        missing.append("redis-server (provides redis-server and redis-cli)")
    try:
        pg_bindir = find_postgres_bindir()
    except ServerError:
        missing.append("postgresql (provides postgres, initdb, pg_ctl, psql)")
    if missing:
        raise ServerError(
            "missing server binaries; install the Debian package(s): "
            + ", ".join(missing)
            + " — e.g. apt-get install redis-server postgresql"
        )
    return Binaries(redis_server=redis_server, redis_cli=redis_cli, postgres_bindir=pg_bindir)


# ------------------------------------------------------- registry for atexit


_LIVE: weakref.WeakSet[_Managed] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _register(server: _Managed) -> None:
    with _LIVE_LOCK:
        _LIVE.add(server)


def _unregister(server: _Managed) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(server)


@atexit.register
def _kill_leftovers() -> None:  # pragma: no cover - only on abnormal exits
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server._emergency_stop()


class _Managed:
    """Base: a child server process with a log file and a temp dir it may own."""

    _proc: subprocess.Popen[bytes] | None
    _log_fh: IO[bytes] | None

    def __init__(self, dir: str | os.PathLike[str] | None, prefix: str) -> None:
        self._owns_dir = dir is None
        self.dir = Path(tempfile.mkdtemp(prefix=prefix)) if dir is None else Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._proc = None
        self._log_fh = None
        self.log_path = self.dir / "server.log"

    # subclasses
    def _emergency_stop(self) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        """Pid of the server process (the postmaster for PostgreSQL), None if not running."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    def _open_log(self) -> IO[bytes]:
        self._close_log()
        self._log_fh = open(self.log_path, "ab")  # kept open for the child
        return self._log_fh

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _resumed_proc(self) -> subprocess.Popen[bytes] | None:
        """The running child, sent SIGCONT first (a SIGSTOPped server cannot shut
        down); None, with the log closed, when it is not running."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._close_log()
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        return proc

    def _reap(self, timeout: float) -> bool:
        """Wait for the child to exit; True if it did."""
        if self._proc is None:
            return True
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _hard_kill(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a stopped process still dies of SIGKILL
                proc.kill()
            if not self._reap(timeout):
                raise ServerError(f"process {proc.pid} did not exit after SIGKILL")
        self._close_log()

    def cleanup(self) -> None:
        """Stop the process if needed and remove the temp dir (only if this object created it)."""
        with contextlib.suppress(Exception):
            self._emergency_stop()
        self._close_log()
        _unregister(self)
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __del__(self) -> None:
        # last resort: never leave an orphan server behind a garbage-collected object
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                proc.kill()


# ----------------------------------------------------------------- Redis


class _StartCleanupContext:
    """Servers as context managers: started on enter, cleaned up on exit
    (also when starting fails)."""

    def start(self, timeout: float | None = None) -> Self:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class _ManagedContext(_Managed, _StartCleanupContext):
    """A managed child process that is also a context manager."""


class RedisServer(_ManagedContext):
    """A private ``redis-server`` child process on 127.0.0.1.

    ``restart()`` reuses the same port and directory, so the AOF is replayed.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = True,
        appendfsync: str = "always",
        save: str = "",
        extra: Mapping[str, str | int] | None = None,
        dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 20.0,
        redis_server: str | None = None,
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        super().__init__(dir, "haoyuan-redis-")
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.save = save
        self.extra: dict[str, str | int] = dict(extra or {})
        self.start_timeout = start_timeout
        self._binary = redis_server
        self.config_path = self.dir / "redis.conf"

    # ---- properties
    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    # ---- config
    def _config_text(self) -> str:
        def q(value: str | int) -> str:
            s = str(value)
            return '""' if s == "" else (f'"{s}"' if " " in s else s)

        lines = {
            "bind": LOCALHOST,
            "port": str(self.port),
            "daemonize": "no",
            "dir": str(self.dir),
            "logfile": '""',  # stdout, redirected to server.log
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": self.appendfsync,
            "save": q(self.save),
            "dbfilename": "dump.rdb",
            "pidfile": str(self.dir / "redis.pid"),
        }
        for key, value in self.extra.items():
            lines[key] = q(value)
        return "".join(f"{k} {v}\n" for k, v in lines.items())

    # ---- lifecycle
    def start(self, timeout: float | None = None) -> Self:
        """Start the server; return once PING works and the dataset is loaded."""
        if self._alive():
            return self
        timeout = self.start_timeout if timeout is None else timeout
        binary = self._binary or _find_redis("redis-server")
        attempts = 1 if self._fixed_port else 5
        for attempt in range(attempts):
            self.config_path.write_text(self._config_text(), encoding="utf-8")
            log = self._open_log()
            log.write(f"=== haoyuan: starting redis on port {self.port} ===\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [binary, str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
            )
            _register(self)
            try:
                self._wait_ready(timeout)
                return self
            except ServerError:
                exited = not self._alive()
                self._hard_kill()
                if exited and attempt + 1 < attempts and _bind_failed(self.log_path):
                    self.port = free_port()  # lost the race for the port: take another
                    continue
                raise
        raise ServerError("unreachable")  # pragma: no cover

    def _wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                return False
            try:
                pong, info = _redis_session(
                    self.port,
                    [["PING"], ["INFO", "persistence"]],
                    timeout=1.0,
                    expect_pid=proc.pid,
                )
            except (OSError, ServerError):
                return False
            fields = _parse_info(str(info))
            return (
                pong == "PONG"
                and fields.get("loading") == "0"
                and fields.get("async_loading", "0") == "0"
            )

        _wait_until(
            ready,
            timeout,
            f"redis-server on port {self.port}",
            alive=self._alive,
            log=self.log_path,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop: SHUTDOWN NOSAVE (AOF is still flushed), else SIGTERM, else SIGKILL."""
        proc = self._resumed_proc()
        if proc is None:
            return
        try:
            _redis_session(self.port, [["SHUTDOWN", "NOSAVE"]], timeout=2.0, expect_pid=proc.pid)
        except (OSError, ServerError):
            pass  # the connection drops when the server exits; errors are expected
        if not self._reap(timeout / 2):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            if not self._reap(timeout / 2):
                self._hard_kill()
        self._close_log()

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the server (a crash) and wait for it to exit."""
        self._hard_kill(timeout)

    def restart(self, timeout: float | None = None) -> Self:
        """Start again on the same port and dir (stopping gracefully first if running);
        returns once the AOF/RDB is loaded (PING ok and ``loading:0``)."""
        if self._alive():
            self.stop()
        self._fixed_port = True  # clients hold this port: never move on restart
        return self.start(timeout)

    def pause(self, ms: int, mode: str = "ALL") -> None:
        """CLIENT PAUSE ``ms`` milliseconds (mode ALL or WRITE)."""
        self.command("CLIENT", "PAUSE", int(ms), mode)

    def unpause(self) -> None:
        self.command("CLIENT", "UNPAUSE")

    def sigstop(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open, nothing answers."""
        pid = self._require_pid()
        os.kill(pid, signal.SIGSTOP)

    def sigcont(self) -> None:
        pid = self._require_pid()
        os.kill(pid, signal.SIGCONT)

    def command(self, *args: str | bytes | int, timeout: float = 2.0) -> object:
        """Run one command on this server over a fresh connection (checked to reach
        our process, not another server on the same port)."""
        pid = self._require_pid()
        return _redis_session(self.port, [args], timeout=timeout, expect_pid=pid)[0]

    def info(self, section: str = "default") -> dict[str, str]:
        return _parse_info(str(self.command("INFO", section)))

    def _require_pid(self) -> int:
        pid = self.pid
        if pid is None:
            raise ServerError(f"redis-server on port {self.port} is not running")
        return pid

    def _emergency_stop(self) -> None:
        if self._alive():
            try:
                self.stop(timeout=4.0)
            except Exception:
                self._hard_kill()

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} pid={self.pid} dir={self.dir}>"


def _bind_failed(log: Path) -> bool:
    text = _tail(log, 20)
    return any(marker in text for marker in _ADDR_IN_USE)


# --------------------------------------------------------------- Redis Cluster


CLUSTER_SLOTS = 16384


class RedisClusterServer(_StartCleanupContext):
    """A loopback Redis Cluster of ``masters`` primaries and ``replicas``
    replicas per primary, each node a RedisServer in its own temp dir with its
    own ``nodes.conf``. With replicas, killing a primary lets its replica take
    over after ``node_timeout_ms`` (a failover).

    The cluster bus port is chosen explicitly (``cluster-port``) rather than the
    default port+10000, which can overflow 65535 for ephemeral ports.
    """

    def __init__(
        self,
        masters: int = 3,
        *,
        replicas: int = 0,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        node_timeout_ms: int = 5000,
        extra: Mapping[str, str | int] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters = masters
        self.replicas = replicas
        self.start_timeout = start_timeout
        self.nodes: list[RedisServer] = []
        for _ in range(masters * (1 + replicas)):
            config: dict[str, str | int] = {
                "cluster-enabled": "yes",
                "cluster-config-file": "nodes.conf",
                "cluster-node-timeout": node_timeout_ms,
                "cluster-port": free_port(),
                "cluster-require-full-coverage": "yes",
            }
            config.update(extra or {})
            self.nodes.append(
                RedisServer(appendonly=appendonly, appendfsync=appendfsync, extra=config)
            )

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every node; wrap in redis.cluster.ClusterNode for redis-py."""
        return [(LOCALHOST, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """URL of the first node (a cluster client discovers the rest)."""
        return f"redis://{LOCALHOST}:{self.nodes[0].port}/0"

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self, timeout: float | None = None) -> Self:
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.start()
        if not all(self._slots_ok(node) for node in self.nodes):
            self._create(max(1.0, deadline - time.monotonic()))
        self.wait_ok(max(1.0, deadline - time.monotonic()))
        if self.replicas:
            # A replica that never synced is never promoted: wait for every link.
            _wait_until(self._replicas_synced, max(1.0, deadline - time.monotonic()),
                        "redis cluster replicas in sync")
        return self

    def wait_replicas_synced(self, timeout: float = 30.0) -> None:
        """Every live replica's link to its primary is up (a restarted node
        rejoins as a replica and syncs)."""
        _wait_until(self._replicas_synced, timeout, "redis cluster replicas in sync")

    def _replicas_synced(self) -> bool:
        for node in self.alive():
            try:
                info = _parse_info(str(node.command("INFO", "replication", timeout=1.0)))
            except (OSError, ServerError):
                return False
            if info.get("role") == "slave" and (info.get("master_link_status") != "up"
                                                or info.get("master_sync_in_progress") != "0"):
                return False
        return True

    def _create(self, timeout: float) -> None:
        cli = _find_redis("redis-cli")
        cmd = [cli, "--cluster", "create"]
        cmd += [f"{LOCALHOST}:{node.port}" for node in self.nodes]
        cmd += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        try:
            done = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ServerError(f"redis-cli --cluster create timed out after {timeout:.1f}s") from exc
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace")
            raise ServerError(f"redis-cli --cluster create failed ({done.returncode}):\n{out}")

    @staticmethod
    def _slots_ok(node: RedisServer) -> bool:
        try:
            info = _parse_info(str(node.command("CLUSTER", "INFO", timeout=1.0)))
        except (OSError, ServerError):
            return False
        return (
            info.get("cluster_state") == "ok"
            and info.get("cluster_slots_assigned") == str(CLUSTER_SLOTS)
            and info.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
        )

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node reports cluster_state:ok, all slots covered and
        every node knows every other node."""
        expected = str(len(self.nodes))

        def ok() -> bool:
            for node in self.nodes:
                if not self._slots_ok(node):
                    return False
                try:
                    info = _parse_info(str(node.command("CLUSTER", "INFO")))
                except (OSError, ServerError):
                    return False
                if info.get("cluster_known_nodes") != expected:
                    return False
            return True

        try:
            _wait_until(ok, timeout, "redis cluster state ok")
        except ServerError as exc:
            tails = "\n".join(f"--- node {n.port} ---\n{n.log_tail(10)}" for n in self.nodes)
            raise ServerError(f"{exc}\n{tails}") from None

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()

    def alive(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.running]

    def role(self, node: RedisServer) -> str:
        """``master`` or ``slave`` as the node says (``""`` if it does not answer)."""
        try:
            return _parse_info(str(node.command("INFO", "replication", timeout=1.0))).get(
                "role", "")
        except (OSError, ServerError):
            return ""

    def primary_of(self, key: str) -> RedisServer:
        """The live primary that owns ``key``'s hash slot."""
        slot = int(str(self.alive()[0].command("CLUSTER", "KEYSLOT", key)))
        for node in self.alive():
            if self.role(node) != "master":
                continue
            for line in str(node.command("CLUSTER", "NODES")).splitlines():
                f = line.split()
                if "myself" in f[2] and "master" in f[2]:
                    for r in f[8:]:
                        lo, _, hi = r.partition("-")
                        if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                            return node
        raise ServerError(f"no live primary owns slot {slot}")

    def node_id(self, node: RedisServer) -> str:
        return str(node.command("CLUSTER", "MYID"))

    def migrate_slot(self, slot: int, to: RedisServer, *, batch: int = 10,
                     pause_s: float = 0.0) -> int:
        """Move one hash slot to the primary ``to`` as ``redis-cli --cluster
        reshard`` does: IMPORTING / MIGRATING, MIGRATE ``batch`` keys at a
        time (``pause_s`` after each widens the window in which the slot's
        keys are split between the two), then the slot's new owner on every
        primary. Returns the number of keys moved."""
        src = None
        for node in self.alive():
            if self.role(node) == "master" and node is not to:
                owned: list[int] = []
                for line in str(node.command("CLUSTER", "NODES")).splitlines():
                    f = line.split()
                    if "myself" in f[2]:
                        for r in f[8:]:
                            lo, _, hi = r.partition("-")
                            if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                                owned.append(slot)
                if owned:
                    src = node
                    break
        if src is None:
            raise ServerError(f"slot {slot}: no other live primary owns it")
        src_id, dst_id = self.node_id(src), self.node_id(to)
        to.command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        while True:
            keys = src.command("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not isinstance(keys, list) or not keys:
                break
            src.command("MIGRATE", LOCALHOST, to.port, "", 0, 5000, "KEYS", *keys, timeout=10.0)
            moved += len(keys)
            if pause_s:
                time.sleep(pause_s)
        for node in self.alive():
            if self.role(node) == "master":
                node.command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved

    def replicas_of(self, primary: RedisServer) -> list[RedisServer]:
        """The live replicas that replicate ``primary`` (by its port)."""
        out = []
        for node in self.alive():
            try:
                info = _parse_info(str(node.command("INFO", "replication", timeout=1.0)))
            except (OSError, ServerError):
                continue
            if info.get("role") == "slave" and info.get("master_port") == str(primary.port):
                out.append(node)
        return out

    def wait_failover(self, key: str, timeout: float = 30.0) -> RedisServer:
        """After ``key``'s primary died: wait until a live primary owns its
        slot (its replica was promoted, after the node timeout and an
        election) and every live node says the cluster is ok. Returns the new
        primary."""
        found: list[RedisServer] = []

        def ok() -> bool:
            try:
                found[:] = [self.primary_of(key)]
            except (ServerError, OSError):
                return False
            return all(self._slots_ok(n) for n in self.alive())

        _wait_until(ok, timeout, "redis cluster failover")
        return found[0]

    def __repr__(self) -> str:
        return f"<RedisClusterServer {self.startup_nodes}>"


# --------------------------------------------------------------- PostgreSQL


class PostgresServer(_ManagedContext):
    """A private PostgreSQL cluster (initdb + postgres) on 127.0.0.1.

    Layout: ``<dir>/data`` (PGDATA), the unix socket in ``<dir>``, the log in
    ``<dir>/server.log``. When running as root the whole dir is chowned to
    ``run_as`` (default ``postgres``) and the server runs as that user.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        dir: str | os.PathLike[str] | None = None,
        settings: Mapping[str, str | int] | None = None,
        bindir: str | None = None,
        run_as: str | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        super().__init__(dir, "haoyuan-pg-")
        try:
            self._setup(port, settings, bindir, run_as, start_timeout)
        except BaseException:
            if self._owns_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _setup(
        self,
        port: int | None,
        settings: Mapping[str, str | int] | None,
        bindir: str | None,
        run_as: str | None,
        start_timeout: float,
    ) -> None:
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.bindir = bindir or find_postgres_bindir()
        self.data_dir = self.dir / "data"
        self.start_timeout = start_timeout
        self.settings: dict[str, str | int] = {
            "max_connections": 200,
            "shared_buffers": "32MB",
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "log_min_messages": "warning",
            "log_connections": "off",
            "log_disconnections": "off",
            "max_wal_size": "256MB",
            "dynamic_shared_memory_type": "posix",
        }
        self.settings.update(settings or {})
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            name = run_as or "postgres"
            try:
                self._user = pwd.getpwnam(name)
            except KeyError:
                raise ServerError(
                    f"running as root, and PostgreSQL refuses root: OS user {name!r} "
                    "not found (the Debian package 'postgresql' creates 'postgres')"
                ) from None
        elif run_as is not None and run_as != pwd.getpwuid(os.geteuid()).pw_name:
            raise ServerError("run_as needs root")
        self._prepare_dir()

    # ---- paths & URLs
    def _bin(self, name: str) -> str:
        path = os.path.join(self.bindir, name)
        if not os.access(path, os.X_OK):
            found = shutil.which(name)
            if found is None:
                raise ServerError(
                    f"PostgreSQL binary {name!r} not found in {self.bindir} or on PATH; "
                    "install the Debian package 'postgresql'"
                )
            return found
        return path

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@{LOCALHOST}:{self.port}/{database}"

    @property
    def socket_dir(self) -> Path:
        return self.dir

    # ---- OS user handling
    def _prepare_dir(self) -> None:
        if self._user is None:
            return
        uid, gid = self._user.pw_uid, self._user.pw_gid
        # the postgres user must be able to traverse every parent of the dir
        for parent in reversed(self.dir.parents):
            try:
                mode = parent.stat().st_mode
            except OSError:
                continue
            if not mode & 0o001:
                raise ServerError(
                    f"{parent} is not traversable by OS user {self._user.pw_name!r}; "
                    "pass a dir= under a world-traversable parent (e.g. /tmp)"
                )
        os.chown(self.dir, uid, gid)
        self.dir.chmod(0o700)
        for root, dirs, files in os.walk(self.dir):
            for name in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(os.path.join(root, name), uid, gid)

    @property
    def _uid(self) -> int | None:
        return None if self._user is None else self._user.pw_uid

    @property
    def _gid(self) -> int | None:
        return None if self._user is None else self._user.pw_gid

    @property
    def _groups(self) -> list[int] | None:
        return None if self._user is None else []

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PG") and k not in ("HOME", "USER", "LOGNAME")
        }
        if self._user is not None:
            env.update(HOME=self._user.pw_dir, USER=self._user.pw_name, LOGNAME=self._user.pw_name)
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        return env

    def _run_tool(
        self, args: Iterable[str], timeout: float, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        argv = list(args)
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                cwd=self.dir,
                env=self._env(),
                timeout=timeout,
                check=False,
                user=self._uid,
                group=self._gid,
                extra_groups=self._groups,
            )
        except subprocess.TimeoutExpired as exc:
            raise ServerError(f"{Path(argv[0]).name} timed out after {timeout:.0f}s") from exc
        if check and done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace")
            raise ServerError(
                f"{' '.join(argv)} failed with exit code {done.returncode}:\n{out}\n"
                f"{_log_hint(self.log_path)}"
            )
        return done

    # ---- lifecycle
    def initdb(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self._run_tool(
            [
                self._bin("initdb"),
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            timeout=120,
        )

    def _postgres_argv(self) -> list[str]:
        argv = [
            self._bin("postgres"),
            "-D",
            str(self.data_dir),
            "-c",
            f"listen_addresses={LOCALHOST}",
            "-c",
            f"port={self.port}",
            "-c",
            f"unix_socket_directories={self.socket_dir}",
        ]
        for key, value in self.settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def start(self, timeout: float | None = None) -> Self:
        """initdb if needed, start postgres, return once it accepts connections."""
        if self._alive():
            return self
        timeout = self.start_timeout if timeout is None else timeout
        self.initdb()
        deadline = time.monotonic() + timeout
        attempts = 1 if self._fixed_port else 5
        attempt = 0
        while True:
            attempt += 1
            log = self._open_log()
            log.write(f"=== haoyuan: starting postgres on port {self.port} ===\n".encode())
            log.flush()
            if self._user is not None:
                # the log file was created by root; let the server's own messages through
                with contextlib.suppress(OSError):
                    os.chown(self.log_path, self._user.pw_uid, self._user.pw_gid)
            self._proc = subprocess.Popen(
                self._postgres_argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=self._env(),
                start_new_session=True,
                user=self._uid,
                group=self._gid,
                extra_groups=self._groups,
            )
            _register(self)
            try:
                self._wait_ready(max(1.0, deadline - time.monotonic()))
                return self
            except ServerError:
                exited = not self._alive()
                self._hard_kill()
                text = _tail(self.log_path, 20)
                if exited and time.monotonic() < deadline:
                    if attempt < attempts and _bind_failed(self.log_path):
                        self.port = free_port()
                        continue
                    if "shared memory block is still in use" in text or (
                        "lock file" in text and "already exists" in text
                    ):
                        time.sleep(0.2)  # children of a killed postmaster still exiting
                        continue
                raise

    def _postmaster_status(self) -> list[str]:
        """Lines of ``postmaster.pid``: pid, datadir, start, port, socket dir,
        listen address, shmem key, status ("starting" / "ready" / "stopping")."""
        try:
            return (self.data_dir / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        except OSError:
            return []

    def _accepting(self) -> bool:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return False
        # our postmaster (not another server on this port) says it is ready ...
        lines = self._postmaster_status()
        if (
            len(lines) < 8
            or lines[0].strip() != str(proc.pid)
            or lines[3].strip() != str(self.port)
            or lines[7].strip() != "ready"
        ):
            return False
        # ... and accepts TCP connections
        done = subprocess.run(
            [
                self._bin("pg_isready"),
                "-h",
                LOCALHOST,
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-t",
                "2",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=self._env(),
            timeout=10,
            check=False,
        )
        return done.returncode == 0

    def _wait_ready(self, timeout: float) -> None:
        _wait_until(
            self._accepting,
            timeout,
            f"postgres on port {self.port}",
            interval=0.05,
            alive=self._alive,
            log=self.log_path,
        )

    def _pg_ctl_stop(self, mode: str, timeout: float) -> None:
        self._run_tool(
            [
                self._bin("pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "-t",
                str(max(1, int(timeout))),
            ],
            timeout=timeout + 5,
        )

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """pg_ctl stop -m ``mode`` (smart | fast | immediate), SIGKILL if that fails."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"mode must be smart, fast or immediate, not {mode!r}")
        proc = self._resumed_proc()
        if proc is None:
            return
        try:
            self._pg_ctl_stop(mode, timeout)
        except ServerError:
            if not self._reap(1.0):
                self.kill()
                return
        if not self._reap(timeout):
            self.kill()
            return
        self._close_log()

    def crash(self, timeout: float = 30.0) -> None:
        """``pg_ctl stop -m immediate``: no checkpoint; the next start runs crash recovery."""
        self.stop(mode="immediate", timeout=timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the postmaster, then wait for its backends to notice and exit
        (they are SIGKILLed too if they linger), so a restart can take the shared memory."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._close_log()
            return
        children = _children_of(proc.pid)
        self._hard_kill(timeout)
        deadline = time.monotonic() + timeout
        while children and time.monotonic() < deadline:
            children = [pid for pid in children if _process_alive(pid)]
            if children:
                time.sleep(0.05)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def restart(self, timeout: float | None = None) -> Self:
        """Start again on the same port and data dir (fast stop first if running)."""
        if self._alive():
            self.stop()
        self._fixed_port = True
        return self.start(timeout)

    def sigstop(self) -> None:
        """SIGSTOP the postmaster (existing backends keep running)."""
        pid = self.pid
        if pid is None:
            raise ServerError("postgres is not running")
        os.kill(pid, signal.SIGSTOP)

    def sigcont(self) -> None:
        pid = self.pid
        if pid is None:
            raise ServerError("postgres is not running")
        os.kill(pid, signal.SIGCONT)

    # ---- SQL helpers (psql, synchronous)
    def psql(self, sql: str, database: str = "postgres", timeout: float = 30.0) -> str:
        """Run SQL through psql (-X -A -t, ON_ERROR_STOP) and return its stdout."""
        if self.pid is None:
            raise ServerError(f"postgres on port {self.port} is not running")
        done = subprocess.run(
            [
                self._bin("psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                LOCALHOST,
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                sql,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env={**self._env(), "PGCONNECT_TIMEOUT": "5"},
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise ServerError(f"psql failed: {done.stderr.decode(errors='replace').strip()}")
        return done.stdout.decode()

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` and return its DSN."""
        self.psql(f"CREATE DATABASE {_quote_ident(name)}")
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS ``name`` WITH (FORCE) (disconnects its sessions)."""
        self.psql(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

    def _emergency_stop(self) -> None:
        if self._alive():
            try:
                self.stop(mode="immediate", timeout=5.0)
            except Exception:
                self.kill()

    def __repr__(self) -> str:
        return f"<PostgresServer {self.dsn} pid={self.pid} dir={self.dir}>"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
