"""
What a change to the relay costs: two ``twistd imapproxy`` side by side in
front of one Dovecot, this checkout's (``after``) and another source tree's
(``before``, e.g. ``git archive main proxy | tar -x -C /tmp/before``), the
same large FETCH through each, interleaved run by run so that the rest of the
machine weighs on both alike. Prints the median MB/s of each and the relay's
CPU seconds per GB relayed (summed over the runs: /proc counts 10 ms ticks).
Both proxies get the rig's options; a tree older than them runs through
``bench.tree``'s wrapper.

    python -m bench.relay_ab --before /tmp/before --size-mb 20 --runs 30
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time

from bench.client import Login, connect_login
from bench.rig import Rig
from bench.stats import cpu_seconds
from bench.tree import ProxyProcess
from tests.imaputil import message


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.relay_ab", description=__doc__)
    ap.add_argument("--before", required=True, help="a source tree holding the 'before' proxy/")
    ap.add_argument("--size-mb", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        work = tempfile.mkdtemp(prefix="imapproxy-relay-ab-")
        stack.callback(shutil.rmtree, work, True)
        rig = Rig(work, stack)
        rig.start()
        rig.populate(0, message(int(args.size_mb * 1e6), "large"))
        assert rig.proxy and rig.pki and rig.big
        # The same store and options; only the code differs (the tree's
        # proxy/ first on PYTHONPATH, and bench.tree's wrapper for a tree
        # older than the options the rig passes).
        tree = type("Before", (ProxyProcess,), {"tree": os.path.abspath(args.before)})
        before = tree(os.path.join(work, "proxy"), env={"REQUESTS_CA_BUNDLE": rig.pki.ca_cert})
        stack.callback(before.stop)
        before.start(*rig.proxy_args())
        ports = {"before": before.ports["ssl"], "after": rig.proxy.ports["ssl"]}
        pids = {"before": before.pid(), "after": rig.proxy.pid()}
        login = Login.password(rig.big.account, rig.big.token)
        buffer = bytearray(len(rig.big_message) + 65536)
        fetch = b"UID FETCH %d BODY.PEEK[]" % rig.big_uid
        clients = {}
        for name, port in ports.items():
            c, _ = connect_login(port, rig.ctx, login, buffer=buffer)
            c.command(b"SELECT INBOX")
            c.command(fetch, big=True)  # warm-up
            clients[name] = c
        rates: dict[str, list[float]] = {n: [] for n in ports}
        cpu = {n: 0.0 for n in ports}
        relayed = {n: 0 for n in ports}
        for i in range(args.runs):
            order = list(ports) if i % 2 == 0 else list(reversed(ports))
            for name in order:
                c = clients[name]
                t0, started = cpu_seconds(pids[name]), time.perf_counter()
                c.command(fetch, big=True)
                elapsed = time.perf_counter() - started
                cpu[name] += cpu_seconds(pids[name]) - t0
                relayed[name] += c.last_literal
                rates[name].append(c.last_literal / elapsed / 1e6)
        for c in clients.values():
            c.logout()
        for name in ports:
            print(
                f"{name:6}: FETCH {args.size_mb:g} MB median {statistics.median(rates[name]):.0f} "
                f"MB/s (min {min(rates[name]):.0f}, max {max(rates[name]):.0f}), "
                f"relay CPU {cpu[name] / (relayed[name] / 1e9):.3f} s/GB over {args.runs} runs"
            )


if __name__ == "__main__":
    main()
