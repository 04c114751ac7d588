"""
The client's side of a restricted session: its commands, read as they come
(``imapframe.Scanner``: line segments and literal pieces, a literal never
held whole) and passed to the provider only once judged (``readonly.judge``).

A command is judged on its first line, or, when the mailbox it names comes
as a literal, once that name has been read (at most ``MAX_NAME`` bytes).
A refused command gets ``tag NO`` from the proxy and none of its bytes
reach the provider: a synchronizing literal it announced is answered with
that ``NO`` (the client then sends no data, RFC 3501 section 7.5), a
non-synchronizing one is read and thrown away, counted, never kept.

After passing a line that announces a synchronizing literal, or ``IDLE``,
the proxy waits for the provider's ``+`` or its tagged answer before it
reads on, so that it always knows, as the provider does, whether the next
bytes are data or a command. What the client sends meanwhile is held,
bounded (the client's reading paused past ``MAX_HOLD``).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from ..model import Restrictions
from ..relay.imapframe import LINE, LineTooLong, Scanner
from . import commands, readonly
from .commands import STRING, CommandSyntaxError, Token
from .mailboxes import Patterns

#: Longest mailbox name taken as a literal (it is read before the verdict).
MAX_NAME = 1024
#: Most bytes held while waiting for the provider before the client's
#: reading is paused.
MAX_HOLD = 64 * 1024
#: Non-synchronizing literals a server that announces only LITERAL- takes.
LITERAL_MINUS = 4096

#: Names given to ``onRefused``: the known ones as they are, any other as
#: ``OTHER`` (a client must not be able to make up metric labels).
KNOWN = readonly.READ | readonly.WRITE | {
    b"AUTHENTICATE", b"LOGIN", b"STARTTLS", b"COMPRESS", b"NOTIFY", b"SETQUOTA",
    b"GENURLAUTH", b"RESETKEY", b"URLFETCH", b"XLIST", b"LANGUAGE", b"CANCELUPDATE",
    b"REPLACE", b"UID REPLACE", b"UNAUTHENTICATE",
}  # fmt: skip

_JUDGING, _PASSING, _REFUSED = 0, 1, 2


@attrs.define
class _Command:
    """A command being read: its verdict so far, and what is held until the verdict."""

    tag: bytes
    name: bytes
    state: int = _JUDGING
    tokens: list[Token] = attrs.Factory(list)
    depth: int = 0
    # Judging: the bytes read so far, and which segments announced a
    # synchronizing literal the proxy itself answered.
    head: list[bytes] = attrs.Factory(list)
    answered: list[int] = attrs.Factory(list)
    literal: bytearray | None = None
    rewrite: bytes | None = None
    nameAt: tuple[int, int] = (0, 0)


@attrs.define
class _Wait:
    tag: bytes
    idle: bool


class CommandFilter:
    """
    :param forward: where the provider's bytes go.
    :param answer: the proxy's own whole response to the client.
    :param onRefused: called with the name of each command refused by policy.
    :param literals: ``(LITERAL+, LITERAL-)``: what the provider takes.
    :param fatal: end the session with this text in a ``* BYE``.
    :param pause: stop reading the client (``True``) or read again (``False``).
    """

    def __init__(
        self,
        forward: Callable[[bytes], object],
        answer: Callable[[bytes], object],
        restrictions: Restrictions,
        patterns: Patterns | None,
        onRefused: Callable[[str], object],
        literals: Callable[[], tuple[bool, bool]],
        fatal: Callable[[bytes], object],
        pause: Callable[[bool], object],
    ):
        self._forward = forward
        self._answer = answer
        self.restrictions = restrictions
        self.patterns = patterns
        self._onRefused = onRefused
        self._literals = literals
        self._fatal = fatal
        self._pause = pause
        self.scanner = Scanner()
        self.command: _Command | None = None
        self.waiting: _Wait | None = None
        self.idling: bytes | None = None
        self.swallowed = 0
        self.dead = False
        self._held = bytearray()
        self._paused = False
        # Bytes the scanner holds of a line not yet ended (from earlier reads).
        self._carry = 0

    # -- input ------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.dead:
            return
        if self.waiting is not None:
            self._held += data
            if len(self._held) > MAX_HOLD:
                # Again each time: the provider's side resumes the client
                # when its own buffer drains.
                self._paused = True
                self._pause(True)
            return
        cmd = self.command
        if cmd is not None and cmd.state == _PASSING and self.scanner.literal >= len(data) > 0:
            # Inside a literal that passes: as it is.
            self.scanner.literal -= len(data)
            self._forward(data)
            return
        self._read(data)

    def _read(self, data: bytes) -> None:
        carried, used = self._carry, 0
        try:
            for kind, piece in self.scanner.feed(data):
                used += len(piece)
                if kind == LINE:
                    self._line(piece)
                else:
                    self._literal(piece)
                if self.dead:
                    return
                if self.waiting is not None:
                    # The rest waits for the provider. (A line just ended:
                    # the scanner holds nothing.)
                    self._carry = 0
                    self._held[:0] = data[used - carried :]
                    return
            self._carry = carried + len(data) - used
        except LineTooLong:
            self._die(b"Command line too long")
        except CommandSyntaxError:
            self._die(b"Protocol error")

    def providerContinued(self) -> None:
        """The provider sent ``+``: the command we wait for goes on."""
        wait, self.waiting = self.waiting, None
        if wait is None:
            return
        if wait.idle:
            self.idling = wait.tag
        self._resume()

    def providerAnswered(self, tag: bytes) -> None:
        """The provider ended the command tagged ``tag``."""
        if self.idling == tag:
            self.idling = None
        wait = self.waiting
        if wait is None or wait.tag != tag:
            return
        self.waiting = None
        if not wait.idle:
            # No continuation: the client sends no literal data.
            self._endCommand()
        self._resume()

    def _resume(self) -> None:
        held, self._held = bytes(self._held), bytearray()
        if self._paused:
            self._paused = False
            self._pause(False)
        if held and not self.dead:
            self.feed(held)

    # -- lines --------------------------------------------------------------------

    def _line(self, segment: bytes) -> None:
        cmd = self.command
        if cmd is None:
            self._begin(segment)
        elif cmd.state == _REFUSED:
            self.swallowed += len(segment)
            if self.scanner.announced is None or not self.scanner.nonSynchronizing:
                self._endCommand()
        elif cmd.state == _PASSING:
            self._passOn(cmd, segment)
        else:
            self._judgeMore(cmd, segment)

    def _begin(self, segment: bytes) -> None:
        line = commands.body(segment)
        if self.idling is not None:
            if line.upper() != b"DONE":
                self._die(b"Expected DONE")
                return
            self.idling = None
            self._forward(segment)
            return
        if not line:
            return  # an empty line: nothing to judge, nothing to pass
        try:
            head = commands.parseHead(line)
        except CommandSyntaxError as e:
            tag = line.split(b" ", 1)[0]
            ok = tag and all(c in commands.TAG_CHARS for c in tag)
            self.command = _Command(tag if ok else b"*", b"")
            self._refuse(self.command, e.text, bad=True, policy=False)
            return
        cmd = self.command = _Command(head.tag, head.name, nameAt=(head.nameStart, head.nameEnd))
        self._judgeMore(cmd, segment, line[head.argsStart :])

    def _judgeMore(self, cmd: _Command, segment: bytes, args: bytes | None = None) -> None:
        """A line of a command not yet judged: its first, or one after a mailbox literal."""
        line = commands.body(segment)
        if args is None:
            args = line
        try:
            commands.checkLine(line)
            if cmd.name == b"ENABLE" or (
                self.patterns is not None and cmd.name in readonly.MAILBOX_ARGS
            ):
                more, cmd.depth = commands.tokenize(commands.withoutAnnouncement(args), cmd.depth)
                cmd.tokens.extend(more)
        except CommandSyntaxError as e:
            self._refuse(cmd, e.text, bad=True, policy=False)
            return
        cmd.head.append(segment)
        complete = self.scanner.announced is None
        verdict = readonly.judge(cmd.name, cmd.tokens, complete, self.restrictions, self.patterns)
        if verdict is not None and self._reaches(cmd, line):
            verdict = readonly.Verdict(readonly.NOT_THAT_COMMAND)
        if verdict is None:
            self._readName(cmd)
        elif verdict.refusal is not None:
            self._refuse(cmd, verdict.refusal, bad=verdict.bad, policy=not verdict.bad)
        elif not self._literalTaken():
            self._refuse(cmd, b"Non-synchronizing literal not supported", bad=True, policy=False)
        else:
            cmd.rewrite = verdict.rewrite
            self._passHead(cmd)

    def _readName(self, cmd: _Command) -> None:
        """The mailbox the verdict needs comes as a literal: read it first."""
        size = self.scanner.announced or 0
        plus, minus = self._literals()
        if size > MAX_NAME:
            self._refuse(cmd, b"Mailbox name too long", bad=True, policy=False)
            return
        if not (plus or minus):
            text = b"Mailbox names as literals are not supported here"
            self._refuse(cmd, text, bad=True, policy=False)
            return
        if not self.scanner.nonSynchronizing:
            # Passed on later as non-synchronizing: the proxy asks for it.
            cmd.answered.append(len(cmd.head) - 1)
            self._answer(b"+ Ready for literal data\r\n")
        cmd.literal = bytearray()
        if size == 0:
            self._literal(b"")

    def _reaches(self, cmd: _Command, line: bytes) -> bool:
        """
        Whether a line of ``cmd`` reaches other mailboxes by other means than
        a mailbox argument: Gmail's labels name other folders (``FETCH
        X-GM-LABELS``) and reach into them (``SEARCH X-GM-RAW "in:…"``);
        ``APPEND … CATENATE (URL …)`` copies from any mailbox. Not for a
        token restricted to some mailboxes.
        """
        if self.patterns is None:
            return False
        upper = line.upper()
        if cmd.name == b"APPEND" and b"CATENATE" in upper:
            return True
        return b"X-GM-LABELS" in upper or b"X-GM-RAW" in upper

    def _literalTaken(self) -> bool:
        """Whether the provider takes the non-synchronizing literal just announced."""
        if self.scanner.announced is None or not self.scanner.nonSynchronizing:
            return True
        plus, minus = self._literals()
        return plus or (minus and self.scanner.announced <= LITERAL_MINUS)

    def _passHead(self, cmd: _Command) -> None:
        """A command judged fine: what was read of it goes on, then the rest as it comes."""
        parts = list(cmd.head)
        first = parts[0]
        if cmd.rewrite is not None:
            start, end = cmd.nameAt
            parts[0] = first[:start] + cmd.rewrite + first[end:]
        for i in cmd.answered:
            line = commands.body(parts[i])
            parts[i] = line[:-1] + b"+}" + parts[i][len(line) :]
        cmd.head = []
        cmd.state = _PASSING
        self._forward(b"".join(parts))
        self._afterPassing(cmd)

    def _passOn(self, cmd: _Command, segment: bytes) -> None:
        """A line after a literal of a command passing: checked like the first."""
        try:
            commands.checkLine(commands.body(segment))
        except CommandSyntaxError:
            self._die(b"Protocol error")
            return
        if not self._literalTaken():
            self._die(b"Non-synchronizing literal not supported")
            return
        if self._reaches(cmd, commands.body(segment)):
            self._die(b"This token may not use that command")
            return
        self._forward(segment)
        self._afterPassing(cmd)

    def _afterPassing(self, cmd: _Command) -> None:
        if self.scanner.announced is None:
            self.command = None
            if cmd.name == b"IDLE":
                self.waiting = _Wait(cmd.tag, idle=True)
        elif not self.scanner.nonSynchronizing:
            self.waiting = _Wait(cmd.tag, idle=False)

    # -- literals ---------------------------------------------------------------

    def _literal(self, piece: bytes) -> None:
        cmd = self.command
        if cmd is None:
            return
        if cmd.state == _PASSING:
            self._forward(piece)
        elif cmd.state == _REFUSED:
            self.swallowed += len(piece)
        elif cmd.literal is not None:
            cmd.literal += piece
            if self.scanner.literal == 0:
                cmd.head.append(bytes(cmd.literal))
                cmd.tokens.append(Token(STRING, bytes(cmd.literal)))
                cmd.literal = None

    # -- endings ----------------------------------------------------------------

    def _refuse(self, cmd: _Command, text: bytes, *, bad: bool, policy: bool) -> None:
        """Answer ``cmd`` from the proxy; what is left of it is never passed on."""
        self._answer(cmd.tag + (b" BAD " if bad else b" NO ") + text + b"\r\n")
        if policy:
            self._onRefused(cmd.name.decode("ascii") if cmd.name in KNOWN else "OTHER")
        cmd.head = []
        cmd.literal = None
        if self.scanner.announced is not None and self.scanner.nonSynchronizing:
            cmd.state = _REFUSED  # its data comes anyway: read past it
        else:
            self._endCommand()

    def _endCommand(self) -> None:
        """The command is over; a synchronizing literal it announced will not come."""
        self.command = None
        self.scanner.literal = 0
        self.scanner.announced = None
        self.scanner.atBoundary = True

    def _die(self, text: bytes) -> None:
        self.dead = True
        self._held = bytearray()
        self._fatal(text)
