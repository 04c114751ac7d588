"""
Memory of a large FETCH through the proxy: the proxy's resident set before,
during and after relaying one large message to a client that reads slowly
and to one that reads as fast as it can, with an unrestricted token (the
byte splice) and with a restricted one (read-only, INBOX only: the policy
relay, which must stream the literal, never hold it). Not a pass/fail test:
it prints figures. Run from the repository root with the test venv:

    .venv/bin/python -m bench.fetch_memory [--size-mb 200] [--token restricted]
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import ssl
import sys
import tempfile
import threading
import time

from tests.conftest import register
from tests.imaputil import message, tls
from tests.upstream import Dovecot, Provider, make_pki
from tests.upstream.proxyproc import ProxyProcess


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def fetch(port: int, ca: str, account: str, token: str, size: int, chunk_pause: float) -> int:
    """FETCH message 1 over TLS reading 64 KiB at a time; returns bytes read."""
    ctx = ssl.create_default_context(cafile=ca)
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    f = s.makefile("rb")
    f.readline()
    s.sendall(f"a LOGIN {account} {token}\r\nb EXAMINE INBOX\r\nc FETCH 1 BODY.PEEK[]\r\n".encode())
    total = 0
    while True:
        data = s.recv(65536)
        if not data:
            break
        total += len(data)
        if total >= size and b"c OK" in data[-200:]:
            break
        if chunk_pause:
            time.sleep(chunk_pause)  # a slow reader, on purpose
    s.close()
    return total


def restricted(proxy: ProxyProcess, account: str) -> str:
    """A read-only, INBOX-only token for ``account``: the policy relay's session."""
    return proxy.cli(
        "tokens", "issue", "--account", account, "--scope", "imap-proxy",
        "--description", "fetch_memory: restricted", "--read-only", "--mailbox", "INBOX",
    ).stdout.strip()  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument(
        "--token",
        choices=("unrestricted", "restricted", "both"),
        default="both",
        help="which token's session to measure (restricted: read-only, INBOX only)",
    )
    args = ap.parse_args()
    size = args.size_mb * 1024 * 1024
    work = tempfile.mkdtemp(prefix="imapproxy-bench-")
    pki = make_pki(os.path.join(work, "pki"))
    provider = Provider(pki, os.path.join(work, "provider"))
    provider.start()
    dovecot = Dovecot(pki, provider.introspection_url)
    dovecot.start()
    proxy = ProxyProcess(os.path.join(work, "proxy"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert})
    try:
        proxy.start("--port", f"ssl:0:interface=127.0.0.1:privateKey={pki.key}:certKey={pki.cert}")
        mb = register(proxy, provider, dovecot, pki)
        msg = message(size, "big")
        dovecot.seed(mb.email, msg)
        del msg
        port = proxy.ports["ssl"]
        tokens = {"unrestricted": mb.token, "restricted": restricted(proxy, mb.account)}
        if args.token != "both":
            tokens = {args.token: tokens[args.token]}
        # One small session of each first so that the code paths are warm.
        for token in tokens.values():
            c = tls(port, pki.ca_cert)
            c.login(mb.account, token)
            c.logout()
        pid = proxy.pid()
        base, _ = rss_kib(pid)
        print(f"message: {args.size_mb} MiB; proxy RSS before: {base / 1024:.1f} MiB")
        readers = (("slow reader (64 KiB / 2 ms)", 0.002), ("fast reader", 0.0))
        for (kind, token), (reader, pause) in itertools.product(tokens.items(), readers):
            label = f"{kind} token, {reader}"
            peak = [0]
            done = threading.Event()

            def sample(peak: list[int] = peak, done: threading.Event = done) -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], rss_kib(pid)[0])
                    done.wait(0.01)

            t = threading.Thread(target=sample)
            t.start()
            started = time.monotonic()
            got = fetch(port, pki.ca_cert, mb.account, token, size, pause)
            elapsed = time.monotonic() - started
            done.set()
            t.join()
            after, hwm = rss_kib(pid)
            print(
                f"{label}: read {got / 2**20:.1f} MiB in {elapsed:.1f} s; proxy RSS peak "
                f"{peak[0] / 1024:.1f} MiB (+{(peak[0] - base) / 1024:.1f}), after "
                f"{after / 1024:.1f} MiB, high-water mark {hwm / 1024:.1f} MiB"
            )
    finally:
        proxy.stop()
        dovecot.stop()
        provider.stop()


if __name__ == "__main__":
    sys.exit(main())
