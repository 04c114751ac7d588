"""
The measurements, each run against every target in turn (interleaved run by
run, so that noise from the rest of the machine spreads evenly): login
latency, round trips in a logged-in session, large FETCH/APPEND throughput
with the relay's CPU time, and logins per second from concurrent clients.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import attrs

from bench.client import Client, IMAPError, connect_login
from bench.rig import SINK, Target
from bench.stats import Sample, cpu_seconds


def login_latency(targets: Sequence[Target], runs: int) -> dict[str, Sample]:
    """
    Connect + TLS + greeting + login + tagged OK, again and again for one
    account (its token cached). Through imapproxy each login takes the spare
    upstream connection made after the one before, as a login that comes
    again within minutes does: it waits until the proxy has logged that the
    spare is ready. Without that wait the next login came while the spare
    was still being made, and was timed against the proxy's work on it, or
    made an upstream connection of its own.
    """
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    made: dict[str, int] = {}
    for t in targets:  # warm-up: caches, the proxy's access token, code paths
        for _ in range(2):  # an account gets a spare from its second login on
            if t.spares_made is not None:
                made[t.name] = t.spares_made()
            c, _ = connect_login(t.port, t.ctx, t.logins[0])
            c.logout()
    waiting = {t.name for t in targets if t.spares_made is not None}
    for _ in range(runs):
        for t in targets:
            if t.name in waiting and t.spares_made is not None:
                try:
                    await_spare(t, made[t.name])
                except TimeoutError as e:
                    # A version without spare connections: time it as it is.
                    print(f"{e}; its logins are timed without waiting", file=sys.stderr)
                    waiting.discard(t.name)
                made[t.name] = t.spares_made()
            c, elapsed = connect_login(t.port, t.ctx, t.logins[0])
            times[t.name].append(elapsed)
            c.logout()
    return {n: Sample(tuple(v), "ms", scale=1e3) for n, v in times.items()}


def await_spare(t: Target, before: int, timeout: float = 30.0) -> None:
    """Until ``t`` has made a spare connection since it had made ``before``."""
    assert t.spares_made is not None
    deadline = time.monotonic() + timeout
    while t.spares_made() <= before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{t.name} made no spare connection within {timeout:.0f} s")
        time.sleep(0.005)


def new_upstream_login_latency(targets: Sequence[Target], runs: int) -> dict[str, Sample]:
    """
    A login that makes its upstream connection (the provider token cached):
    through imapproxy, an account's second login, before it has a spare
    connection (those are made for accounts that log in often); direct and
    through the peer, every login is like that.
    """
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    for t in targets:
        for login in t.second[:runs]:  # the first login: caches the token
            c, _ = connect_login(t.port, t.ctx, login)
            c.logout()
    for i in range(runs):
        for t in targets:
            login = t.second[i] if i < len(t.second) else t.logins[0]
            c, elapsed = connect_login(t.port, t.ctx, login)
            times[t.name].append(elapsed)
            c.logout()
    return {n: Sample(tuple(v), "ms", scale=1e3) for n, v in times.items()}


def cold_login_latency(targets: Sequence[Target], runs: int) -> dict[str, Sample]:
    """A first login for an account: the provider token has to be fetched."""
    times: dict[str, list[float]] = {t.name: [] for t in targets if t.cold}
    for i in range(runs):
        for t in targets:
            if i >= len(t.cold):
                continue
            started = time.perf_counter()
            c, _ = connect_login(t.port, t.ctx, t.cold[i]())
            times[t.name].append(time.perf_counter() - started)
            c.logout()
    return {n: Sample(tuple(v), "ms", scale=1e3) for n, v in times.items()}


def round_trips(targets: Sequence[Target], iterations: int) -> dict[str, dict[str, Sample]]:
    """NOOP and ``UID FETCH 1:* (FLAGS)`` on a few messages, one session each."""
    sessions = {}
    try:
        for t in targets:
            c, _ = connect_login(t.port, t.ctx, t.logins[0])
            sessions[t.name] = c
            c.command(b"SELECT INBOX")
        commands = {"NOOP": b"NOOP", "UID FETCH 1:* (FLAGS)": b"UID FETCH 1:* (FLAGS)"}
        out: dict[str, dict[str, Sample]] = {}
        for label, cmd in commands.items():
            times: dict[str, list[float]] = {t.name: [] for t in targets}
            for c in sessions.values():  # warm-up
                c.command(cmd)
            # Blocks of iterations, target after target, to interleave noise.
            block = max(1, iterations // 10)
            done = 0
            while done < iterations:
                n = min(block, iterations - done)
                for name, c in sessions.items():
                    record = times[name].append
                    for _ in range(n):
                        started = time.perf_counter()
                        c.command(cmd)
                        record(time.perf_counter() - started)
                done += n
            out[label] = {n: Sample(tuple(v), "ms", scale=1e3, digits=3) for n, v in times.items()}
        return out
    finally:
        for c in sessions.values():
            c.logout()


@attrs.define
class Throughput:
    fetch: dict[str, Sample]
    append: dict[str, Sample]
    cpu_per_gb: dict[str, Sample]
    append_mode: dict[str, str]


def throughput(targets: Sequence[Target], runs: int, big_uid: int, payload: bytes) -> Throughput:
    """MB/s (10^6 bytes) of a FETCH of the large message and an APPEND of
    *payload*, TLS on both legs; and the relay's CPU seconds per GB (10^9
    bytes) relayed."""
    size = len(payload)
    buffer = bytearray(size + 65536)
    fetch: dict[str, list[float]] = {t.name: [] for t in targets}
    append: dict[str, list[float]] = {t.name: [] for t in targets}
    cpu: dict[str, list[float]] = {t.name: [0.0, 0.0] for t in targets if t.pid}
    modes: dict[str, str] = {}
    sessions: dict[str, Client] = {}
    fetch_cmd = b"UID FETCH %d BODY.PEEK[]" % big_uid
    try:
        for t in targets:
            c, _ = connect_login(t.port, t.ctx, t.big_login, buffer=buffer)
            sessions[t.name] = c
            c.command(b"SELECT INBOX")
            c.command(fetch_cmd, big=True)  # warm-up: page cache, code paths
        for _ in range(runs):
            for t in targets:
                c = sessions[t.name]
                before = cpu_seconds(t.pid) if t.pid else 0.0
                started = time.perf_counter()
                c.command(fetch_cmd, big=True)
                fetched = c.last_literal
                fetch[t.name].append(fetched / (time.perf_counter() - started) / 1e6)
                started = time.perf_counter()
                modes[t.name] = c.append(SINK, payload)
                append[t.name].append(size / (time.perf_counter() - started) / 1e6)
                if t.pid:  # summed: /proc counts CPU time in 10 ms ticks
                    cpu[t.name][0] += cpu_seconds(t.pid) - before
                    cpu[t.name][1] += (fetched + size) / 1e9
        for c in list(sessions.values())[:1]:  # untimed: empty the shared sink
            c.command(b"SELECT " + SINK.encode())
            c.command(b"STORE 1:* +FLAGS.SILENT (\\Deleted)")
            c.command(b"EXPUNGE")
    finally:
        for c in sessions.values():
            c.logout()

    def rate(v: list[float]) -> Sample:
        return Sample(tuple(v), "MB/s", higher_better=True, digits=0)

    return Throughput(
        {n: rate(v) for n, v in fetch.items()},
        {n: rate(v) for n, v in append.items()},
        {n: Sample((v[0] / v[1],), "CPU s/GB", digits=2) for n, v in cpu.items()},
        modes,
    )


def _login_loop(t: Target, index: int, go: Any, deadline_box: Any, results: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    login = t.logins[index % len(t.logins)]
    ok = errors = 0
    go.wait(30)
    deadline = deadline_box.value
    while time.monotonic() < deadline:
        try:
            c, _ = connect_login(t.port, t.ctx, login)
            c.command(b"LOGOUT")
            c.close()
            ok += 1
        except (IMAPError, OSError):
            errors += 1
    results.put((ok, errors))


def logins_per_second(t: Target, clients: int, seconds: float) -> tuple[float, int]:
    """*clients* processes looping connect + login + LOGOUT for *seconds*;
    returns (logins/s, failed attempts)."""
    mp = multiprocessing.get_context("fork")
    go = mp.Event()
    deadline = mp.Value("d", 0.0)
    results = mp.Queue()
    procs = [
        mp.Process(target=_login_loop, args=(t, i, go, deadline, results), daemon=True)
        for i in range(clients)
    ]
    try:
        for p in procs:
            p.start()
        deadline.value = time.monotonic() + seconds
        go.set()
        got = [results.get(timeout=seconds + 90) for _ in procs]
        for p in procs:
            p.join(10)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        results.close()
    ok = sum(g[0] for g in got)
    return ok / seconds, sum(g[1] for g in got)


def logins_per_second_runs(
    targets: Sequence[Target], runs: int, clients: int, seconds: float
) -> tuple[dict[str, Sample], dict[str, int]]:
    rates: dict[str, list[float]] = {t.name: [] for t in targets}
    errors: dict[str, int] = {t.name: 0 for t in targets}
    for _ in range(runs):
        for t in targets:
            rate, failed = logins_per_second(t, clients, seconds)
            rates[t.name].append(rate)
            errors[t.name] += failed
    samples = {
        n: Sample(tuple(v), "logins/s", higher_better=True, digits=0) for n, v in rates.items()
    }
    return samples, errors
