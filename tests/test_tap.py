"""
Tests for ``proxy.tap``: the twistd options (defaults, config file, command
line) and ``makeService``. Every store is a temporary SQLite file, closed
again by the test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from io import StringIO
from unittest import mock

from cryptography.fernet import Fernet
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from proxy.encryption import ENV_VAR
from proxy.settings import DEFAULT_PORT, DEFAULT_SMTP_PORT, SETTINGS
from proxy.store import SQLiteStore
from proxy.tap import Options, makeService
from tests.upstream.certs import make_pki


def closeStore(store: SQLiteStore) -> None:
    """Close a store opened with openBlocking, without a thread or the reactor."""
    store._closeBlocking()
    if store._pool.started:
        store._pool.stop()


class OptionsMixin:
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="imapproxy-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        # The key then comes from secret.key beside the store, not the environment.
        saved = os.environ.pop(ENV_VAR, None)
        if saved is not None:
            self.addCleanup(os.environ.__setitem__, ENV_VAR, saved)
        self.storeURL = "sqlite://" + os.path.join(self.dir, "x.sqlite3")

    def parse(self, *args: str, store: bool = True) -> Options:
        options = Options()
        argv = list(args)
        if store:
            argv = ["--store", self.storeURL, *argv]
        options.parseOptions(argv)
        self.addCleanup(closeStore, options["_store"])
        return options

    def config(self, text: str) -> str:
        path = os.path.join(self.dir, "imapproxy.conf")
        with open(path, "w") as f:
            f.write("[imapproxy]\n" + text)
        return path


class OptionsTests(OptionsMixin, SynchronousTestCase):
    def test_defaults(self):
        """Without options every setting has its default and one loopback port."""
        o = self.parse()
        self.assertEqual(o["port"], [DEFAULT_PORT])
        self.assertEqual(o["smtp-port"], [DEFAULT_SMTP_PORT])
        self.assertEqual(DEFAULT_SMTP_PORT, "tcp:2587:interface=127.0.0.1")
        for name, (default, _conv, _help) in SETTINGS.items():
            if name != "store":
                self.assertEqual(o[name], default, name)
        self.assertEqual(o["plaintext-login"], "loopback")
        self.assertEqual(o["login-timeout"], 60.0)
        self.assertIsNone(o["starttls"])

    def test_storeChecked(self):
        """postOptions checks the store (created, beside a new key) and leaves it closed."""
        o = self.parse()
        store = o["_store"]
        self.assertIsInstance(store, SQLiteStore)
        self.assertEqual(store.path, os.path.join(self.dir, "x.sqlite3"))
        self.assertTrue(os.path.exists(store.path))
        # Closed again: twistd may fork to daemonize; the service reopens it.
        self.assertIsNone(store._db)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "secret.key")))
        self.assertFalse(store._pool.started)

    def test_notFinite(self):
        """nan and inf are not positive numbers of seconds."""
        for value in ("nan", "inf"):
            self.usageError("--login-timeout", value)

    def test_converted(self):
        """Numeric options are converted to their types."""
        o = self.parse("--login-timeout", "12.5", "--max-bad-commands", "4")
        self.assertEqual((o["login-timeout"], o["max-bad-commands"]), (12.5, 4))

    def test_configFile(self):
        """Values from the config file are used, converted."""
        path = self.config(
            "port =\n  tcp:1143:interface=127.0.0.1\n  tcp:1144:interface=127.0.0.1\n"
            "login-timeout = 30\nplaintext-login = deny\nmax-literal = 100\n"
        )
        o = self.parse("--config", path)
        self.assertEqual(
            o["port"], ["tcp:1143:interface=127.0.0.1", "tcp:1144:interface=127.0.0.1"]
        )
        self.assertEqual(o["login-timeout"], 30.0)
        self.assertEqual(o["plaintext-login"], "deny")
        self.assertEqual(o["max-literal"], 100)

    def test_configStore(self):
        """The store URL may come from the config file."""
        path = self.config(f"store = {self.storeURL}\n")
        o = self.parse("--config", path, store=False)
        self.assertEqual(o["_store"].path, os.path.join(self.dir, "x.sqlite3"))

    def test_commandLineWins(self):
        """A command-line option wins over the config file, ports included."""
        path = self.config("port = tcp:1143\nlogin-timeout = 30\nplaintext-login = deny\n")
        o = self.parse(
            "--config", path, "--login-timeout", "5", "--port", "tcp:1999:interface=127.0.0.1"
        )
        self.assertEqual(o["login-timeout"], 5.0)
        self.assertEqual(o["port"], ["tcp:1999:interface=127.0.0.1"])
        self.assertEqual(o["plaintext-login"], "deny")

    def test_repeatablePort(self):
        """--port (and -p) may be given several times, in order."""
        o = self.parse("--port", "tcp:1143", "-p", "tcp:1144", "--port=tcp:1145")
        self.assertEqual(o["port"], ["tcp:1143", "tcp:1144", "tcp:1145"])

    def test_smtpPorts(self):
        """--smtp-port is repeatable like --port; "none" turns SMTP off."""
        o = self.parse("--smtp-port", "tcp:1587", "--smtp-port=tcp6:1587")
        self.assertEqual(o["smtp-port"], ["tcp:1587", "tcp6:1587"])
        self.assertEqual(self.parse("--smtp-port", "none")["smtp-port"], [])

    def test_smtpPortsFromConfig(self):
        """smtp-port lines in the config file, unless the command line gives one."""
        path = self.config("smtp-port =\n  tcp:1587:interface=127.0.0.1\n  tcp:1588\n")
        o = self.parse("--config", path)
        self.assertEqual(o["smtp-port"], ["tcp:1587:interface=127.0.0.1", "tcp:1588"])
        o = self.parse("--config", path, "--smtp-port", "tcp:1599")
        self.assertEqual(o["smtp-port"], ["tcp:1599"])
        self.assertEqual(self.parse("--config", self.config("smtp-port = none\n"))["smtp-port"], [])

    def test_smtpPortHelp(self):
        """--help describes --smtp-port in even text, with its default."""
        text = str(Options()).split("--smtp-port=")[1].split("--store=")[0]
        words = " ".join(line.strip() for line in text.splitlines())
        self.assertNotIn("  ", words)
        self.assertIn("[default: tcp:2587:interface=127.0.0.1]", words)

    def test_badSmtpEndpoint(self):
        """An --smtp-port that does not parse is a usage error naming it."""
        self.assertIn("bogus:2587", self.usageError("--smtp-port", "bogus:2587"))
        self.assertIn("tls-certificate", self.usageError("--smtp-port", "ssl:2465"))

    def test_smtpHostname(self):
        """--smtp-hostname is a host name: no spaces or line breaks to forge a reply with."""
        self.assertEqual(self.parse("--smtp-hostname", "mx.example")["smtp-hostname"], "mx.example")
        for bad in ("mx example", "mx\r\n250 ok", "-mx", ""):
            self.assertIn("smtp-hostname", self.usageError("--smtp-hostname", bad))

    def usageError(self, *args: str) -> str:
        """A start-up error: one line, ``imapproxy: …``, no usage text."""
        options = Options()
        e = self.assertRaises(SystemExit, options.parseOptions, ["--store", self.storeURL, *args])
        if "_store" in options:
            closeStore(options["_store"])
        self.assertIsInstance(e.code, str)
        self.assertTrue(e.code.startswith("imapproxy: "), e.code)
        self.assertNotIn("\n", e.code)
        return e.code

    def test_badPlaintextLogin(self):
        """An unknown --plaintext-login is a usage error."""
        self.assertIn("plaintext-login", self.usageError("--plaintext-login", "sometimes"))

    def test_badEndpoint(self):
        """An endpoint string that does not parse is a usage error naming it."""
        self.assertIn("bogus:2143", self.usageError("--port", "bogus:2143"))

    def test_badEndpointArguments(self):
        """An endpoint string with a bad port is a usage error."""
        self.usageError("--port", "tcp:notaport")

    def test_badNumber(self):
        """A non-numeric number is a usage error."""
        self.assertIn("login-timeout", self.usageError("--login-timeout", "soon"))

    def test_nonPositiveTimeout(self):
        """A zero or negative timeout is a usage error."""
        self.usageError("--upstream-timeout", "0")
        self.usageError("--oauth2-timeout", "-1")

    def test_certificateWithoutKey(self):
        """--tls-certificate without --tls-key is a usage error."""
        self.usageError("--tls-certificate", os.path.join(self.dir, "cert.pem"))

    def test_unreadableCertificate(self):
        """A certificate that cannot be read is a usage error, not a traceback."""
        missing = os.path.join(self.dir, "missing.pem")
        self.usageError("--tls-certificate", missing, "--tls-key", missing)

    def test_unknownConfigKey(self):
        """An unknown setting in the config file is a usage error."""
        path = self.config("login_timeout = 30\n")
        self.assertIn("login_timeout", self.usageError("--config", path))

    def test_missingConfigFile(self):
        """A config file that cannot be read is a usage error."""
        self.usageError("--config", os.path.join(self.dir, "nope.conf"))

    def test_badConfigValue(self):
        """A bad value in the config file is a usage error."""
        path = self.config("max-literal = lots\n")
        self.assertIn("max-literal", self.usageError("--config", path))

    def test_badStoreURL(self):
        """A store URL of an unknown scheme is a one-line start-up error."""
        options = Options()
        e = self.assertRaises(SystemExit, options.parseOptions, ["--store", "mysql://localhost/0"])
        self.assertIn("unsupported store URL", e.code)

    def test_twoSlashStoreURL(self):
        """sqlite://var/lib/… is refused, naming the three-slash form; nothing is created."""
        cwd = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, cwd)
        options = Options()
        e = self.assertRaises(
            SystemExit, options.parseOptions, ["--store", "sqlite://var/lib/imapproxy/x.sqlite3"]
        )
        self.assertIn("sqlite:///var/lib/imapproxy/x.sqlite3", e.code)
        self.assertEqual(os.listdir(self.dir), [])

    def test_extraSlashesCollapsed(self):
        """sqlite:////abs/x names /abs/x (logged with one leading slash)."""
        from proxy.store import sqlitePath

        self.assertEqual(sqlitePath("sqlite:////var/lib/x.sqlite3"), "/var/lib/x.sqlite3")

    def test_emptyStorePath(self):
        """A store URL without a file is refused."""
        for url in ("sqlite://", "sqlite:///", "sqlite:///tmp/dir/"):
            self.assertIn("names no file", self.usageErrorStore(url))

    def usageErrorStore(self, url: str) -> str:
        e = self.assertRaises(SystemExit, Options().parseOptions, ["--store", url])
        return str(e.code)

    def test_unwritableStoreDirectory(self):
        """A store that cannot be created is one line naming it, not a traceback."""
        blocker = os.path.join(self.dir, "file")
        open(blocker, "w").close()
        line = self.usageErrorStore(f"sqlite://{blocker}/state/x.sqlite3")
        self.assertTrue(line.startswith("imapproxy: "), line)
        self.assertIn(blocker, line)

    def test_unknownOptionIsOneLine(self):
        """An unknown option is one line, without twistd's usage text."""
        self.assertIn("--bogus", self.usageError("--bogus"))

    def test_version(self):
        """--version prints imapproxy's version, not only Twisted's."""
        from proxy import __version__

        out = StringIO()
        with mock.patch("sys.stdout", out):
            e = self.assertRaises(SystemExit, Options().parseOptions, ["--version"])
        self.assertEqual(e.code, 0)
        self.assertTrue(out.getvalue().startswith(f"imapproxy {__version__} "), out.getvalue())

    def test_sslWithoutKeyNeedsCertificate(self):
        """ssl:PORT without privateKey= and without tls-certificate is one line saying so."""
        self.assertIn("tls-certificate", self.usageError("--port", "ssl:2993"))

    def test_missingCertificateNamed(self):
        """A configured certificate that does not exist is named in the one line."""
        missing = os.path.join(self.dir, "cert.pem")
        line = self.usageError("--tls-certificate", missing, "--tls-key", missing)
        self.assertIn(f"cannot read TLS certificate {missing}", line)

    def test_commentAfterPortInConfig(self):
        """'port = tcp:2143 ; comment' in the config file is the endpoint tcp:2143."""
        path = self.config("port = tcp:1143:interface=127.0.0.1 ; the IMAP port\n")
        self.assertEqual(self.parse("--config", path)["port"], ["tcp:1143:interface=127.0.0.1"])

    def test_wrongSecretKey(self):
        """A secret key that does not match the existing store is a usage error."""
        closeStore(self.parse()["_store"])
        keyFile = os.path.join(self.dir, "other.key")
        with open(keyFile, "wb") as f:
            f.write(Fernet.generate_key())
        self.assertIn("does not match", self.usageError("--secret-file", keyFile))


class ThreadedMemoryReactor(MemoryReactorClock):
    """A memory reactor whose "thread pool" runs the work at once."""

    def getThreadPool(self):
        return self

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except Exception:
            onResult(False, Failure())
        else:
            onResult(True, result)

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class MakeServiceTests(OptionsMixin, TestCase):
    def service(self, *args: str):
        o = self.parse(*args)
        reactor = ThreadedMemoryReactor()
        return o, reactor, makeService(o, reactor)

    def test_service(self):
        """Listens on every IMAP, API and SMTP port and closes the store when stopped."""
        o, reactor, service = self.service(
            "--port",
            "tcp:1143:interface=127.0.0.1",
            "--port",
            "tcp:1144",
            "--api-port",
            "tcp:18080:interface=127.0.0.1",
            "--smtp-port",
            "tcp:1587:interface=127.0.0.1",
            "--smtp-hostname",
            "mx.example",
        )
        self.assertIsInstance(service, MultiService)
        self.assertIn(o["_store"], list(service))
        service.privilegedStartService()
        # Listening before the reactor runs (and before twistd drops root).
        self.assertEqual(
            [(port, interface) for port, _f, _b, interface in reactor.tcpServers],
            [(1143, "127.0.0.1"), (1144, ""), (18080, "127.0.0.1"), (1587, "127.0.0.1")],
        )
        service.startService()

        def stopped(_):
            self.assertIsNone(o["_store"]._db)
            self.assertFalse(o["_store"]._pool.started)
            self.assertEqual(reactor.getDelayedCalls(), [])

        return service.stopService().addCallback(stopped)

    def test_smtpDoor(self):
        """The SMTP listener: its own limiter and refusals, the shared sessions, the smtp scope."""
        from proxy.cred import ITokenCredentials
        from proxy.imap import ProxyFactory
        from proxy.limits import SMTP, LimitedFactory
        from proxy.smtp import ExtensionsPrimer, SubmissionFactory

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        o, reactor, service = self.service(
            "--smtp-port", "tcp:1587:interface=127.0.0.1", "--smtp-hostname", "mx.example"
        )
        service.privilegedStartService()
        factories = {port: f for port, f, _b, _i in reactor.tcpServers}
        imap, smtp = factories[2143], factories[1587]
        self.assertIsInstance(smtp, LimitedFactory)
        self.assertIs(smtp.refusals, SMTP)
        self.assertEqual(smtp.limiter.name, "SMTP")
        self.assertIsNot(smtp.limiter, imap.limiter)
        door = smtp.wrappedFactory
        self.assertIsInstance(door, SubmissionFactory)
        self.assertIsInstance(imap.wrappedFactory, ProxyFactory)
        # Revocation, account removal and shutdown reach SMTP sessions too.
        self.assertIs(door.sessions, imap.wrappedFactory.sessions)
        self.assertIs(door.policy, imap.wrappedFactory.policy)
        self.assertEqual(door.hostname, b"mx.example")
        [checker] = door.portal.checkers.values()
        self.assertEqual(checker._scope, "smtp")
        self.assertIn(ITokenCredentials, door.portal.checkers)
        self.assertEqual(
            [type(s) for s in service if isinstance(s, ExtensionsPrimer)], [ExtensionsPrimer]
        )
        text = "\n".join(formatEvent(e) for e in events)
        # (A memory reactor reports every port on 0.0.0.0.)
        self.assertRegex(text, r"SMTP listening on \S+:1587 \(tcp\)")
        for p in service:
            if isinstance(p, StreamServerEndpointService):
                p.stopService()

    def test_smtpOff(self):
        """--smtp-port none: no SMTP listener, nothing probed."""
        from proxy.smtp import ExtensionsPrimer

        o, reactor, service = self.service("--smtp-port", "none", "--api-port", "none")
        service.privilegedStartService()
        self.assertEqual([port for port, *_ in reactor.tcpServers], [2143])
        self.assertFalse([s for s in service if isinstance(s, ExtensionsPrimer)])
        for p in service:
            if isinstance(p, StreamServerEndpointService):
                p.stopService()

    def test_sslSmtpPortUsesConfiguredCertificate(self):
        """--smtp-port ssl:PORT is implicit TLS with the configured certificate."""
        pki = make_pki(os.path.join(self.dir, "pki"))
        o, reactor, service = self.service(
            "--smtp-port",
            "ssl:1465:interface=127.0.0.1",
            "--tls-certificate",
            pki.cert,
            "--tls-key",
            pki.key,
            "--api-port",
            "none",
        )
        service.privilegedStartService()
        [(port, factory, contextFactory, _backlog, interface)] = reactor.sslServers
        self.assertEqual((port, interface), (1465, "127.0.0.1"))
        self.assertIs(contextFactory, o["certificate"])
        # STARTTLS on plain SMTP listeners offers the same certificate.
        self.assertIs(factory.wrappedFactory.contextFactory, o["certificate"])
        for p in service:
            if isinstance(p, StreamServerEndpointService):
                p.stopService()

    def test_sslPortUsesConfiguredCertificate(self):
        """ssl:PORT without a key listens with the configured certificate, as STARTTLS does."""
        pki = make_pki(os.path.join(self.dir, "pki"))
        o, reactor, service = self.service(
            "--port",
            "ssl:1993:interface=127.0.0.1",
            "--tls-certificate",
            pki.cert,
            "--tls-key",
            pki.key,
            "--api-port",
            "none",
        )
        service.privilegedStartService()
        [(port, _factory, contextFactory, _backlog, interface)] = reactor.sslServers
        self.assertEqual((port, interface), (1993, "127.0.0.1"))
        self.assertIs(contextFactory, o["certificate"])
        self.assertIs(o["starttls"], o["certificate"])
        for p in service:
            if isinstance(p, StreamServerEndpointService):
                p.stopService()

    def test_stateLogged(self):
        """Start-up logs the absolute store and key file, and warns of a new key and store."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.service()
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn(f"store {os.path.join(self.dir, 'x.sqlite3')}, key file", text)
        self.assertIn(os.path.join(self.dir, "secret.key"), text)
        self.assertIn("back it up", text)
        self.assertIn("first run", text)
        warned = [e for e in events if "back it up" in formatEvent(e)]
        self.assertEqual(warned[0]["log_level"], LogLevel.warn)


class ExampleConfigTests(SynchronousTestCase):
    def test_exampleDocumentsEverySetting(self):
        """tap.example.conf loads as is and names every setting the server has."""
        from proxy.config import readConfig
        from proxy.settings import LIST_SETTINGS, SETTINGS

        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tap.example.conf")
        readConfig(path, set(SETTINGS) | LIST_SETTINGS)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        missing = [
            name
            for name in sorted(set(SETTINGS) | LIST_SETTINGS)
            if f"{name} =" not in text and f"{name}=" not in text
        ]
        self.assertEqual(missing, [])


class ListenerLimitTests(SynchronousTestCase):
    """What lets one process hold thousands of sessions."""

    def test_backlogAddedWhereNoneIsGiven(self):
        """TCP, TLS, UNIX and PROXY-protocol listeners get a 1,024 backlog unless one is set."""
        from proxy.endpoints import withBacklog

        self.assertEqual(withBacklog("tcp:2143"), "tcp:2143:backlog=1024")
        self.assertEqual(
            withBacklog("haproxy:ssl:993:privateKey=k.pem"),
            "haproxy:ssl:993:privateKey=k.pem:backlog=1024",
        )
        self.assertEqual(withBacklog("tcp:2143:backlog=5"), "tcp:2143:backlog=5")
        self.assertEqual(withBacklog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")

    def test_fileLimitRaisedToTheHardLimit(self):
        """The soft open-files limit ends at the hard one (a session holds two files)."""
        import resource

        from proxy.startup import raiseFileLimit

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        if hard != resource.RLIM_INFINITY and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
            self.assertEqual(raiseFileLimit(), hard)
            self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)
        else:
            self.assertGreaterEqual(raiseFileLimit(), soft)
