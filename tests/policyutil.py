"""
A restricted session in memory for the policy relay's tests: a client and
a provider over ``StringTransport``, spliced by a ``PolicySplice``, and a
small IMAP server model (``Provider``) that frames what reaches it as the
provider would (lines, literals, ``+`` for synchronizing literals, IDLE) and
keeps every command it would run.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import task
from twisted.internet.testing import StringTransport

from proxy.model import Restrictions
from proxy.policy import PolicySplice

CAPS = [b"IMAP4rev1", b"LITERAL+", b"IDLE", b"UIDPLUS", b"MOVE", b"COMPRESS=DEFLATE"]
_ANNOUNCED = re.compile(rb"\{([0-9]+)(\+?)\}\r?\n\Z")


class Leg:
    def __init__(self, capabilities: list[bytes] | None = None):
        self.transport = StringTransport()
        self.sink: Any = None
        self.bytesReceived = 0
        self.paused = True
        self.capabilities = capabilities

    def takeOver(self, sink: Any, onLost: Any) -> bytes:
        self.sink = sink
        return b""


class Provider:
    """
    What the provider makes of the bytes it gets: ``commands`` holds, for
    each command it would run, ``(tag, NAME, first line)``. Answers ``+`` to
    synchronizing literals and a tagged OK to each command, unless told not
    to (``answer``), or a tagged BAD before the literal (``refuseLiterals``).
    """

    def __init__(self, session: Session):
        self.session = session
        self.buffer = b""
        self.commands: list[tuple[bytes, bytes, bytes]] = []
        #: Each command's bytes as they came, literals included.
        self.raw: list[bytes] = []
        self._raw = b""
        self.literal = 0
        self.current: tuple[bytes, bytes, bytes] | None = None
        self.idling: bytes | None = None
        self.answer = True
        self.refuseLiterals = False

    def run(self) -> None:
        self.buffer += self.session.upstream.transport.value()
        self.session.upstream.transport.clear()
        while True:
            if self.literal:
                taken = min(self.literal, len(self.buffer))
                self.literal -= taken
                self._raw += self.buffer[:taken]
                self.buffer = self.buffer[taken:]
                if self.literal:
                    return
            newline = self.buffer.find(b"\n")
            if newline < 0:
                return
            line, self.buffer = self.buffer[: newline + 1], self.buffer[newline + 1 :]
            self._line(line)

    def _line(self, line: bytes) -> None:
        if self.idling is not None:
            tag, self.idling = self.idling, None
            self._reply(tag + b" OK Idle done\r\n")
            return
        if self.current is None:
            words = line.rstrip(b"\r\n").split(b" ")
            name = words[1].upper() if len(words) > 1 else b""
            if name == b"UID" and len(words) > 2:
                name += b" " + words[2].upper()
            self.current = (words[0], name, line)
            self._raw = b""
        self._raw += line
        m = _ANNOUNCED.search(line)
        if m is not None:
            if not m.group(2):
                if self.refuseLiterals:
                    tag = self.current[0]
                    self.current = None
                    self._reply(tag + b" BAD No literal for you\r\n")
                    return
                self._reply(b"+ go on\r\n")
            self.literal = int(m.group(1))
            return
        cmd, self.current = self.current, None
        self.commands.append(cmd)
        self.raw.append(self._raw)
        if cmd[1] == b"IDLE":
            self.idling = cmd[0]
            self._reply(b"+ idling\r\n")
        elif self.answer:
            self._reply(cmd[0] + b" OK done\r\n")

    def _reply(self, data: bytes) -> None:
        self.session.reply(data)

    @property
    def names(self) -> list[bytes]:
        return [name for _, name, _ in self.commands]


class Session:
    def __init__(
        self,
        readOnly: bool = True,
        mailboxes: tuple[str, ...] = (),
        capabilities: list[bytes] | None = None,
        auto: bool = True,
    ):
        self.clock = task.Clock()
        self.client = Leg()
        self.upstream = Leg(CAPS if capabilities is None else capabilities)
        self.refused: list[str] = []
        self.splice = PolicySplice(
            self.client,
            self.upstream,
            "test",
            callLater=self.clock.callLater,
            seconds=self.clock.seconds,
            restrictions=Restrictions(readOnly=readOnly, mailboxes=mailboxes),
            onRefused=self.refused.append,
        )
        self.splice.start(b"")
        self.provider = Provider(self)
        self.auto = auto

    def send(self, data: bytes) -> None:
        """The client sends ``data`` (one read); the provider model answers if ``auto``."""
        self.client.sink(data)
        if self.auto:
            self.provider.run()

    def reply(self, data: bytes) -> None:
        self.upstream.sink(data)
        if self.auto:
            self.provider.run()

    def toProvider(self) -> bytes:
        data = self.upstream.transport.value()
        self.upstream.transport.clear()
        return data

    def toClient(self) -> bytes:
        data = self.client.transport.value()
        self.client.transport.clear()
        return data
