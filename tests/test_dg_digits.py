"""DG end to end on the 8x8 digits through the CLI (slow): a briefly trained DDM, its samples
(`noisecls predict`), a discriminator trained on them (`noisecls fit` with dg_digits.yaml), and
`noisecls test` of the same model guided and unguided: DG lowers the FID (DigitsFeatures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false"]


def noisecls(*args: str, cwd: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "noisecls.cli", *args, *QUIET],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def read_fid(log_root: Path) -> float:
    (path,) = log_root.rglob("results.json")
    records = json.loads(path.read_text())["records"]
    return next(float(r["value"]) for r in records if r["metric"] == "test/fid")


@pytest.mark.slow
def test_dg_improves_digits_fid(tmp_path: Path) -> None:
    ddm, dg = (
        str(ROOT / "experiments" / "ddm_digits.yaml"),
        str(ROOT / "experiments" / "dg_digits.yaml"),
    )
    noisecls("fit", "--config", ddm, "--trainer.max_steps", "800",
             "--trainer.check_val_every_n_epoch", "1000", "--trainer.default_root_dir", "ddm",
             cwd=tmp_path)  # fmt: skip
    (score_ckpt,) = (tmp_path / "ddm").rglob("last.ckpt")
    noisecls("predict", "--config", ddm, "--ckpt_path", str(score_ckpt),
             "--trainer.default_root_dir", "ddm", "--model.init_args.predict.num_samples",
             "1437", "--model.init_args.predict.batch_size", "479", cwd=tmp_path)  # fmt: skip
    common = ["--config", dg, "--model.init_args.score_run", "ddm"]
    noisecls("fit", *common, "--trainer.max_steps", "1500", "--trainer.default_root_dir", "dg",
             cwd=tmp_path)  # fmt: skip
    (dg_ckpt,) = (tmp_path / "dg").rglob("best.ckpt")  # lowest held-out BCE
    for name, weight in (("guided", "2.0"), ("plain", "0.0")):
        noisecls("test", *common, "--ckpt_path", str(dg_ckpt), "--trainer.default_root_dir",
                 name, "--model.init_args.guidance.weight", weight, cwd=tmp_path)  # fmt: skip
    guided, plain = read_fid(tmp_path / "guided"), read_fid(tmp_path / "plain")
    print(f"digits FID: unguided {plain:.3f}, DG {guided:.3f}")
    assert guided < plain, (guided, plain)
