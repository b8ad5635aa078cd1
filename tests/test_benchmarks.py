"""Every benchmark script runs end to end (tiny sizes) and prints its ratio line.

Performance is never asserted here (benchmarks/ measures it side by side); this only keeps the
scripts runnable (the subprocess-per-variant scripts with one round: each round starts a Python
process per variant): a benchmark that crashes measures nothing (bench_ddm's Lightning variant once
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
                      "--warmup", "1", "--repeats", "1"], "overhead ratio"),
    "bench_cdm.py": (["--image-size", "8", "--channels", "8", "--channel-mult", "1,2", "--batch",
                      "4", "--steps", "1", "--warmup", "1", "--repeats", "1"],
                     "CDM / DDM sampling cost per denoiser call"),
    "bench_cdl.py": (["--image-size", "8", "--channels", "8", "--batch", "8", "--points", "4",
                      "--examples", "1", "--warmup", "1", "--repeats", "2", "--calls", "1"],
                     "1+4nK/B"),
    "bench_dg.py": (["--channels", "8", "--batch", "4", "--steps", "3", "--num-fake", "4",
                     "--train-steps", "2", "--repeats", "2"], "live / cached step"),
    "bench_soft.py": (["--image-size", "8", "--channels", "8", "--batch", "2", "--repeats", "2",
                       "--calls", "1", "--sampler-steps", "2"], "sampler share"),
}  # fmt: skip


def test_every_benchmark_is_covered() -> None:
    assert sorted(p.name for p in BENCH.glob("bench_*.py")) == sorted(TINY)


#: the slowest smoke runs (interleaved repeats of a double backward / a Lightning fit) run with
#: ``make test-slow``; the default suite keeps the others within CI's budget
SLOW_SCRIPTS = ("bench_cdm.py", "bench_ddm.py")


@pytest.mark.parametrize(
    "script",
    [pytest.param(s, marks=pytest.mark.slow) if s in SLOW_SCRIPTS else s for s in sorted(TINY)],
)
def test_benchmark_runs(script: str) -> None:
    args, marker = TINY[script]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCH / script), *args], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker in done.stdout, done.stdout[-2000:]
    assert "spread" in done.stdout  # every ratio comes with its spread over the rounds


def test_interleaving_rotates_and_ratios_flag_their_spread() -> None:
    sys.path.insert(0, str(BENCH))
    from common import Spread, interleave, paired_ratio, ratio_text

    order: list[str] = []
    values = interleave(lambda v: order.append(v) or float(len(order)), ("a", "b", "c"), 3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # round r starts at r mod 3
    assert values == {"a": [1.0, 6.0, 8.0], "b": [2.0, 4.0, 9.0], "c": [3.0, 5.0, 7.0]}
    steady = paired_ratio([2.0, 2.1, 1.95], [1.0, 1.0, 1.0])
    assert steady.median == 2.0 and steady.spread == pytest.approx(0.075)
    assert not steady.unstable and "UNSTABLE" not in ratio_text(steady)
    shaky = Spread.of([1.0, 1.3, 0.9])
    assert shaky.unstable and "UNSTABLE: spread > 10%" in ratio_text(shaky)
