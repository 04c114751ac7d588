"""
Two versions' round trips, measured side by side: two rigs (each its own
Dovecot, provider and proxy, as ``bench.login_pair``), one session logged in
through each, and blocks of commands alternated between them (A B, B A …).
For each block it reads the CPU the proxy's threads were given
(``/proc/PID/task/*/schedstat``, in nanoseconds, finer than the clock ticks
of ``/proc/PID/stat`` a block of a few hundred round trips would need), and
times every command. Both ratios it prints are medians over the block
pairs (of CPU per command, of the median latency of a block), so whatever
slows the machine for a moment slows both alike:

    .venv/bin/python -m bench.rtt_pair venv /tmp/OLD [--blocks 40] [--per 250]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import statistics
import time

from bench.client import connect_login
from bench.login_pair import _rig

COMMANDS = (b"NOOP", b"UID FETCH 1:* (FLAGS)")


def runNanoseconds(pid: int) -> int:
    """CPU nanoseconds the threads of process ``pid`` alive now have run."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except OSError:  # a thread that ended between the glob and the read
            pass
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rtt_pair", description=__doc__)
    ap.add_argument("a", help="'venv' or a source tree")
    ap.add_argument("b", help="'venv' or a source tree")
    ap.add_argument("--blocks", type=int, default=40, help="blocks per version and command")
    ap.add_argument("--per", type=int, default=250, help="commands per block")
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        rigs = [_rig(stack, tree, False) for tree in (args.a, args.b)]
        pids = []
        clients = []
        for r in rigs:
            assert r.proxy is not None
            pids.append(r.proxy.pid())
            t = r.targets["imapproxy"]
            c, _ = connect_login(t.port, t.ctx, t.logins[0])
            stack.callback(c.close)
            c.command(b"SELECT INBOX")
            clients.append(c)
        for cmd in COMMANDS:
            for c in clients:  # warm-up
                for _ in range(300):
                    c.command(cmd)
            cpu: list[list[float]] = [[], []]
            latency: list[list[float]] = [[], []]  # a block's median
            for block in range(args.blocks):
                for k in (0, 1) if block % 2 == 0 else (1, 0):
                    before = runNanoseconds(pids[k])
                    times = []
                    for _ in range(args.per):
                        start = time.perf_counter()
                        clients[k].command(cmd)
                        times.append(time.perf_counter() - start)
                    cpu[k].append((runNanoseconds(pids[k]) - before) / args.per / 1e3)
                    latency[k].append(1e6 * statistics.median(times))
            cpuRatio = statistics.median(a / b for a, b in zip(*cpu, strict=True))
            latencyRatio = statistics.median(a / b for a, b in zip(*latency, strict=True))
            print(
                f"{cmd.decode()}: CPU per command A {statistics.median(cpu[0]):.1f} us, "
                f"B {statistics.median(cpu[1]):.1f} us, A/B {cpuRatio:.3f}; latency A "
                f"{statistics.median(latency[0]):.0f} us, "
                f"B {statistics.median(latency[1]):.0f} us, "
                f"A/B {latencyRatio:.3f} (medians of {args.blocks} block pairs); "
                f"load average {os.getloadavg()[0]:.1f}"
            )
        for c in clients:
            c.logout()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
