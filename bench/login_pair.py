"""
Two versions' CPU per login, measured side by side: two rigs (each its own
Dovecot, provider and proxy), one running this venv's ``proxy/`` or a tree's,
the other another tree's (``bench.tree``), and logins alternated between them
one by one (A B, B A, A B …). Whatever slows the machine down slows both
alike, so the ratio of their CPU per login (``/proc`` utime + stime of each
twistd) holds to about a percent on a machine whose absolute figures move by
a third between runs of ``bench.login_cpu``:

    .venv/bin/python -m bench.login_pair venv /tmp/OLD [--logins 400] [--spares]

``venv`` stands for the installed code. Without ``--spares`` each login makes
its upstream connection (``--warm-upstream 0``, as ``bench.login_cpu``); with
it, each takes the spare connection made after the one before, and the CPU
includes making that spare. With ``--cold`` each measured login is the first
of a fresh account, so it includes the token refresh (the provider's answer,
the store's write); registering ``--logins`` such accounts in each rig, by the
admin command, takes about a second each first.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics

from bench.client import Login, connect_login
from bench.login_cpu import _NoSpares, cpuTimes, smallRig
from bench.measure import await_spare
from bench.rig import Rig


def _rig(stack: contextlib.ExitStack, tree: str, spares: bool) -> Rig:
    own = {"tree": None if tree == "venv" else os.path.abspath(tree), "spares": spares}
    return smallRig(stack, type("PairProxy", (_NoSpares,), own))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.login_pair", description=__doc__)
    ap.add_argument("a", help="'venv' or a source tree")
    ap.add_argument("b", help="'venv' or a source tree")
    ap.add_argument("--logins", type=int, default=400)
    ap.add_argument("--spares", action="store_true", help="logins take spare connections")
    ap.add_argument("--cold", action="store_true", help="each login the first of a fresh account")
    args = ap.parse_args(argv)
    if args.cold and args.spares:
        ap.error("--cold and --spares exclude each other: a fresh account has no spare")
    with contextlib.ExitStack() as stack:
        rigs = [_rig(stack, tree, args.spares) for tree in (args.a, args.b)]
        targets = [r.targets["imapproxy"] for r in rigs]
        # Only the proxy's fresh accounts (make_targets' cold runs would
        # register direct and second-login ones too, three times the wait).
        n = args.logins if args.cold else 0
        fresh = [
            [Login.password(mb.account, mb.token) for mb in (r.register() for _ in range(n))]
            for r in rigs
        ]
        pids = [r.proxy.pid() for r in rigs if r.proxy is not None]
        logins = [0, 0]
        made = [0, 0]  # spares made before each side's last login

        def login(k: int, i: int | None = None) -> float:
            """Side *k*'s next login: account 0's, or its *i*th fresh account's."""
            t = targets[k]
            if args.spares and t.spares_made is not None:
                # An account gets a spare from its second login on.
                if logins[k] >= 2:
                    await_spare(t, made[k])
                made[k] = t.spares_made()
            logins[k] += 1
            who = t.logins[0] if i is None else fresh[k][i]
            c, elapsed = connect_login(t.port, t.ctx, who)
            c.logout()
            c.close()
            return elapsed

        for _ in range(20):  # warm-up: caches, tokens, spares
            for k in (0, 1):
                login(k)
        before = [cpuTimes(p) for p in pids]
        times: list[list[float]] = [[], []]
        for i in range(args.logins):
            for k in (0, 1) if i % 2 == 0 else (1, 0):
                times[k].append(login(k, i if args.cold else None))
        after = [cpuTimes(p) for p in pids]
    cpu = [1e6 * sum(a - b for a, b in zip(after[k], before[k], strict=True)) for k in (0, 1)]
    per = [c / args.logins for c in cpu]
    med = [1e3 * statistics.median(t) for t in times]
    print(
        f"{args.logins} logins each{' (spares)' if args.spares else ''}"
        f"{' (first of an account)' if args.cold else ''}: "
        f"A {args.a} {per[0]:.0f} us/login, median {med[0]:.2f} ms; "
        f"B {args.b} {per[1]:.0f} us/login, median {med[1]:.2f} ms; "
        f"A/B CPU {per[0] / per[1]:.3f}, latency {med[0] / med[1]:.3f}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
