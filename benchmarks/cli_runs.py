"""What the study scripts share: running ``noisecls`` commands, finding a run's checkpoints and
reading its ``results.json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def noisecls(*args: str, cwd: Path) -> None:
    """Run one CLI command (W&B off, no progress bar, one torch thread unless OMP_NUM_THREADS
    is set); a failure stops the study with the command's last output."""
    env = {
        "OMP_NUM_THREADS": "1",
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONWARNINGS": "ignore",
    }  # fmt: skip  (one thread: oversubscribed cores slow down)
    cmd = [sys.executable, "-m", "noisecls.cli", *args, "--trainer.enable_progress_bar", "false"]
    print("$ noisecls " + " ".join(args), flush=True)
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"command failed:\n{out.stderr[-3000:]}")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def newest_checkpoint(run: Path, name: str = "last.ckpt") -> Path:
    """The newest checkpoint called ``name`` under a fit's directory."""
    found = sorted(run.rglob(name), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"no {name} under {run}")
    return found[-1]


def has_checkpoint(run: Path, name: str = "last.ckpt") -> bool:
    return any(run.rglob(name))


def read_results(run: Path) -> dict[str, float]:
    """Every metric of the newest results.json under run (value; NFE as '<metric>/nfe')."""
    found = sorted(run.rglob("results.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"no results.json under {run}")
    records = json.loads(found[-1].read_text())["records"]
    values = {r["metric"]: r["value"] for r in records}
    values |= {f"{r['metric']}/nfe": r["nfe"] for r in records if r.get("nfe")}
    return values
