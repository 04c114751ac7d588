"""
Profile the proxy under one kind of load, with py-spy attached to the real
``twistd imapproxy`` process: where its time goes for short commands, for a
large FETCH, or for logins. Run from the repository root with the test venv
(py-spy from PyPI, ``.venv/bin/pip install py-spy``):

    .venv/bin/python -m bench.profile noop   [--seconds 10] [--out prof.txt]
    .venv/bin/python -m bench.profile fetch  [--size-mb 50]
    .venv/bin/python -m bench.profile login

It prints py-spy's top functions (own and total time) and leaves the raw
samples (``--format raw``, collapsed stacks) in ``--out`` for a flame graph.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

from bench.client import Login, connect_login
from bench.rig import Rig
from tests.imaputil import message


def _load(kind: str, rig: Rig, stop: threading.Event) -> int:
    """Run the load until ``stop``; :return: operations done."""
    assert rig.proxy is not None and rig.proxy.port is not None
    port = rig.targets["imapproxy"].port
    ctx = rig.ctx
    n = 0
    if kind == "login":
        mb = rig.small[0]
        while not stop.is_set():
            c, _ = connect_login(port, ctx, Login.password(mb.account, mb.token))
            c.logout()
            c.close()
            n += 1
        return n
    big = kind == "fetch"
    mb = rig.big if big else rig.small[0]
    assert mb is not None
    c, _ = connect_login(port, ctx, Login.password(mb.account, mb.token))
    try:
        c.command(b"SELECT INBOX")
        while not stop.is_set():
            if big:
                c.command(b"UID FETCH 1 (BODY.PEEK[])", big=True)
            else:
                c.command(b"NOOP")
            n += 1
    finally:
        c.close()
    return n


def _summarize(raw: str, top: int) -> str:
    """Own and total samples per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            k = int(count)
            samples += k
            frames = stack.split(";")
            own[frames[-1]] += k
            for frame in set(frames):
                total[frame] += k
    lines = [f"{samples} samples", "", "own time:"]
    lines += [f"  {100 * k / samples:5.1f}%  {f}" for f, k in own.most_common(top)]
    lines += ["", "total time (with callees):"]
    lines += [f"  {100 * k / samples:5.1f}%  {f}" for f, k in total.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    ap.add_argument("kind", choices=["noop", "fetch", "login"])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size-mb", type=int, default=50)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="profile-raw.txt")
    ap.add_argument("--native", action="store_true", help="sample C frames too")
    ap.add_argument(
        "--clients", type=int, default=1, help="concurrent sessions (several load the proxy's CPU)"
    )
    args = ap.parse_args(argv)
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(pyspy):
        sys.exit("py-spy is missing: .venv/bin/pip install py-spy")
    with contextlib.ExitStack() as stack:
        work = tempfile.mkdtemp(prefix="imapproxy-profile-")
        stack.callback(shutil.rmtree, work, True)
        rig = Rig(work, stack)
        rig.start()
        rig.populate(1, message(args.size_mb * 1_000_000, "big"))
        rig.make_targets(0)
        assert rig.proxy is not None
        # Warm up: the provider token is fetched and cached first.
        c, _ = connect_login(
            rig.targets["imapproxy"].port,
            rig.ctx,
            Login.password(rig.small[0].account, rig.small[0].token),
        )
        c.close()
        stop = threading.Event()
        done: list[int] = []
        workers = [
            threading.Thread(target=lambda: done.append(_load(args.kind, rig, stop)))
            for _ in range(args.clients)
        ]
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        record = subprocess.run(
            [
                pyspy,
                "record",
                "--pid",
                str(rig.proxy.pid()),
                "--duration",
                str(int(args.seconds)),
                "--rate",
                str(args.rate),
                "--format",
                "raw",
                "--output",
                args.out,
                # --native: C frames too (OpenSSL, the kernel's send), at the
                # price of pausing the process for each sample.
                *(["--native"] if args.native else ["--nonblocking"]),
            ],
            capture_output=True,
            text=True,
        )
        stop.set()
        for worker in workers:
            worker.join()
        if record.returncode != 0:
            sys.exit(f"py-spy failed: {record.stderr[-2000:]}")
        print(f"{args.kind}: {sum(done)} operations in {args.seconds:g} s")
        print(_summarize(args.out, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
