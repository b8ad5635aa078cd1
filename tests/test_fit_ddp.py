"""`noisecls fit` under DDP on 2 CPU processes (gloo), through the CLI.

Semantics under test (see noisecls.randomness and noisecls.data.sampling):
* ``data.batch_size`` is the GLOBAL batch: each of W ranks trains on batch_size / W examples,
  rank r on rows r·B/W .. (r+1)·B/W - 1 of the global batch of step s;
* per-example training noise is drawn for the whole global batch from a generator seeded by
  (seed, step) and sliced, so it depends on an example's position, not on W;
* hence a 2-process DDM run at per-rank batch B/2 ends at the weights (raw and EMA) of a
  1-process run at batch B, up to float reduction order; the same holds for CDM, whose loss
  back-propagates through an input gradient (create_graph) inside DDP's reducer;
* a DDP run resumed from a checkpoint ends where the uninterrupted DDP run ends.

The fast tests cover one method per DDP hazard (EMA's deep copy, resume: DDM; double backward:
CDM; state fitted outside DDP's broadcast, validation callbacks: CDL's reference). Slow: Soft's
DCT operators and statistics fitted at fit start, DG's frozen score model and its feature cache
built by both ranks, and the full matrix of CPU configs with every evaluation callback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from noisecls.methods.base import RankDisagreementError, check_ranks_agree

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
TIMEOUT = 300  # a hung rank fails the test instead of stalling the suite
DDP = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")


def noisecls(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "noisecls.cli", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def small_config(name: str, path: Path, *, callbacks: list | None = None, **net: object) -> Path:
    """experiments/{name}.yaml with a smaller net, no logger and the given callbacks (default:
    EMA + last checkpoint only)."""
    config = yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text())
    config["model"]["init_args"]["net"]["init_args"].update(net)
    if callbacks is None:
        callbacks = [
            {"class_path": "noisecls.callbacks.EMAWeightAveraging",
             "init_args": {"decay": 0.9}},
            {"class_path": "noisecls.callbacks.ModelCheckpoint",
             "init_args": {"save_last": True}},
        ]  # fmt: skip
    config["trainer"].update(
        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks
    )
    path.write_text(yaml.safe_dump(config))
    return path


def last_checkpoint(root: Path) -> dict:
    """The last.ckpt under root (there must be exactly one)."""
    found = sorted(root.rglob("last.ckpt"))
    assert len(found) == 1, found
    return torch.load(found[0], map_location="cpu", weights_only=False)


def assert_same_weights(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """EMA weights (state_dict) and raw weights (current_model_state) agree, and so does the
    step; tolerance for float reduction order (all-reduce of two half-batch gradients)."""
    assert a["global_step"] == b["global_step"]
    for key in ("state_dict", "current_model_state"):
        assert a[key].keys() == b[key].keys()
        for name, value in a[key].items():
            torch.testing.assert_close(value, b[key][name], rtol=rtol, atol=atol, msg=name)


def weight_distance(a: dict, b: dict) -> float:
    """Largest absolute difference between the raw weights of two checkpoints."""
    sa, sb = a["current_model_state"], b["current_model_state"]
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa if sa[k].is_floating_point())


# ---- the rank-agreement guard (no processes needed) ----------------------------------------
def test_rank_agreement_guard_names_the_tensor_a_rank_disagrees_on() -> None:
    g = torch.Generator().manual_seed(0)
    named = {"net.weight": torch.randn(4, 3, generator=g), "reference.mean": torch.randn(5)}

    def gather_same(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x, x])

    check_ranks_agree(named, gather_same)  # identical ranks: no error

    def gather_one_entry_off(x: torch.Tensor) -> torch.Tensor:
        other = {**named, "reference.mean": named["reference.mean"].clone()}
        other["reference.mean"][3] += 1e-6  # one entry, a tiny change
        from noisecls.methods.base import tensor_fingerprint

        return torch.stack([x, torch.stack([tensor_fingerprint(t) for t in other.values()])])

    with pytest.raises(RankDisagreementError, match=r"ranks \[1\].*reference\.mean"):
        check_ranks_agree(named, gather_one_entry_off)


# ---- DDM: 2 processes = 1 process, resume = uninterrupted ----------------------------------
@pytest.fixture(scope="module")
def ddm_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """ddm_toy (64-wide MLP, global batch 64, 12 steps, EMA 0.9) on 1 process, on 2 processes,
    and on 2 processes stopped at step 6 and resumed from its last.ckpt to step 12."""
    root = tmp_path_factory.mktemp("ddm_ddp")
    config = str(small_config("ddm_toy", root / "ddm.yaml", hidden=64))
    common = ("--config", config, "--data.init_args.batch_size", "64")
    runs = {}
    noisecls("fit", *common, "--trainer.max_steps", "12", "--trainer.default_root_dir", "one",
             cwd=root)  # fmt: skip
    runs["one"] = last_checkpoint(root / "one")
    noisecls("fit", *common, *DDP, "--trainer.max_steps", "12",
             "--trainer.default_root_dir", "two", cwd=root)  # fmt: skip
    runs["two"] = last_checkpoint(root / "two")
    noisecls("fit", *common, *DDP, "--trainer.max_steps", "6",
             "--trainer.default_root_dir", "half", cwd=root)  # fmt: skip
    half = next((root / "half").rglob("last.ckpt"))
    noisecls("fit", *common, *DDP, "--trainer.max_steps", "12", "--ckpt_path", str(half),
             "--trainer.default_root_dir", "resumed", cwd=root)  # fmt: skip
    runs["resumed"] = last_checkpoint(root / "resumed")
    runs["half"] = torch.load(half, map_location="cpu", weights_only=False)
    return runs


def test_ddm_two_processes_at_half_batch_end_at_the_one_process_weights(ddm_runs) -> None:
    one, two = ddm_runs["one"], ddm_runs["two"]
    assert one["global_step"] == 12
    # the last 6 steps moved the weights ~100x further than the two runs differ
    moved, differ = weight_distance(ddm_runs["half"], two), weight_distance(one, two)
    print(f"weights moved {moved:.2e} in 6 steps; 1 vs 2 processes differ by {differ:.2e}")
    assert moved > 1e-3 and differ < 1e-5
    assert_same_weights(one, two)


def test_ddp_run_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(
    ddm_runs,
) -> None:
    assert ddm_runs["half"]["global_step"] == 6
    assert_same_weights(ddm_runs["two"], ddm_runs["resumed"], rtol=1e-6, atol=1e-7)


# ---- CDM: the double backward through DDP's reducer ----------------------------------------
def test_cdm_double_backward_under_ddp_matches_one_process(tmp_path: Path) -> None:
    config = str(small_config("cdm_toy", tmp_path / "cdm.yaml", hidden=32, num_blocks=2))
    common = ("--config", config, "--data.init_args.batch_size", "32", "--trainer.max_steps",
              "6")  # fmt: skip
    noisecls("fit", *common, "--trainer.default_root_dir", "one", cwd=tmp_path)
    noisecls("fit", *common, *DDP, "--trainer.default_root_dir", "two", cwd=tmp_path)
    one, two = last_checkpoint(tmp_path / "one"), last_checkpoint(tmp_path / "two")
    # Adam at lr 1e-3 moves each weight ~1e-3 per step; reduction-order noise, which Adam's
    # normalisation amplifies in the logits head, measured 5e-6 after 6 steps.
    assert_same_weights(one, two, atol=3e-5)


# ---- CDL and Soft: state fitted at setup / fit start, validation callbacks -----------------
@pytest.mark.parametrize(
    "name", ["cdl_toy", pytest.param("soft_toy", marks=pytest.mark.slow)]
)  # soft_digits (DCT blur on images) is in the slow matrix too
def test_fit_under_ddp_with_validation_callbacks(name: str, tmp_path: Path) -> None:
    """Fit (EMA, checkpoints, the config's validation callbacks) on 2 processes: the ranks agree
    on every tensor at the start (the guard in on_train_start), validation metrics are logged
    once per validation, and the checkpoint holds EMA and raw weights."""
    config = yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text())
    callbacks = [c for c in config["trainer"]["callbacks"]
                 if not c["class_path"].endswith(("FIDCallback", "NLLCallback"))]  # fmt: skip
    path = small_config(name, tmp_path / f"{name}.yaml", callbacks=callbacks, hidden=32)
    noisecls("fit", "--config", str(path), *DDP, "--trainer.max_steps", "8",
             "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "4",
             "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "logs",
             cwd=tmp_path)  # fmt: skip
    checkpoint = last_checkpoint(tmp_path)
    assert checkpoint["global_step"] == 8
    assert "current_model_state" in checkpoint  # EMA ran: raw weights kept beside EMA ones
    metrics = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    assert "val/loss" in header
    val_rows = [row for row in metrics[1:] if row.split(",")[header.index("val/loss")]]
    assert len(val_rows) == 2  # steps 4 and 8, logged once (rank 0), not once per rank
    if name == "cdl_toy":  # the reference, and the per-term gradients outside DDP's reducer
        assert "cdl_reference" in checkpoint
        assert {"train/cdl_grad_ratio", "val/cdl_accuracy"} <= set(header)


# ---- the full matrix (slow): every CPU config through the CLI, as shipped ------------------
MATRIX_STEPS = ("--trainer.max_steps", "20", "--trainer.val_check_interval", "10")


@pytest.fixture(scope="module")
def matrix_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Working directory of the matrix: DG's configs read runs/ddm_{toy,digits} from it."""
    return tmp_path_factory.mktemp("matrix")


def ddp_fit_as_shipped(config: Path, cwd: Path, *extra: str) -> dict:
    """Fit the config on 2 processes with all its callbacks; its last checkpoint."""
    name = config.stem
    noisecls("fit", "--config", str(config), *DDP, *MATRIX_STEPS,
             "--trainer.default_root_dir", f"runs/{name}", *extra, cwd=cwd)  # fmt: skip
    checkpoint = last_checkpoint(cwd / "runs" / name)
    assert checkpoint["global_step"] == 20
    return checkpoint


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["ddm_toy", "ddm_digits", "cdm_toy", "cdm_digits", "cdl_toy", "cdl_digits", "soft_toy",
     "soft_digits"],
)  # fmt: skip
def test_every_cpu_config_fits_under_ddp(name: str, matrix_dir: Path) -> None:
    """EMA, the config's validation callbacks (denoising MSE, sample grids, FID / NLL where
    they run in validation) and checkpointing on 2 gloo processes."""
    checkpoint = ddp_fit_as_shipped(EXPERIMENTS / f"{name}.yaml", matrix_dir)
    assert "current_model_state" in checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("data", ["toy", "digits"])
def test_dg_pipeline_under_ddp(data: str, matrix_dir: Path) -> None:
    """The DG configs' pipeline on 2 processes: the score model's fake set written by DDP
    predict, the discriminator fitted by DDP against the frozen score model."""
    score_run = matrix_dir / "runs" / f"ddm_{data}"
    if not score_run.is_dir():
        ddp_fit_as_shipped(EXPERIMENTS / f"ddm_{data}.yaml", matrix_dir)
    (checkpoint,) = score_run.rglob("last.ckpt")
    noisecls("predict", "--config", str(EXPERIMENTS / f"ddm_{data}.yaml"), *DDP[:4],
             "--ckpt_path", str(checkpoint), "--model.init_args.predict.num_samples", "train",
             "--trainer.default_root_dir", f"runs/ddm_{data}", cwd=matrix_dir)  # fmt: skip
    config = yaml.safe_load((EXPERIMENTS / f"dg_{data}.yaml").read_text())
    config["model"]["init_args"]["score_run"] = str(score_run)
    path = matrix_dir / f"dg_{data}.yaml"
    path.write_text(yaml.safe_dump(config))
    ddp_fit_as_shipped(path, matrix_dir)


@pytest.mark.slow
def test_dg_feature_cache_is_built_once_and_shared_under_ddp(matrix_dir: Path) -> None:
    """dg_digits on the frozen score model's bottleneck features (as dg_cifar10), with the
    feature cache: the two ranks fill one cache entry together, then train on it."""
    score_run = matrix_dir / "runs" / "ddm_digits"
    if not (score_run / "samples").is_dir():
        test_dg_pipeline_under_ddp("digits", matrix_dir)
    config = yaml.safe_load((EXPERIMENTS / "dg_digits.yaml").read_text())
    model = config["model"]["init_args"]
    model.update(score_run=str(score_run), features_from_score=True,
                 feature_cache={"draws": 2, "directory": str(matrix_dir / "cache")})  # fmt: skip
    bottleneck = {"image_size": 4, "in_channels": 64, "channel_mult": [1],
                  "attention_resolutions": []}  # fmt: skip
    model["discriminator_net"]["init_args"].update(bottleneck)
    path = matrix_dir / "dg_digits_features.yaml"
    path.write_text(yaml.safe_dump(config))
    ddp_fit_as_shipped(path, matrix_dir)
    entries = [p for p in (matrix_dir / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file(), entries
    assert not list((matrix_dir / "cache").glob("*.partial"))
