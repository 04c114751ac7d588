"""
A light IMAP upstream for the concurrency benchmark: just enough of an IMAP
server for the proxy to log in with XOAUTH2 and for a client to sit in IDLE,
at a few KiB per connection, so that thousands of sessions cost the upstream
next to nothing and the proxy is what gets measured.

It speaks IMAPS (implicit TLS) on loopback: a greeting with capabilities,
CAPABILITY, NOOP, ID, AUTHENTICATE XOAUTH2 (SASL-IR or continuation; any
bearer token is accepted for a user that matches ``--user-suffix``; nothing
asks a provider), then NOOP, IDLE/DONE, SELECT/EXAMINE (an empty INBOX) and
LOGOUT.

One ``selectors`` loop per process over non-blocking ``ssl`` sockets (CPython
sets ``SSL_MODE_RELEASE_BUFFERS``: an idle TLS connection holds no record
buffers); ``--procs`` forks workers that share the listening socket. Run::

    python -m bench.lightupstream --cert cert.pem --key key.pem [--port 0] [--procs 1]

It prints ``listening 127.0.0.1 PORT`` once ready and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import errno
import os
import selectors
import signal
import socket
import ssl
import sys
import time

CAPS_PREAUTH = b"IMAP4rev1 SASL-IR ID AUTH=XOAUTH2"
CAPS_AUTH = b"IMAP4rev1 SASL-IR ID IDLE"
MAX_LINE = 16384
# The XOAUTH2 error challenge, as Google sends it.
ERROR_CHALLENGE = base64.b64encode(b'{"status":"401","schemes":"bearer","scope":"imap"}')


def parse_xoauth2(blob: bytes) -> tuple[str, str] | None:
    """``base64(user=U^Aauth=Bearer T^A^A)`` → ``(U, T)``, or None if malformed."""
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return None
    user = token = None
    for part in raw.split(b"\x01"):
        if part.startswith(b"user="):
            user = part[5:]
        elif part.startswith(b"auth="):
            scheme, _, value = part[5:].partition(b" ")
            if scheme.lower() == b"bearer" and value:
                token = value
    if not user or not token:
        return None
    return user.decode("utf-8", "replace"), token.decode("utf-8", "replace")


class Conn:
    """One client connection: TLS handshake, then IMAP lines."""

    __slots__ = ("sock", "server", "state", "inbuf", "outbuf", "tag", "user", "events")

    def __init__(self, sock: ssl.SSLSocket, server: Server):
        self.sock = sock
        self.server = server
        self.state = "handshake"
        self.inbuf = b""
        self.outbuf = b""
        self.tag = b""
        self.user = ""
        self.events = selectors.EVENT_READ

    # -- I/O ----------------------------------------------------------------

    def _want(self, events: int) -> None:
        if events != self.events:
            self.events = events
            self.server.sel.modify(self.sock, events, self)

    def handle(self, mask: int) -> None:
        if self.state == "handshake":
            try:
                self.sock.do_handshake()
            except ssl.SSLWantReadError:
                self._want(selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                self._want(selectors.EVENT_WRITE)
                return
            except (ssl.SSLError, OSError):
                self.close()
                return
            self.state = "preauth"
            self._want(selectors.EVENT_READ)
            self.send(b"* OK [CAPABILITY " + CAPS_PREAUTH + b"] lightupstream ready\r\n")
            return
        if mask & selectors.EVENT_WRITE and self.outbuf:
            self.flush()
        if mask & selectors.EVENT_READ and self.sock is not None:
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
            except (ssl.SSLError, OSError):
                self.close()
                return
            if not data:
                self.close()
                return
            self.inbuf += data
            while self.sock is not None:
                i = self.inbuf.find(b"\r\n")
                if i < 0:
                    if len(self.inbuf) > MAX_LINE:
                        self.send(b"* BYE line too long\r\n")
                        self.close()
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
            except (ssl.SSLError, OSError):
                self.close()
                return
            self.outbuf = self.outbuf[n:]
        if self.sock is not None:
            self._want(selectors.EVENT_READ)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        self.server.sel.unregister(sock)
        self.server.conns -= 1
        try:
            sock.close()
        except OSError:
            pass

    # -- IMAP ---------------------------------------------------------------

    def line(self, line: bytes) -> None:
        if self.state == "idle":
            if line.strip().upper() == b"DONE":
                self.state = "auth"
                self.send(self.tag + b" OK IDLE terminated\r\n")
            else:
                self.send(b"* BAD expected DONE\r\n")
            return
        if self.state == "sasl":
            self.sasl(line)
            return
        parts = line.split(b" ", 2)
        if len(parts) < 2:
            self.send(b"* BAD missing command\r\n")
            return
        tag, cmd = parts[0], parts[1].upper()
        rest = parts[2] if len(parts) == 3 else b""
        auth = self.state == "auth"
        if cmd == b"CAPABILITY":
            caps = CAPS_AUTH if auth else CAPS_PREAUTH
            self.send(b"* CAPABILITY " + caps + b"\r\n" + tag + b" OK CAPABILITY completed\r\n")
        elif cmd == b"NOOP":
            self.send(tag + b" OK NOOP completed\r\n")
        elif cmd == b"ID":
            self.send(b'* ID ("name" "lightupstream")\r\n' + tag + b" OK ID completed\r\n")
        elif cmd == b"LOGOUT":
            self.send(b"* BYE logging out\r\n" + tag + b" OK LOGOUT completed\r\n")
            self.close()
        elif cmd == b"AUTHENTICATE" and not auth:
            mech, _, initial = rest.partition(b" ")
            if mech.upper() != b"XOAUTH2":
                self.send(tag + b" NO [CANNOT] unsupported mechanism\r\n")
                return
            self.tag = tag
            self.state = "sasl"
            if initial:
                self.sasl(initial)
            else:
                self.send(b"+ \r\n")
        elif cmd == b"IDLE" and auth:
            self.tag = tag
            self.state = "idle"
            self.send(b"+ idling\r\n")
        elif cmd in (b"SELECT", b"EXAMINE") and auth:
            self.send(
                b"* FLAGS (\\Seen)\r\n* 0 EXISTS\r\n* 0 RECENT\r\n"
                b"* OK [UIDVALIDITY 1] UIDs valid\r\n* OK [UIDNEXT 1] next UID\r\n"
                + tag
                + (b" OK [READ-ONLY] " if cmd == b"EXAMINE" else b" OK [READ-WRITE] ")
                + cmd
                + b" completed\r\n"
            )
        else:
            self.send(tag + b" BAD command unknown or not valid in this state\r\n")

    def sasl(self, response: bytes) -> None:
        tag = self.tag
        if self.user == "\x00failed":
            # The client's answer to the error challenge: now the tagged NO.
            self.user = ""
            self.state = "preauth"
            self.send(tag + b" NO [AUTHENTICATIONFAILED] invalid credentials\r\n")
            return
        if response.strip() == b"*":
            self.state = "preauth"
            self.send(tag + b" BAD authentication cancelled\r\n")
            return
        parsed = parse_xoauth2(response.strip())
        if parsed is None or not parsed[0].endswith(self.server.user_suffix):
            self.user = "\x00failed"
            self.send(b"+ " + ERROR_CHALLENGE + b"\r\n")
            return
        self.user = parsed[0]
        self.state = "auth"
        self.server.logins += 1
        self.send(tag + b" OK [CAPABILITY " + CAPS_AUTH + b"] logged in\r\n")


class Server:
    def __init__(self, listener: socket.socket, ctx: ssl.SSLContext, user_suffix: str):
        self.listener = listener
        self.ctx = ctx
        self.user_suffix = user_suffix
        self.sel = selectors.DefaultSelector()
        self.conns = 0
        self.logins = 0
        self.running = True

    def accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    print(f"lightupstream: accept failed: {e}", file=sys.stderr, flush=True)
                    time.sleep(0.01)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            conn = Conn(tls, self)
            self.conns += 1
            self.sel.register(tls, selectors.EVENT_READ, conn)
            conn.handle(selectors.EVENT_READ)

    def serve(self) -> None:
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        while self.running:
            for key, mask in self.sel.select(1.0):
                if key.data is None:
                    self.accept()
                else:
                    key.data.handle(mask)


def make_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    # Stateless resumption tickets are not needed; nothing per session is kept.
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--procs", type=int, default=1, help="worker processes sharing the socket")
    ap.add_argument("--backlog", type=int, default=4096)
    ap.add_argument("--user-suffix", default="", help="accept only users ending with this")
    args = ap.parse_args(argv)

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(args.backlog)
    listener.setblocking(False)
    ctx = make_context(args.cert, args.key)

    def work() -> None:
        server = Server(listener, ctx, args.user_suffix)

        def stop(_sig: int, _frame: object) -> None:
            server.running = False

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        server.serve()

    port = listener.getsockname()[1]
    print(f"listening {args.host} {port}", flush=True)
    if args.procs <= 1:
        work()
        return 0
    children = []
    for _ in range(args.procs):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _die_with_parent()
                work()
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    listener.close()

    def forward(_sig: int, _frame: object) -> None:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for pid in children:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except ChildProcessError:
                break
            except InterruptedError:
                continue
    return 0


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (no orphaned workers)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
