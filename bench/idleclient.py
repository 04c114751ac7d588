"""
IMAP clients for the concurrency benchmark, one process holding many
connections in one ``selectors`` loop over non-blocking ``ssl`` sockets (a
few KiB each: asyncio's TLS transport would allocate a 256 KiB read buffer
per connection).

``hold``: open ``--n`` sessions (connect, TLS, LOGIN, IDLE), at most
``--concurrency`` logging in at once, and keep them in IDLE. Progress goes
to stdout as JSON lines; once every session is either held or failed it
prints ``{"event": "ready", ...}`` and waits for a line on stdin (``release``),
then ends each IDLE with DONE, logs out, and prints ``{"event": "released",
...}`` with how many sessions were still alive.

``churn``: for ``--seconds``, ``--concurrency`` clients each loop over
connect, TLS, LOGIN, LOGOUT; prints one JSON line with the logins completed,
the failures and the login latencies.

Accounts come from ``--accounts FILE``: a JSON list of ``[account, token]``,
used round-robin (from ``--offset``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import signal
import socket
import ssl
import sys
import time

STDIN = object()


class Client:
    """One connection to the proxy, driven by its ``script``."""

    __slots__ = (
        "loop",
        "account",
        "token",
        "sock",
        "state",
        "inbuf",
        "outbuf",
        "events",
        "started",
        "loggedIn",
        "done",
    )

    def __init__(self, loop: Loop, account: str, token: str, done: object):
        self.loop = loop
        self.account = account
        self.token = token
        self.sock: ssl.SSLSocket | None = None
        self.state = "connect"
        self.inbuf = b""
        self.outbuf = b""
        self.events = selectors.EVENT_WRITE
        self.started = time.monotonic()
        self.loggedIn = 0.0
        self.done = done  # callable(client, outcome)

    def start(self) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = raw.connect_ex((self.loop.host, self.loop.port))
        if err not in (0, errno.EINPROGRESS):
            raw.close()
            self.finish(f"connect: {os.strerror(err)}")
            return
        self.sock = self.loop.ctx.wrap_socket(
            raw, server_hostname=self.loop.server_name, do_handshake_on_connect=False
        )
        self.loop.sel.register(self.sock, selectors.EVENT_WRITE, self)

    def _want(self, events: int) -> None:
        if events != self.events and self.sock is not None:
            self.events = events
            self.loop.sel.modify(self.sock, events, self)

    def handle(self, mask: int) -> None:
        assert self.sock is not None
        if self.state == "connect":
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.finish(f"connect: {os.strerror(err)}")
                return
            self.state = "handshake"
        if self.state == "handshake":
            try:
                self.sock.do_handshake()
            except ssl.SSLWantReadError:
                self._want(selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                self._want(selectors.EVENT_WRITE)
                return
            except (ssl.SSLError, OSError) as e:
                self.finish(f"tls: {e}")
                return
            self.state = "greeting"
            self._want(selectors.EVENT_READ)
        if mask & selectors.EVENT_WRITE and self.outbuf:
            self.flush()
        if self.sock is not None:
            self.read()

    def read(self) -> None:
        while self.sock is not None:
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                return
            except ssl.SSLWantWriteError:
                self._want(selectors.EVENT_READ | selectors.EVENT_WRITE)
                return
            except (ssl.SSLError, OSError) as e:
                self.closed(f"read: {e}")
                return
            if not data:
                self.closed("eof")
                return
            self.inbuf += data
            while self.sock is not None:
                i = self.inbuf.find(b"\r\n")
                if i < 0:
                    break
                line, self.inbuf = self.inbuf[:i], self.inbuf[i + 2 :]
                self.line(line)

    def send(self, data: bytes) -> None:
        self.outbuf += data
        self.flush()

    def flush(self) -> None:
        while self.outbuf and self.sock is not None:
            try:
                n = self.sock.send(self.outbuf)
            except (ssl.SSLWantWriteError, BlockingIOError):
                self._want(selectors.EVENT_READ | selectors.EVENT_WRITE)
                return
            except ssl.SSLWantReadError:
                return
            except (ssl.SSLError, OSError) as e:
                self.closed(f"write: {e}")
                return
            self.outbuf = self.outbuf[n:]
        if self.sock is not None:
            self._want(selectors.EVENT_READ)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            self.loop.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        try:
            sock.close()
        except OSError:
            pass

    def finish(self, outcome: str) -> None:
        self.close()
        done, self.done = self.done, None
        if done is not None:
            done(self, outcome)

    # -- the IMAP conversation ----------------------------------------------

    def closed(self, why: str) -> None:
        if self.state == "logout":
            self.finish("ok")
        elif self.state == "held":
            self.finish("dropped")
        else:
            self.finish(f"closed in {self.state}: {why}")

    def line(self, line: bytes) -> None:
        state = self.state
        if state == "greeting":
            if not line.startswith(b"* OK"):
                self.finish(f"greeting: {line[:80]!r}")
                return
            self.state = "login"
            self.send(f"a LOGIN {self.account} {self.token}\r\n".encode())
        elif state == "login":
            if line.startswith(b"a OK"):
                self.loggedIn = time.monotonic()
                self.loop.logged_in(self)
            elif line.startswith(b"a "):
                self.finish(f"login: {line[:120]!r}")
        elif state == "idle-start":
            if line.startswith(b"+"):
                self.state = "held"
                self.loop.held(self)
            elif line.startswith(b"b "):
                self.finish(f"idle: {line[:120]!r}")
        elif state == "held":
            if line.startswith((b"* BYE", b"b ")):
                self.finish(f"dropped: {line[:120]!r}")
            # Anything else (e.g. "* OK Still here") is an IDLE notice.
        elif state == "done":
            if line.startswith(b"b "):
                self.state = "logout"
                self.send(b"c LOGOUT\r\n")
        elif state == "logout":
            if line.startswith(b"c "):
                self.finish("ok")

    def idle(self) -> None:
        self.state = "idle-start"
        self.send(b"b IDLE\r\n")

    def release(self) -> None:
        if self.state == "held":
            self.state = "done"
            self.send(b"DONE\r\n")

    def logout(self) -> None:
        self.state = "logout"
        self.send(b"c LOGOUT\r\n")


class Loop:
    def __init__(self, args: argparse.Namespace, accounts: list[list[str]]):
        self.host = args.host
        self.port = args.port
        self.server_name = args.server_name
        self.ctx = ssl.create_default_context(cafile=args.ca)
        self.sel = selectors.DefaultSelector()
        self.accounts = accounts
        self.next_account = args.offset
        self.concurrency = args.concurrency
        self.in_flight = 0
        self.clients: set[Client] = set()
        self.running = True

    def new_client(self, done: object) -> Client:
        account, token = self.accounts[self.next_account % len(self.accounts)]
        self.next_account += 1
        c = Client(self, account, token, done)
        self.clients.add(c)
        self.in_flight += 1
        c.start()
        return c

    def logged_in(self, c: Client) -> None:
        raise NotImplementedError

    def held(self, c: Client) -> None:
        raise NotImplementedError

    def poll(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            if key.data is STDIN:
                self.stdin_ready()
            else:
                key.data.handle(mask)

    def stdin_ready(self) -> None:
        pass


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


class Hold(Loop):
    def __init__(self, args: argparse.Namespace, accounts: list[list[str]]):
        super().__init__(args, accounts)
        self.n = args.n
        self.started = 0
        self.held_count = 0
        self.failed: dict[str, int] = {}
        self.dropped = 0
        self.released_ok = 0
        self.phase = "opening"
        self.lastReport = 0.0
        self.stdin_buf = b""
        self.held_at_release = 0
        self.deadline = 0.0

    def done(self, c: Client, outcome: str) -> None:
        self.clients.discard(c)
        if c.state in ("connect", "handshake", "greeting", "login", "idle-start"):
            self.in_flight -= 1
        if outcome == "ok":
            self.released_ok += 1
        elif outcome.startswith("dropped"):
            self.dropped += 1
            self.held_count -= 1
        else:
            key = outcome[:100]
            self.failed[key] = self.failed.get(key, 0) + 1

    def logged_in(self, c: Client) -> None:
        c.idle()

    def held(self, c: Client) -> None:
        self.in_flight -= 1
        self.held_count += 1

    def stdin_ready(self) -> None:
        data = os.read(0, 4096)
        if not data:
            self.running = False  # the parent went away: leave
            return
        self.stdin_buf += data
        if b"release" in self.stdin_buf and self.phase == "ready":
            self.phase = "releasing"
            self.held_at_release = self.held_count
            self.deadline = time.monotonic() + 60.0
            for c in list(self.clients):
                c.release()

    def run(self, timeout: float) -> None:
        self.sel.register(0, selectors.EVENT_READ, STDIN)
        t0 = time.monotonic()
        while self.running:
            while self.phase == "opening" and self.in_flight < self.concurrency:
                if self.started >= self.n:
                    break
                self.started += 1
                self.new_client(self.done)
            self.poll(0.2)
            now = time.monotonic()
            if self.phase == "opening":
                if self.started >= self.n and self.in_flight == 0:
                    self.phase = "ready"
                    emit(
                        event="ready",
                        held=self.held_count,
                        failed=sum(self.failed.values()),
                        errors=self.failed,
                        seconds=round(now - t0, 2),
                    )
                elif now - self.lastReport > 2.0:
                    self.lastReport = now
                    emit(event="progress", held=self.held_count, failed=sum(self.failed.values()))
                if now - t0 > timeout:
                    for c in list(self.clients):
                        if c.state != "held":
                            c.finish("timeout")
            elif self.phase == "releasing":
                if not self.clients:
                    emit(
                        event="released",
                        held_at_release=self.held_at_release,
                        released_ok=self.released_ok,
                        dropped=self.dropped,
                    )
                    return
                if now > self.deadline:
                    for c in list(self.clients):
                        c.finish("release-timeout")


class Churn(Loop):
    def __init__(self, args: argparse.Namespace, accounts: list[list[str]]):
        super().__init__(args, accounts)
        self.seconds = args.seconds
        self.max_logins = args.max_logins
        self.started_count = 0
        self.logins = 0
        self.completed = 0
        self.failed: dict[str, int] = {}
        self.latencies: list[float] = []
        self.stopping = False

    def done(self, c: Client, outcome: str) -> None:
        self.clients.discard(c)
        self.in_flight -= 1
        if outcome == "ok":
            self.completed += 1
        elif c.loggedIn == 0.0:
            key = outcome[:100]
            self.failed[key] = self.failed.get(key, 0) + 1

    def logged_in(self, c: Client) -> None:
        if not self.stopping:
            self.logins += 1
            self.latencies.append(c.loggedIn - c.started)
        c.logout()

    def run(self) -> None:
        t0 = time.monotonic()
        end = t0 + self.seconds
        stopped: float | None = None
        while True:
            now = time.monotonic()
            if now >= end:
                self.stopping = True
            if self.stopping and stopped is None:
                stopped = now
            if self.max_logins and self.started_count >= self.max_logins:
                self.stopping = True
            if not self.stopping:
                while self.in_flight < self.concurrency and not (
                    self.max_logins and self.started_count >= self.max_logins
                ):
                    self.started_count += 1
                    self.new_client(self.done)
            elif not self.clients or now > end + 30:
                break
            self.poll(0.05)
        if stopped is None:
            stopped = time.monotonic()
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None

        emit(
            event="churn",
            seconds=round(min(self.seconds, stopped - t0), 3),
            logins=self.logins,
            completed=self.completed,
            failed=sum(self.failed.values()),
            errors=self.failed,
            p50_ms=pct(0.5),
            p95_ms=pct(0.95),
            max_ms=pct(1.0),
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("hold", "churn"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--server-name", default="localhost")
    ap.add_argument("--ca", required=True)
    ap.add_argument("--accounts", required=True)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--max-logins", type=int, default=0, help="churn: stop after this many")
    ap.add_argument("--timeout", type=float, default=600.0, help="hold: bound on opening")
    args = ap.parse_args(argv)
    with open(args.accounts) as f:
        accounts = json.load(f)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if args.mode == "hold":
        Hold(args, accounts).run(args.timeout)
    else:
        Churn(args, accounts).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
