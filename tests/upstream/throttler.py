"""A fake provider that throttles (Twisted), for the integration tests.

Run it as ``python -m tests.upstream.throttler --ports-file F --stats-file S``
from the repository root. It listens on 127.0.0.1 on two ephemeral plain-TCP
ports, one IMAP and one SMTP submission, writes ``{"imap": N, "smtp": M}``
to the ports file once both listen, and answers every XOAUTH2 login with a
throttling refusal chosen by the mailbox's local part:

IMAP
    ``gmail-connections…``: ``NO [ALERT] Too many simultaneous connections. (Failure)``;
    ``gmail-bandwidth…``: ``NO [ALERT] Account exceeded command or bandwidth limits. (Failure)``;
    ``ms-backoff…``: ``NO Request is throttled. Suggested Backoff Time: 3000 milliseconds``.

SMTP
    any mailbox: ``432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded``.

After each login it rewrites the stats file, ``{"imap:<mailbox>": logins,
"smtp:<mailbox>": logins}``, atomically: the tests read how many logins
reached the provider.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import subprocess
import sys
from collections import Counter

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from tests.upstream.osutil import stop_process, wait_until

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT = 15.0

IMAP_ANSWERS = {
    "gmail-connections": b"NO [ALERT] Too many simultaneous connections. (Failure)",
    "gmail-bandwidth": b"NO [ALERT] Account exceeded command or bandwidth limits. (Failure)",
    "ms-backoff": b"NO Request is throttled. Suggested Backoff Time: 3000 milliseconds",
}
SMTP_ANSWER = b"432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"


def mailboxOf(initial: bytes) -> str:
    """The ``user=`` of an XOAUTH2 initial response (base64), or ``?``."""
    try:
        decoded = base64.b64decode(initial, validate=True)
    except (binascii.Error, ValueError):
        return "?"
    for part in decoded.split(b"\x01"):
        if part.startswith(b"user="):
            return part[5:].decode("ascii", "replace")
    return "?"


class Stats:
    def __init__(self, path: str) -> None:
        self.path = path
        self.logins: Counter[str] = Counter()
        self.write()

    def count(self, key: str) -> None:
        self.logins[key] += 1
        self.write()

    def write(self) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(dict(self.logins), f)
        os.replace(tmp, self.path)


class ThrottlingIMAP(LineReceiver):
    delimiter = b"\r\n"

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.pending: bytes | None = None

    def connectionMade(self) -> None:
        self.sendLine(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] throttler ready")

    def lineReceived(self, line: bytes) -> None:
        if self.pending is not None:
            tag, self.pending = self.pending, None
            return self.answer(tag, line)
        parts = line.split(b" ")
        command = parts[1].upper() if len(parts) > 1 else b""
        if command == b"CAPABILITY":
            self.sendLine(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2")
            self.sendLine(parts[0] + b" OK done")
        elif command == b"AUTHENTICATE" and len(parts) == 4:
            self.answer(parts[0], parts[3])
        elif command == b"AUTHENTICATE":
            self.pending = parts[0]
            self.sendLine(b"+ ")
        elif command == b"LOGOUT":
            self.sendLine(b"* BYE bye")
            self.sendLine(parts[0] + b" OK done")
            self.transport.loseConnection()
        else:
            self.sendLine(parts[0] + b" BAD not here")

    def answer(self, tag: bytes, initial: bytes) -> None:
        mailbox = mailboxOf(initial)
        self.stats.count("imap:" + mailbox)
        local = mailbox.split("@")[0]
        refusal = next((a for k, a in IMAP_ANSWERS.items() if local.startswith(k)), None)
        self.sendLine(tag + b" " + (refusal or b"NO [AUTHENTICATIONFAILED] unknown"))


class ThrottlingSMTP(LineReceiver):
    delimiter = b"\r\n"

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def connectionMade(self) -> None:
        self.sendLine(b"220 throttler ESMTP")

    def lineReceived(self, line: bytes) -> None:
        words = line.split(b" ")
        verb = words[0].upper()
        if verb in (b"EHLO", b"HELO"):
            self.sendLine(b"250-throttler")
            self.sendLine(b"250-ENHANCEDSTATUSCODES")
            self.sendLine(b"250 AUTH XOAUTH2")
        elif verb == b"AUTH" and len(words) == 3:
            self.stats.count("smtp:" + mailboxOf(words[2]))
            self.sendLine(SMTP_ANSWER)
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 5.5.1 not here")


class Throttler:
    """The throttling provider as a subprocess: ``start()``, ``stop()``, ``logins()``."""

    host = "127.0.0.1"

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.ports_file = os.path.join(workdir, "throttler-ports.json")
        self.stats_file = os.path.join(workdir, "throttler-stats.json")
        self.log_path = os.path.join(workdir, "throttler.log")
        self.imap_port = self.smtp_port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        for path in (self.ports_file, self.stats_file):
            if os.path.exists(path):
                os.unlink(path)
        cmd = [sys.executable, "-m", "tests.upstream.throttler"]
        cmd += ["--ports-file", self.ports_file, "--stats-file", self.stats_file]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            ports = wait_until(self._ports, START_TIMEOUT, "the throttler to listen")
        except BaseException:
            self.stop()
            raise
        self.imap_port, self.smtp_port = ports["imap"], ports["smtp"]

    def _ports(self) -> dict[str, int] | None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"the throttler exited with {self._proc.returncode}")
        if not os.path.exists(self.ports_file):
            return None
        with open(self.ports_file) as f:
            return dict(json.load(f))

    def logins(self, protocol: str, mailbox: str) -> int:
        """How many XOAUTH2 logins of ``mailbox`` reached it, by ``protocol``."""
        with open(self.stats_file) as f:
            return int(json.load(f).get(f"{protocol}:{mailbox}", 0))

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, 10.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports-file", required=True)
    parser.add_argument("--stats-file", required=True)
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    stats = Stats(args.stats_file)
    imap = reactor.listenTCP(
        0, Factory.forProtocol(lambda: ThrottlingIMAP(stats)), interface="127.0.0.1"
    )
    smtp = reactor.listenTCP(
        0, Factory.forProtocol(lambda: ThrottlingSMTP(stats)), interface="127.0.0.1"
    )
    tmp = f"{args.ports_file}.tmp"
    with open(tmp, "w") as f:
        json.dump({"imap": imap.getHost().port, "smtp": smtp.getHost().port}, f)
    os.replace(tmp, args.ports_file)
    print("throttler listening", file=sys.stderr)
    reactor.run()


if __name__ == "__main__":
    main()
