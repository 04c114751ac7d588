"""
``twistd imapproxy``: ``makeService`` composes the service from the options
(``options.Options``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.cred.portal import Portal
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger

from . import __version__
from . import metricshooks as metered
from .alerts import AlertingAdmin, buildAlerts
from .auditlog import connectionLimit, twistdObserver
from .certs import (
    certificateWatch,
)
from .cred import API_SCOPE, TokenChecker, UpstreamRealm, upstreamConnector
from .drain import Drain
from .encryption import ENV_VAR
from .imap import ProxyFactory, ServerPolicy, SessionRegistry
from .imap.sessions import SAMPLE_INTERVAL, liveRound
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
from .options import Options
from .penalties import LoginPenalties, MemoryPenalties, PenaltyPolicy
from .relay import configure as configureRelay
from .smtp import submissionDoor
from .startup import (
    KEY_RELOAD_INTERVAL,
    Closing,
    Hangup,
    KeyWatch,
    ListeningEndpoint,
    ProxyService,
    freezeStartup,
    raiseFileLimit,
)
from .store import (
    RedisPenalties,
    RedisSlots,
    RedisStore,
    RefreshLock,
    SessionBoard,
    SessionBus,
)
from .throttle import Throttles, throttlePolicy
from .upstream import WarmUpstreams, probeSMTP
from .upstream.slots import SPARE_CHECK, LocalSlots, SlotKeeper
from .web import METRICS_SCOPE, MetricsPage, MetricsSite, TokenAPI

log = Logger()


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
    parent = getattr(options, "parent", None) or {}
    if options["log-format"] == "json" and not parent.get("syslog"):
        top.logObserver = twistdObserver(parent.get("logfile"), bool(parent.get("nodaemon")))
    # Once for the whole process, before any connection: logs which path.
    configureRelay(options["relay"])
    store = options["_store"]
    store.setServiceParent(top)

    refresher = ThreadedRefresher(reactor, options["oauth2-threads"], options["oauth2-timeout"])
    shared = isinstance(store, RedisStore)
    metrics = metered.Metrics(reactor, perAccount=options["metrics-per-account"])
    alerts, alerting = buildAlerts(
        options["webhook"], options["_webhookSecret"], reactor, store, metrics
    )
    alerting.setServiceParent(top)
    accessTokens = AccessTokens(
        metered.refresh(refresher.refresh, metrics),
        store.setRefreshToken,
        reactor,
        cache=TokenCache(reactor, load=store.getAccessToken, persist=store.saveAccessToken),
        policy=RetryPolicy(
            deadline=options["oauth2-deadline"], earlyWait=options["oauth2-early-wait"]
        ),
        markReauth=lambda account, reason: alerts.changed(
            store.setAccountState(account, "reauth-required", f"{reason} ({_now()})"),
            account,
            "reauth-required",
            "invalid-grant",
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
    # Per-account connection caps, counted across instances with Redis.
    counter: Any = RedisSlots(store) if shared else LocalSlots()
    slots = SlotKeeper(
        counter,
        reactor,
        wait=options["connection-wait"],
        default=options["max-account-connections"],
    )
    slots.giveUpSpare = warm.discard
    slots.spareAccounts = warm.accounts
    slots.onRefused = connectionLimit
    realm.slots = slots
    metrics.watchSlots(slots)
    if shared:
        TimerService(counter.heartbeat, slots.heartbeat).setServiceParent(top)
        TimerService(SPARE_CHECK, slots.checkSpares).setServiceParent(top)
    realm.throttles = Throttles(store, reactor, throttlePolicy(options), metrics)
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
    sessions = SessionRegistry(spares=warm, clock=reactor)
    metrics.watch(sessions, warm, penalties, store)
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
    bus = board = None
    if shared:
        # Close requests (revoke with disconnect, account deletion) made on
        # any instance reach this one's sessions.
        bus = SessionBus(store, sessions.close, reactor, end=sessions.end)
        bus.setServiceParent(top)
        board = SessionBoard(store, bus.instance, SAMPLE_INTERVAL)
    # Which sessions moved bytes lately (their last activity), off the relay
    # path; with a shared store, this instance's sessions for the others' lists.
    TimerService(SAMPLE_INTERVAL, liveRound, sessions, board).setServiceParent(top)

    def shutdown() -> None:
        closed = sessions.close()
        if closed:
            log.info("closed {n} sessions at shutdown", n=closed)
        warm.stop()
        slots.stop()
        refresher.stop()
        imapLimiter.stop()
        smtpLimiter.stop()
        apiLimiter.stop()

    Closing(shutdown).setServiceParent(top)
    # SIGTERM: front doors closed, sessions ended at clean points, then the rest.
    top.drain = Drain(sessions, options["drain-timeout"], reactor, signals)
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
        # The real process only: a test's reactor must not freeze the test run.
        freezeStartup(reactor)
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
    admin = AlertingAdmin(store, sessions, reactor, bus, board, alerts=alerts)
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
