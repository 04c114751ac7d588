"""
Figures and the table: a sample's median and p99, rows of direct / imapproxy
/ peer with their ratios to direct, the markdown table, and the machine.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Sequence

import attrs


def percentile(values: Sequence[float], q: float) -> float:
    """The *q*-th percentile (0..100), interpolating between ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@attrs.frozen
class Sample:
    """Repeated measurements of one figure.

    :param higher_better: for rates; its p99 is then the worst 1% too (the
        1st percentile), so that p99 always reads "99% of runs did better".
    :param scale: what the values are multiplied by for display (1e3: ms).
    """

    values: tuple[float, ...]
    unit: str
    higher_better: bool = False
    scale: float = 1.0
    digits: int = 2

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def p99(self) -> float:
        return percentile(self.values, 1 if self.higher_better else 99)

    def show(self) -> str:
        m, p = self.median * self.scale, self.p99 * self.scale
        if len(self.values) == 1:
            return f"{m:.{self.digits}f} {self.unit}"
        return f"{m:.{self.digits}f} / {p:.{self.digits}f} {self.unit}"


Cell = Sample | str | None


def _show(cell: Cell) -> str:
    if cell is None:
        return "—"
    return cell if isinstance(cell, str) else cell.show()


def ratio(cell: Cell, base: Cell) -> str:
    """Median over median, e.g. ``1.12×``; blank when either is missing."""
    if not isinstance(cell, Sample) or not isinstance(base, Sample) or not base.median:
        return ""
    return f"{cell.median / base.median:.2f}×"


@attrs.define
class Table:
    rows: list[tuple[str, Cell, Cell, Cell]] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)
    #: The reference relay (HAProxy, TLS both legs), by figure.
    haproxy: dict[str, Cell] = attrs.field(factory=dict)

    def add(
        self, figure: str, direct: Cell, proxy: Cell, peer: Cell = None, haproxy: Cell = None
    ) -> None:
        self.rows.append((figure, direct, proxy, peer))
        if haproxy is not None:
            self.haproxy[figure] = haproxy

    def markdown(self) -> str:
        head = "| figure | direct | imapproxy | ratio | peer | peer ratio |"
        rule = "|---|---|---|---|---|---|"
        if self.haproxy:
            head += " HAProxy (C relay) | HAProxy ratio |"
            rule += "---|---|"
        out = [head, rule]
        for figure, direct, proxy, peer in self.rows:
            cells = [
                figure,
                _show(direct),
                _show(proxy),
                ratio(proxy, direct),
                _show(peer),
                ratio(peer, direct),
            ]
            if self.haproxy:
                ref = self.haproxy.get(figure)
                cells += [_show(ref), ratio(ref, direct)]
            out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _dovecot_version() -> str:
    try:
        out = subprocess.run(
            ["dovecot", "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "not installed"


def _meminfo_gib() -> str:
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        return f"{kib / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def machine(extra: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """What the figures were measured on."""
    items = [
        ("CPU", _cpu_model()),
        ("cores", str(os.cpu_count())),
        ("memory", _meminfo_gib()),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
        ("Dovecot", _dovecot_version()),
    ]
    items += sorted((extra or {}).items())
    return items


def machine_markdown(items: list[tuple[str, str]]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in items)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name may hold spaces; fields restart after its ')'.
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return ticks / os.sysconf("SC_CLK_TCK")
