"""
``python -m bench``: start the tests' upstream (PKI, fake provider, Dovecot),
``twistd imapproxy`` and the peer, measure direct / imapproxy / peer side by
side and print one markdown table with the machine it ran on.
``--write-docs`` puts both in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import inspect
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import attrs

from bench import measure, restricted
from bench.report import write_docs
from bench.rig import Rig
from bench.stats import Cell, Table, machine, machine_markdown
from bench.tree import ProxyProcess, hasSMTP
from tests.imaputil import message

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


@attrs.frozen
class Settings:
    runs: int = 10
    iterations: int = 2000
    size: int = 50_000_000
    clients: int = 8
    seconds: float = 10.0
    lps_runs: int = 3
    cold_runs: int = 10
    smtp_logins: int = 20
    smtp_messages: int = 100
    smtp_size: int = 30_000_000


QUICK = Settings(
    runs=3,
    iterations=200,
    size=10_000_000,
    clients=4,
    seconds=3.0,
    lps_runs=1,
    cold_runs=3,
    smtp_logins=6,
    smtp_messages=30,
    smtp_size=10_000_000,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a fast smoke run (small, few runs)")
    ap.add_argument("--runs", type=int, help="repetitions of each login/throughput figure")
    ap.add_argument("--iterations", type=int, help="round trips per command")
    ap.add_argument("--size-mb", type=float, help="FETCH/APPEND message size, MB (10^6)")
    ap.add_argument("--clients", type=int, help="concurrent clients for logins/s")
    ap.add_argument("--seconds", type=float, help="duration of one logins/s run")
    ap.add_argument("--no-peer", action="store_true", help="leave out the peer (emailproxy)")
    ap.add_argument("--no-smtp", action="store_true", help="leave out SMTP submission")
    ap.add_argument(
        "--smtp-only",
        action="store_true",
        help="SMTP submission only (no IMAP or concurrency rows)",
    )
    ap.add_argument("--smtp-logins", type=int, help="SMTP logins timed per target")
    ap.add_argument("--smtp-messages", type=int, help="10 KB SMTP messages per session run")
    ap.add_argument("--smtp-size-mb", type=float, help="large SMTP message size, MB (10^6)")
    ap.add_argument(
        "--no-concurrency", action="store_true", help="leave out bench.concurrency (idle sessions)"
    )
    ap.add_argument(
        "--no-haproxy",
        action="store_true",
        help="leave out the reference relay (HAProxy terminating TLS on both legs)",
    )
    ap.add_argument("--write-docs", action="store_true", help="write docs/benchmarks.md")
    ap.add_argument(
        "--observability",
        action="store_true",
        help="only the cost of metrics and the JSON log: an observed and a plain imapproxy "
        "side by side (bench.observability; --quick, --runs and --size-mb apply)",
    )
    ap.add_argument(
        "--caps",
        action="store_true",
        help="only what per-account connection caps cost a login: two instances on one "
        "Redis, caps on and off, interleaved (bench.caps; --runs applies)",
    )
    ap.add_argument("--peer-venv", default=".bench-peer-venv", help="venv the peer is installed in")
    ap.add_argument(
        "--tree",
        metavar="DIR",
        help="run the measured imapproxy from DIR's proxy/ (another version, bench.tree)",
    )
    args = ap.parse_args(argv)
    if args.tree and args.write_docs:
        ap.error("--tree measures another version: its table does not go in docs/benchmarks.md")
    return args


def settings(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else Settings()
    changes: dict[str, Any] = {}
    if args.runs:
        changes.update(runs=args.runs, cold_runs=args.runs)
    if args.iterations:
        changes["iterations"] = args.iterations
    if args.size_mb:
        changes["size"] = int(args.size_mb * 1e6)
    if args.clients:
        changes["clients"] = args.clients
    if args.seconds:
        changes["seconds"] = args.seconds
    if args.smtp_logins:
        changes["smtp_logins"] = args.smtp_logins
    if args.smtp_messages:
        changes["smtp_messages"] = args.smtp_messages
    if args.smtp_size_mb:
        changes["smtp_size"] = int(args.smtp_size_mb * 1e6)
    return attrs.evolve(s, **changes)


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _row(table: Table, figure: str, cells: dict[str, Any]) -> None:
    table.add(
        figure,
        cells.get("direct"),
        cells.get("imapproxy"),
        cells.get("peer"),
        cells.get("haproxy"),
    )


def start_peer(rig: Rig, args: argparse.Namespace, cold_runs: int, smtp: Any = None) -> str:
    """Install and start the peer (serving SMTP too with *smtp*, a
    :class:`bench.smtprig.SMTPRig`); a note on what happened instead if it failed."""
    try:
        from bench import peer
    except Exception as e:  # a missing peer must not cost the table
        return f"peer left out: bench.peer does not import ({e!r})"
    try:
        say(f"installing {peer.PEER_PACKAGE} {peer.PEER_VERSION} in {args.peer_venv}")
        python = peer.ensure_installed(args.peer_venv)
        say("starting the peer (its key derivation takes a while per account)")
        rig.add_peer(python, cold_runs, (smtp.upstream, smtp.accounts) if smtp else None)
    except Exception:
        traceback.print_exc()
        return "peer left out: it failed to install or start (traceback above)"
    return f"peer: {peer.PEER_PACKAGE} {peer.PEER_VERSION} from PyPI"


def concurrency_rows(rig: Rig, quick: bool) -> tuple[list[tuple[str, Cell, Cell, Cell]], list[str]]:
    """``bench.concurrency.run``'s figures as rows (and notes), or why there are none."""
    try:
        from bench import concurrency
    except Exception as e:  # a missing module must not cost the table
        return [], [f"concurrency figures left out: bench.concurrency does not import ({e!r})"]
    kwargs: dict[str, Any] = dict(
        pki=rig.pki, provider=rig.provider, dovecot=rig.dovecot, quick=quick
    )
    if "workdir" in inspect.signature(concurrency.run).parameters:
        kwargs["workdir"] = os.path.join(rig.work, "concurrency")
    try:
        result = concurrency.run(**kwargs)
    except Exception:
        traceback.print_exc()
        return [], ["concurrency figures left out: bench.concurrency.run failed (traceback above)"]
    items: Any = result.items() if isinstance(result, dict) else result
    rows: list[tuple[str, Cell, Cell, Cell]] = []
    notes = []
    for entry in items:
        item: tuple[Any, ...] = tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)
        if len(item) in (2, 3):  # (figure, imapproxy value[, note])
            rows.append((str(item[0]), None, _cell(item[1]), None))
            if len(item) == 3 and item[2]:
                notes.append(f"{item[0]}: {item[2]}")
        elif len(item) == 4:  # (figure, direct, imapproxy, peer)
            rows.append((str(item[0]), _cell(item[1]), _cell(item[2]), _cell(item[3])))
        else:
            rows.append((str(item[0]), None, None, None))
    return rows, notes


def smtp_supported() -> bool:
    """Whether the measured imapproxy has the SMTP front door (``--smtp-port``)."""
    if ProxyProcess.default is not None:
        return hasSMTP(ProxyProcess.default)
    return importlib.util.find_spec("proxy.smtp") is not None


def _cell(value: Any) -> Cell:
    return None if value is None else value if isinstance(value, str) else str(value)


def measure_all(rig: Rig, s: Settings, table: Table, step: Callable[[str], None]) -> None:
    targets = list(rig.targets.values())
    step("login latency (new upstream connection)")
    _row(
        table,
        "login: connect+TLS+login, new upstream connection",
        measure.new_upstream_login_latency(targets, s.runs),
    )
    step("login latency (logging in again)")
    _row(
        table,
        "login again within minutes (imapproxy: spare upstream connection)",
        measure.login_latency(targets, s.runs),
    )
    step("login latency (cold)")
    _row(
        table,
        "login, first of an account (token refresh first)",
        measure.cold_login_latency(targets, s.runs),
    )
    step("round trips")
    for label, samples in measure.round_trips(targets, s.iterations).items():
        _row(table, f"round trip: {label}", samples)
    step("throughput")
    tp = measure.throughput(targets, s.runs, rig.big_uid, rig.big_message)
    size = f"{len(rig.big_message) / 1e6:.0f} MB"
    _row(table, f"FETCH {size} (TLS both legs)", tp.fetch)
    _row(table, f"APPEND {size} (TLS both legs)", tp.append)
    _row(table, "relay CPU per GB relayed", tp.cpu_per_gb)
    modes = sorted(set(tp.append_mode.values()))
    table.notes.append(f"APPEND used: {', '.join(f'{k}: {v}' for k, v in tp.append_mode.items())}")
    if len(modes) > 1:
        table.notes.append("APPEND literal types differ between targets")
    restricted.measure(rig, s.runs, s.iterations, table, step)
    step(f"logins/s ({s.clients} clients, {s.seconds:g} s)")
    lps, errors = measure.logins_per_second_runs(targets, s.lps_runs, s.clients, s.seconds)
    _row(table, f"logins/s, {s.clients} concurrent clients", lps)
    if "peer" in lps and lps["peer"].median:
        table.notes.append(
            f"imapproxy ÷ peer, logins/s: {lps['imapproxy'].median / lps['peer'].median:.1f}×"
        )
    failed = {k: v for k, v in errors.items() if v}
    if failed:
        table.notes.append(f"failed logins during logins/s: {failed}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings(args)
    signal.signal(signal.SIGTERM, _terminate)
    if args.observability:
        from bench import observability

        size = int(args.size_mb * 1e6) if args.size_mb else None
        return observability.main(args.quick, args.runs, size, say)
    if args.caps:
        from bench import caps

        return caps.main(["--runs", str(args.runs or (50 if args.quick else 200))])
    table = Table()
    extra = {"imapproxy": importlib.metadata.version("imapproxy")}
    if args.tree:
        ProxyProcess.default = os.path.abspath(args.tree)
        extra["imapproxy"] = f"proxy/ from {ProxyProcess.default} (--tree)"
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = tempfile.mkdtemp(prefix="imapproxy-bench-")
        stack.callback(shutil.rmtree, work, True)
        rig = Rig(work, stack)
        say("starting PKI, provider, Dovecot and imapproxy")
        smtp_proxy = not args.no_smtp and smtp_supported()
        rig.start(smtp=smtp_proxy)
        say(f"registering {s.clients + 1} accounts, seeding a {s.size / 1e6:g} MB message")
        big = message(1000 if args.smtp_only else s.size, "large")
        rig.populate(s.clients, big)
        rig.make_targets(s.cold_runs)
        smtp = None
        if args.no_smtp:
            table.notes.append("SMTP left out (--no-smtp)")
        else:
            from bench import smtprun

            say("starting the SMTP sink and Dovecot submission")
            smtp, notes = smtprun.start(rig, smtp_proxy)
            table.notes.extend(notes)
        if args.no_peer:
            table.notes.append("peer left out (--no-peer)")
        else:
            note = start_peer(rig, args, s.cold_runs, smtp)
            table.notes.append(note)
            if "left out" not in note:
                from bench.peer import PEER_PACKAGE, PEER_VERSION

                extra["peer"] = f"{PEER_PACKAGE} {PEER_VERSION}"
            if smtp:
                table.notes.extend(smtprun.add_peer(smtp, rig))
        if args.no_haproxy:
            table.notes.append("reference relay left out (--no-haproxy)")
        else:
            table.notes.append(rig.add_haproxy())
            if smtp:
                table.notes.append(smtp.add_haproxy())
        if args.smtp_only:
            table.notes.append("IMAP figures left out (--smtp-only)")
        else:
            measure_all(rig, s, table, lambda what: say(f"measuring {what}"))
        if smtp:
            smtprun.measure(smtp, s, table, lambda what: say(f"measuring {what}"))
        if args.no_concurrency or args.smtp_only:
            table.notes.append("concurrency figures left out (--no-concurrency or --smtp-only)")
        else:
            say("bench.concurrency")
            rows, notes = concurrency_rows(rig, args.quick)
            table.rows.extend(rows)
            table.notes.extend(notes)
        say("stopping")
    table.notes.append(
        f"settings: {s.runs} runs, {s.iterations} round trips, {s.size / 1e6:g} MB message, "
        f"{s.clients} clients x {s.seconds:g} s x {s.lps_runs} for logins/s"
        + (" (--quick)" if args.quick else "")
        + f"; took {time.monotonic() - started:.0f} s"
    )
    info = machine(extra)
    print(table.markdown())
    print()
    for note in table.notes:
        print(f"- {note}")
    print()
    print("Machine:")
    print(machine_markdown(info))
    if args.write_docs:
        path = write_docs(os.path.join(DOCS, "benchmarks.md"), table, info)
        say(f"wrote {path}")
    return 0
