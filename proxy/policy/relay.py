"""
``PolicySplice``: the splice of a restricted token's session. The client's
commands go through a ``CommandFilter`` (only what the token may do reaches
the provider), the provider's responses through a ``ResponseFilter``
(capabilities and other mailboxes' names left out, the proxy's refusals put
in between two responses). Both stream: memory per session stays bounded
whatever the size of a message or of a literal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from ..model import Restrictions
from ..relay import Splice
from .commandfilter import CommandFilter
from .mailboxes import Patterns
from .readonly import filterCapabilities
from .responses import ResponseFilter

log = Logger(namespace="proxy.policy")

#: The proxy's own answers waiting for a boundary in the provider's stream
#: past which the client's reading is paused.
MAX_PENDING = 256

__all__ = ["PolicySplice", "filterCapabilities"]


class PolicySplice(Splice):
    """
    A ``Splice`` that enforces ``restrictions`` on the wire.

    :param restrictions: the token's (truthy: an unrestricted token has the
        plain ``Splice``).
    :param onRefused: called with the command's name for each command the
        policy refuses (``"OTHER"`` for a name the proxy does not know): for
        counting and the ``command-refused`` event, never its arguments.
    """

    def __init__(
        self,
        client: Any,
        upstream: Any,
        label: str,
        onEnd: Any = None,
        callLater: Any = None,
        audit: dict[str, Any] | None = None,
        seconds: Any = None,
        *,
        restrictions: Restrictions,
        onRefused: Callable[[str], None],
    ):
        super().__init__(client, upstream, label, onEnd, callLater, audit, seconds)
        self.restrictions = restrictions
        self.onRefused = onRefused
        self.patterns = Patterns(restrictions.mailboxes) if restrictions.mailboxes else None
        self._pausedFor: set[str] = set()
        self.responses: ResponseFilter | None = None
        self.commands = CommandFilter(
            self._toUpstream,
            self._answer,
            restrictions,
            self.patterns,
            self._refused,
            self._literals,
            self._fatal,
            lambda on: self._pauseClient("hold", on),
        )
        self._upstreamWrite: Callable[[bytes], object] | None = None

    # -- the two directions ---------------------------------------------------------

    def toClientSink(self, write: Any) -> Any:
        """The provider's bytes through the response filter; its output to the base's writer."""
        self.responses = ResponseFilter(
            super().toClientSink(write),
            self.restrictions,
            self.patterns,
            self.commands.providerContinued,
            self.commands.providerAnswered,
            self._drained,
        )
        return self._guard(self.responses.feed)

    def toUpstreamSink(self, write: Any) -> Any:
        """The client's bytes through the command filter; what passes to the base's writer."""
        self._upstreamWrite = super().toUpstreamSink(write)
        return self._guard(self.commands.feed)

    def _guard(self, feed: Callable[[bytes], None]) -> Callable[[bytes], None]:
        def guarded(data: bytes) -> None:
            try:
                feed(data)
            except Exception:
                # A bug, not the client's input: never pass bytes unjudged.
                log.failure("policy relay of session {label} failed", label=self.label)
                self.commands.dead = True
                self.close()

        return guarded

    def _toUpstream(self, data: bytes) -> None:
        assert self._upstreamWrite is not None
        self._upstreamWrite(data)

    # -- helpers for the filters ----------------------------------------------------

    def _answer(self, response: bytes) -> None:
        assert self.responses is not None
        self.responses.local(response)
        if self.responses.pending > MAX_PENDING:
            self._pauseClient("pending", True)

    def _drained(self) -> None:
        if "pending" in self._pausedFor:
            self._pauseClient("pending", False)

    def _refused(self, name: str) -> None:
        try:
            self.onRefused(name)
        except Exception:
            log.failure("counting a refused command failed")

    def _literals(self) -> tuple[bool, bool]:
        caps = {c.upper() for c in getattr(self.upstream, "capabilities", None) or ()}
        return b"LITERAL+" in caps, b"LITERAL-" in caps

    def _pauseClient(self, why: str, on: bool) -> None:
        """Stop reading the client while anything needs it (held bytes, answers waiting)."""
        transport = self.client.transport
        if on:
            # Every time: the provider's side resumes the client when its
            # own buffer drains, whatever paused it.
            self._pausedFor.add(why)
            transport.pauseProducing()
        elif why in self._pausedFor:
            self._pausedFor.discard(why)
            if not self._pausedFor:
                transport.resumeProducing()

    def _fatal(self, text: bytes) -> None:
        """The client broke the protocol where the proxy cannot follow: ``* BYE`` and close."""
        log.info("session {label} ended by the policy relay: {why}", label=self.label, why=text)
        self.closedBy = self.closedBy or "client"
        if self.responses is not None:
            self.responses.local(b"* BYE " + text + b"\r\n")
        self.close(by="client")
