"""A real ``redis-server`` on 127.0.0.1 (and a Unix socket) for the store tests.

Nothing is persisted (``--save '' --appendonly no``) unless ``persist=True``
(an append-only file synced at every write, so the data survives a stop).
``stop()`` and ``start()`` again keep the port and the socket path, so tests
can take Redis away and bring it back; ``pause()``/``resume()`` hang it
(SIGSTOP/SIGCONT).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from typing import Any

from tests.upstream.osutil import free_port, stop_process

__all__ = ["RedisServer", "RedisServerError"]

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 5

_running: weakref.WeakSet[RedisServer] = weakref.WeakSet()


class RedisServerError(RuntimeError):
    """redis-server did not start, or a command failed."""


class RedisServer:
    """One private redis-server: ``start()``, ``stop()``, ``cleanup()``.

    :param password: given to ``--requirepass`` (and used by ``command``).
    :param persist: keep the data across ``stop()``/``start()`` (AOF, fsync always).
    :param load_delay_us: Redis's ``key-load-delay``: a pause for each key loaded
        at start-up, so that a restart stays ``LOADING`` long enough to see.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        password: str | None = None,
        persist: bool = False,
        load_delay_us: int = 0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.password = password
        self.persist = persist
        self.load_delay_us = load_delay_us
        # More redis-server arguments, e.g. ("--replicaof", HOST, PORT).
        self.extra_args = extra_args
        self.port: int | None = None
        self.dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    # -- addresses ------------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (with ``:password@`` if there is one)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self._port()}/0"

    @property
    def socket_path(self) -> str:
        if self.dir is None:
            raise RedisServerError("redis-server not started")
        return os.path.join(self.dir, "redis.sock")

    @property
    def unix_url(self) -> str:
        """``unix:///…/redis.sock?db=0`` (with ``&password=`` if there is one)."""
        auth = f"&password={self.password}" if self.password else ""
        return f"unix://{self.socket_path}?db=0{auth}"

    @property
    def running(self) -> bool:
        """Started, and not stopped or killed since."""
        return self._proc is not None and self._proc.poll() is None

    def _port(self) -> int:
        if self.port is None:
            raise RedisServerError("redis-server not started")
        return self.port

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """Start (the first time on a free port, after ``stop()`` on the same one)."""
        if self._proc is not None:
            raise RedisServerError("already started")
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="imapproxy-redis-")
        if self.port is not None:
            self._start_once(self.port)
            return
        last: Exception | None = None
        for _ in range(START_ATTEMPTS):
            try:
                self._start_once(free_port())
                return
            except RedisServerError as e:  # most likely a lost port race
                last = e
                self.port = None
        raise RedisServerError(f"redis-server did not start in {START_ATTEMPTS} attempts: {last}")

    def _command_line(self, port: int) -> list[str]:
        """The redis-server command that serves ``port``."""
        assert self.dir is not None
        cmd = [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "yes" if self.persist else "no",
            "--appendfsync",
            "always",
            "--dir",
            self.dir,
            "--unixsocket",
            self.socket_path,
            "--unixsocketperm",
            "700",
            "--daemonize",
            "no",
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        if self.load_delay_us:
            cmd += ["--key-load-delay", str(self.load_delay_us)]
        return [*cmd, *self.extra_args]

    def _start_once(self, port: int) -> None:
        assert self.dir is not None
        cmd = self._command_line(port)
        with open(os.path.join(self.dir, "redis.log"), "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.port = port
        _running.add(self)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise RedisServerError(f"redis-server exited with {code}: {self.log_tail()}")
            try:
                if self._ready():
                    return
            except RedisServerError:
                self.stop()
                raise
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(
                    f"redis-server not ready after {START_TIMEOUT}s: {self.log_tail()}"
                )
            time.sleep(0.02)

    def _ready(self) -> bool:
        """Whether the server answers PING with PONG.

        Not yet listening (OSError) and still loading its data set (the
        ``LOADING`` error a restarted server with an append-only file gives)
        both mean "not yet"; any other error reply is a real failure.
        """
        try:
            return self.command("PING") == "PONG"
        except OSError:
            return False
        except RedisServerError as e:
            if str(e).startswith("LOADING"):
                return False
            raise

    def stop(self) -> None:
        """SIGTERM and wait; the port and the directory are kept for ``start()``."""
        proc, self._proc = self._proc, None
        _running.discard(self)
        if proc is None:
            return
        if proc.poll() is None and self._paused:
            proc.send_signal(signal.SIGCONT)
        stop_process(proc, STOP_TIMEOUT)
        self._paused = False

    def kill(self) -> None:
        """SIGKILL and wait: a crash (no shutdown, connections reset)."""
        proc, self._proc = self._proc, None
        _running.discard(self)
        if proc is not None:
            proc.kill()
            proc.wait()
        self._paused = False

    def pause(self) -> None:
        """Hang the server (SIGSTOP): connections stay open, nothing answers."""
        if self._proc is None:
            raise RedisServerError("redis-server not started")
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        if self._proc is not None and self._paused:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def cleanup(self) -> None:
        """Stop, and remove the directory."""
        self.stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self.port = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    def log_tail(self, n: int = 2000) -> str:
        if self.dir is None:
            return "(no log)"
        try:
            with open(os.path.join(self.dir, "redis.log"), "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    # -- a blocking client, for set-up and inspection ------------------------------

    def command(self, *args: str) -> Any:
        """Run one command (after AUTH) and return its reply.

        :raises RedisServerError: for an error reply; OSError when unreachable.
        """
        commands: list[tuple[str, ...]] = []
        if self.password:
            commands.append(("AUTH", self.password))
        commands.append(args)
        with socket.create_connection((self.host, self._port()), timeout=5) as sock:
            with sock.makefile("rb") as replies:
                sock.sendall(b"".join(_encode(c) for c in commands))
                results = [_read_reply(replies) for _ in commands]
        for result in results:
            if isinstance(result, RedisServerError):
                raise result
        return results[-1]

    def transaction(self, *commands: tuple[str, ...]) -> list[Any]:
        """Run ``commands`` in one MULTI/EXEC (nothing runs in between); their replies."""
        replies: list[Any] = []
        with socket.create_connection((self.host, self._port()), timeout=5) as sock:
            with sock.makefile("rb") as f:
                batch = [("MULTI",), *commands, ("EXEC",)]
                if self.password:
                    batch.insert(0, ("AUTH", self.password))
                sock.sendall(b"".join(_encode(c) for c in batch))
                replies = [_read_reply(f) for _ in batch]
        results = replies[-1]
        if results is None:
            raise RedisServerError("transaction aborted")
        for reply in [*replies[:-1], *([] if isinstance(results, Exception) else results)]:
            if isinstance(reply, RedisServerError):
                raise reply
        if isinstance(results, RedisServerError):
            raise results
        return list(results)

    def flush(self) -> None:
        """Empty every database."""
        self.command("FLUSHALL")

    def dump(self) -> dict[str, Any]:
        """Every key of database 0 with its value (hashes as dicts): to look for plaintext."""
        out: dict[str, Any] = {}
        for key in self.command("KEYS", "*"):
            kind = self.command("TYPE", key)
            if kind == "hash":
                pairs = self.command("HGETALL", key)
                out[key] = dict(zip(pairs[::2], pairs[1::2], strict=True))
            elif kind == "string":
                out[key] = self.command("GET", key)
            elif kind == "set":
                out[key] = sorted(self.command("SMEMBERS", key))
            elif kind == "zset":
                out[key] = self.command("ZRANGE", key, "0", "-1", "WITHSCORES")
            else:
                out[key] = kind
        return out


def _encode(args: tuple[str, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(f: Any) -> Any:
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("redis-server closed the connection")
    kind, rest = line[:1], line[1:-2].decode("utf-8", "replace")
    if kind == b"+":
        return rest
    if kind == b"-":
        return RedisServerError(rest)
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2].decode("utf-8", "replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise RedisServerError(f"not a Redis reply: {line[:40]!r}")


@atexit.register
def _stop_all() -> None:
    """No redis-server outlives the test run, even one a failed test left running."""
    for server in list(_running):
        server.stop()
