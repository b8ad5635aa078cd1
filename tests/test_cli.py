"""`noisecls` end to end in subprocesses: fit / test / predict from the YAML files, config
round-trip, one-line errors, exact resume, non-finite loss."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "experiments" / "ddm_toy.yaml")
DIGITS = str(ROOT / "experiments" / "ddm_digits.yaml")
SMALL_TOY = [
    "--data.init_args.n_train", "1024", "--data.init_args.n_val", "256",
    "--data.init_args.n_test", "256", "--trainer.enable_progress_bar", "false",
]  # fmt: skip


def noisecls(
    *args: str, cwd: Path, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "noisecls.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def one_error_line(stderr: str) -> str:
    """The single error line (informational log lines such as "Seed set to 0" may precede it;
    no traceback may)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("noisecls: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def load_weights(ckpt: Path) -> tuple[dict, dict]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return state["state_dict"], state.get("current_model_state", {})


@pytest.fixture(scope="module")
def trained_toy(tmp_path_factory) -> tuple[Path, Path]:
    cwd = tmp_path_factory.mktemp("toy")
    out = noisecls(
        "fit", "--config", TOY, "--trainer.max_steps", "40", "--trainer.val_check_interval", "20",
        *SMALL_TOY, cwd=cwd,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    ckpts = sorted(cwd.glob("runs/ddm_toy/**/last.ckpt"))
    assert ckpts, list(cwd.rglob("*"))
    return cwd, ckpts[-1]


def test_fit_writes_ema_checkpoint(trained_toy):
    _, ckpt = trained_toy
    ema, raw = load_weights(ckpt)
    assert raw, "EMAWeightAveraging keeps the raw weights as current_model_state"
    key = next(k for k in ema if k.endswith("weight"))
    assert not torch.equal(ema[key], raw[key])


def test_test_and_predict_from_checkpoint(trained_toy):
    cwd, ckpt = trained_toy
    out = noisecls("test", "--config", TOY, "--ckpt_path", str(ckpt), *SMALL_TOY, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/loss" in out.stdout
    out = noisecls(
        "predict", "--config", TOY, "--ckpt_path", str(ckpt), *SMALL_TOY,
        "--model.init_args.predict.num_samples", "10", "--model.init_args.predict.batch_size", "4",
        cwd=cwd,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    shards = sorted(cwd.glob("runs/ddm_toy/samples/*.npz"))
    assert len(shards) == 3
    import numpy as np

    total = sum(np.load(s)["samples"].shape[0] for s in shards)
    assert total == 10


def test_print_config_round_trips(tmp_path):
    first = noisecls("fit", "--config", TOY, "--print_config", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (tmp_path / "resolved.yaml").write_text(first.stdout)
    second = noisecls("fit", "--config", "resolved.yaml", "--print_config", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert "noisecls.methods.DDM" in first.stdout and "ResidualMLP" in first.stdout


def test_wrong_config_key_is_one_line(tmp_path):
    out = noisecls("fit", "--config", TOY, "--model.init_args.learning_rat", "1", cwd=tmp_path)
    assert out.returncode == 2
    assert "learning_rat" in one_error_line(out.stderr)


def test_wrong_option_value_names_the_nested_key(tmp_path):
    """A value of the wrong type deep in the config is reported at its full key with what was
    expected, not as jsonargparse's nested Union dump."""
    out = noisecls("fit", "--config", TOY, "--model.init_args.predict.num_samples", "all",
                   cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2
    line = one_error_line(out.stderr)
    assert "model.predict.num_samples: expected <class 'int'> or typing.Literal['train']" in line
    assert "got all" in line and "Union" not in line


def test_missing_data_directory_is_one_line(tmp_path):
    out = noisecls(
        "fit", "--config", str(ROOT / "experiments" / "ddm_cifar10.yaml"),
        "--data.init_args.root", str(tmp_path / "nowhere"), "--trainer.accelerator", "cpu",
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode != 0
    line = one_error_line(out.stderr)
    assert "nowhere" in line and "download" in line


def test_incompatible_image_size_is_one_line(tmp_path):
    out = noisecls(
        "fit", "--config", DIGITS, "--model.init_args.net.init_args.image_size", "16",
        "--model.init_args.net.init_args.attention_resolutions", "[8]",
        "--trainer.max_steps", "1", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode != 0
    line = one_error_line(out.stderr)
    assert "(1, 8, 8)" in line and "16" in line
    # a network that cannot be built at all is refused before any data is read
    out = noisecls(
        "fit", "--config", DIGITS, "--model.init_args.net.init_args.image_size", "12",
        "--model.init_args.net.init_args.channel_mult", "[1, 2, 2, 2]", cwd=tmp_path,
    )  # fmt: skip
    assert "cannot be halved" in one_error_line(out.stderr)


def test_checkpoint_of_another_method_is_refused(trained_toy, tmp_path):
    _, ckpt = trained_toy
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["hyper_parameters"]["_class_path"] = "noisecls.methods.cdm.CDM"
    foreign = tmp_path / "foreign.ckpt"
    torch.save(state, foreign)
    out = noisecls("test", "--config", TOY, "--ckpt_path", str(foreign), *SMALL_TOY, cwd=tmp_path)
    assert out.returncode != 0
    assert "CDM" in one_error_line(out.stderr)


def test_resume_reaches_the_same_weights(tmp_path):
    common = [
        "--config", TOY, *SMALL_TOY, "--trainer.val_check_interval", "1.0",
        "--trainer.check_val_every_n_epoch", "1", "--data.init_args.batch_size", "256",
    ]  # fmt: skip
    full = noisecls(
        "fit", *common, "--trainer.max_steps", "16", "--trainer.default_root_dir", "full",
        cwd=tmp_path,
    )  # fmt: skip
    assert full.returncode == 0, full.stderr[-3000:]
    half = noisecls(
        "fit", *common, "--trainer.max_steps", "8", "--trainer.default_root_dir", "half",
        cwd=tmp_path,
    )  # fmt: skip
    assert half.returncode == 0, half.stderr[-3000:]
    mid = next((tmp_path / "half").rglob("last.ckpt"))
    resumed = noisecls(
        "fit", *common, "--trainer.max_steps", "16", "--trainer.default_root_dir", "resumed",
        "--ckpt_path", str(mid), cwd=tmp_path,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ema_a, raw_a = load_weights(next((tmp_path / "full").rglob("last.ckpt")))
    ema_b, raw_b = load_weights(next((tmp_path / "resumed").rglob("last.ckpt")))
    ema_mid, _ = load_weights(mid)
    for key in ema_a:
        assert torch.allclose(ema_a[key], ema_b[key], atol=1e-6), key
        assert torch.allclose(raw_a[key], raw_b[key], atol=1e-6), key
    assert any(not torch.equal(ema_a[k], ema_mid[k]) for k in ema_a)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    # Adam at lr 1e30: the first update makes the weights ~1e30, the next loss overflows. The
    # checkpoint saved after the first step (validation every step) must survive intact.
    out = noisecls(
        "fit", "--config", TOY, *SMALL_TOY, "--trainer.max_steps", "50",
        "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", "diverge",
        "--model.init_args.optimizer.init_args.lr", "1e30", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    assert "non-finite training loss" in one_error_line(out.stderr)
    saved = sorted((tmp_path / "diverge").rglob("*.ckpt"))
    assert saved, "a checkpoint from before the divergence must remain"
    for path in saved:
        state = torch.load(path, map_location="cpu", weights_only=False)
        assert 1 <= state["global_step"] < 50
        ema, raw = state["state_dict"], state["current_model_state"]
        assert all(
            torch.isfinite(v).all() for v in [*ema.values(), *raw.values()] if v.is_floating_point()
        )
    assert not list((tmp_path / "diverge").rglob("*.tmp*")), "no half-written files"


def test_wandb_logger_from_yaml_runs_offline(tmp_path):
    logger = tmp_path / "wandb_logger.yaml"
    logger.write_text(
        "trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.WandbLogger\n"
        "    init_args:\n      project: noisecls-test\n      save_dir: wandb_runs\n"
    )
    env_offline = {"WANDB_MODE": "offline"}
    out = noisecls(
        "fit", "--config", TOY, "--config", str(logger), *SMALL_TOY,
        "--trainer.max_steps", "5", cwd=tmp_path, env=env_offline,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "wandb_runs" / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1, list((tmp_path / "wandb_runs").rglob("*"))
    assert runs[0].stat().st_size > 0
