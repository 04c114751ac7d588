"""
``twistd imapproxy``: the options and ``makeService``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

from twisted.application.service import MultiService
from twisted.cred.portal import Portal
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.python import usage

from . import __version__, selfcheck
from . import metricshooks as metered
from .admin import Admin
from .certs import (
    CertificateError,
    ReloadingCertificate,
    certificateWatch,
    configuredCertificateEndpoint,
    usesConfiguredCertificate,
)
from .config import ConfigError, readConfig, splitList
from .cred import API_SCOPE, TokenChecker, UpstreamRealm, upstreamConnector
from .encryption import ENV_VAR, SecretKeyError
from .endpoints import serverEndpoint
from .imap import PLAINTEXT_POLICIES, ProxyFactory, ServerPolicy, SessionRegistry
from .limits import (
    HTTP,
    IMAP,
    SMTP,
    ConnectionLimiter,
    LimitedFactory,
    Limits,
    openBudget,
    releaseMemory,
)
from .oauth import (
    AccessTokens,
    Onboarding,
    RefreshLeases,
    RetryPolicy,
    SingleFlight,
    ThreadedRefresher,
    TokenCache,
)
from .penalties import LoginPenalties, MemoryPenalties, PenaltyPolicy
from .relay import MODES as RELAY_MODES
from .relay import configure as configureRelay
from .settings import LIST_DEFAULTS, LIST_SETTINGS, SETTINGS, ZERO_ALLOWED
from .smtp import submissionDoor, validHostname
from .startup import (
    KEY_RELOAD_INTERVAL,
    Closing,
    Hangup,
    KeyWatch,
    ListeningEndpoint,
    ProxyService,
    raiseFileLimit,
)
from .store import (
    RedisPenalties,
    RedisStore,
    RefreshLock,
    SessionBus,
    SQLiteStore,
    StoreError,
    defaultStoreURL,
    makeStore,
)
from .upstream import WarmUpstreams, probeSMTP
from .web import METRICS_SCOPE, MetricsPage, MetricsSite, TokenAPI

log = Logger()


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
        for name in LIST_DEFAULTS:
            self[name] = []

    def parseOptions(self, options: Any = None) -> None:
        """
        As usage.Options, but a bad option or a start-up check that fails ends
        the process with one line (``imapproxy: …``, status 1): twistd would
        print its whole usage text above the reason.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"imapproxy: {e}") from None

    def opt_version(self) -> None:
        """Display imapproxy's version (and Twisted's) and exit."""
        from twisted import version as twistedVersion

        print(f"imapproxy {__version__} (Twisted {twistedVersion.short()})")
        sys.exit(0)

    def opt_port(self, description: str) -> None:
        """
        Endpoint to accept IMAP clients on, e.g. ssl:2993 (with --tls-certificate),
        ssl:2993:privateKey=key.pem:certKey=cert.pem or haproxy:tcp:2143 (repeatable)
        [default: tcp:2143:interface=127.0.0.1]
        """
        self["port"].append(description)

    opt_p = opt_port

    def opt_api_port(self, description: str) -> None:
        """
        Endpoint for the HTTP API, e.g. ssl:8443 (with --tls-certificate)
        (repeatable; "none" for no API) [default: tcp:8080:interface=127.0.0.1]
        """
        self["api-port"].append(description)

    def opt_smtp_port(self, description: str) -> None:
        self["smtp-port"].append(description)

    # One line: --help wraps the text as it is, indentation included.
    opt_smtp_port.__doc__ = (
        "Endpoint to accept SMTP submission clients on, e.g. ssl:2465 (implicit TLS "
        "with --tls-certificate) or tcp:2587 (STARTTLS when a certificate is set) "
        '(repeatable; "none" for no SMTP) [default: tcp:2587:interface=127.0.0.1]'
    )

    def opt_metrics_port(self, description: str) -> None:
        """Endpoint serving /metrics only, e.g. tcp:9143 (repeatable) [default: none]"""
        self["metrics-port"].append(description)

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
        for name, default in LIST_DEFAULTS.items():
            if not self[name]:
                self[name] = splitList(fromFile.get(name, "")) or [default]
            if self[name] == ["none"] and name != "port":
                self[name] = []
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
        if self["smtp-hostname"] is not None and not validHostname(self["smtp-hostname"]):
            raise usage.UsageError("--smtp-hostname must be a host name (letters, digits, . and -)")
        if self["relay"] not in RELAY_MODES:
            raise usage.UsageError("--relay must be fast or plain")
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
        self["certificate"] = None
        if self["tls-certificate"]:
            try:
                self["certificate"] = ReloadingCertificate.fromFiles(
                    os.path.abspath(self["tls-certificate"]), os.path.abspath(self["tls-key"])
                )
            except CertificateError as e:
                raise usage.UsageError(str(e)) from None
        # STARTTLS offers the same, reloading, certificate.
        self["starttls"] = self["certificate"]
        from twisted.internet import reactor

        for description in sum((self[name] for name in LIST_DEFAULTS), []):
            self.endpoint(reactor, description)
        self._openStore(reactor)

    def endpoint(self, reactor: Any, description: str) -> Any:
        """
        The endpoint for a ``--port``, ``--api-port`` or ``--smtp-port`` string.

        :raises usage.UsageError: naming the string and what is wrong.
        """
        try:
            if usesConfiguredCertificate(description):
                if self["certificate"] is None:
                    raise ValueError(
                        "names no privateKey=/certKey= and no tls-certificate/tls-key is set"
                    )
                return configuredCertificateEndpoint(reactor, description, self["certificate"])
            return serverEndpoint(reactor, description)
        except Exception as e:
            # Endpoint parsers raise all sorts (a systemd: index without a
            # passed socket is an IndexError): every one is a usage error.
            raise usage.UsageError(f"endpoint {description!r}: {e}") from None

    def _openStore(self, reactor: Any) -> None:
        if self["store"] is None:
            self["store"] = defaultStoreURL()
        try:
            store = makeStore(self["store"], self["secret-file"], reactor)
            fresh = isinstance(store, SQLiteStore) and not os.path.exists(store.path)
            # Opened here to refuse a wrong key or a bad file before anything
            # starts, then closed: twistd may fork to daemonize, and an SQLite
            # connection must not cross a fork. The service opens it again.
            store.openBlocking()
            store._closeBlocking()
        except (StoreError, SecretKeyError) as e:
            raise usage.UsageError(str(e)) from None
        except OSError as e:
            raise usage.UsageError(f"cannot open the store {self['store']}: {e}") from None
        self["_store"] = store
        self["_freshStore"] = fresh


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# Open files kept for listeners, log files, the store and the like.
FILE_RESERVE = 64


def _limits(options: Options, maxConnections: int, maxOpen: int | None) -> Limits:
    """The connection limits of one front door, from the settings."""
    return Limits(
        maxPreauth=maxConnections,
        maxPreauthPerAddress=options["max-preauth-per-address"],
        maxHandshakes=options["max-handshakes"],
        handshakeTimeout=options["handshake-timeout"],
        maxOpen=maxOpen,
    )


def makeService(options: Options, reactor: Any = None) -> MultiService:
    signals = reactor is None  # the real twistd: SIGHUP reloads
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    top = ProxyService()
    # Once for the whole process, before any connection: logs which path.
    configureRelay(options["relay"])
    store = options["_store"]
    store.setServiceParent(top)

    refresher = ThreadedRefresher(reactor, options["oauth2-threads"], options["oauth2-timeout"])
    shared = isinstance(store, RedisStore)
    metrics = metered.Metrics(reactor, perAccount=options["metrics-per-account"])
    accessTokens = AccessTokens(
        metered.refresh(refresher.refresh, metrics),
        store.setRefreshToken,
        reactor,
        cache=TokenCache(reactor, load=store.getAccessToken, persist=store.saveAccessToken),
        policy=RetryPolicy(deadline=options["oauth2-deadline"]),
        markReauth=lambda account, reason: store.setAccountState(
            account, "reauth-required", f"{reason} ({_now()})"
        ),
        # Instances sharing a store refresh an account one at a time.
        flight=SingleFlight(RefreshLeases(RefreshLock(store), reactor), reload=store.getAccount)
        if shared
        else None,
    )
    connect = metered.connector(upstreamConnector(reactor, options["upstream-timeout"]), metrics)
    realm = UpstreamRealm(store, metered.accessTokens(accessTokens, metrics), connect, reactor)
    warm = WarmUpstreams(
        realm.connectFor, reactor, keep=options["warm-upstream"], maxSpares=options["max-warm"]
    )
    realm.warm = warm
    penaltyBackend = RedisPenalties(store) if shared else MemoryPenalties(reactor)
    penalties = LoginPenalties(
        penaltyBackend,
        reactor,
        PenaltyPolicy(
            maximum=options["login-penalty"],
            forget=options["login-penalty-forget"],
            refuseAfter=options["api-refuse-after"],
        ),
    )
    checker = TokenChecker(store, reactor, penalties=penalties)
    portal = metered.portal(Portal(realm, [checker]), metrics)
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
    metrics.watch(sessions, warm, None if shared else penaltyBackend, store)
    factory = ProxyFactory(portal, policy, options["starttls"], sessions)
    smtpFactory, primer = submissionDoor(
        realm,
        store,
        reactor,
        penalties,
        policy,
        options["starttls"],
        sessions,
        # probeSMTP may be a coroutine function: a Deferred either way.
        lambda upstream: ensureDeferred(probeSMTP(reactor, upstream, options["upstream-timeout"])),
        # None: looked up, once, when there is an SMTP listener.
        options["smtp-hostname"] if options["smtp-port"] else "localhost",
    )
    smtpFactory.portal = metered.portal(smtpFactory.portal, metrics)
    bus = None
    if shared:
        # Close requests (revoke with disconnect, account deletion) made on
        # any instance reach this one's sessions.
        bus = SessionBus(store, sessions.close, reactor)
        bus.setServiceParent(top)

    def shutdown() -> None:
        closed = sessions.close()
        if closed:
            log.info("closed {n} sessions at shutdown", n=closed)
        warm.stop()
        refresher.stop()
        imapLimiter.stop()
        smtpLimiter.stop()
        apiLimiter.stop()

    Closing(shutdown).setServiceParent(top)
    # Keys added with 'imapproxy secrets add-key' are picked up while running.
    keys = KeyWatch(store, reactor)
    keys.service(KEY_RELOAD_INTERVAL).setServiceParent(top)
    certificate = options["certificate"]
    if certificate is not None:
        certificateWatch(certificate, reactor).setServiceParent(top)
    if signals:

        def hangup() -> None:
            log.info("SIGHUP: reloading the TLS certificate and the key file")
            keys.check()
            if certificate is not None:
                certificate.reload(reactor, force=True)

        Hangup(reactor, hangup).setServiceParent(top)
    files = raiseFileLimit()
    # Files kept for what is not a client connection: listeners, logs, the
    # store, spare upstream connections and the API's connections.
    reserve = FILE_RESERVE + options["max-warm"] + options["max-api-connections"]
    imapLimits = _limits(options, options["max-preauth"], openBudget(files, reserve))

    def trim() -> None:
        # After a flood was cut: give its memory back, off the reactor thread.
        reactor.callInThread(releaseMemory)

    imapLimiter = ConnectionLimiter(imapLimits, reactor, "IMAP", trim)
    front = LimitedFactory(factory, imapLimiter, IMAP)
    smtpLimiter = ConnectionLimiter(imapLimits, reactor, "SMTP", trim)
    smtpFront = LimitedFactory(smtpFactory, smtpLimiter, SMTP)
    if options["smtp-port"]:
        # What the first clients' EHLO offers: the stored accounts' servers, asked.
        primer.setServiceParent(top)
    admin = Admin(store, sessions, reactor, bus)
    onboarding = Onboarding(
        admin, store.secrets, refresher.run, reactor, timeout=options["oauth2-timeout"]
    )
    apiChecker = TokenChecker(store, reactor, API_SCOPE, penalties, refuse=True)
    metricsChecker = TokenChecker(store, reactor, METRICS_SCOPE, penalties, refuse=True)
    metricsPage = MetricsPage(metrics, metricsChecker)
    api = TokenAPI(admin, reactor, onboarding, apiChecker, metricsPage)
    site = api.site(options["api-request-timeout"])
    metricsSite = MetricsSite(metricsPage, reactor).site(options["api-request-timeout"])
    apiLimits = _limits(options, options["max-api-connections"], None)
    apiLimiter = ConnectionLimiter(apiLimits, reactor, "API", trim)
    apiFront = LimitedFactory(site, apiLimiter, HTTP)
    for what, descriptions, serving in (
        ("IMAP", options["port"], front),
        ("API", options["api-port"], apiFront),
        ("SMTP", options["smtp-port"], smtpFront),
        ("metrics", options["metrics-port"], LimitedFactory(metricsSite, apiLimiter, HTTP)),
    ):
        for description in descriptions:
            endpoint = options.endpoint(reactor, description)
            top.addListener(ListeningEndpoint(endpoint, description, what, reactor), serving)
    _logState(options, store)
    if files > 0:
        log.info(
            "open files limit {n}: room for about {s} IMAP connections",
            n=files,
            s=imapLimits.maxOpen,
        )
    return top


def _logState(options: Options, store: Any) -> None:
    """Say where the state is: an operator must know what to back up."""
    where = store.path if isinstance(store, RedisStore) else os.path.abspath(store.path)
    keyFile = store.secrets.path
    keyFile = os.path.abspath(keyFile) if keyFile else "$" + ENV_VAR
    log.info(
        "imapproxy {version} starting, store {store}, key file {key}",
        version=__version__,
        store=where,
        key=keyFile,
    )
    if options.get("_freshStore"):
        log.warn("first run: created a new, empty store at {store}", store=where)
    if store.secrets.created:
        log.warn(
            "created a new secret key in {key}: back it up now; without it the stored "
            "refresh tokens and client secrets cannot be read",
            key=keyFile,
        )
