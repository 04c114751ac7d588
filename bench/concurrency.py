"""
Concurrency of the proxy: N spliced sessions held in IDLE at once, the
proxy's resident memory per held session, and the logins per second the
proxy completes while they are held.

Two upstreams: the real Dovecot (N = 1,000: one imap process per session
there) and ``bench/lightupstream.py``, a few-KiB-per-connection IMAPS server
(N = 9,000), so that the proxy is what is measured. The clients are
``bench/idleclient.py`` processes (several hold a share of the sessions each;
others loop connect + TLS + LOGIN + LOGOUT for the login rate).

Each upstream has a fresh proxy of its own. Figures: RSS per session =
(VmRSS with N held - VmRSS before) / N, VmRSS from /proc/<twistd
pid>/status, "before" taken after a warm-up (one login per account, 8
clients); the logins per second with none held come last, after the
sessions are released. Memory a proxy kept from what it did before
(another benchmark's 50 MB FETCH, a burst of 32 clients' logins) would
otherwise be reused by the held sessions, and the figure would measure
the allocator's history, not a session (docs/benchmarks.md, "what the
Dovecot memory figure measures"). Run from the repository root with the
test venv:

    .venv/bin/python -m bench.concurrency [--n-dovecot 1000] [--n-light 9000]

or from the benchmark harness through :func:`run`. The setting up is in
``bench/concurrency_setup.py``, the measuring in ``bench/concurrency_measure.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

from bench.concurrency_measure import Row, measure, rows_for, rss_kib
from bench.concurrency_setup import (
    LIGHT_DOMAIN,
    Children,
    LightUpstream,
    add_accounts,
    fresh_proxy,
    raise_fd_limit,
    say,
)
from bench.tree import ProxyProcess


def run(
    pki: Any,
    provider: Any,
    dovecot: Any,
    workdir: str,
    quick: bool = False,
    n_dovecot: int | None = None,
    n_light: int | None = None,
    profile: str | None = None,
) -> list[Row]:
    """
    The rows (figure, imapproxy value, note) for the harness's table: a
    proxy of its own against ``dovecot``, then another against a light
    upstream it starts.
    """
    if n_dovecot is None:
        n_dovecot = 200 if quick else 1000
    if n_light is None:
        n_light = 500 if quick else 9000
    raise_fd_limit()
    os.makedirs(workdir, exist_ok=True)
    children = Children()
    phase = _Phase(pki, provider, children, workdir, quick, profile)
    rows: list[Row] = []
    try:
        if n_dovecot:
            rows += phase.measure("dovecot", dovecot.tls_port, n_dovecot, hold=(4, 6))
        if n_light:
            upstream = LightUpstream(pki, children)
            upstream.start()
            try:
                say(f"light: upstream on port {upstream.port}")
                rows += phase.measure("light", upstream.port, n_light, hold=(6, 8))
                up = sum(rss_kib(p) for p in upstream.pids())
                rows[-1] = (
                    rows[-1][0],
                    rows[-1][1],
                    rows[-1][2] + f"; light upstream RSS now {up / 1024:.0f} MiB",
                )
            finally:
                upstream.stop()
    finally:
        children.close()
    return rows


class _Phase:
    """One upstream's figures, measured through a fresh proxy of its own."""

    # label: (accounts (quick, full), their domain and id prefix, the rows' name)
    KINDS = {
        "dovecot": ((10, 50), "example.com", "conc", "Dovecot"),
        "light": ((20, 100), LIGHT_DOMAIN, "light", "light upstream"),
    }
    CHURN_CLIENTS = 32

    def __init__(
        self,
        pki: Any,
        provider: Any,
        children: Children,
        workdir: str,
        quick: bool,
        profile: str | None,
    ):
        self.pki, self.provider, self.children = pki, provider, children
        self.workdir, self.quick, self.profile = workdir, quick, profile

    def measure(self, label: str, upstreamPort: int, n: int, hold: tuple[int, int]) -> list[Row]:
        counts, domain, prefix, what = self.KINDS[label]
        count = counts[0] if self.quick else counts[1]
        proxy = fresh_proxy(self.pki, self.workdir, f"proxy-{label}")
        try:
            say(f"{label}: registering {count} accounts")
            accounts = add_accounts(
                proxy,
                self.provider,
                count,
                port=upstreamPort,
                ca_file=self.pki.ca_cert,
                domain=domain,
                prefix=prefix,
            )
            res = measure(
                self.children,
                pid=proxy.pid(),
                port=proxy.ports["ssl"],
                ca=self.pki.ca_cert,
                accounts=accounts,
                workdir=self.workdir,
                n=n,
                hold_procs=hold[0],
                hold_concurrency=hold[1],
                churn_seconds=3.0 if self.quick else 6.0,
                churn_clients=self.CHURN_CLIENTS,
                churn_procs=2,
                label=label,
                profile=self.profile,
            )
        finally:
            proxy.stop()
        res["churn_clients"] = self.CHURN_CLIENTS
        return rows_for(res, what)


def _terminate(_sig: int, _frame: Any) -> None:
    # SIGTERM/SIGHUP as Ctrl-C: unwind through every finally (children, servers).
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-dovecot", type=int, default=1000, help="0 to skip")
    ap.add_argument("--n-light", type=int, default=9000, help="0 to skip")
    ap.add_argument("--quick", action="store_true", help="smaller N and shorter login tests")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--profile", metavar="DIR", help="py-spy the proxy during the login tests")
    ap.add_argument("--tree", metavar="DIR", help="run the proxies from DIR's proxy/ (bench.tree)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    from tests.upstream import Dovecot, Provider, make_pki

    if args.tree:
        ProxyProcess.default = os.path.abspath(args.tree)
    raise_fd_limit()
    work = tempfile.mkdtemp(prefix="imapproxy-bench-conc-")
    provider = dovecot = None
    try:
        pki = make_pki(os.path.join(work, "pki"))
        provider = Provider(pki, os.path.join(work, "provider"))
        provider.start()
        if args.n_dovecot:
            dovecot = Dovecot(pki, provider.introspection_url)
            dovecot.start()
        rows = run(
            pki,
            provider,
            dovecot,
            os.path.join(work, "concurrency"),
            quick=args.quick,
            n_dovecot=args.n_dovecot,
            n_light=args.n_light,
            profile=args.profile,
        )
        width = max(len(r[0]) for r in rows)
        for figure, value, note in rows:
            print(f"{figure:<{width}}  {value:>10}  {note}")
    finally:
        if dovecot is not None:
            dovecot.stop()
        if provider is not None:
            provider.stop()
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
