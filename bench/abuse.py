"""
A bounded loopback load generator for the proxy's connection limits and its
pre-auth parser; it starts its own ``twistd imapproxy`` (no provider needed:
nothing here logs in) and stops by itself::

    .venv/bin/python -m bench.abuse [--files 1200] [--hold 1200] [--handshakes 2000]
        [--waves 2] [--fuzz-connections 200] [-- extra twistd imapproxy options]

The proxy's open-files limit is set to ``--files`` (0: left alone) once it
runs, as in the finding this reproduces (1,200).

(a) One address (127.0.0.1) holds ``--hold`` idle connections and as many
    half-open TLS handshakes as it may; a client from 127.0.0.2 is then timed
    from connect to greeting, in the clear and over TLS (target: < 1 s).
(b) ``--waves`` floods of ``--handshakes`` half-open TLS handshakes (each
    sends its ClientHello, then nothing), spread over many 127.x addresses;
    the proxy's RSS (``/proc/PID/status``) before, at the peak, and after each
    wave once the proxy has dropped them (target: back within 20 % of the
    baseline).
(c) The fuzz corpus (``a LOGIN`` with no argument, malformed literals, NULs,
    8-bit bytes, huge counts) over ``--fuzz-connections`` connections: log
    lines and tracebacks it adds to the proxy's log (target: 0 tracebacks,
    lines per connection bounded).
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import shutil
import socket
import ssl
import tempfile
import time
from typing import Any

from tests.upstream import make_pki
from tests.upstream.proxyproc import ProxyProcess

CORPUS = [
    b"a LOGIN\r\n",
    b"a LOGIN alice\r\n",
    b"a LOGIN alice {-1}\r\n",
    b"a LOGIN alice {1_0}\r\n",
    b"a LOGIN alice { 5}\r\n",
    b"a LOGIN alice {99999999999999999999999}\r\n",
    b"a LOGIN \x00\xff\xfe {3}\r\n",
    b'a LOGIN "unterminated\r\n',
    b'a LOGIN "a\\x" b\r\n',
    b"a AUTHENTICATE\r\n",
    b"a AUTHENTICATE PLAIN a b c\r\n",
    b"a AUTHENTICATE PLAIN\r\n%%%\r\n",
    b"a ID (\r\n",
    b"\xff\xfe\xfd NOOP\r\n",
    b"a APPEND INBOX {10+}\r\n0123456789\r\n",
    b"a NOOP {5}\r\n",
]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def connect(port: int, source: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.setblocking(False)
    return s


def first_lines(socks: list[socket.socket], seconds: float) -> dict[socket.socket, bytes]:
    """Each socket's first line (b"" when closed), for those that answer within ``seconds``."""
    deadline = time.monotonic() + seconds
    got = {s: b"" for s in socks}
    done: dict[socket.socket, bytes] = {}
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    while len(done) < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.2):
            s: Any = key.fileobj
            try:
                data = s.recv(4096)
            except (ConnectionError, ssl.SSLError):
                data = b""
            except (BlockingIOError, ssl.SSLWantReadError):
                continue
            got[s] += data
            if not data or b"\r\n" in got[s]:
                done[s] = got[s].split(b"\r\n")[0]
                sel.unregister(s)
    sel.close()
    return done


def half_open(port: int, source: str, ctx: ssl.SSLContext) -> Any:
    """A TLS connection that sends its ClientHello and then nothing (None: refused)."""
    try:
        raw = connect(port, source)
    except OSError:
        return None
    s = ctx.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
    try:
        s.do_handshake()
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        pass
    except (ssl.SSLError, OSError):
        pass
    return s


def greeted_in(port: int, ca: str | None) -> float:
    """Seconds from connect (from 127.0.0.2) to the greeting, TLS when ``ca``; inf: none in 10 s."""
    started = time.monotonic()
    try:
        s = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)
        )
        if ca:
            s = ssl.create_default_context(cafile=ca).wrap_socket(s, server_hostname="localhost")
        with s:
            greeting = s.recv(4096)
    except OSError:
        return float("inf")
    if not greeting.startswith(b"* OK imapproxy ready"):
        return float("inf")
    return time.monotonic() - started


def close_all(socks: list[Any]) -> None:
    for s in socks:
        try:
            if s is not None:
                s.close()
        except OSError:
            pass
    socks.clear()


def settle(pid: int, seconds: float) -> int:
    """Wait ``seconds`` for the proxy to drop what it holds; :return: its RSS then."""
    time.sleep(seconds)
    return rss_kib(pid)


def hold_and_greet(proxy: ProxyProcess, pki: Any, hold: int) -> dict[str, Any]:
    plain, tls = proxy.ports["tcp"], proxy.ports["ssl"]
    ctx = ssl.create_default_context(cafile=pki.ca_cert)
    held: list[Any] = []
    try:
        socks = []
        for _ in range(hold):
            socks.append(connect(plain, "127.0.0.1"))
        held += socks
        lines = first_lines(socks, 30)
        greeted = sum(v.startswith(b"* OK") for v in lines.values())
        refused = sum(v.startswith(b"* BYE Too many connections") for v in lines.values())
        handshakes = [half_open(tls, "127.0.0.1", ctx) for _ in range(100)]
        held += handshakes
        time.sleep(0.5)
        return {
            "held": hold,
            "greeted": greeted,
            "refused": refused,
            "plain_greeting_s": greeted_in(plain, None),
            "tls_greeting_s": greeted_in(tls, pki.ca_cert),
        }
    finally:
        close_all(held)


def handshake_flood(proxy: ProxyProcess, pki: Any, n: int, waves: int, wait: float) -> list[dict]:
    tls = proxy.ports["ssl"]
    ctx = ssl.create_default_context(cafile=pki.ca_cert)
    pid = proxy.pid()
    rows = []
    for wave in range(waves):
        before = rss_kib(pid)
        socks: list[Any] = []
        peak = before
        for i in range(n):
            # 40 an address: under the per-address cap, so the total caps bind.
            source = f"127.0.{1 + i // 40 // 250}.{10 + i // 40 % 250}"
            socks.append(half_open(tls, source, ctx))
            if i % 200 == 0:
                peak = max(peak, rss_kib(pid))
        time.sleep(1.0)
        peak = max(peak, rss_kib(pid))
        close_all(socks)
        after = settle(pid, wait)
        rows.append({"wave": wave + 1, "before_kib": before, "peak_kib": peak, "after_kib": after})
    return rows


def fuzz(proxy: ProxyProcess, connections: int) -> dict[str, Any]:
    plain = proxy.ports["tcp"]
    lines_before = proxy.full_log().count("\n")
    tracebacks_before = proxy.full_log().count("Traceback")
    for i in range(connections):
        s = socket.create_connection(("127.0.0.1", plain), timeout=10)
        with s:
            s.recv(4096)
            s.sendall(b"".join(CORPUS[(i + j) % len(CORPUS)] for j in range(len(CORPUS))))
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
    time.sleep(0.5)
    log = proxy.full_log()
    added = log.count("\n") - lines_before
    return {
        "connections": connections,
        "commands": connections * len(CORPUS),
        "log_lines": added,
        "log_lines_per_connection": added / connections,
        "tracebacks": log.count("Traceback") - tracebacks_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1200, help="the proxy's open-files limit")
    parser.add_argument("--hold", type=int, default=1200)
    parser.add_argument("--handshakes", type=int, default=2000)
    parser.add_argument("--waves", type=int, default=2)
    parser.add_argument("--fuzz-connections", type=int, default=200)
    parser.add_argument("--settle", type=float, default=12.0, help="seconds after a wave")
    parser.add_argument("extra", nargs="*", help="more twistd imapproxy options (after --)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = tempfile.mkdtemp(prefix="imapproxy-abuse-")
    try:
        pki = make_pki(os.path.join(work, "pki"))
        proxy = ProxyProcess(os.path.join(work, "proxy"))
        proxy.start(
            "--port",
            f"ssl:0:interface=127.0.0.1:privateKey={pki.key}:certKey={pki.cert}",
            *args.extra,
        )
        try:
            pid = proxy.pid()
            if args.files:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (args.files, args.files))
            # Warm the code paths (one greeting each way) before the baseline.
            greeted_in(proxy.ports["tcp"], None)
            greeted_in(proxy.ports["ssl"], pki.ca_cert)
            time.sleep(0.5)
            baseline = rss_kib(pid)
            print(f"baseline RSS {baseline / 1024:.1f} MiB")
            a = hold_and_greet(proxy, pki, args.hold)
            print(
                f"(a) 127.0.0.1 opened {a['held']} idle + 100 half-open TLS: "
                f"{a['greeted']} greeted, {a['refused']} refused; 127.0.0.2 greeted in "
                f"{a['plain_greeting_s'] * 1000:.0f} ms (plain), "
                f"{a['tls_greeting_s'] * 1000:.0f} ms (TLS)"
            )
            settle(pid, 1.0)
            for row in handshake_flood(proxy, pki, args.handshakes, args.waves, args.settle):
                print(
                    f"(b) wave {row['wave']}: {args.handshakes} half-open handshakes, RSS "
                    f"{row['before_kib'] / 1024:.1f} -> peak {row['peak_kib'] / 1024:.1f} -> "
                    f"after {row['after_kib'] / 1024:.1f} MiB "
                    f"({100 * (row['after_kib'] - baseline) / baseline:+.0f} % of baseline)"
                )
            c = fuzz(proxy, args.fuzz_connections)
            print(
                f"(c) fuzz: {c['commands']} malformed commands on {c['connections']} connections: "
                f"{c['log_lines']} log lines ({c['log_lines_per_connection']:.2f} a connection), "
                f"{c['tracebacks']} tracebacks"
            )
        finally:
            proxy.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
