"""Shared helpers for the benchmark scripts: timing, peak memory, and measurements that survive
a shared machine.

On a busy machine one measurement of a variant says little: another process may have taken a
core for its whole duration. So every script (1) runs its variants interleaved, round after
round (round r starts at variant r mod k), so that a slow spell hits all variants alike, (2)
uses one torch thread per process unless ``--threads`` says otherwise, and (3) reports each
ratio as the median over the rounds of the per-round ratios, with its spread (max - min of the
per-round ratios over their median), flagged when the spread exceeds 10%.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

#: a ratio whose per-round values spread more than this (relative) is flagged as unreliable
SPREAD_LIMIT = 0.10


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on GPU, process max RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> float:
    """Median seconds per call of fn after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------- shared machines
def add_repeat_arguments(parser: argparse.ArgumentParser, repeats: int = 5) -> None:
    """``--repeats`` (interleaved rounds) and ``--threads`` (torch threads per process)."""
    parser.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help="interleaved rounds of all variants (median and spread over them)",
    )
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (1: steady when shared)")  # fmt: skip


def configure_threads(threads: int) -> None:
    """Use ``threads`` torch threads here and in child processes (OMP / MKL variables)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)


def interleave(
    measure: Callable[[str], float], variants: Sequence[str], repeats: int
) -> dict[str, list[float]]:
    """``measure(variant)`` for every variant, ``repeats`` rounds, interleaved: round r runs the
    variants starting at index r mod k. Returns each variant's values in round order."""
    values: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(repeats):
        for i in range(len(variants)):
            variant = variants[(r + i) % len(variants)]
            values[variant].append(measure(variant))
    return values


@dataclass
class Spread:
    """Median of some values and their spread: (max - min) / median (0 for one value)."""

    median: float
    spread: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        median = statistics.median(values)
        spread = (max(values) - min(values)) / abs(median) if median else float("inf")
        return cls(median, spread, len(values))

    @property
    def unstable(self) -> bool:
        return self.spread > SPREAD_LIMIT


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Spread:
    """The per-round ratios numerator[r] / denominator[r], summarised (paired: each round's two
    measurements ran back to back, under the same load)."""
    return Spread.of([a / b for a, b in zip(numerator, denominator, strict=True)])


def ratio_text(ratio: Spread, digits: int = 3) -> str:
    """``1.023 (spread 4.1%, 5 rounds)``, with ``  ** UNSTABLE: spread > 10% **`` appended when
    the spread exceeds ``SPREAD_LIMIT``."""
    text = f"{ratio.median:.{digits}f} (spread {ratio.spread:.1%}, {ratio.count} rounds)"
    if ratio.unstable:
        text += f"  ** UNSTABLE: spread > {SPREAD_LIMIT:.0%} **"
    return text


def seconds_text(values: Sequence[float]) -> str:
    """Median seconds with their spread, e.g. ``0.2041 s +-3.2%``."""
    s = Spread.of(values)
    return f"{s.median:.4f} s +-{s.spread / 2:.1%}"


def interleave_calls(
    calls: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    calls_per_round: int = 3,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """In-process variants, interleaved: each round times every call (median seconds of
    ``calls_per_round`` calls after ``warmup``), ``repeats`` rounds (see ``interleave``)."""

    def measure(name: str) -> float:
        return time_per_call(calls[name], device, warmup, calls_per_round)

    return interleave(measure, tuple(calls), repeats)
