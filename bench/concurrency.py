"""
Concurrency of the proxy: N spliced sessions held in IDLE at once, the
proxy's resident memory per held session, and the logins per second the
proxy completes while they are held.

Two upstreams: the real Dovecot (N = 1,000: one imap process per session
there) and ``bench/lightupstream.py``, a few-KiB-per-connection IMAPS server
(N = 9,000), so that the proxy is what is measured. The clients are
``bench/idleclient.py`` processes (several hold a share of the sessions each;
others loop connect + TLS + LOGIN + LOGOUT for the login rate).

Figures: RSS per session = (VmRSS with N held - VmRSS before) / N, VmRSS
from /proc/<twistd pid>/status, "before" taken after a warm-up (one login
per account, then a few seconds of logins with nothing held). Run from the
repository root with the test venv:

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
    light_proxy,
    proxy_args,
    raise_fd_limit,
    say,
)


def run(
    pki: Any,
    provider: Any,
    dovecot: Any,
    proxy: Any,
    workdir: str,
    quick: bool = False,
    n_dovecot: int | None = None,
    n_light: int | None = None,
    profile: str | None = None,
) -> list[Row]:
    """
    The rows (figure, imapproxy value, note) for the harness's table. Uses
    ``proxy`` (which must have an ``ssl`` port) against ``dovecot``, and a
    second proxy of its own against a light upstream it starts.
    """
    if n_dovecot is None:
        n_dovecot = 200 if quick else 1000
    if n_light is None:
        n_light = 500 if quick else 9000
    churn_seconds = 3.0 if quick else 6.0
    churn_clients = 32
    raise_fd_limit()
    os.makedirs(workdir, exist_ok=True)
    children = Children()
    rows: list[Row] = []
    try:
        if n_dovecot:
            port = proxy.ports.get("ssl")
            if port is None:
                raise RuntimeError("the proxy given has no ssl: port")
            say(f"dovecot: registering {10 if quick else 50} accounts")
            accounts = add_accounts(
                proxy,
                provider,
                10 if quick else 50,
                port=dovecot.tls_port,
                ca_file=pki.ca_cert,
                domain="example.com",
                prefix="conc",
            )
            res = measure(
                children,
                pid=proxy.pid(),
                port=port,
                ca=pki.ca_cert,
                accounts=accounts,
                workdir=workdir,
                n=n_dovecot,
                hold_procs=4,
                hold_concurrency=6,
                churn_seconds=churn_seconds,
                churn_clients=churn_clients,
                churn_procs=2,
                label="dovecot",
                profile=profile,
            )
            res["churn_clients"] = churn_clients
            rows += rows_for(res, "Dovecot")
        if n_light:
            upstream = LightUpstream(pki, children)
            upstream.start()
            lproxy = None
            try:
                lproxy = light_proxy(pki, workdir)
                count = 20 if quick else 100
                say(f"light: upstream on port {upstream.port}; registering {count} accounts")
                accounts = add_accounts(
                    lproxy,
                    provider,
                    count,
                    port=upstream.port,
                    ca_file=pki.ca_cert,
                    domain=LIGHT_DOMAIN,
                    prefix="light",
                )
                res = measure(
                    children,
                    pid=lproxy.pid(),
                    port=lproxy.ports["ssl"],
                    ca=pki.ca_cert,
                    accounts=accounts,
                    workdir=workdir,
                    n=n_light,
                    hold_procs=6,
                    hold_concurrency=8,
                    churn_seconds=churn_seconds,
                    churn_clients=churn_clients,
                    churn_procs=2,
                    label="light",
                    profile=profile,
                )
                res["churn_clients"] = churn_clients
                up = sum(rss_kib(p) for p in upstream.pids())
                rows += rows_for(res, "light upstream")
                rows[-1] = (
                    rows[-1][0],
                    rows[-1][1],
                    rows[-1][2] + f"; light upstream RSS now {up / 1024:.0f} MiB",
                )
            finally:
                if lproxy is not None:
                    lproxy.stop()
                upstream.stop()
    finally:
        children.close()
    return rows


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
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    from tests.upstream import Dovecot, Provider, make_pki
    from tests.upstream.proxyproc import ProxyProcess

    raise_fd_limit()
    work = tempfile.mkdtemp(prefix="imapproxy-bench-conc-")
    provider = dovecot = proxy = None
    try:
        pki = make_pki(os.path.join(work, "pki"))
        provider = Provider(pki, os.path.join(work, "provider"))
        provider.start()
        if args.n_dovecot:
            dovecot = Dovecot(pki, provider.introspection_url)
            dovecot.start()
            proxy = ProxyProcess(
                os.path.join(work, "proxy"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert}
            )
            proxy.start(*proxy_args(pki))
        rows = run(
            pki,
            provider,
            dovecot,
            proxy,
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
        if proxy is not None:
            proxy.stop()
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
