"""
Login cost, less noisy than the table's five-sample login row on a busy
machine: *N* logins through imapproxy, each making its upstream connection
(spares off: ``--warm-upstream 0``), interleaved with *N* direct logins to
Dovecot, and the proxy process's CPU time per login (utime + stime from
``/proc``), which other processes' load barely changes. Compare two trees by
running it in each, alternately:

    .venv/bin/python -m bench.login_cpu [--logins 150] [--tree DIR]

``--tree DIR`` runs the proxy from another source tree's ``proxy/`` (put
first on its ``PYTHONPATH``; the venv's dependencies and this tree's rig), so
that two versions are compared in one session on one machine, e.g.
``git archive COMMIT proxy | tar -x -C /tmp/COMMIT``, then alternate
``--tree /tmp/COMMIT`` with no ``--tree``. The other version must accept the
rig's options (``--smtp-port`` appeared with SMTP submission).

The bench's Dovecot runs two ``imap-login`` processes with their own TLS
session-ticket keys, so whether an upstream handshake resumes depends on
which one accepts it: the latency figures are bimodal, the CPU figure less so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile

from bench.client import connect_login
from bench.rig import Rig
from tests.imaputil import message
from tests.upstream.proxyproc import ProxyProcess


def cpuSeconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _NoSpares(ProxyProcess):
    tree: str | None = None

    def start(self, *extra: str) -> None:
        prefix = ["env", f"PYTHONPATH={self.tree}"]
        if self.tree and self.server_prefix[:2] != prefix:  # once, however often started
            self.server_prefix = [*prefix, *self.server_prefix]
        super().start(*extra, "--warm-upstream", "0")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.login_cpu", description=__doc__)
    ap.add_argument("--logins", type=int, default=150)
    ap.add_argument("--tree", help="a source tree whose proxy/ runs instead of the installed one")
    args = ap.parse_args(argv)
    _NoSpares.tree = os.path.abspath(args.tree) if args.tree else None
    import bench.rig

    bench.rig.ProxyProcess = _NoSpares  # type: ignore[misc]
    with contextlib.ExitStack() as stack:
        work = tempfile.mkdtemp(prefix="imapproxy-logincpu-")
        stack.callback(shutil.rmtree, work, True)
        rig = Rig(work, stack)
        rig.start()
        rig.populate(1, message(1000, "big"))
        rig.make_targets(0)
        assert rig.proxy is not None
        proxy, direct = rig.targets["imapproxy"], rig.targets["direct"]
        pid = rig.proxy.pid()
        times: dict[str, list[float]] = {"imapproxy": [], "direct": []}
        for warmup in (True, False):
            before = cpuSeconds(pid)
            for _ in range(10 if warmup else args.logins):
                for t in (proxy, direct):
                    c, elapsed = connect_login(t.port, t.ctx, t.logins[0])
                    if not warmup:
                        times[t.name].append(elapsed)
                    c.logout()
                    c.close()
        cpu = cpuSeconds(pid) - before
        p, d = (statistics.median(times[n]) * 1e3 for n in ("imapproxy", "direct"))
        print(
            f"{args.logins} logins: imapproxy median {p:.2f} ms, direct {d:.2f} ms, "
            f"ratio {p / d:.2f}; imapproxy CPU {1e6 * cpu / args.logins:.0f} us/login; "
            f"load average {os.getloadavg()[0]:.1f}; proxy/ from {args.tree or 'the venv'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
