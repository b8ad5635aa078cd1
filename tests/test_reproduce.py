"""benchmarks/reproduce_digits.py at a smoke budget (2 steps per fit, small evaluations): every
method's fit / test / predict command runs and the compare table has one row per method. Slow
(about 20 CLI processes: ~10 minutes on 2 CPU cores)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["ddm", "cdm", "cdl", "cdl_finetune", "dg_guided", "dg_unguided", "soft_momentum",
        "soft_naive"]  # fmt: skip


@pytest.mark.slow
def test_smoke_reproduction_writes_the_cross_method_table(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore",
           "NOISECLS_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "reproduce_digits.py"), "--steps", "2",
         "--fid-samples", "50", "--nll-examples", "10", "--sampler-steps", "5",
         "--fake-samples", "100", "--feature-epochs", "1", "--jobs", "2",
         "--out", str(tmp_path / "repro")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3000,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    with open(tmp_path / "repro" / "compare" / "compare.csv") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert list(rows) == ROWS
    for name, row in rows.items():
        assert math.isfinite(float(row["test/fid"])) and float(row["test/fid"]) > 0, name
        assert row["step"] == "2", name
    assert rows["dg_guided"]["method"] == "DG" and rows["soft_naive"]["method"] == "SoftDiffusion"
    # the unguided DG row is the same discriminator checkpoint, sampled without guidance
    assert rows["dg_guided"]["checkpoint"] == rows["dg_unguided"]["checkpoint"]
    assert rows["dg_guided"]["test/fid"] != rows["dg_unguided"]["test/fid"]
    assert rows["cdl_finetune"]["checkpoint"] != rows["cdl"]["checkpoint"]
    assert (tmp_path / "repro" / "logs" / "cdm.log").is_file()  # --jobs 2: a log per row
    report = (tmp_path / "repro" / "reproduce.md").read_text()
    assert "steps per fit: 2" in report and "at commit " in report
