"""Small helpers shared by the benchmark scripts (tables, timing, machine description, Ray)."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence


def machine() -> str:
    """One line: date, CPU count and model, memory, torch / transformers / ray versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    versions = []
    for mod in ("torch", "transformers", "ray"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    date = datetime.date.today().isoformat()
    return f"{date}; {os.cpu_count()} cores ({cpu}{mem}); python {platform.python_version()}; " + ", ".join(versions)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A plain Markdown table (so it can be pasted into docs/benchmarks.md as is)."""

    def fmt(x: Any) -> str:
        if isinstance(x, float):
            if x != x:  # nan
                return "-"
            if abs(x) >= 100:
                return f"{x:,.0f}"
            if abs(x) >= 10:
                return f"{x:.1f}"
            if abs(x) >= 0.01 or x == 0:
                return f"{x:.3f}"
            return f"{x:.2e}"
        return str(x)

    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(f"\n{title}\n")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def timeit(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def init_ray(num_cpus: int) -> None:
    """A private local Ray cluster (the package's own start-up: 127.0.0.1, no dashboard)."""
    from vlgrpo.cluster.placement import init_ray as _init

    _init(None, num_cpus)


def result(name: str, value: float) -> None:
    """The last line every benchmark prints."""
    print(f"RESULT {name}={value:.4f}", flush=True)
