"""DG's three commands as the configs' headers give them, at a tiny budget: the score model is
rebuilt from its checkpoint alone (no score_model block), ``score_run`` names the checkpoint and
the fake set, best.ckpt is kept by the held-out class-balanced BCE, the calibration figure is
written, and a fake set written by other weights is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from noisecls.errors import NoiseclsError
from noisecls.methods.ddm import DDM
from noisecls.methods.dg import load_module_checkpoint, score_run_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DDM_TOY, DG_TOY = (str(ROOT / "experiments" / f"{n}.yaml") for n in ("ddm_toy", "dg_toy"))
SMALL = ["--data.init_args.n_train", "600", "--data.init_args.n_val", "200",
         "--data.init_args.n_test", "200", "--trainer.enable_progress_bar", "false"]  # fmt: skip
DG_SMALL = [a.replace("data.init_args", "data.init_args.real.init_args") for a in SMALL]


def noisecls(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "noisecls.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def ok(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_dg_pipeline_from_a_score_run_directory(tmp_path: Path) -> None:
    ok(noisecls("fit", "--config", DDM_TOY, "--trainer.max_steps", "30",
                "--trainer.default_root_dir", "score", *SMALL, cwd=tmp_path))  # fmt: skip
    (ckpt,) = (tmp_path / "score").rglob("last.ckpt")
    rebuilt = load_module_checkpoint(str(ckpt))  # from the checkpoint alone: net config saved
    assert isinstance(rebuilt, DDM) and rebuilt.model.prediction == "v"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(rebuilt.state_dict(), state, rtol=0, atol=0)

    ok(noisecls("predict", "--config", DDM_TOY, "--ckpt_path", str(ckpt),
                "--trainer.default_root_dir", "score", "--model.init_args.predict.num_samples",
                "train", *SMALL, cwd=tmp_path))  # fmt: skip
    run = ["--config", DG_TOY, "--model.init_args.score_run", "score", *DG_SMALL]
    ok(noisecls("fit", *run, "--trainer.max_steps", "40", "--trainer.val_check_interval", "20",
                "--trainer.default_root_dir", "dg", cwd=tmp_path))  # fmt: skip
    logs = next((tmp_path / "dg").rglob("checkpoints")).parent
    assert {p.name for p in (logs / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    best = torch.load(logs / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    (callback,) = [v for k, v in best["callbacks"].items() if "ModelCheckpoint" in k]
    assert callback["monitor"] == "val/loss" and callback["best_model_path"].endswith("best.ckpt")
    assert sorted(p.name for p in (logs / "calibration").iterdir()) == [
        "val_step0000020.png", "val_step0000040.png",
    ]  # fmt: skip

    ok(noisecls("test", *run, "--ckpt_path", str(logs / "checkpoints" / "best.ckpt"),
                "--trainer.default_root_dir", "guided", cwd=tmp_path))  # fmt: skip
    (results,) = (tmp_path / "guided").rglob("results.json")
    metrics = {r["metric"]: r["value"] for r in json.loads(results.read_text())["records"]}
    assert metrics["test/fid"] > 0 and 0 <= metrics["test/ece"] <= 1

    # the recorded checkpoint path now holds other weights (the run trained further and was
    # saved over it): the fake set no longer describes the model, so DG refuses it
    further_run = ["--trainer.max_steps", "35", "--trainer.default_root_dir", "further"]
    ok(noisecls("fit", "--config", DDM_TOY, "--ckpt_path", str(ckpt), *further_run, *SMALL,
                cwd=tmp_path))  # fmt: skip
    (further,) = (tmp_path / "further").rglob("last.ckpt")
    shutil.copyfile(further, ckpt)
    out = noisecls("fit", *run, "--trainer.max_steps", "1", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "no longer holds the weights that wrote" in out.stderr, out.stderr[-2000:]


def test_score_run_finds_the_recorded_checkpoint_from_another_directory(tmp_path: Path) -> None:
    """The manifest records the checkpoint as given to predict (relative to its working
    directory); from elsewhere it is found under the run directory by its tail."""
    run = tmp_path / "somewhere" / "ddm"
    ckpt = run / "lightning_logs" / "version_3" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    (run / "samples").mkdir()
    manifest = {"checkpoint": "runs/ddm/lightning_logs/version_3/checkpoints/last.ckpt",
                "weights_sha256": "abc"}  # fmt: skip
    (run / "samples" / "manifest.json").write_text(json.dumps(manifest))
    assert score_run_checkpoint(str(run)) == (str(ckpt), "abc")
    ckpt.unlink()
    with pytest.raises(NoiseclsError, match=r"is gone; give model\.init_args\.score_checkpoint"):
        score_run_checkpoint(str(run))
    with pytest.raises(NoiseclsError, match=r"holds no fake set written by `noisecls predict`"):
        score_run_checkpoint(str(tmp_path))
