"""
The SMTP submission part of ``python -m bench``: set-up (:mod:`bench.smtprig`)
and the rows (:mod:`bench.smtpmeasure`), each failure turned into a note so
that it never costs the IMAP table.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from bench.smtpmeasure import (
    big_rate,
    login_latency,
    message8,
    session_per_message,
    session_rate,
)
from bench.smtprig import SMTPRig
from bench.stats import Sample, Table


def start(rig: Any, with_proxy: bool) -> tuple[SMTPRig | None, list[str]]:
    """The SMTP rig, or None; notes for the table."""
    smtp = SMTPRig(rig)
    try:
        smtp.start()
    except Exception:
        traceback.print_exc()
        return None, ["SMTP figures left out: the SMTP set-up failed (traceback above)"]
    if not with_proxy:
        return smtp, ["SMTP through imapproxy left out: this imapproxy has no SMTP front door"]
    try:
        smtp.add_proxy()
    except Exception:
        traceback.print_exc()
        return smtp, ["SMTP through imapproxy left out: its set-up failed (traceback above)"]
    return smtp, []


def add_peer(smtp: SMTPRig, rig: Any) -> list[str]:
    if rig.peer_smtp_port is None or "peer" not in rig.targets:
        return ["SMTP through the peer left out: the peer did not start"]
    smtp.add_peer(rig.peer_smtp, rig.peer_smtp_port, rig.targets["peer"].pid)
    return []


def measure(smtp: SMTPRig, s: Any, table: Table, step: Callable[[str], None]) -> None:
    """The SMTP rows: login time, 10 KB messages/s, MB/s of a large message."""
    targets = list(smtp.targets.values())
    try:
        step(f"SMTP login time ({s.smtp_logins} logins)")
        login, offered = login_latency(targets, s.smtp_logins)
        table.notes.append(
            "SMTP EHLO offered: " + "; ".join(f"{k}: {v}" for k, v in offered.items())
        )
        _row(table, "SMTP login: connect+TLS+EHLO+AUTH until 235", login)
        size = 10_000
        step(f"SMTP {s.smtp_messages} x 10 KB messages in one session, {s.runs} runs")
        rate = session_rate(targets, s.runs, s.smtp_messages, size, smtp.sink)
        _row(table, f"SMTP 10 KB messages, {s.smtp_messages} in one session", rate)
        step(f"SMTP one 10 KB message per session, {s.smtp_logins} sessions")
        single = session_per_message(targets, s.smtp_logins, size, smtp.sink)
        _row(table, "SMTP one 10 KB message per session (connect to QUIT's 221)", single)
        big = message8(s.smtp_size, "bench large message")
        mb = f"{len(big) / 1e6:.0f} MB"
        step(f"SMTP {mb} message, {s.runs} runs")
        tp = big_rate(targets, s.runs, big, smtp.sink)
        _row(table, f"SMTP {mb} message, 8-bit, DATA (TLS both legs)", tp.rate)
        _row(table, "SMTP relay CPU per GB relayed", tp.cpu_per_gb)
    except Exception:
        traceback.print_exc()
        table.notes.append("SMTP figures incomplete: a measurement failed (traceback above)")
        return
    table.notes.append(
        "SMTP: every message checked at the sink (count, envelope, bytes after Dovecot's "
        f"Received header); client: bench.smtpclient (raw socket), {s.smtp_logins} logins, "
        f"{s.runs} runs of {s.smtp_messages} x 10 KB and of 1 x {mb}"
    )
    if "imapproxy" in login and "peer" in login:
        ratios = [
            ("login time", _over(login["peer"], login["imapproxy"])),
            ("10 KB msg/s", _over(rate["imapproxy"], rate["peer"])),
            ("one message per session", _over(single["imapproxy"], single["peer"])),
            (f"{mb} MB/s", _over(tp.rate["imapproxy"], tp.rate["peer"])),
        ]
        table.notes.append(
            "imapproxy vs peer, SMTP (above 1: imapproxy ahead): "
            + ", ".join(f"{k} {v:.2f}×" for k, v in ratios)
        )


def _over(a: Sample, b: Sample) -> float:
    return a.median / b.median if b.median else float("nan")


def _row(table: Table, figure: str, cells: dict[str, Sample]) -> None:
    table.add(
        figure,
        cells.get("direct"),
        cells.get("imapproxy"),
        cells.get("peer"),
        cells.get("haproxy"),
    )
