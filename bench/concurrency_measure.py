"""
Measuring for :mod:`bench.concurrency`: the proxy's RSS and open fds from
/proc, sessions held in IDLE by ``bench/idleclient.py`` hold clients, the
logins per second of its churn clients (with nothing held, and while the
sessions are held), and the table rows made of one measurement.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys
import time
from typing import Any

from bench.concurrency_setup import Children, say

HERE = os.path.dirname(os.path.abspath(__file__))
IDLECLIENT = os.path.join(HERE, "idleclient.py")

Row = tuple[str, str, str]


# -- readings from /proc ---------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def rss_kib(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return 0


# -- clients ---------------------------------------------------------------------


def _client_cmd(mode: str, port: int, ca: str, accounts_file: str, **opts: Any) -> list[str]:
    cmd = [sys.executable, IDLECLIENT, mode, "--port", str(port), "--ca", ca]
    cmd += ["--accounts", accounts_file]
    for k, v in opts.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    return cmd


def churn(
    children: Children,
    port: int,
    ca: str,
    accounts_file: str,
    *,
    seconds: float,
    clients: int,
    procs: int,
    max_logins: int = 0,
) -> dict[str, Any]:
    """``clients`` concurrent connect+TLS+LOGIN+LOGOUT loops over ``procs`` processes."""
    per = max(1, clients // procs)
    started = []
    for i in range(procs):
        opts: dict[str, Any] = {"seconds": seconds, "concurrency": per, "offset": i * 7}
        if max_logins:
            opts["max_logins"] = max(1, max_logins // procs)
        cmd = _client_cmd("churn", port, ca, accounts_file, **opts)
        started.append(children.spawn(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL))
    total: dict[str, Any] = {"logins": 0, "failed": 0, "errors": {}, "p50_ms": [], "p95_ms": []}
    elapsed = 0.0
    for p in started:
        try:
            out, _ = p.communicate(timeout=seconds + 120)
        except subprocess.TimeoutExpired:
            children.kill(p)
            raise RuntimeError("a churn client did not finish") from None
        children.procs.remove(p)
        r = json.loads(out.decode().strip().splitlines()[-1])
        total["logins"] += r["logins"]
        total["failed"] += r["failed"]
        for k, v in r["errors"].items():
            total["errors"][k] = total["errors"].get(k, 0) + v
        elapsed = max(elapsed, r["seconds"])
        for key in ("p50_ms", "p95_ms"):
            if r[key] is not None:
                total[key].append(r[key])
    total["seconds"] = elapsed
    total["rate"] = total["logins"] / elapsed if elapsed else 0.0
    # Per-process percentiles, the worst of them: close enough for a table.
    for key in ("p50_ms", "p95_ms"):
        total[key] = max(total[key]) if total[key] else None
    return total


class Holders:
    """``procs`` hold clients, each opening and keeping its share of ``n`` IDLE sessions."""

    def __init__(
        self,
        children: Children,
        port: int,
        ca: str,
        accounts_file: str,
        n: int,
        procs: int,
        concurrency: int,
    ):
        self.children = children
        self.procs: list[subprocess.Popen[bytes]] = []
        share, extra = divmod(n, procs)
        for i in range(procs):
            count = share + (1 if i < extra else 0)
            if count == 0:
                continue
            cmd = _client_cmd(
                "hold",
                port,
                ca,
                accounts_file,
                n=count,
                concurrency=concurrency,
                offset=i * 13,
            )
            self.procs.append(
                children.spawn(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE, bufsize=0)
            )
        self._buf: dict[int, bytes] = {p.pid: b"" for p in self.procs}

    def _events(self, want: str, timeout: float) -> list[dict[str, Any]]:
        """The first ``want`` event of every client (progress lines are logged)."""
        got: dict[int, dict[str, Any]] = {}
        sel = selectors.DefaultSelector()
        for p in self.procs:
            assert p.stdout is not None
            sel.register(p.stdout, selectors.EVENT_READ, p)
        deadline = time.monotonic() + timeout
        last = 0.0
        progress: dict[int, int] = {}
        try:
            while len(got) < len(self.procs):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"hold clients: no {want!r} after {timeout:.0f}s")
                for key, _ in sel.select(1.0):
                    p = key.data
                    data = os.read(p.stdout.fileno(), 65536)
                    if not data:
                        sel.unregister(p.stdout)
                        if p.pid not in got:
                            raise RuntimeError(f"a hold client exited ({p.poll()})")
                        continue
                    self._buf[p.pid] += data
                    while b"\n" in self._buf[p.pid]:
                        line, self._buf[p.pid] = self._buf[p.pid].split(b"\n", 1)
                        ev = json.loads(line)
                        if ev["event"] == want:
                            got[p.pid] = ev
                        elif ev["event"] == "progress":
                            progress[p.pid] = ev["held"]
                if progress and time.monotonic() - last > 10:
                    last = time.monotonic()
                    say(f"  ... {sum(progress.values())} sessions held so far")
        finally:
            sel.close()
        return list(got.values())

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        evs = self._events("ready", timeout)
        errors: dict[str, int] = {}
        for e in evs:
            for k, v in e["errors"].items():
                errors[k] = errors.get(k, 0) + v
        return {
            "held": sum(e["held"] for e in evs),
            "failed": sum(e["failed"] for e in evs),
            "errors": errors,
            "seconds": max(e["seconds"] for e in evs),
        }

    def release(self, timeout: float = 120.0) -> dict[str, Any]:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(b"release\n")
        evs = self._events("released", timeout)
        return {
            "held_at_release": sum(e["held_at_release"] for e in evs),
            "released_ok": sum(e["released_ok"] for e in evs),
            "dropped": sum(e["dropped"] for e in evs),
        }

    def close(self) -> None:
        for p in self.procs:
            self.children.kill(p)


# -- one measurement -------------------------------------------------------------


def measure(
    children: Children,
    *,
    pid: int,
    port: int,
    ca: str,
    accounts: list[tuple[str, str]],
    workdir: str,
    n: int,
    hold_procs: int,
    hold_concurrency: int,
    churn_seconds: float,
    churn_clients: int,
    churn_procs: int,
    label: str,
    profile: str | None = None,
) -> dict[str, Any]:
    accounts_file = os.path.join(workdir, f"accounts-{label}.json")
    fd = os.open(accounts_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(accounts, f)
    res: dict[str, Any] = {"n": n, "fd_limit": fd_limit(pid)}
    # Two logins per account: the second makes the account's spare upstream
    # connection, which the held sessions' memory must not include.
    say(f"{label}: warm-up (two logins per account: provider tokens, TLS options, spares)")
    warm = churn(
        children,
        port,
        ca,
        accounts_file,
        seconds=120,
        clients=8,
        procs=1,
        max_logins=2 * len(accounts),
    )
    if warm["failed"]:
        raise RuntimeError(f"{label}: warm-up logins failed: {warm['errors']}")

    def logins() -> dict[str, Any]:
        return churn(
            children,
            port,
            ca,
            accounts_file,
            seconds=churn_seconds,
            clients=churn_clients,
            procs=churn_procs,
        )

    # Memory first, on a proxy that has done only the warm-up: a burst of
    # logins before would leave memory the held sessions then reuse.
    time.sleep(1.0)
    res["rss_before"] = rss_kib(pid)
    res["fds_before"] = fd_count(pid)
    say(f"{label}: opening {n} IDLE sessions from {hold_procs} client processes")
    holders = Holders(children, port, ca, accounts_file, n, hold_procs, hold_concurrency)
    try:
        res["hold"] = holders.wait_ready(timeout=max(600.0, n / 5))
        say(f"{label}: held {res['hold']}")
        time.sleep(2.0)
        res["rss_held"] = rss_kib(pid)
        res["fds_held"] = fd_count(pid)
        say(f"{label}: logins while held ({churn_clients} clients, {churn_seconds}s)")
        spy = _profile(children, pid, churn_seconds, profile, label)
        res["held_churn"] = logins()
        if spy is not None:
            spy.wait(60)
            children.procs.remove(spy)
        res["rss_after_churn"] = rss_kib(pid)
        res["hwm"] = int(proc_status(pid)["VmHWM"].split()[0])
        res["release"] = holders.release()
    finally:
        holders.close()
    time.sleep(2.0)
    res["rss_released"] = rss_kib(pid)
    res["fds_released"] = fd_count(pid)
    say(f"{label}: logins with nothing held ({churn_clients} clients, {churn_seconds}s)")
    res["base_churn"] = logins()
    say(f"{label}: {json.dumps({k: v for k, v in res.items() if 'churn' not in k})}")
    return res


def _profile(
    children: Children, pid: int, seconds: float, profile: str | None, label: str
) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` of the proxy during the login test, as collapsed stacks."""
    if not profile:
        return None
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        say("py-spy not found: no profile")
        return None
    os.makedirs(profile, exist_ok=True)
    out = os.path.join(profile, f"proxy-{label}.txt")
    cmd = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "-f", "raw"]
    cmd += ["-o", out, "--nonblocking"]
    say(f"{label}: profiling the proxy into {out}")
    return children.spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rows_for(res: dict[str, Any], what: str) -> list[Row]:
    n = res["n"]
    hold = res["hold"]
    held = hold["held"]
    rel = res["release"]
    per = (res["rss_held"] - res["rss_before"]) / held if held else 0.0
    fds = (res["fds_held"] - res["fds_before"]) / held if held else 0.0
    base = res["base_churn"]
    hc = res["held_churn"]
    errors = f"; errors {hold['errors']}" if hold["errors"] else ""
    rows = [
        (
            f"idle sessions held ({what})",
            f"{held}",
            f"of {n} opened (connect, TLS, LOGIN, IDLE) in {hold['seconds']:.0f}s "
            f"({held / hold['seconds']:.0f}/s); {hold['failed']} failed{errors}; "
            f"{rel['held_at_release']} still in IDLE after the login test, "
            f"{rel['released_ok']} ended with DONE+LOGOUT",
        ),
        (
            f"proxy RSS per idle session ({what})",
            f"{per:.0f} KiB",
            f"VmRSS {res['rss_before'] / 1024:.0f} -> {res['rss_held'] / 1024:.0f} MiB with "
            f"{held} held ({fds:.2f} fds/session, {res['fds_held']} of "
            f"{res['fd_limit']} fds); {res['rss_released'] / 1024:.0f} MiB after release",
        ),
        (
            f"logins/s while {held} held ({what})",
            f"{hc['rate']:.0f}",
            f"{hc['logins']} LOGINs in {hc['seconds']:.1f}s by "
            f"{res['churn_clients']} concurrent clients (connect+TLS+LOGIN+LOGOUT), "
            f"latency p50 {hc['p50_ms']} ms p95 {hc['p95_ms']} ms, {hc['failed']} failed; "
            f"with none held: {base['rate']:.0f}/s",
        ),
    ]
    return rows
