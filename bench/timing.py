"""Shared timing helpers for the benchmark scripts (bench/*.py): warm up, then time, the device's clock.

On a GPU the time of a call is read with CUDA events, which mark the device's own timeline, after
warm-up calls have compiled kernels and filled the allocator's cache. On a CPU, time.perf_counter.
Each measurement is the median of `repeats` calls: robust to the odd slow call (another process, GC).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds per call of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            start_time = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_time)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run_info(device: torch.device) -> dict[str, str]:
    """What a reader needs to reproduce a number: device, date, commit, torch version."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "device": device_name(device),
        "date": date.today().isoformat(),
        "commit": commit,
        "torch": torch.__version__,
    }


def print_table(rows: list[dict[str, object]]) -> None:
    """A plain Markdown table of `rows` (the keys of the first row are the columns)."""
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(_format(row[column]) for column in columns) + " |")


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")
