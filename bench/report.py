"""
Writes the measured table and the machine into docs/benchmarks.md, between
two markers, keeping the hand-written text around them.
"""

from __future__ import annotations

import datetime
import os

from bench.stats import Table, machine_markdown

BEGIN = "<!-- bench:begin (written by `python -m bench --write-docs`) -->"
END = "<!-- bench:end -->"


def generated(table: Table, info: list[tuple[str, str]]) -> str:
    today = datetime.date.today().isoformat()
    notes = "\n".join(f"- {n}" for n in table.notes)
    return (
        f"{BEGIN}\n"
        f"Measured {today}. Each cell is median / p99.\n\n"
        f"{table.markdown()}\n\n"
        f"{notes}\n\n"
        f"Machine:\n\n{machine_markdown(info)}\n"
        f"{END}"
    )


def write_docs(path: str, table: Table, info: list[tuple[str, str]]) -> str:
    """Replace the generated part of *path* (append it if there is none)."""
    block = generated(table, info)
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    start, end = text.find(BEGIN), text.find(END)
    if start >= 0 and end > start:
        text = text[:start] + block + text[end + len(END) :]
    else:
        text = (text.rstrip() + "\n\n" if text else "# Benchmarks\n\n") + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
