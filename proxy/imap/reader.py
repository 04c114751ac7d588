"""
Reading the pre-auth commands off the wire: a line, and for each literal
it announces the literal's data and the rest of the line, up to a complete
command, which is then parsed (``syntax.py``) and run.

Everything is bounded (line length, literal size, the command's size with its
literals, the number of commands) and every mistake gets a fixed ``BAD``.
A command refused before its end (an unknown command, a login that needs
TLS) is still read to its end, past any non-synchronizing literal, so that
its data is never taken for commands; a synchronizing literal of a refused
command is answered with the refusal instead of a continuation.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from typing import Any

import attrs
from twisted.logger import Logger

from . import syntax

log = Logger(namespace="proxy.imap")

UNKNOWN = b"Command unknown or not valid before login"

# The commands answered before login: how to parse their arguments, and the
# name of the method that runs them with the tag and those arguments.
COMMANDS: dict[bytes, tuple[Callable[[list[syntax.Token]], tuple[Any, ...]], str]] = {
    b"CAPABILITY": (syntax.noArguments, "do_CAPABILITY"),
    b"NOOP": (syntax.noArguments, "do_NOOP"),
    b"LOGOUT": (syntax.noArguments, "do_LOGOUT"),
    b"STARTTLS": (syntax.noArguments, "do_STARTTLS"),
    b"ID": (syntax.idArguments, "do_ID"),
    b"LOGIN": (syntax.loginArguments, "do_LOGIN"),
    b"AUTHENTICATE": (syntax.authenticateArguments, "do_AUTHENTICATE"),
}


@attrs.define
class _Command:
    """
    A command being read: its first line, then each literal and the rest of
    the line after it.

    :ivar verdict: once the answer is known (a refusal), the rest is only
        read past and the verdict given, with the tag, at its end.
    """

    tag: bytes
    name: bytes
    tokens: list[syntax.Token] = attrs.Factory(list)
    verdict: Callable[[bytes], None] | None = None
    size: int = 0
    remaining: int = 0
    literal: bytearray | None = None


class CommandReader:
    """
    The reading half of ``ProxyServer`` (a ``LineReceiver``), which provides
    ``policy``, ``reading()``, ``refuseEarly(name)``, ``bye(text)`` and the
    response methods of ``IMAP4Server``.

    :ivar continuation: when set, the next line goes to it instead (the
        client's response to an ``AUTHENTICATE`` challenge).
    """

    policy: Any
    address: str
    _command: _Command | None = None
    _commands = 0
    _faulted = False
    continuation: Callable[[bytes], None] | None = None
    # Provided by the server and its bases.
    reading: Callable[[], bool]
    refuseEarly: Callable[[bytes], Callable[[bytes], None] | None]
    bye: Callable[[bytes], None]
    sendBadResponse: Any
    sendContinuationRequest: Any
    setLineMode: Any
    setRawMode: Any

    def lineReceived(self, line: bytes) -> None:
        if not self.reading():
            return
        try:
            if self.continuation is not None:
                respond, self.continuation = self.continuation, None
                respond(line)
            elif self._command is not None:
                self._continue(self._command, line)
            else:
                self._begin(line)
        except Exception as e:
            self._internalError(e)

    def rawDataReceived(self, data: bytes) -> None:
        """The data of a literal, then the rest of its command's line."""
        cmd = self._command
        if not self.reading() or cmd is None or cmd.literal is None:
            return
        take = data[: cmd.remaining]
        cmd.literal += take
        cmd.remaining -= len(take)
        if cmd.remaining:
            return
        if cmd.verdict is None:
            cmd.tokens.append(syntax.Token(syntax.STRING, bytes(cmd.literal)))
        cmd.literal = None
        self.setLineMode(data[len(take) :])

    def _begin(self, line: bytes) -> None:
        self._commands += 1
        if self._commands > self.policy.maxCommands:
            # Even valid commands are bounded: a peer that never logs in (or
            # never reads) cannot make us queue answers until the timeout.
            self.bye(b"Too many commands before login")
            return
        bad = self.sendBadResponse
        try:
            tag, name, rest = syntax.splitCommand(line)
        except syntax.CommandSyntaxError as e:
            bad(None, e.text)
            return
        if not name:
            bad(tag, b"Missing command")
            return
        cmd = self._command = _Command(tag, name)
        if name not in COMMANDS:
            cmd.verdict = functools.partial(bad, message=UNKNOWN)
        else:
            cmd.verdict = self.refuseEarly(name)
        self._continue(cmd, rest)

    def _continue(self, cmd: _Command, piece: bytes) -> None:
        """One piece of ``cmd``: its first line after the name, or a line after a literal."""
        bad = self.sendBadResponse
        cmd.size += len(piece)
        if cmd.size > self.policy.maxCommandSize:
            self.bye(b"Command line too long")
            return
        literal = None
        if cmd.verdict is None:
            try:
                literal = self._parse(cmd, piece)
            except syntax.CommandSyntaxError as e:
                cmd.verdict = functools.partial(bad, message=e.text)
        if cmd.verdict is not None:
            # Refused anyway: only find the literal to read past.
            try:
                literal = syntax.trailingLiteral(piece)
            except syntax.CommandSyntaxError:
                literal = None
        if literal is None:
            self._finish(cmd)
            return
        if literal.size > self.policy.maxLiteral:
            if not literal.synchronizing:
                # Its data is on the way and would be read as commands.
                self.bye(b"Literal too long")
                return
            if cmd.verdict is None:
                cmd.verdict = functools.partial(bad, message=syntax.TOO_LONG.text)
        if literal.synchronizing:
            if cmd.verdict is not None:
                # The client waits for a continuation: answer instead.
                self._finish(cmd)
                return
            self.sendContinuationRequest(b"Ready for %d octets of text" % literal.size)
        cmd.size += literal.size
        cmd.remaining = literal.size
        cmd.literal = bytearray()
        if literal.size:
            self.setRawMode()
        else:
            self.rawDataReceived(b"")

    def _parse(self, cmd: _Command, piece: bytes) -> syntax.Literal | None:
        tokens, literal = syntax.tokenize(piece)
        cmd.tokens.extend(tokens)
        most = syntax.MAX_TOKENS.get(cmd.name, 0)
        if len(cmd.tokens) > most or (literal is not None and len(cmd.tokens) == most):
            raise syntax.TOO_MANY
        if literal is not None and cmd.name not in syntax.TAKES_LITERALS:
            raise syntax.SYNTAX
        return literal

    def _finish(self, cmd: _Command) -> None:
        self._command = None
        if cmd.verdict is not None:
            cmd.verdict(cmd.tag)
            return
        parse, run = COMMANDS[cmd.name]
        try:
            args = parse(cmd.tokens)
        except syntax.CommandSyntaxError as e:
            self.sendBadResponse(cmd.tag, e.text)
            return
        getattr(self, run)(cmd.tag, *args)

    def _internalError(self, error: Exception) -> None:
        """
        A bug, not an input: one log line, without a traceback (which might
        carry the input), once per connection since the connection closes.
        """
        frame = traceback.extract_tb(error.__traceback__)[-1]
        if not self._faulted:
            self._faulted = True
            log.error(
                "internal error in a pre-auth command from {address}: {error} at {where}",
                address=self.address,
                error=type(error).__name__,
                where=f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}",
            )
        self._command = None
        self.continuation = None
        self.bye(b"Internal error")
