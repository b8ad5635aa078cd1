"""Every benchmark script runs end to end (tiny sizes) and prints its ratio line.

Performance is never asserted here (benchmarks/ measures it side by side); this only keeps the
scripts runnable: a benchmark that crashes measures nothing (bench_ddm's Lightning variant once
imported lightning before noisecls and died on torchvision's op registration).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = {  # script: (arguments, a line the script prints when it finished)
    "bench_ddm.py": (["--image-size", "8", "--channels", "8", "--batch", "4", "--steps", "2",
                      "--warmup", "1", "--rounds", "1"], "overhead ratio"),
    "bench_cdm.py": (["--image-size", "8", "--channels", "8", "--channel-mult", "1,2", "--batch",
                      "4", "--steps", "2", "--warmup", "1", "--rounds", "1"],
                     "CDM / DDM training-step ratio"),
    "bench_cdl.py": (["--image-size", "8", "--channels", "8", "--batch", "8", "--points", "4",
                      "--examples", "1", "--warmup", "1", "--repeats", "1"], "1+4nK/B"),
    "bench_dg.py": (["--channels", "8", "--batch", "4", "--steps", "3", "--num-fake", "4",
                     "--train-steps", "2", "--repeats", "2"], "cached"),
    "bench_soft.py": (["--image-size", "8", "--channels", "8", "--batch", "2", "--repeats", "1",
                       "--sampler-steps", "2"], "sampler share"),
}  # fmt: skip


def test_every_benchmark_is_covered() -> None:
    assert sorted(p.name for p in BENCH.glob("bench_*.py")) == sorted(TINY)


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs(script: str) -> None:
    args, marker = TINY[script]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCH / script), *args], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker in done.stdout, done.stdout[-2000:]
