"""
The admin command's audit events (``proxy.adminaudit``): each audit event,
and nothing else, as one JSON line with the user who ran the command, to
syslog (ident imapproxy-admin, authpriv.notice) and to the ``--audit-log``
file (or ``IMAPPROXY_AUDIT_LOG``'s), created 0600 and appended to. The
real command writing the file: test_integration_adminaudit.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import syslog
import tempfile
from unittest import mock

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from proxy import adminaudit, auditlog


class ObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sent: list[str] = []
        self.out = io.StringIO()
        self.observer = adminaudit.AdminAuditObserver(self.sent.append, self.out, "ops")

    def test_auditEventsOnly(self):
        """An audit event is one JSON line to both; a plain log line goes to neither."""
        log = Logger(namespace="proxy.test", observer=self.observer)
        log.info("some text {n}", n=1)
        with mock.patch.object(auditlog.log, "observer", self.observer):
            auditlog.change("token.revoke", "a" * 64, "cli")
        [line] = self.out.getvalue().splitlines()
        self.assertEqual(self.sent, [line])
        event = json.loads(line)
        self.assertEqual(
            {k: event[k] for k in ("event", "operation", "target", "actor", "user")},
            {
                "event": "change",
                "operation": "token.revoke",
                "target": "a" * 64,
                "actor": "cli",
                "user": "ops",
            },
        )

    def test_syslog(self):
        """The syslog line: ident imapproxy-admin, authpriv, notice, with the PID."""
        with (
            mock.patch.object(syslog, "openlog") as openlog,
            mock.patch.object(syslog, "syslog") as send,
        ):
            adminaudit.toSyslog('{"event":"change"}')
        openlog.assert_called_once_with("imapproxy-admin", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        send.assert_called_once_with(syslog.LOG_NOTICE, '{"event":"change"}')


class StartTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="imapproxy-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.publisher = LogPublisher()
        self.sent: list[str] = []
        self.addCleanup(self.stop)

    def stop(self) -> None:
        current = adminaudit._current
        if current is not None and current.out is not None:
            current.out.close()
        adminaudit._current = None

    def start(self, path: str | None, environ: dict[str, str]) -> adminaudit.AdminAuditObserver:
        return adminaudit.start(path, environ, self.sent.append, self.publisher)

    def emit(self) -> None:
        Logger(namespace="proxy.audit", observer=self.publisher).info(
            "", event="change", operation="app.delete", target="corp", actor="cli"
        )

    def test_fileFromTheEnvironmentAppended(self):
        """IMAPPROXY_AUDIT_LOG names the file; it is created 0600 and appended to."""
        path = os.path.join(self.dir, "audit.log")
        with open(path, "w") as f:
            f.write("before\n")
        os.chmod(path, 0o600)
        self.start(None, {adminaudit.ENV_VAR: path})
        self.emit()
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(lines[0], "before")
        self.assertEqual(json.loads(lines[1])["operation"], "app.delete")
        self.assertEqual(len(self.sent), 1)
        fresh = os.path.join(self.dir, "new.log")
        self.start(fresh, {adminaudit.ENV_VAR: path})
        self.emit()
        self.assertEqual(stat.S_IMODE(os.stat(fresh).st_mode), 0o600)
        # The option wins over the environment, and the first observer is gone.
        with open(path) as f:
            self.assertEqual(len(f.read().splitlines()), 2)
        self.assertEqual(len(self.sent), 2)

    def test_noFileSyslogOnly(self):
        self.start(None, {})
        self.emit()
        self.assertEqual(len(self.sent), 1)
        self.assertEqual(os.listdir(self.dir), [])

    def test_unwritable(self):
        """A file that cannot be opened is a clear error, before anything is done."""
        path = os.path.join(self.dir, "missing", "audit.log")
        error = self.assertRaises(adminaudit.AuditLogError, self.start, path, {})
        self.assertEqual(str(error), f"cannot open the audit log {path}: No such file or directory")
