"""
The services ``twistd imapproxy`` is made of, around the protocol pieces:
listeners that must all listen or the process ends, the key and certificate
watches, ``SIGHUP``, and the clean-up at shutdown.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from .encryption import SecretKeyError, writeLoadedMarker

log = Logger()

# Seconds between looks at the key file (``imapproxy secrets add-key``).
KEY_RELOAD_INTERVAL = 5.0


class StartupFailed(Exception):
    """
    The service cannot start. An exception, not ``SystemExit``: twistd
    reports an ``Exception`` from a daemonized start to the waiting parent
    (``An error has occurred: …``, status 1), and waits forever otherwise.
    """


def _oneLine(previous: Any, kind: Any, value: BaseException, tb: Any) -> None:
    if isinstance(value, StartupFailed):
        # twistd sends sys.stderr to the log, which already has the line.
        stream = sys.__stderr__ or sys.stderr
        stream.write(f"imapproxy: {value}\n")
        stream.flush()
    else:
        previous(kind, value, tb)


def startupFailed(message: str) -> None:
    """
    End the start-up with one line, in the log and on standard error (not a
    traceback), and exit status 1 so that a supervisor (systemd's
    ``Restart=on-failure``) sees the failure.

    :raises StartupFailed: always, out of twistd to the interpreter.
    """
    log.critical("{message}", message=message)
    sys.excepthook = partial(_oneLine, sys.excepthook)
    raise StartupFailed(message)


class ListeningEndpoint:
    """
    An endpoint that remembers the port it got, or why it got none, and logs
    the address (the tests and operators read it from the log).

    :param what: ``IMAP`` or ``API``, for the log.
    """

    def __init__(self, endpoint: Any, description: str, what: str, reactor: Any):
        self.endpoint = endpoint
        self.description = description
        self.what = what
        self.port: Any = None
        self.error: str | None = None
        self._reactor = reactor
        self._started = False

    def listen(self, factory: Any) -> Any:
        d = self.endpoint.listen(factory)
        return d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: Any) -> Any:
        self.port = port
        host = port.getHost()
        kind = self.description.split(":", 1)[0]
        if self.description.startswith("haproxy:ssl:"):
            kind = "haproxy+ssl"
        log.info(
            "{what} listening on {host}:{port} ({kind})",
            what=self.what,
            host=getattr(host, "host", host),
            port=getattr(host, "port", ""),
            kind=kind,
        )
        return port

    def _failed(self, failure: Any) -> None:
        cause = getattr(failure.value, "socketError", None)
        reason = getattr(cause, "strerror", None) or failure.getErrorMessage()
        self.error = f"cannot listen on {self.description}: {reason}"
        if self._started:
            # Only an endpoint that answers once the reactor runs gets here:
            # nothing else may be served, and the exit status must say so.
            log.critical("{error}", error=self.error)
            self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self._reactor.stop()
        return None

    def started(self) -> None:
        self._started = True


class ProxyService(MultiService):
    """
    The whole service. Every listener listens in ``privilegedStartService``,
    before the reactor runs (and before twistd drops root): when one cannot,
    the others are closed and the process ends with one line and status 1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[ListeningEndpoint] = []
        # (what, service) of each listener, for the stop sequence.
        self.listenerServices: list[tuple[str, Any]] = []
        # ``drain.Drain``: the stop sequence (front doors, drain, the rest).
        self.drain: Any = None
        # --log-format json: the observer twistd starts logging to.
        self.logObserver: Any = None

    def setServiceParent(self, parent: Any) -> None:
        # twistd puts the service in its Application, then starts logging to
        # the Application's ILogObserver component if it has one (the way a
        # .tac file picks its log observer).
        if self.logObserver is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.logObserver)
        super().setServiceParent(parent)

    def addListener(self, endpoint: ListeningEndpoint, factory: Any) -> None:
        self.listeners.append(endpoint)
        service = StreamServerEndpointService(endpoint, factory)
        service.setServiceParent(self)
        self.listenerServices.append((endpoint.what, service))

    def stopService(self) -> Any:
        if self.drain is None:
            return super().stopService()
        return self.drain.stop(self)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failed = [e.error for e in self.listeners if e.error is not None]
        for e in self.listeners:
            e.started()
        if failed:
            for e in self.listeners:
                if e.port is not None:
                    e.port.stopListening()
            startupFailed(failed[0])


class Closing(Service):
    """Runs a callable when the service stops (thread pools, open sessions)."""

    def __init__(self, onStop: Any):
        self._onStop = onStop

    def stopService(self) -> Any:
        super().stopService()
        return self._onStop()


class KeyWatch:
    """
    Re-reads the key file (keys added with ``imapproxy secrets add-key``) and
    records the keys in use beside it, so that the admin command can tell
    whether a running server picked a new key up.
    """

    def __init__(
        self,
        store: Any,
        reactor: Any,
        pid: int | None = None,
        runInThread: Callable[..., Deferred[Any]] | None = None,
    ):
        self._store = store
        self._reactor = reactor
        self._run = runInThread
        self._pid = os.getpid() if pid is None else pid
        self._recorded: list[bytes] | None = None
        self._markerFailed = False

    def service(self, interval: float = KEY_RELOAD_INTERVAL) -> TimerService:
        watch = TimerService(interval, self.check)
        watch.clock = self._reactor
        return watch

    def check(self) -> Any:
        secrets = self._store.secrets
        d = self._store.reloadSecrets()

        def changed(yes: bool) -> Any:
            if yes:
                log.info("secret keys reloaded from {path}", path=secrets.path)
            return self._record()

        def invalid(failure: Any) -> None:
            # A broken key file must not stop the watch: keep the keys in use.
            failure.trap(SecretKeyError)
            log.error(
                "key file {path} not loaded, keeping the current keys: {error}",
                path=secrets.path,
                error=failure.getErrorMessage(),
            )

        return d.addCallbacks(changed, invalid)

    def _record(self) -> Any:
        secrets = self._store.secrets
        if secrets.path is None or secrets.keys == self._recorded:
            return None
        keys = list(secrets.keys)
        run = self._run or partial(
            threads.deferToThreadPool, self._reactor, self._reactor.getThreadPool()
        )
        d = run(writeLoadedMarker, secrets.path, keys, self._pid)

        def done(_: Any) -> None:
            self._recorded = keys

        def failed(failure: Any) -> None:
            failure.trap(OSError)
            if not self._markerFailed:
                self._markerFailed = True
                log.warn(
                    "cannot record the keys in use beside {path} ({error}): "
                    "'imapproxy secrets add-key' cannot tell whether this server loaded a key",
                    path=secrets.path,
                    error=failure.value.strerror,
                )

        return d.addCallbacks(done, failed)


class Hangup(Service):
    """``SIGHUP`` runs ``onHangup`` in the reactor thread (reload certificate and keys)."""

    def __init__(self, reactor: Any, onHangup: Any):
        self._reactor = reactor
        self._onHangup = onHangup
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._received)

    def _received(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._onHangup)

    def stopService(self) -> Any:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return None


def freezeStartup(reactor: Any, freeze: Callable[[], None] = gc.freeze) -> None:
    """
    Once ``reactor`` runs (every module imported, every service built), move
    what the process holds to the collector's permanent generation: its
    full passes then walk only what came after (sessions, caches), not the
    80,000 or so objects of the code itself again at each one. They are
    still freed by reference counting; only cycles among them stay.
    """
    reactor.callWhenRunning(freeze)


def raiseFileLimit() -> int:
    """
    Raise the soft limit on open files to the hard one: a spliced session
    holds two, and the usual soft default (1,024) would stop the proxy near
    500 sessions. :return: the limit now in force.
    """
    try:
        import resource
    except ImportError:  # not on Unix
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft and (hard == resource.RLIM_INFINITY or hard > soft):
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1048576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
