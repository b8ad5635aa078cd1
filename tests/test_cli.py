"""`noisecls` end to end in subprocesses: fit / test / predict from the YAML files, config
round-trip, one-line errors, exact resume, non-finite loss, default loggers (offline W&B),
progress lines and filtered warnings."""

from __future__ import annotations

import csv
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from noisecls.cli import _state_dict_mismatch, build_cli, main, read_checkpoint
from noisecls.errors import NoiseclsError
from noisecls.quiet import NEEDLESS_LOG_LINES, NEEDLESS_WARNINGS

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "experiments" / "ddm_toy.yaml")
DIGITS = str(ROOT / "experiments" / "ddm_digits.yaml")
SMALL_TOY = [
    "--data.init_args.n_train", "1024", "--data.init_args.n_val", "256",
    "--data.init_args.n_test", "256", "--trainer.enable_progress_bar", "false",
]  # fmt: skip


def noisecls(
    *args: str, cwd: Path, timeout: int = 300, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess:
    """Run the CLI (an ``env`` value of None removes that variable)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
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
    """A 40-step toy fit with the progress bar on (stdout is a pipe: plain lines) and Python's
    default warning filters (the CLI's own filters must hide the needless ones)."""
    cwd = tmp_path_factory.mktemp("toy")
    out = noisecls(
        "fit", "--config", TOY, "--trainer.max_steps", "40", "--trainer.val_check_interval", "20",
        *SMALL_TOY[:-2], cwd=cwd, env={"PYTHONWARNINGS": "default"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    ckpts = sorted(cwd.glob("runs/ddm_toy/**/last.ckpt"))
    assert ckpts, list(cwd.rglob("*"))
    # plain progress lines, the step budget counted (not Lightning's "Epoch 9/-2")
    assert re.search(r"^fit: step 40/40 \(100%\) · train/loss [0-9.]+ · .* it/s · elapsed "
                     r"\d:\d\d:\d\d · ETA 0:00:00$", out.stdout, re.M), out.stdout  # fmt: skip
    assert "/-2" not in out.stdout + out.stderr and "\x1b[" not in out.stdout
    assert re.search(r"^validation at step 20 \([0-9.]+ s\): val/loss", out.stdout, re.M)
    for needless in (*NEEDLESS_WARNINGS, *NEEDLESS_LOG_LINES):
        assert not re.search(needless.pattern, out.stdout + out.stderr), needless.pattern
    return cwd, ckpts[-1]


def test_fit_writes_ema_checkpoint(trained_toy):
    _, ckpt = trained_toy
    ema, raw = load_weights(ckpt)
    assert raw, "EMAWeightAveraging keeps the raw weights as current_model_state"
    key = next(k for k in ema if k.endswith("weight"))
    assert not torch.equal(ema[key], raw[key])


def test_test_and_predict_from_checkpoint(trained_toy):
    cwd, ckpt = trained_toy
    out = noisecls("test", "--config", TOY, "--ckpt_path", str(ckpt), *SMALL_TOY[:-2], cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/loss" in out.stdout
    # what test is doing and where its results went
    assert "test: computing FIDCallback, NLLCallback" in out.stdout
    fid = re.search(r"^test/fid = ([0-9.e+-]+) \(2000 samples, ddim\(50\), NFE 50, ", out.stdout,
                    re.M)  # fmt: skip
    assert fid, out.stdout
    (written,) = re.findall(r"^results: (\S+results.json) and (\S+results.md)$", out.stdout, re.M)
    results = json.loads((cwd / written[0]).read_text())
    record = next(r for r in results["records"] if r["metric"] == "test/fid")
    assert float(fid[1]) == pytest.approx(record["value"], rel=1e-5)
    # a sample plot of the test run beside results.md
    assert list((cwd / written[1]).parent.glob("samples/test_*.png"))
    assert results["checkpoint_step"] == 40
    # compare (dispatched by the noisecls entry point) reads it back into one row
    compared = noisecls("compare", str(cwd / written[0]), "--out", "cmp", cwd=cwd)
    assert compared.returncode == 0, compared.stderr
    row = next(line for line in compared.stdout.splitlines() if line.startswith("| version_"))
    assert f"| {float(fid[1]):.4g} |" in row and "| DDM | 40 | ddim(50) | 50 |" in row
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
    line = one_error_line(out.stderr)
    assert "is a checkpoint of another method: CDM" in line and "model is DDM" in line
    assert f"--config {ROOT / 'experiments' / 'cdm_toy.yaml'}" in line


def test_unreadable_checkpoints_are_one_line(trained_toy, tmp_path):
    _, ckpt = trained_toy
    data = ckpt.read_bytes()
    cases = {"truncated.ckpt": data[: len(data) // 2], "garbage.ckpt": b"not a checkpoint\n",
             "empty.ckpt": b""}  # fmt: skip
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(NoiseclsError, match="truncated or corrupt") as err:
            read_checkpoint(tmp_path / name)
        assert "\n" not in str(err.value) and len(str(err.value)) < 300, str(err.value)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(NoiseclsError, match="not a Lightning checkpoint"):
        read_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(NoiseclsError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_fid_and_compare_subcommands_dispatch(capsys):
    for name, own_option in (("fid", "--kid-subset-size"), ("compare", "--labels")):
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        assert f"noisecls {name}" in (text := capsys.readouterr().out) and own_option in text


def test_state_dict_mismatch_is_one_line():
    small, large = torch.nn.Linear(3, 4), torch.nn.Linear(5, 4)
    with pytest.raises(RuntimeError) as err:
        large.load_state_dict(small.state_dict())
    message = _state_dict_mismatch(err.value, "a.ckpt")
    assert "\n" not in message
    assert "size mismatch for weight: checkpoint [4, 3] vs model [4, 5]" in message
    assert message.startswith("checkpoint a.ckpt does not fit the configured network")


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


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file (``run-*.wandb``: wandb's LevelDB-style log of
    32 KiB blocks, a 7-byte file header ``:W&B`` + magic 0xBEE1, records with 7-byte headers
    (crc32, length, type 1 full / 2 first / 3 middle / 4 last))."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7])[:2] == (b":W&B", 0xBEE1)
    pos, parts, records = 7, [], []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(b"".join(parts)))
            parts = []
    return records


def test_default_loggers_follow_the_config():
    def loggers(*args: str) -> list:
        cli = build_cli(["--config", TOY, *args], run=False)
        return cli.trainer.loggers

    csv, wandb = loggers()
    assert isinstance(csv, CSVLogger) and isinstance(wandb, WandbLogger)
    init = wandb._wandb_init
    assert (init["project"], init["name"], init["group"], init["tags"]) == (
        "noisecls", "ddm_toy", "toy-gmm", ["DDM"])  # fmt: skip
    assert init["config"]["model"]["class_path"] == "noisecls.methods.DDM"
    assert "anonymous" not in init
    assert [type(lg) for lg in loggers("--wandb", "false")] == [CSVLogger]
    assert loggers("--trainer.logger", "false") == []
    (mine,) = loggers("--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "mine")
    assert isinstance(mine, CSVLogger) and mine.save_dir == "mine"


@pytest.mark.slow  # default-suite budget (CI: 15 min on 2 cores)
def test_default_wandb_run_is_offline_and_holds_the_metrics(tmp_path):
    out = noisecls(
        "fit", "--config", TOY, *SMALL_TOY, "--trainer.max_steps", "6",
        "--trainer.log_every_n_steps", "2", "--trainer.limit_val_batches", "0",
        cwd=tmp_path, env={"WANDB_MODE": None, "WANDB_API_KEY": None, "WANDB_SILENT": "true"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (run_file,) = (tmp_path / "runs" / "ddm_toy" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.run_group, run.job_type, list(run.tags)) == (
        "ddm_toy", "toy-gmm", "fit", ["DDM"])  # fmt: skip
    config = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in run.config.update}
    assert config["trainer"]["max_steps"] == 6 and config["data"]["init_args"]["n_train"] == 1024
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]  # fmt: skip
    losses = {h["trainer/global_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert sorted(losses) == [1, 3, 5] and all(0 < v < 100 for v in losses.values())
    # the CSV log of the same run holds the same losses
    with open(tmp_path / "runs/ddm_toy/lightning_logs/version_0/metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/loss")]
    assert {int(r["step"]): float(r["train/loss"]) for r in rows} == pytest.approx(losses)
