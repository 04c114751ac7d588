"""
The stop sequence of ``twistd imapproxy`` (SIGTERM, Ctrl-C, ``systemctl
stop``): twistd stops the reactor, which first stops the service tree and
waits for the Deferred it returns. ``ProxyService.stopService`` hands that to
:meth:`Drain.stop`, which goes in this order:

1. The IMAP and SMTP listeners close (new connections are refused at once;
   a TCP health check on them, HAProxy's ``check``, fails at its next try),
   and ``/health`` answers 503 ``draining`` (an HTTP health check fails too).
   The API and metrics listeners stay, so the drain can be watched.
2. Every spliced session is asked to end at its next clean point
   (``Splice.closeWhenIdle``): idle ones, IDLE included, read ``* BYE
   imapproxy is shutting down`` / ``421 4.3.2 … Service shutting down`` at
   once; those in the middle of a transfer or with commands in flight get it
   as soon as what is in flight has been relayed. Logins that complete now
   are ended the same way right after their OK.
3. After ``--drain-timeout`` seconds the sessions still open are cut (no
   line: it would land inside a response); a second SIGTERM or SIGINT
   (Ctrl-C twice) cuts them at once.
4. The other services stop (API listeners, store, timers, thread pools) as
   before, and the process exits with status 0.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger

from . import auditlog

log = Logger()

#: The listeners closed first (``ListeningEndpoint.what``).
FRONT_DOORS = ("IMAP", "SMTP")


class Drain:
    """
    :param sessions: the ``SessionRegistry`` of live sessions.
    :param timeout: seconds given to sessions in the middle of a transfer.
    :param clock: ``IReactorTime``; with ``signals``, the reactor
        (``callFromThread``).
    :param signals: while draining, a second SIGTERM or SIGINT cuts what is
        left at once (the real twistd; twistd's own handlers would only try
        to stop the stopping reactor again).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, sessions: Any, timeout: float, clock: Any, signals: bool = False) -> None:
        self.sessions = sessions
        self.timeout = timeout
        self.clock = clock
        self.signals = signals
        self._previous: dict[int, Any] = {}
        self.draining = False
        self._open: set[Any] = set()
        self._clean = 0
        self._done: Deferred[None] | None = None
        self._deadline: Any = None
        self._began = 0.0
        self._asking = False

    def stop(self, top: Any) -> Deferred[Any]:
        """
        Stop ``top`` (the ``ProxyService``, with ``listenerServices``): front doors,
        drain, then every other service in reverse order, as
        ``MultiService.stopService`` would.
        """
        Service.stopService(top)
        doors = [s for what, s in top.listenerServices if what in FRONT_DOORS]
        self.draining = True
        closing = DeferredList([maybeDeferred(s.stopService) for s in doors])
        closing.addCallback(lambda _: self.run())
        # Whatever happened, the rest must stop: the process has to end.
        closing.addErrback(lambda f: log.failure("the drain failed", f))

        def others(_: Any) -> Deferred[Any]:
            rest = [s for s in reversed(list(top)) if s not in doors]
            return DeferredList([maybeDeferred(s.stopService) for s in rest])

        return closing.addCallback(others)

    def run(self) -> Deferred[None]:
        """
        Ask every session to end at a clean point; :return: a Deferred fired
        once they all closed, or the drain timeout came and the rest were cut.
        """
        self.draining = True
        self._done = Deferred()
        self._began = self.clock.seconds()
        if self.signals:
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._again)
        self._asking = True
        try:
            n = self.sessions.drain(self._asked)
        finally:
            self._asking = False
        log.info(
            "stopping: new connections refused; {n} sessions to end, within {t}s",
            n=n,
            t=self.timeout,
        )
        auditlog.drain("start", n, 0, 0.0)
        done = self._done
        if not self._open:
            self._finish()
        else:
            self._deadline = self.clock.callLater(self.timeout, self._finish)
        return done

    def _asked(self, splice: Any) -> None:
        self._open.add(splice)
        splice.whenClosed().addCallback(self._closed, splice)

    def _closed(self, _: Any, splice: Any) -> None:
        if splice in self._open:
            self._open.discard(splice)
            self._clean += 1
            if not self._open and self._done is not None and not self._asking:
                self._finish()

    def _again(self, number: int, frame: Any) -> None:
        """A second SIGTERM or SIGINT while draining (a signal handler)."""
        self.clock.callFromThread(self._cutNow)

    def _cutNow(self) -> None:
        if self._done is not None:
            log.info("stopping: a second signal, {n} sessions cut now", n=len(self._open))
            self._finish()

    def _finish(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        cut = list(self._open)
        self._open.clear()
        for splice in cut:
            splice.close("shutdown")
        elapsed = self.clock.seconds() - self._began
        log.info(
            "drained in {s:.1f}s: {clean} sessions ended at a clean point, {cut} cut",
            s=elapsed,
            clean=self._clean,
            cut=len(cut),
        )
        auditlog.drain("end", self._clean, len(cut), elapsed)
        done, self._done = self._done, None
        if done is not None:
            done.callback(None)
