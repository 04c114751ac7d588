"""
An SMTP sink for the tests: the relay host of the Dovecot submission fixture.

Dovecot submission keeps no queue: it relays every transaction, live, to one
``submission_relay_host``. This sink is that host. It speaks just enough
ESMTP (PIPELINING, 8BITMIME, SIZE, ENHANCEDSTATUSCODES, DSN, CHUNKING) that
Dovecot relays every message byte-exact with ``BDAT <n> LAST``, takes lines
of any length, and keeps each message's envelope and bytes. aiosmtpd would
not do: it has no CHUNKING and refuses lines over 1000 bytes.

It runs an asyncio loop in its own thread, so it needs nothing from the
Twisted reactor the tests may use; :meth:`SMTPSink.stop` closes every
connection and joins the thread.

Refusals on demand, so tests can see a provider's refusal pass through:

- ``MAIL FROM:<quota@…>`` gets ``452 4.2.2 Mailbox full``;
- ``RCPT TO:<reject-…>`` gets ``550 5.1.1 Recipient address rejected``;
- ``MAIL FROM:<reject-data@…>`` is accepted, and the message refused at its
  end with ``554 5.7.1 Message content rejected`` (nothing kept).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
import time

import attrs

__all__ = ["Received", "SMTPSink", "SMTPSinkError"]

HOSTNAME = "sink.test"
# Above Dovecot's submission_max_mail_size + its SIZE= slack: the limit the
# tests exercise is Dovecot's, not the sink's.
MAX_SIZE = 64 * 1024 * 1024
# A command line longer than this is refused (message lines are unbounded).
MAX_COMMAND = 64 * 1024
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0

QUOTA_REPLY = b"452 4.2.2 Mailbox full"
RCPT_REFUSED_REPLY = b"550 5.1.1 Recipient address rejected"
DATA_REFUSED_REPLY = b"554 5.7.1 Message content rejected"

_EHLO = [
    HOSTNAME.encode(),
    b"PIPELINING",
    b"8BITMIME",
    b"SIZE %d" % MAX_SIZE,
    b"ENHANCEDSTATUSCODES",
    b"DSN",
    b"CHUNKING",
]
_PATH = re.compile(rb"^(MAIL FROM|RCPT TO):\s*<([^>]*)>(.*)$", re.IGNORECASE)
_BDAT = re.compile(rb"^BDAT ([0-9]{1,12})( LAST)?$", re.IGNORECASE)


class SMTPSinkError(RuntimeError):
    """The sink did not start, or a wait ran out."""


@attrs.frozen
class Received:
    """One accepted message: its envelope and its bytes exactly as sent."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")


class _Session(asyncio.Protocol):
    """One relay connection: a state machine over a byte buffer."""

    def __init__(self, sink: SMTPSink) -> None:
        self.sink = sink
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.mail_from: str | None = None
        self.rcpt_tos: list[str] = []
        self.body = bytearray()
        # None: commands; "data": until CRLF.CRLF; int: BDAT bytes still due.
        self.mode: str | int | None = None
        self.bdat_last = False
        self.scan_from = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.sink._sessions.add(self)
        self.reply(b"220 " + HOSTNAME.encode() + b" ESMTP test sink")

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink._sessions.discard(self)

    def reply(self, line: bytes) -> None:
        assert self.transport is not None
        self.transport.write(line + b"\r\n")

    def reset(self) -> None:
        self.mail_from, self.rcpt_tos, self.body, self.mode = None, [], bytearray(), None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None and not self.transport.is_closing():
            if isinstance(self.mode, int):
                if not self._bdat_chunk():
                    return
            elif self.mode == "data":
                if not self._data_body():
                    return
            else:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    if len(self.buf) > MAX_COMMAND:
                        self.reply(b"500 5.5.2 Line too long")
                        self.transport.close()
                    return
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                self.command(line)

    def _bdat_chunk(self) -> bool:
        assert isinstance(self.mode, int)
        take = min(self.mode, len(self.buf))
        if len(self.body) + take > MAX_SIZE:
            self.reply(b"552 5.3.4 Message too big")
            assert self.transport is not None
            self.transport.close()
            return False
        self.body += self.buf[:take]
        del self.buf[:take]
        self.mode -= take
        if self.mode > 0:
            return False
        self.mode = None
        if self.bdat_last:
            self.finish(bytes(self.body))
        else:
            self.reply(b"250 2.0.0 Chunk accepted")
        return True

    def _data_body(self) -> bool:
        # The body ends at CRLF "." CRLF; the CRLF before the dot is the body's.
        if self.buf.startswith(b".\r\n"):
            body_end, consumed = 0, 3
        else:
            i = self.buf.find(b"\r\n.\r\n", max(0, self.scan_from - 4))
            if i < 0:
                self.scan_from = len(self.buf)
                if len(self.buf) > MAX_SIZE:
                    self.reply(b"552 5.3.4 Message too big")
                    assert self.transport is not None
                    self.transport.close()
                return False
            body_end, consumed = i + 2, i + 5
        raw = bytes(self.buf[:body_end])
        del self.buf[:consumed]
        self.scan_from = 0
        self.mode = None
        lines = raw.split(b"\r\n")
        self.finish(b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines))
        return True

    def finish(self, data: bytes) -> None:
        assert self.mail_from is not None
        if self.mail_from.lower().startswith("reject-data@"):
            self.reply(DATA_REFUSED_REPLY)
        else:
            n = self.sink._store(Received(self.mail_from, tuple(self.rcpt_tos), data))
            self.reply(b"250 2.0.0 Ok: queued as SINK%d" % n)
        self.reset()

    def command(self, line: bytes) -> None:
        verb = line.split(b" ", 1)[0].upper()
        if verb in (b"EHLO", b"HELO"):
            self.reset()
            if verb == b"HELO":
                self.reply(b"250 " + HOSTNAME.encode())
            else:
                self.reply(b"\r\n".join(b"250-" + e for e in _EHLO[:-1]) + b"\r\n250 " + _EHLO[-1])
        elif verb in (b"MAIL", b"RCPT"):
            self.envelope(line)
        elif verb == b"DATA":
            if self.mail_from is None or not self.rcpt_tos:
                self.reply(b"503 5.5.1 Need MAIL and RCPT first")
            else:
                self.mode = "data"
                self.reply(b"354 End data with <CR><LF>.<CR><LF>")
        elif verb == b"BDAT":
            self.bdat(line)
        elif verb == b"RSET":
            self.reset()
            self.reply(b"250 2.0.0 Ok")
        elif verb == b"NOOP":
            self.reply(b"250 2.0.0 Ok")
        elif verb == b"QUIT":
            self.reply(b"221 2.0.0 Bye")
            assert self.transport is not None
            self.transport.close()
        else:
            self.reply(b"502 5.5.2 Command not implemented")

    def envelope(self, line: bytes) -> None:
        m = _PATH.match(line)
        if m is None:
            self.reply(b"501 5.5.4 Syntax error in parameters")
            return
        address = m.group(2).decode("utf-8", "surrogateescape")
        if m.group(1).upper() == b"MAIL FROM":
            if self.mail_from is not None:
                self.reply(b"503 5.5.1 Sender already given")
            elif address.lower().startswith("quota@"):
                self.reply(QUOTA_REPLY)
            else:
                self.mail_from = address
                self.reply(b"250 2.1.0 Ok")
        elif self.mail_from is None:
            self.reply(b"503 5.5.1 Need MAIL first")
        elif address.lower().startswith("reject-"):
            self.reply(RCPT_REFUSED_REPLY)
        else:
            self.rcpt_tos.append(address)
            self.reply(b"250 2.1.5 Ok")

    def bdat(self, line: bytes) -> None:
        m = _BDAT.match(line)
        if m is None:
            self.reply(b"501 5.5.4 Syntax: BDAT <size> [LAST]")
            assert self.transport is not None
            self.transport.close()  # the chunk's bytes cannot be skipped safely
            return
        if self.mail_from is None or not self.rcpt_tos:
            self.reply(b"503 5.5.1 Need MAIL and RCPT first")
            assert self.transport is not None
            self.transport.close()
            return
        self.mode = int(m.group(1))
        self.bdat_last = m.group(2) is not None


class SMTPSink:
    """
    The sink: ``start()``, ``host``/``port``, ``messages``, ``wait_for``,
    ``clear()``, ``stop()``.
    """

    host = "127.0.0.1"

    def __init__(self) -> None:
        self.port: int | None = None
        self._messages: list[Received] = []
        self._cond = threading.Condition()
        self._counter = itertools.count(1)
        self._sessions: set[_Session] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise SMTPSinkError("already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(lambda: _Session(self), self.host, self.port or 0)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # reported to start()
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="smtp-sink", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT) or failure:
            self.stop()
            raise SMTPSinkError(f"the sink did not start: {failure or 'timeout'}")

    def stop(self) -> None:
        """Close the listener and every connection; join the thread."""
        thread, loop = self._thread, self._loop
        self._thread = None
        if thread is None or loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for session in list(self._sessions):
                if session.transport is not None:
                    session.transport.abort()
            if self._server is not None:
                await self._server.wait_closed()
            asyncio.get_running_loop().stop()

        if not loop.is_closed():
            loop.call_soon_threadsafe(lambda: loop.create_task(shutdown()))
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            raise SMTPSinkError("the sink's thread did not end")
        self._loop = self._server = None

    def __enter__(self) -> SMTPSink:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what arrived -------------------------------------------------------

    def _store(self, message: Received) -> int:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()
        return next(self._counter)

    @property
    def messages(self) -> list[Received]:
        """A copy of the messages kept so far, oldest first."""
        with self._cond:
            return list(self._messages)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        """The messages once at least *n* arrived; :class:`SMTPSinkError` after *timeout*."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._messages) < n:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    if len(self._messages) >= n:
                        break
                    raise SMTPSinkError(f"{len(self._messages)} of {n} messages within {timeout}s")
            return list(self._messages)

    def clear(self) -> None:
        """Forget every message kept so far."""
        with self._cond:
            self._messages.clear()
