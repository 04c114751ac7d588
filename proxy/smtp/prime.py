"""
Priming the EHLO cache: at start-up, and again every few minutes for those
still unknown, the SMTP servers of the stored accounts are asked for their
EHLO (``proxy.upstream.probeSMTP``: connect, EHLO, STARTTLS, EHLO, QUIT; no
login), so that the first clients are offered what their providers have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .extensions import ProviderExtensions

log = Logger(namespace="proxy.smtp")

# Seconds between two rounds (each probes only the servers still unknown).
PROBE_INTERVAL = 300.0


def serverKey(upstream: Any) -> str:
    """An SMTP upstream as the cache knows it: ``host:port``, as ``session.server``."""
    return f"{upstream.host}:{upstream.port}"


class ExtensionsPrimer(Service):
    """
    :param accounts: the account store (``listAccounts``).
    :param extensions: the cache to prime.
    :param probe: ``(upstream) -> Deferred[list[bytes]]``, the server's EHLO keywords.
    :param clock: ``IReactorTime`` for the rounds.
    :param interval: seconds between rounds.

    A server that cannot be probed is named once in the log (again only
    after it answered once); until it answers a probe or a login reaches
    it, what it offers is unknown and does not limit the EHLO.
    """

    def __init__(
        self,
        accounts: Any,
        extensions: ProviderExtensions,
        probe: Callable[[Any], Deferred[list[bytes]]],
        clock: Any,
        interval: float = PROBE_INTERVAL,
    ):
        self._accounts = accounts
        self._extensions = extensions
        self._probe = probe
        self._clock = clock
        self._interval = interval
        self._loop: LoopingCall | None = None
        self._inflight: dict[str, Deferred[Any]] = {}
        self._failed: set[str] = set()
        self._storeFailed = False

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.round)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: log.failure("priming the SMTP extensions stopped", f)
        )

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for d in list(self._inflight.values()):
            d.cancel()
        return None

    def round(self) -> Deferred[None]:
        """Probe the stored accounts' servers not known yet; fires once they are started."""
        return ensureDeferred(self._round())

    async def _round(self) -> None:
        try:
            accounts = await self._accounts.listAccounts()
        except Exception as e:
            if not self._storeFailed:
                self._storeFailed = True
                log.warn(
                    "cannot list the accounts to probe their SMTP servers: {error}",
                    error=type(e).__name__,
                )
            return
        self._storeFailed = False
        upstreams: dict[str, Any] = {}
        for account in accounts:
            if account.smtp is not None:
                upstreams.setdefault(serverKey(account.smtp), account.smtp)
        for key in sorted(self._extensions.expect(upstreams)):
            if key not in self._inflight:
                self._start(key, upstreams[key])

    def _start(self, key: str, upstream: Any) -> None:
        try:
            d = self._probe(upstream)
        except Exception as e:
            d = Deferred()
            d.errback(e)
        self._inflight[key] = d
        d.addCallbacks(self._learned, self._failedProbe, callbackArgs=(key,), errbackArgs=(key,))
        d.addBoth(self._done, key)

    def _done(self, _: object, key: str) -> None:
        self._inflight.pop(key, None)

    def _learned(self, extensions: list[bytes], key: str) -> None:
        self._failed.discard(key)
        self._extensions.learn(key, extensions)
        log.info(
            "SMTP server {server} offers {extensions}",
            server=key,
            extensions=" ".join(e.decode("ascii", "replace") for e in extensions),
        )

    def _failedProbe(self, failure: Any, key: str) -> None:
        if failure.check(CancelledError):
            return
        self._extensions.unreachable(key)
        if key in self._failed:
            return
        self._failed.add(key)
        error = failure.value
        log.warn(
            "probing SMTP server {server} failed ({reason}); tried again every {interval} s",
            server=key,
            reason=getattr(error, "reason", None) or type(error).__name__,
            interval=round(self._interval),
        )
