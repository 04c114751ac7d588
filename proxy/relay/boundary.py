"""
Where a spliced session may be ended with a last line of the proxy's own (an
IMAP ``* BYE``, an SMTP ``421``) without corrupting the stream, and whether
the session is *quiet*: nothing in flight the client is still waiting for.

Both directions are followed as they are relayed, at the cost of a ``find``
a line (literal and message bytes are skipped, not read):

- **IMAP.** ``imapframe.Scanner`` follows each direction. The provider's
  stream is *between responses* when its last response is whole (no partial
  line, no literal still to come): only there may a ``* BYE`` go in. The
  client's commands are counted as they start (every command is tagged;
  ``DONE``, which ends an ``IDLE``, is no command), and the provider's
  tagged responses as their first byte comes (the scanner counts them at C
  speed, no Python a line); the difference is the commands in flight. An
  ``IDLE`` in progress is quiet: a server may send ``* BYE`` during an IDLE
  at any time (RFC 2177), and clients expect it. Quiet: both streams between
  commands/responses and no command in flight but an ``IDLE``.
- **SMTP.** Replies are lines (``250-`` continues, ``250 `` ends); the
  client's commands are lines but for message content (after a ``354``
  reply to ``DATA``, up to the ``CRLF.CRLF``) and ``BDAT`` chunks (counted
  bytes). Every command and every message content gets one final reply, in
  order (RFC 2920), so commands are matched to replies in a queue. Quiet:
  no partial reply, every command answered, no content coming and no mail
  transaction open (a ``MAIL`` accepted and its message not yet ended, with
  ``RSET`` ending it too): a ``421`` between transactions loses nothing the
  client believes sent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from .imapframe import Scanner

Write = Callable[[bytes], Any]

#: How much of an SMTP line is kept to read its verb or reply code.
_SMTP_HEAD = 32
#: How much of what the IMAP client got last is kept, to see a BYE.
_TAIL_KEPT = 128


class ImapBoundaries:
    """The framing state of both directions of one spliced IMAP session."""

    # One a held session: slots, not a dictionary.
    __slots__ = (
        "down",
        "up",
        "sent",
        "answered",
        "_tagged",
        "idling",
        "loggedOut",
        "_tail",
        "_toClient",
        "_toUpstream",
        "afterWrite",
    )

    def __init__(self) -> None:
        # The provider's side: no Python a line (its tagged responses are
        # counted by the scanner); the client's: a look at each command.
        self.down = Scanner()
        self.up = Scanner(onStart=self._command)
        self.sent = 0
        self.answered = 0
        self._tagged = 0
        self.idling = False
        # The client said LOGOUT: the provider's close is its goodbye.
        self.loggedOut = False
        # The last bytes the client got (for ``farewell``).
        self._tail = b""
        self.afterWrite: Callable[[], None] | None = None

    def _command(self, head: bytes) -> None:
        words = head.split(None, 2)
        if not words:
            return  # an empty line: no command, no answer
        if len(words) == 1 and words[0].upper() == b"DONE":
            self.idling = False
            return
        self.sent += 1
        if len(words) >= 2:
            verb = words[1].upper()
            if verb == b"IDLE":
                self.idling = True
            elif verb == b"LOGOUT":
                self.loggedOut = True

    @property
    def betweenResponses(self) -> bool:
        """A line of the proxy's own may go to the client now."""
        return self.down.atBoundary

    @property
    def farewell(self) -> bool:
        """The client has had a goodbye: it logged out, or the last response was a BYE."""
        if self.loggedOut:
            return True
        tail = self._tail
        start = tail.rfind(b"\n", 0, len(tail) - 1) + 1
        if start == 0 and len(tail) == _TAIL_KEPT:
            return False  # a last line longer than what is kept
        return tail[start : start + 5].upper() == b"* BYE"

    @property
    def quiet(self) -> bool:
        inFlight = self.sent - self.answered
        return (
            self.down.atBoundary
            and self.up.atBoundary
            and (inFlight == 0 or (inFlight == 1 and self.idling))
        )

    # The relays are bound methods, not closures: fewer objects a session.
    # Each direction is made once per session: a second call replaces the
    # first's writer. ``afterWrite``, when set, is called after each write
    # (the splice's wait for a quiet session).
    def toClient(self, write: Write) -> Write:
        """``write``, after following what the client gets."""
        self._toClient = write
        return self._relayToClient

    def toUpstream(self, write: Write) -> Write:
        """``write``, after following what the client sends."""
        self._toUpstream = write
        return self._relayToUpstream

    def _relayToClient(self, data: bytes) -> Any:
        down = self.down
        down.skim(data)
        if down.tagged != self._tagged:
            # Tagged responses begun since the last read answer the oldest commands.
            new, self._tagged = down.tagged - self._tagged, down.tagged
            self.answered = min(self.sent, self.answered + new)
            if self.answered == self.sent:
                self.idling = False
        if len(data) >= _TAIL_KEPT:
            self._tail = data[-_TAIL_KEPT:]
        else:
            self._tail = (self._tail + data)[-_TAIL_KEPT:]
        result = self._toClient(data)
        if self.afterWrite is not None:
            self.afterWrite()
        return result

    def _relayToUpstream(self, data: bytes) -> Any:
        self.up.skim(data)
        result = self._toUpstream(data)
        if self.afterWrite is not None:
            self.afterWrite()
        return result


class _Lines:
    """The first bytes of each CRLF line of a stream, handed out as lines end."""

    def __init__(self, onLine: Callable[[bytes], None]) -> None:
        self.onLine = onLine
        self.partial = False
        self._head = b""

    def feed(self, data: bytes, pos: int = 0) -> int:
        """Follow ``data`` from ``pos`` to the end of its first line; :return: where it stopped."""
        newline = data.find(b"\n", pos)
        stop = len(data) if newline < 0 else newline + 1
        if len(self._head) < _SMTP_HEAD:
            self._head += data[pos : min(stop, pos + _SMTP_HEAD - len(self._head))]
        if newline < 0:
            self.partial = True
            return stop
        head, self._head, self.partial = self._head, b"", False
        self.onLine(head)
        return stop


class SmtpBoundaries:
    """The framing state of both directions of one spliced SMTP session."""

    def __init__(self) -> None:
        self.afterWrite: Callable[[], None] | None = None
        self._replies = _Lines(self._reply)
        self._commands = _Lines(self._command)
        # The commands sent and not yet answered, oldest first (verbs, and
        # ``.`` for a message's content).
        self.pending: deque[bytes] = deque()
        self.multiline = False
        self.transaction = False
        # Message content coming from the client: after DATA's 354, the
        # last bytes seen (to find CRLF.CRLF across reads); for BDAT, the
        # bytes of the chunk still to come.
        self.content: bytes | None = None
        self.chunk = 0
        self.farewell = False

    def _reply(self, head: bytes) -> None:
        code, more = head[:3], head[3:4] == b"-"
        self.multiline = more
        if more or not self.pending:
            if not more:
                self.farewell = code in (b"221", b"421")
            return
        verb = self.pending.popleft()
        self.farewell = code in (b"221", b"421")
        if verb == b"MAIL" and code[:1] == b"2":
            self.transaction = True
        elif verb in (b".", b"RSET", b"BDAT LAST"):
            self.transaction = False
        elif verb == b"DATA" and code == b"354":
            self.content = b"\r\n"

    def _command(self, head: bytes) -> None:
        words = head.split()
        verb = words[0].upper() if words else b""
        if verb == b"BDAT" and len(words) >= 2 and words[1].isdigit():
            self.chunk = int(words[1])
            last = len(words) >= 3 and words[2].upper() == b"LAST"
            self.pending.append(b"BDAT LAST" if last else b"BDAT")
            return
        self.pending.append(verb)

    @property
    def betweenResponses(self) -> bool:
        return not self._replies.partial and not self.multiline

    @property
    def quiet(self) -> bool:
        return (
            self.betweenResponses
            and not self._commands.partial
            and not self.pending
            and self.content is None
            and not self.chunk
            and not self.transaction
        )

    # As ImapBoundaries': bound methods, each direction made once a session.
    def toClient(self, write: Write) -> Write:
        """``write``, after following the replies the client gets."""
        self._toClient = write
        return self._relayToClient

    def toUpstream(self, write: Write) -> Write:
        """``write``, after following what the client sends."""
        self._toUpstream = write
        return self._relayToUpstream

    def _relayToClient(self, data: bytes) -> Any:
        pos, end = 0, len(data)
        while pos < end:
            pos = self._replies.feed(data, pos)
        result = self._toClient(data)
        if self.afterWrite is not None:
            self.afterWrite()
        return result

    def _relayToUpstream(self, data: bytes) -> Any:
        self._follow(data)
        result = self._toUpstream(data)
        if self.afterWrite is not None:
            self.afterWrite()
        return result

    def _follow(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self.chunk:
                taken = min(self.chunk, end - pos)
                self.chunk -= taken
                pos += taken
            elif self.content is not None:
                pos = self._inContent(data, pos)
            else:
                pos = self._commands.feed(data, pos)

    def _inContent(self, data: bytes, pos: int) -> int:
        """Message content up to its ``CRLF.CRLF`` (the CRLF before may be DATA's own)."""
        seen = self.content or b""
        window = seen + data[pos : pos + 5]
        at = window.find(b"\r\n.\r\n")
        if at < 0:
            at = data.find(b"\r\n.\r\n", pos)
            if at < 0:
                self.content = (seen + data[max(pos, len(data) - 4) :])[-4:]
                return len(data)
            stop = at + 5
        else:
            stop = pos + at + 5 - len(seen)
        self.content = None
        self.pending.append(b".")
        return stop
