"""
``python -m bench.caps``: what the per-account connection caps cost a
login. Two ``twistd imapproxy`` instances on one Redis store, in front of
the tests' Dovecot, alike but for the caps: one with
``--max-account-connections 1000000`` (every login takes a slot in Redis, a
Lua script, and gives it back at its LOGOUT), one with ``0`` (the slot code
is skipped). No spares, so every login makes its upstream connection (the
access token cached: each account logged in once first). Logins are timed
interleaved (on, off, on, off…) so that a busy machine weighs on both
alike; the medians and their ratio are printed.

Run from the source tree with the test environment's Python:
``.venv/bin/python -m bench.caps [--runs N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import ssl
import statistics
import tempfile

from bench.client import Login, connect_login
from tests.conftest import OAUTH2_DEADLINE, register
from tests.upstream import Dovecot, Provider, make_pki
from tests.upstream.proxyproc import ProxyProcess
from tests.upstream.redisserver import RedisServer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.caps", description=__doc__)
    ap.add_argument("--runs", type=int, default=200, help="logins timed per instance")
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = tempfile.mkdtemp(prefix="bench-caps-")
        pki = make_pki(os.path.join(work, "pki"))
        provider = Provider(pki, os.path.join(work, "provider"))
        stack.callback(provider.stop)
        provider.start()
        dovecot = Dovecot(pki, provider.introspection_url)
        stack.callback(dovecot.stop)
        dovecot.start()
        redis = RedisServer()
        stack.callback(redis.cleanup)
        redis.start()
        procs = {}
        for name, cap in (("on", "1000000"), ("off", "0")):
            p = ProxyProcess(
                os.path.join(work, f"proxy-{name}"),
                store=redis.url,
                secret_file=os.path.join(work, "secret.key"),
                env={"REQUESTS_CA_BUNDLE": pki.ca_cert},
            )
            if not os.path.exists(p.secret_file):  # type: ignore[arg-type]
                from cryptography.fernet import Fernet

                with open(p.secret_file, "wb") as f:  # type: ignore[arg-type]
                    f.write(Fernet.generate_key() + b"\n")
                os.chmod(p.secret_file, 0o600)  # type: ignore[arg-type]
            stack.callback(p.stop)
            p.start(
                "--max-account-connections", cap,
                "--warm-upstream", "0",
                "--oauth2-deadline", str(OAUTH2_DEADLINE),
            )  # fmt: skip
            procs[name] = p
        box = register(procs["on"], provider, dovecot, pki)
        login = Login.password(box.account, box.token)
        ctx: ssl.SSLContext | None = None
        times: dict[str, list[float]] = {"on": [], "off": []}
        for name in procs:  # caches the access token on each
            c, _ = connect_login(procs[name].port, ctx, login)
            c.logout()
        for _ in range(args.runs):
            for name, p in procs.items():
                c, elapsed = connect_login(p.port, ctx, login)
                times[name].append(elapsed)
                c.logout()
        on = statistics.median(times["on"]) * 1e3
        off = statistics.median(times["off"]) * 1e3
        print(f"logins timed: {args.runs} per instance, interleaved; Redis store; no spares")
        print(f"caps on  (cap 1000000): median {on:.2f} ms")
        print(f"caps off (no cap):      median {off:.2f} ms")
        print(f"ratio on/off: {on / off:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
