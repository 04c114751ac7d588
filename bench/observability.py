"""
``python -m bench --observability``: what metrics and the JSON log cost.

Two imapproxy processes on the same store, in front of the same Dovecot:
*observed* runs with ``--log-format json`` and ``--metrics-per-account``
and has its ``/metrics`` scraped every second for the whole run (as a
Prometheus with a 1 s interval would, fifteen times the usual rate);
*plain* runs with the text log and is never scraped. Each round measures a
block of logins (an account that logs in again: the spare upstream
connection path, the shortest, where a fixed cost shows most) and one large
FETCH and APPEND on each, the order alternating (observed first, then plain
first), so that what the rest of the machine does hits both alike. Each
round gives a ratio observed / plain per figure; the report is their median
and spread (lowest, highest).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import attrs

from bench.client import connect_login
from bench.rig import SINK, Rig, Target
from bench.stats import cpu_seconds, machine, machine_markdown
from tests.imaputil import message
from tests.upstream.proxyproc import ProxyProcess

OBSERVED = ("--log-format", "json", "--metrics-per-account", "yes")
SCRAPE_INTERVAL = 1.0


@attrs.frozen
class Plan:
    rounds: int = 20
    logins: int = 30  # per target and round
    size: int = 50_000_000


QUICK = Plan(rounds=3, logins=8, size=10_000_000)


class Scraper:
    """Scrapes ``url`` every ``interval`` seconds in a thread, until stopped."""

    def __init__(self, url: str, interval: float = SCRAPE_INTERVAL):
        self.url = url
        self.interval = interval
        self.scrapes = 0
        self.failures = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with urllib.request.urlopen(self.url, timeout=10) as answer:
                    self.bytes += len(answer.read())
                self.scrapes += 1
            except OSError:
                self.failures += 1


def login_block(t: Target, n: int) -> float:
    """The median of ``n`` logins (connect, TLS, LOGIN, tagged OK), seconds."""
    times = []
    for _ in range(n):
        c, elapsed = connect_login(t.port, t.ctx, t.logins[0])
        times.append(elapsed)
        c.logout()
    return statistics.median(times)


@attrs.define
class Figures:
    """Per target, one value a round."""

    login: dict[str, list[float]] = attrs.field(factory=dict)
    logincpu: dict[str, list[float]] = attrs.field(factory=dict)
    fetch: dict[str, list[float]] = attrs.field(factory=dict)
    append: dict[str, list[float]] = attrs.field(factory=dict)
    cpu: dict[str, list[float]] = attrs.field(factory=dict)

    def add(self, kind: str, name: str, value: float) -> None:
        getattr(self, kind).setdefault(name, []).append(value)


def measure(targets: Sequence[Target], plan: Plan, rig: Rig, say: Any) -> Figures:
    figures = Figures()
    buffer = bytearray(len(rig.big_message) + 65536)
    fetch_cmd = b"UID FETCH %d BODY.PEEK[]" % rig.big_uid
    sessions = {}
    try:
        for t in targets:  # warm-up: access tokens, spares, page cache, code paths
            login_block(t, 3)
            c, _ = connect_login(t.port, t.ctx, t.big_login, buffer=buffer)
            sessions[t.name] = c
            c.command(b"SELECT INBOX")
            c.command(fetch_cmd, big=True)
        for r in range(rounds := plan.rounds):
            say(f"round {r + 1} of {rounds}")
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for t in order:
                before = cpu_seconds(t.pid) if t.pid else 0.0
                figures.add("login", t.name, login_block(t, plan.logins))
                if t.pid:
                    figures.add("logincpu", t.name, (cpu_seconds(t.pid) - before) / plan.logins)
            for t in order:
                c = sessions[t.name]
                before = cpu_seconds(t.pid) if t.pid else 0.0
                started = time.perf_counter()
                c.command(fetch_cmd, big=True)
                fetched = c.last_literal
                figures.add("fetch", t.name, fetched / (time.perf_counter() - started) / 1e6)
                started = time.perf_counter()
                c.append(SINK, rig.big_message)
                size = len(rig.big_message)
                figures.add("append", t.name, size / (time.perf_counter() - started) / 1e6)
                if t.pid:
                    spent = cpu_seconds(t.pid) - before
                    figures.add("cpu", t.name, spent / ((fetched + size) / 1e9))
            c = sessions[order[0].name]  # untimed: empty the shared sink
            c.command(b"SELECT " + SINK.encode())
            c.command(b"STORE 1:* +FLAGS.SILENT (\\Deleted)")
            c.command(b"EXPUNGE")
            c.command(b"SELECT INBOX")
    finally:
        for c in sessions.values():
            c.logout()
    return figures


def _spread(ratios: list[float]) -> str:
    return (
        f"{statistics.median(ratios):.3f} ({min(ratios):.3f} – {max(ratios):.3f})"
        if ratios
        else "—"
    )


def report(figures: Figures, scraper: Scraper, plan: Plan) -> str:
    """The markdown table: per figure, medians and the observed / plain ratios."""
    rows = [
        ("login again (spare upstream), median of a block", "login", "ms", 1e3, False),
        ("proxy CPU per login", "logincpu", "ms", 1e3, False),
        (f"FETCH {plan.size / 1e6:g} MB", "fetch", "MB/s", 1.0, True),
        (f"APPEND {plan.size / 1e6:g} MB", "append", "MB/s", 1.0, True),
        ("relay CPU per GB relayed", "cpu", "CPU s/GB", 1.0, False),
    ]
    out = [
        "| figure | plain | observed | observed ÷ plain, median (lowest – highest) | cost |",
        "|---|---|---|---|---|",
    ]
    for label, kind, unit, scale, higher in rows:
        values = getattr(figures, kind)
        obs, plain = values.get("observed", []), values.get("plain", [])
        if not obs or not plain:
            continue
        ratios = [o / p for o, p in zip(obs, plain, strict=False) if p]
        middle = statistics.median(ratios)
        cost = (1 - middle) if higher else (middle - 1)
        out.append(
            f"| {label} | {statistics.median(plain) * scale:.2f} {unit} "
            f"| {statistics.median(obs) * scale:.2f} {unit} | {_spread(ratios)} "
            f"| {cost * 100:+.1f}% |"
        )
    out.append("")
    for label, kind in (("per login", "logincpu"), ("per GB relayed", "cpu")):
        values = getattr(figures, kind)
        obs, plain = sum(values.get("observed", [])), sum(values.get("plain", []))
        if plain:
            out.append(
                f"- proxy CPU {label}, all rounds together (/proc counts 10 ms ticks): "
                f"observed ÷ plain {obs / plain:.3f}"
            )
    out.append(
        f"- {plan.rounds} rounds, {plan.logins} logins a target and round, "
        f"order alternating; cost: the median ratio as a slowdown (positive: observed is slower)"
    )
    out.append(
        f"- observed: {' '.join(OBSERVED)}, /metrics scraped every {SCRAPE_INTERVAL:g} s: "
        f"{scraper.scrapes} scrapes ({scraper.failures} failed), "
        f"{scraper.bytes // max(scraper.scrapes, 1)} bytes each"
    )
    return "\n".join(out)


def main(quick: bool, rounds: int | None, size: int | None, say: Any) -> int:
    plan = QUICK if quick else Plan()
    if rounds:
        plan = attrs.evolve(plan, rounds=rounds)
    if size:
        plan = attrs.evolve(plan, size=size)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = tempfile.mkdtemp(prefix="imapproxy-bench-obs-")
        stack.callback(shutil.rmtree, work, True)
        rig = Rig(work, stack)
        say("starting PKI, provider, Dovecot and the plain imapproxy")
        rig.start()
        assert rig.proxy is not None and rig.pki is not None
        say(f"registering accounts, seeding a {plan.size / 1e6:g} MB message")
        rig.populate(1, message(plan.size, "large"))
        rig.make_targets(1)
        say("starting the observed imapproxy (same store)")
        observed = ProxyProcess(
            os.path.join(work, "observed"),
            env={"REQUESTS_CA_BUNDLE": rig.pki.ca_cert},
            store=rig.proxy.store,
            secret_file=rig.proxy.secret_file,
        )
        stack.callback(observed.stop)
        observed.start(*rig.proxy_args(), *OBSERVED)
        plain = attrs.evolve(rig.targets["imapproxy"], name="plain")
        watched = attrs.evolve(
            plain, name="observed", port=observed.ports["ssl"], pid=observed.pid()
        )
        scraper = Scraper(f"http://127.0.0.1:{observed.api_port}/metrics")
        scraper.start()
        stack.callback(scraper.stop)
        figures = measure([watched, plain], plan, rig, say)
        scraper.stop()
        say("stopping")
    text = report(figures, scraper, plan)
    print(text)
    print(f"- took {time.monotonic() - started:.0f} s" + (" (--quick)" if quick else ""))
    print()
    print("Machine:")
    print(machine_markdown(machine()))
    return 0
