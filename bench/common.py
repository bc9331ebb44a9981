"""What the benchmark scripts share: markdown tables, and the CPU time other processes take while a section runs.

Standard library only: bench/pylate_runner.py imports it inside PyLate's own venv, where xmodal is not installed.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table; columns of numbers (or blanks / "-") are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    right = [bool(cells) and all(numeric(r[i]) for r in cells) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right, strict=True))
    return "\n".join([line(headers), sep + "|", *(line(r) for r in cells)])


def numeric(value: str) -> bool:
    if value in ("", "-"):
        return True
    try:
        float(value.rstrip("x"))
    except ValueError:
        return False
    return True


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for raw in Path("/proc/cpuinfo").read_text().splitlines():
            if raw.startswith("model name"):
                return raw.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _cpu_times() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields), fields[3] + fields[4]  # (all, idle + iowait)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """CPU time other processes took while a section ran, as a share of the whole machine: busy time from
    /proc/stat minus this process's and its waited-for children's. Other work on the machine skews every
    timing, so each figure is printed with it."""

    share = 0.0

    def __enter__(self) -> OtherLoad:
        self._start = (_cpu_times(), _own_cpu())
        return self

    def __exit__(self, *exc: object) -> None:
        (total0, idle0), own0 = self._start
        total1, idle1 = _cpu_times()
        tick = os.sysconf("SC_CLK_TCK")
        busy_s = ((total1 - total0) - (idle1 - idle0)) / tick
        self.share = 100 * max(busy_s - (_own_cpu() - own0), 0.0) / max((total1 - total0) / tick, 1e-9)

    def __str__(self) -> str:
        return f"other processes used {self.share:.0f}% of the CPUs meanwhile"
