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

or from the benchmark harness through :func:`run`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
IDLECLIENT = os.path.join(HERE, "idleclient.py")
LIGHTUPSTREAM = os.path.join(HERE, "lightupstream.py")

CLIENT_ID = "app-client"
CLIENT_SECRET = "app-secret"
LIGHT_DOMAIN = "light.example"
OAUTH2_DEADLINE = 10.0

Row = tuple[str, str, str]


def _say(*args: Any) -> None:
    print("[concurrency]", *args, file=sys.stderr, flush=True)


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


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- accounts ------------------------------------------------------------------


def add_accounts(
    proxy: Any,
    provider: Any,
    n: int,
    *,
    port: int,
    ca_file: str,
    domain: str,
    prefix: str,
    parallel: int = 4,
) -> list[tuple[str, str]]:
    """
    ``n`` accounts on ``localhost:port`` (implicit TLS, trusting ``ca_file``), each
    with its own provider grant and one imap-proxy token, through the admin
    command as ``tests.conftest.register`` does; ``parallel`` commands at once.
    """

    def one(i: int) -> tuple[str, str]:
        tag = secrets.token_hex(3)
        account = f"{prefix}{i}-{tag}"
        email = f"{prefix}{i}-{tag}@{domain}"
        refresh_token = "rt-" + secrets.token_urlsafe(24)
        provider.add_grant(refresh_token, email, CLIENT_ID, CLIENT_SECRET, expires_in=7200)
        proxy.cli(
            "accounts",
            "add",
            account,
            "--email",
            email,
            "--imap-host",
            "localhost",
            "--imap-port",
            str(port),
            "--imap-tls",
            "implicit",
            "--imap-ca-file",
            ca_file,
            "--token-url",
            provider.token_url,
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            CLIENT_SECRET,
            "--refresh-token",
            "-",
            input=refresh_token + "\n",
        )
        token = proxy.cli(
            "tokens",
            "issue",
            "--account",
            account,
            "--scope",
            "imap-proxy",
            "--description",
            f"concurrency bench {i}",
        ).stdout.strip()
        return account, token

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, range(n)))


# -- child processes -------------------------------------------------------------


class Children:
    """Every process the benchmark starts, killed (and reaped) on the way out."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, **kw)
        self.procs.append(p)
        return p

    def kill(self, p: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for stream in (p.stdin, p.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        if p in self.procs:
            self.procs.remove(p)

    def close(self) -> None:
        for p in list(self.procs):
            self.kill(p)


class LightUpstream:
    """``bench/lightupstream.py`` in its own process(es) on 127.0.0.1."""

    def __init__(self, pki: Any, children: Children, procs: int = 1):
        self.pki = pki
        self.children = children
        self.procs = procs
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, LIGHTUPSTREAM, "--cert", self.pki.cert, "--key", self.pki.key]
        cmd += ["--procs", str(self.procs), "--user-suffix", "@" + LIGHT_DOMAIN]
        self._proc = self.children.spawn(cmd, stdout=subprocess.PIPE)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().decode()
        if not line.startswith("listening "):
            raise RuntimeError(f"lightupstream did not start: {line!r}")
        self.port = int(line.split()[2])

    def pids(self) -> list[int]:
        """The serving processes (the workers when forked)."""
        assert self._proc is not None
        if self.procs <= 1:
            return [self._proc.pid]
        try:
            with open(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return [self._proc.pid]

    def stop(self) -> None:
        if self._proc is not None:
            self.children.kill(self._proc)
            self._proc = None


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
                    _say(f"  ... {sum(progress.values())} sessions held so far")
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
    _say(f"{label}: warm-up (one login per account: provider tokens, TLS options)")
    warm = churn(
        children,
        port,
        ca,
        accounts_file,
        seconds=120,
        clients=8,
        procs=1,
        max_logins=len(accounts),
    )
    if warm["failed"]:
        raise RuntimeError(f"{label}: warm-up logins failed: {warm['errors']}")
    _say(f"{label}: logins with nothing held ({churn_clients} clients, {churn_seconds}s)")
    res["base_churn"] = churn(
        children,
        port,
        ca,
        accounts_file,
        seconds=churn_seconds,
        clients=churn_clients,
        procs=churn_procs,
    )
    time.sleep(1.0)
    res["rss_before"] = rss_kib(pid)
    res["fds_before"] = fd_count(pid)
    _say(f"{label}: opening {n} IDLE sessions from {hold_procs} client processes")
    holders = Holders(children, port, ca, accounts_file, n, hold_procs, hold_concurrency)
    try:
        res["hold"] = holders.wait_ready(timeout=max(600.0, n / 5))
        _say(f"{label}: held {res['hold']}")
        time.sleep(2.0)
        res["rss_held"] = rss_kib(pid)
        res["fds_held"] = fd_count(pid)
        _say(f"{label}: logins while held ({churn_clients} clients, {churn_seconds}s)")
        spy = _profile(children, pid, churn_seconds, profile, label)
        res["held_churn"] = churn(
            children,
            port,
            ca,
            accounts_file,
            seconds=churn_seconds,
            clients=churn_clients,
            procs=churn_procs,
        )
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
    _say(f"{label}: {json.dumps({k: v for k, v in res.items() if 'churn' not in k})}")
    return res


def _profile(
    children: Children, pid: int, seconds: float, profile: str | None, label: str
) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` of the proxy during the login test, as collapsed stacks."""
    if not profile:
        return None
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        _say("py-spy not found: no profile")
        return None
    os.makedirs(profile, exist_ok=True)
    out = os.path.join(profile, f"proxy-{label}.txt")
    cmd = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "-f", "raw"]
    cmd += ["-o", out, "--nonblocking"]
    _say(f"{label}: profiling the proxy into {out}")
    return children.spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _rows(res: dict[str, Any], what: str) -> list[Row]:
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


def _light_proxy(pki: Any, workdir: str) -> Any:
    from tests.upstream.proxyproc import ProxyProcess

    p = ProxyProcess(os.path.join(workdir, "proxy-light"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert})
    p.start(*proxy_args(pki))
    return p


def proxy_args(pki: Any) -> list[str]:
    """The proxy's options here: an IMAPS port with a listen backlog past Twisted's 50."""
    return [
        "--port",
        f"ssl:0:interface=127.0.0.1:backlog=1024:privateKey={pki.key}:certKey={pki.cert}",
        "--oauth2-deadline",
        str(OAUTH2_DEADLINE),
    ]


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
            _say(f"dovecot: registering {10 if quick else 50} accounts")
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
            rows += _rows(res, "Dovecot")
        if n_light:
            upstream = LightUpstream(pki, children)
            upstream.start()
            lproxy = None
            try:
                lproxy = _light_proxy(pki, workdir)
                count = 20 if quick else 100
                _say(f"light: upstream on port {upstream.port}; registering {count} accounts")
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
                rows += _rows(res, "light upstream")
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
