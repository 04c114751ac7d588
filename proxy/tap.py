"""
``twistd imapproxy``: the options and ``makeService``.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet import ssl
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage

from . import selfcheck
from .admin import Admin
from .config import ConfigError, readConfig, splitList
from .cred import TokenChecker, UpstreamRealm, upstreamConnector
from .encryption import SecretKeyError
from .endpoints import serverEndpoint
from .imap import PLAINTEXT_POLICIES, ProxyFactory, ServerPolicy, SessionRegistry
from .oauth import AccessTokens, Onboarding, RefreshLeases, ThreadedRefresher
from .pem import splitCertificates
from .store import (
    RedisStore,
    RefreshLock,
    SessionBus,
    StoreError,
    defaultStoreURL,
    makeStore,
)
from .upstream import WarmUpstreams
from .web import TokenAPI

log = Logger()

DEFAULT_PORT = "tcp:2143:interface=127.0.0.1"
DEFAULT_API_PORT = "tcp:8080:interface=127.0.0.1"

# name -> (default, converter, help). One table for the options, the config
# file and tap.example.conf.
SETTINGS: dict[str, tuple[Any, Any, str]] = {
    "store": (
        None,
        str,
        "Where accounts and tokens live: sqlite:///PATH "
        "[default: an SQLite file in the state directory]",
    ),
    "secret-file": (
        None,
        str,
        "File holding the key(s) that encrypt provider secrets "
        "[default: $IMAPPROXY_SECRET_KEY, else secret.key beside the "
        "SQLite file, created on first run]",
    ),
    "plaintext-login": (
        "loopback",
        str,
        "Logins without TLS: allow, loopback (only from loopback clients) or deny",
    ),
    "tls-certificate": (None, str, "PEM certificate (chain) offered with STARTTLS on plain ports"),
    "tls-key": (None, str, "PEM private key for --tls-certificate"),
    "login-timeout": (60.0, float, "Seconds a client has from connecting to logging in"),
    "upstream-timeout": (
        15.0,
        float,
        "Seconds to connect and log in to the provider's IMAP server",
    ),
    "warm-upstream": (
        300.0,
        float,
        "Seconds a spare provider connection, already logged in, waits for the next "
        "login of an account that logged in twice within that time (0: no spares)",
    ),
    "max-warm": (500, int, "Spare provider connections kept at most, all accounts together"),
    "oauth2-timeout": (10.0, float, "Seconds for one request to a token endpoint"),
    "oauth2-deadline": (
        10.0,
        float,
        "Seconds a token refresh may take in all, retries with backoff included; "
        "past it the login gets NO [UNAVAILABLE]",
    ),
    "max-bad-commands": (10, int, "Invalid commands before login, then * BYE"),
    "max-commands": (100, int, "Commands of any kind before login, then * BYE"),
    "max-failed-logins": (3, int, "Refused logins on one connection, then * BYE"),
    "max-line-length": (8192, int, "Longest command line accepted before login"),
    "max-literal": (4096, int, "Largest literal accepted before login"),
    "oauth2-threads": (4, int, "Threads for requests to token endpoints"),
}


# Numeric settings for which 0 means "none".
ZERO_ALLOWED = {"warm-upstream"}

# Settings that may be given several times (one a line in the config file).
LIST_SETTINGS = {"port", "api-port"}


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "An IMAP proxy for OAuth2-only mailboxes: clients log in with an account "
        "id and an imapproxy token; the proxy logs in to the provider with "
        "XOAUTH2 and relays the session. Settings may also come from --config "
        "(see tap.example.conf); command-line options win."
    )
    optParameters = [
        ["config", "c", None, "INI file with an [imapproxy] section of these settings"],
    ] + [
        [
            name,
            None,
            None,
            f"{help_} [default: {default}]"
            if default is not None and "default" not in help_
            else help_,
        ]
        for name, (default, _conv, help_) in SETTINGS.items()
    ]

    def __init__(self) -> None:
        super().__init__()
        self["port"] = []
        self["api-port"] = []

    def opt_port(self, description: str) -> None:
        """
        Endpoint to accept IMAP clients on, e.g. ssl:2993:privateKey=key.pem:certKey=cert.pem
        or haproxy:tcp:2143 (repeatable) [default: tcp:2143:interface=127.0.0.1]
        """
        self["port"].append(description)

    opt_p = opt_port

    def opt_api_port(self, description: str) -> None:
        """
        Endpoint for the HTTP API, e.g. ssl:8443:privateKey=key.pem:certKey=cert.pem
        (repeatable; "none" for no API) [default: tcp:8080:interface=127.0.0.1]
        """
        self["api-port"].append(description)

    def postOptions(self) -> None:
        reason = selfcheck.check()
        if reason is not None:
            raise usage.UsageError(reason)
        fromFile: dict[str, str] = {}
        if self["config"]:
            try:
                fromFile = readConfig(self["config"], set(SETTINGS) | LIST_SETTINGS)
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
        if not self["port"]:
            self["port"] = splitList(fromFile.get("port", "")) or [DEFAULT_PORT]
        if not self["api-port"]:
            self["api-port"] = splitList(fromFile.get("api-port", "")) or [DEFAULT_API_PORT]
        if self["api-port"] == ["none"]:
            self["api-port"] = []
        for name, (default, conv, _help) in SETTINGS.items():
            raw = self[name] if self[name] is not None else fromFile.get(name)
            if raw is None:
                self[name] = default
                continue
            try:
                self[name] = conv(raw)
            except ValueError:
                raise usage.UsageError(f"--{name}: not a valid value: {raw!r}") from None
        if self["plaintext-login"] not in PLAINTEXT_POLICIES:
            raise usage.UsageError("--plaintext-login must be allow, loopback or deny")
        for name, (_default, conv, _help) in SETTINGS.items():
            if name in ZERO_ALLOWED and self[name] == 0:
                continue
            if conv in (int, float) and not (math.isfinite(self[name]) and self[name] > 0):
                raise usage.UsageError(f"--{name} must be a positive number")
        worst = 2 * (self["oauth2-deadline"] + self["upstream-timeout"])
        if self["login-timeout"] < worst:
            # A login that refreshes, is refused upstream and retries could
            # be cut off by the login deadline: say so, but let it run.
            log.warn(
                "--login-timeout {t}s is shorter than the worst-case login "
                "(2 x (oauth2-deadline + upstream-timeout) = {w}s)",
                t=self["login-timeout"],
                w=worst,
            )
        if bool(self["tls-certificate"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-certificate and --tls-key go together")
        self["starttls"] = self._loadStartTLS()
        from twisted.internet import reactor

        for description in self["port"] + self["api-port"]:
            try:
                serverEndpoint(reactor, description)
            except Exception as e:
                # Endpoint parsers raise all sorts (a systemd: index without a
                # passed socket is an IndexError): every one is a usage error.
                raise usage.UsageError(f"endpoint {description!r}: {e}") from None
        if self["store"] is None:
            self["store"] = defaultStoreURL()
        try:
            store = makeStore(self["store"], self["secret-file"], reactor)
            # Opened here to refuse a wrong key or a bad file before anything
            # starts, then closed: twistd may fork to daemonize, and an SQLite
            # connection must not cross a fork. The service opens it again.
            store.openBlocking()
            store._closeBlocking()
        except (StoreError, SecretKeyError) as e:
            raise usage.UsageError(str(e)) from None
        self["_store"] = store

    def _loadStartTLS(self) -> Any:
        if not self["tls-certificate"]:
            return None
        try:
            with open(self["tls-certificate"], "rb") as f:
                chain = f.read()
            with open(self["tls-key"], "rb") as f:
                key = f.read()
            certs = splitCertificates(chain)
            if not certs:
                raise ValueError("no certificate in the file")
            leaf = ssl.PrivateCertificate.loadPEM(certs[0] + b"\n" + key)
            # The intermediates go out with the leaf: clients need them.
            return ssl.CertificateOptions(
                privateKey=leaf.privateKey.original,
                certificate=leaf.original,
                extraCertChain=[ssl.Certificate.loadPEM(c).original for c in certs[1:]],
            )
        except (OSError, ValueError, ssl.SSL.Error) as e:
            raise usage.UsageError(f"cannot load the STARTTLS certificate: {e}") from None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class _Listener(Service):
    """Listens on one endpoint string and logs the address it got."""

    def __init__(self, reactor: Any, description: str, factory: Any, what: str):
        self._reactor = reactor
        self._description = description
        self._factory = factory
        self._what = what
        self._port: Any = None

    def startService(self) -> None:
        super().startService()
        d = serverEndpoint(self._reactor, self._description).listen(self._factory)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: Any) -> None:
        self._port = port
        host = port.getHost()
        log.info(
            "{what} listening on {host}:{port} ({kind})",
            what=self._what,
            host=getattr(host, "host", host),
            port=getattr(host, "port", ""),
            kind="haproxy+ssl"
            if self._description.startswith("haproxy:ssl:")
            else self._description.split(":", 1)[0],
        )

    def _failed(self, failure: Any) -> None:
        log.critical(
            "cannot listen on {description}: {error}",
            description=self._description,
            error=failure.getErrorMessage(),
        )
        self._reactor.stop()

    def stopService(self) -> Any:
        super().stopService()
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None


KEY_RELOAD_INTERVAL = 5.0


def _reloadKeys(store: Any) -> Any:
    def changed(yes: bool) -> None:
        if yes:
            log.info("secret keys reloaded from {path}", path=store.secrets.path)

    def invalid(failure: Any) -> None:
        # A broken key file must not stop the watch: keep the keys in use.
        failure.trap(SecretKeyError)
        log.error(
            "key file {path} not loaded, keeping the current keys: {error}",
            path=store.secrets.path,
            error=failure.getErrorMessage(),
        )

    return store.reloadSecrets().addCallbacks(changed, invalid)


class _Starting(Service):
    """Runs a callable when the service starts."""

    def __init__(self, onStart: Any):
        self._onStart = onStart

    def startService(self) -> None:
        super().startService()
        self._onStart()


class _Closing(Service):
    """Runs a callable when the service stops (thread pools, open sessions)."""

    def __init__(self, onStop: Any):
        self._onStop = onStop

    def stopService(self) -> Any:
        super().stopService()
        return self._onStop()


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


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    top = MultiService()
    store = options["_store"]
    store.setServiceParent(top)

    refresher = ThreadedRefresher(reactor, options["oauth2-threads"], options["oauth2-timeout"])
    shared = isinstance(store, RedisStore)
    accessTokens = AccessTokens(
        refresher.refresh,
        store.setRefreshToken,
        reactor,
        markReauth=lambda account, reason: store.setAccountState(
            account, "reauth-required", f"{reason} ({_now()})"
        ),
        deadline=options["oauth2-deadline"],
        loadSaved=store.getAccessToken,
        persist=store.saveAccessToken,
        # Instances sharing a store refresh an account one at a time.
        leases=RefreshLeases(RefreshLock(store), reactor) if shared else None,
        reload=store.getAccount if shared else None,
    )
    realm = UpstreamRealm(
        store, accessTokens, upstreamConnector(reactor, options["upstream-timeout"])
    )
    warm = WarmUpstreams(
        realm.connectFor, reactor, keep=options["warm-upstream"], maxSpares=options["max-warm"]
    )
    realm.warm = warm
    portal = Portal(realm, [TokenChecker(store, reactor)])
    policy = ServerPolicy(
        loginTimeout=options["login-timeout"],
        maxBadCommands=options["max-bad-commands"],
        maxCommands=options["max-commands"],
        maxFailedLogins=options["max-failed-logins"],
        maxLineLength=options["max-line-length"],
        maxLiteral=options["max-literal"],
        plaintextLogin=options["plaintext-login"],
    )
    sessions = SessionRegistry(spares=warm)
    factory = ProxyFactory(portal, policy, options["starttls"], sessions)
    bus = None
    if shared:
        # Close requests (revoke with disconnect, account deletion) made on
        # any instance reach this one's sessions.
        bus = SessionBus(store, sessions.close, reactor)
        bus.setServiceParent(top)

    # Keys added with 'imapproxy secrets add-key' are picked up while running.
    keyWatch = LoopingCall(_reloadKeys, store)
    keyWatch.clock = reactor

    def shutdown() -> None:
        if keyWatch.running:
            keyWatch.stop()
        closed = sessions.close()
        if closed:
            log.info("closed {n} sessions at shutdown", n=closed)
        warm.stop()
        refresher.stop()

    _Closing(shutdown).setServiceParent(top)
    _Starting(
        lambda: keyWatch.start(KEY_RELOAD_INTERVAL, now=False).addErrback(
            lambda f: log.failure("watching the key file failed", f)
        )
    ).setServiceParent(top)
    for description in options["port"]:
        _Listener(reactor, description, factory, "IMAP").setServiceParent(top)
    admin = Admin(store, sessions, reactor, bus)
    onboarding = Onboarding(
        admin, store.secrets, refresher.run, reactor, timeout=options["oauth2-timeout"]
    )
    api = TokenAPI(admin, reactor, onboarding)
    site = api.site()
    for description in options["api-port"]:
        _Listener(reactor, description, site, "API").setServiceParent(top)
    where = store.path if isinstance(store, RedisStore) else os.path.basename(store.path)
    log.info("imapproxy starting, store {store}", store=where)
    files = raiseFileLimit()
    if files > 0:
        log.info(
            "open files limit {n}: room for about {s} sessions", n=files, s=max(files - 64, 0) // 2
        )
    return top
