"""
What a restricted token costs: the same sessions as the unrestricted
imapproxy rows, logged in with a token that is read-only and restricted to
INBOX (both filters of the policy relay at work), so that every command is
parsed and every response framed. FETCH throughput of the large message
and the NOOP round trip, interleaved run by run with the direct and the
unrestricted sessions; the rows compare with direct like every other row,
and a note gives restricted ÷ unrestricted (the target: FETCH ≥ 0.8×).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bench.client import Client, Login, connect_login
from bench.rig import Rig, Target
from bench.stats import Sample, Table, cpu_seconds

RESTRICTIONS = ("--read-only", "--mailbox", "INBOX")


def restricted_token(rig: Rig, account: str) -> str:
    """A read-only, INBOX-only imap-proxy token for ``account``, from the admin command."""
    assert rig.proxy is not None
    return rig.proxy.cli(
        "tokens", "issue", "--account", account, "--scope", "imap-proxy",
        "--description", "bench: restricted", *RESTRICTIONS,
    ).stdout.strip()  # fmt: skip


def target(rig: Rig) -> Target:
    """The imapproxy target again, its logins with restricted tokens."""
    assert rig.big is not None and rig.small
    proxy = rig.targets["imapproxy"]
    small = rig.small[0]
    return Target(
        "restricted",
        proxy.port,
        proxy.ctx,
        [Login.password(small.account, restricted_token(rig, small.account))],
        Login.password(rig.big.account, restricted_token(rig, rig.big.account)),
        pid=proxy.pid,
    )


def noop_round_trips(targets: list[Target], iterations: int) -> dict[str, Sample]:
    """NOOP after EXAMINE INBOX, in blocks interleaved across the targets."""
    sessions: dict[str, Client] = {}
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    try:
        for t in targets:
            c, _ = connect_login(t.port, t.ctx, t.logins[0])
            sessions[t.name] = c
            c.command(b"EXAMINE INBOX")
            c.command(b"NOOP")  # warm-up
        block = max(1, iterations // 10)
        done = 0
        while done < iterations:
            n = min(block, iterations - done)
            for name, c in sessions.items():
                record = times[name].append
                for _ in range(n):
                    started = time.perf_counter()
                    c.command(b"NOOP")
                    record(time.perf_counter() - started)
            done += n
    finally:
        for c in sessions.values():
            c.logout()
    return {n: Sample(tuple(v), "ms", scale=1e3, digits=3) for n, v in times.items()}


def fetch_throughput(
    targets: list[Target], runs: int, big_uid: int, size: int
) -> tuple[dict[str, Sample], dict[str, Sample]]:
    """MB/s of ``UID FETCH … BODY.PEEK[]`` of the large message, and CPU s/GB relayed."""
    buffer = bytearray(size + 65536)
    rates: dict[str, list[float]] = {t.name: [] for t in targets}
    cpu: dict[str, list[float]] = {t.name: [0.0, 0.0] for t in targets if t.pid}
    sessions: dict[str, Client] = {}
    command = b"UID FETCH %d BODY.PEEK[]" % big_uid
    try:
        for t in targets:
            c, _ = connect_login(t.port, t.ctx, t.big_login, buffer=buffer)
            sessions[t.name] = c
            c.command(b"EXAMINE INBOX")
            c.command(command, big=True)  # warm-up
        for _ in range(runs):
            for t in targets:
                c = sessions[t.name]
                before = cpu_seconds(t.pid) if t.pid else 0.0
                started = time.perf_counter()
                c.command(command, big=True)
                fetched = c.last_literal
                rates[t.name].append(fetched / (time.perf_counter() - started) / 1e6)
                if t.pid:
                    cpu[t.name][0] += cpu_seconds(t.pid) - before
                    cpu[t.name][1] += fetched / 1e9
    finally:
        for c in sessions.values():
            c.logout()
    return (
        {n: Sample(tuple(v), "MB/s", higher_better=True, digits=0) for n, v in rates.items()},
        {n: Sample((v[0] / v[1],), "CPU s/GB", digits=2) for n, v in cpu.items()},
    )


def measure(
    rig: Rig, runs: int, iterations: int, table: Table, step: Callable[[str], None]
) -> None:
    """The restricted rows and the restricted ÷ unrestricted note."""
    step("restricted token (read-only, INBOX only): NOOP and FETCH")
    restricted = target(rig)
    targets = [rig.targets["direct"], rig.targets["imapproxy"], restricted]
    noop = noop_round_trips(targets, iterations)
    table.add("round trip: NOOP, restricted token", noop["direct"], noop["restricted"])
    size = len(rig.big_message)
    fetch, cpu = fetch_throughput(targets, runs, rig.big_uid, size)
    label = f"FETCH {size / 1e6:.0f} MB, restricted token (TLS both legs)"
    table.add(label, fetch["direct"], fetch["restricted"])
    table.add("relay CPU per GB fetched, restricted token", None, cpu["restricted"])
    fetchRatio = fetch["restricted"].median / fetch["imapproxy"].median
    noopRatio = noop["restricted"].median / noop["imapproxy"].median
    table.notes.append(
        "restricted token (read-only, INBOX only; same run, same sessions otherwise): "
        f"FETCH {fetch['restricted'].median:.0f} vs {fetch['imapproxy'].median:.0f} MB/s "
        f"unrestricted = {fetchRatio:.2f}× (target ≥ 0.8×); NOOP "
        f"{noop['restricted'].median * 1e3:.3f} vs {noop['imapproxy'].median * 1e3:.3f} ms "
        f"= {noopRatio:.2f}×; CPU {cpu['restricted'].median:.2f} vs "
        f"{cpu['imapproxy'].median:.2f} s/GB"
    )
