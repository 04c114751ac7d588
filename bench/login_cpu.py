"""
Login cost, less noisy than the table's five-sample login row on a busy
machine: *N* logins through imapproxy, each making its upstream connection
(spares off: ``--warm-upstream 0``), interleaved with *N* direct logins to
Dovecot, and the proxy process's CPU time per login (utime + stime from
``/proc``), which other processes' load barely changes. Compare two trees by
running it in each, alternately:

    .venv/bin/python -m bench.login_cpu [--logins 150] [--tree DIR]

``--tree DIR`` runs the proxy from another source tree's ``proxy/``
(``bench.tree``), so that two versions are compared in one session on one
machine: alternate ``--tree /tmp/COMMIT`` with no ``--tree``. On a noisy
machine ``bench.login_pair`` compares two versions more closely: it runs
both at once and alternates logins between them one by one.

``--calls`` also counts the Python function calls the proxy's reactor
thread makes per login (cProfile, switched on for the measured logins only
by a signal): unlike CPU time, the count repeats exactly from run to run,
so it shows a small change in the work per login that the CPU figure's
noise hides. The CPU figure of a ``--calls`` run includes the profiler.

``--hold N`` then holds N logged-in sessions (each LOGIN, then a NOOP
through the splice; with ``--idle`` then IDLE) and prints the proxy's RSS
per session: the memory figure of ``bench.concurrency`` on this rig, on a
fresh proxy (that figure depends on what the proxy did before), in a
minute, for two trees.

The bench's Dovecot runs two ``imap-login`` processes with their own TLS
session-ticket keys, so whether an upstream handshake resumes depends on
which one accepts it: the latency figures are bimodal, the CPU figure less so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import shutil
import signal
import statistics
import tempfile
import time
from typing import Any

from bench.client import connect_login
from bench.rig import Rig
from bench.tree import ProxyProcess
from tests.imaputil import message


def cpuTimes(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


# Imported by the proxy's Python (first on its PYTHONPATH) with ``--calls``:
# one signal starts a cProfile of the reactor thread, another saves it.
_CALLS_SITE = """import cProfile, os, signal
_p = cProfile.Profile()
def _start(*a):
    _p.enable()
def _stop(*a):
    _p.disable()
    _p.dump_stats(os.environ["LOGIN_CPU_CALLS"] + ".tmp")
    os.rename(os.environ["LOGIN_CPU_CALLS"] + ".tmp", os.environ["LOGIN_CPU_CALLS"])
signal.signal(signal.SIGRTMIN + 2, _start)
signal.signal(signal.SIGRTMIN + 3, _stop)
"""


def _callsSite(workdir: str) -> str:
    """A directory whose ``sitecustomize`` lets ``--calls`` profile the proxy."""
    site = os.path.join(workdir, "calls-site")
    os.makedirs(site, exist_ok=True)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(_CALLS_SITE)
    return site


class _NoSpares(ProxyProcess):
    calls = False
    #: True: spare connections as configured (``bench.login_pair --spares``).
    spares = False

    def sitePaths(self) -> list[str]:
        return [_callsSite(self.workdir)] if self.calls else []

    def environment(self) -> list[str]:
        if not self.calls:
            return []
        return [f"LOGIN_CPU_CALLS={os.path.join(self.workdir, 'calls.pstats')}"]

    def start(self, *extra: str) -> None:
        super().start(*extra, *(() if self.spares else ("--warm-upstream", "0")))


def _countCalls(pid: int, workdir: str, keep: str) -> int:
    """Stop the proxy's profile (copied to ``keep`` unless "-"); :return: its calls."""
    path = os.path.join(workdir, "calls.pstats")
    os.kill(pid, signal.SIGRTMIN + 3)
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit("the proxy saved no profile (was --calls's sitecustomize imported?)")
        time.sleep(0.1)
    if keep != "-":
        shutil.copy(path, keep)
    return sum(nc for _cc, nc, *_ in pstats.Stats(path).stats.values())  # type: ignore[attr-defined]


def smallRig(stack: contextlib.ExitStack, proxy: type[ProxyProcess]) -> Rig:
    """A rig (one small mailbox, no cold accounts) whose proxy is a ``proxy``."""
    work = tempfile.mkdtemp(prefix="imapproxy-logincpu-")
    stack.callback(shutil.rmtree, work, True)
    rig = Rig(work, stack, proxy_class=proxy)
    rig.start()
    rig.populate(1, message(1000, "big"))
    rig.make_targets(0)
    return rig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.login_cpu", description=__doc__)
    ap.add_argument("--logins", type=int, default=150)
    ap.add_argument("--tree", help="a source tree whose proxy/ runs instead of the installed one")
    ap.add_argument(
        "--calls",
        nargs="?",
        const="-",
        metavar="PSTATS",
        help="count the proxy's Python calls per login (and keep the profile in PSTATS)",
    )
    ap.add_argument(
        "--hold",
        type=int,
        default=0,
        metavar="N",
        help="then hold N logged-in sessions and print the proxy's RSS per session",
    )
    ap.add_argument("--idle", action="store_true", help="the held sessions wait in IDLE")
    args = ap.parse_args(argv)
    _NoSpares.calls = bool(args.calls)
    _NoSpares.tree = os.path.abspath(args.tree) if args.tree else None
    with contextlib.ExitStack() as stack:
        rig = smallRig(stack, _NoSpares)
        assert rig.proxy is not None
        proxy, direct = rig.targets["imapproxy"], rig.targets["direct"]
        pid = rig.proxy.pid()
        times: dict[str, list[float]] = {"imapproxy": [], "direct": []}
        for warmup in (True, False):
            if args.calls and not warmup:
                os.kill(pid, signal.SIGRTMIN + 2)
            before = cpuTimes(pid)
            for _ in range(10 if warmup else args.logins):
                for t in (proxy, direct):
                    c, elapsed = connect_login(t.port, t.ctx, t.logins[0])
                    if not warmup:
                        times[t.name].append(elapsed)
                    c.logout()
                    c.close()
        after = cpuTimes(pid)
        calls = ""
        if args.calls:
            count = _countCalls(pid, rig.proxy.workdir, args.calls)
            calls = f"; {count / args.logins:.0f} Python calls/login"
        user, system = (a - b for a, b in zip(after, before, strict=True))
        cpu = user + system
        p, d = (statistics.median(times[n]) * 1e3 for n in ("imapproxy", "direct"))
        print(
            f"{args.logins} logins: imapproxy median {p:.2f} ms, direct {d:.2f} ms, "
            f"ratio {p / d:.2f}; imapproxy CPU {1e6 * cpu / args.logins:.0f} us/login "
            f"(user {1e6 * user / args.logins:.0f}, system {1e6 * system / args.logins:.0f}); "
            f"load average {os.getloadavg()[0]:.1f}; proxy/ from {args.tree or 'the venv'}{calls}"
        )
        if args.hold:
            print(_holdSessions(proxy, pid, args.hold, args.idle))
    return 0


def rssKiB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _holdSessions(target: Any, pid: int, n: int, idle: bool) -> str:
    """Open ``n`` sessions (LOGIN, a NOOP through the splice, IDLE) and compare RSS."""
    before = rssKiB(pid)
    held = []
    try:
        for _ in range(n):
            c, _elapsed = connect_login(target.port, target.ctx, target.logins[0])
            held.append(c)
            c.command(b"NOOP")
            if idle:
                c.sock.sendall(b"i IDLE\r\n")
                while not c.line().startswith(b"+"):
                    pass
        during = rssKiB(pid)
    finally:
        for c in held:
            with contextlib.suppress(Exception):
                if idle:
                    c.sock.sendall(b"DONE\r\n")
                c.logout()
                c.close()
    return (
        f"{n} sessions held: proxy RSS {before} -> {during} KiB, "
        f"{(during - before) / n:.1f} KiB per idle session{' (in IDLE)' if idle else ''}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
