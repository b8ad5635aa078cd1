"""benchmarks/gpu_check.py: its synthetic data sets load through the real DataModules, a timed
run keeps the paper config's trainer settings, the budgets it projects, the CPU dry run
``--device cpu --tiny`` of every paper config (in this process, ~40 s on 2 busy cores), a failing
config's exit status, and (slow) the dry run as a command with the speed-option table."""

from __future__ import annotations

import copy
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets.cifar as torchvision_cifar
import yaml

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


@pytest.fixture
def synthetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> gpu_check.SyntheticData:
    """The script's data sets (4 images per CIFAR batch file) with its md5 replacement, undone
    after the test."""
    monkeypatch.setattr(torchvision_cifar, "check_integrity", torchvision_cifar.check_integrity)
    gpu_check.trust_synthetic_cifar()
    root = tmp_path / "data"
    return gpu_check.SyntheticData(
        gpu_check.write_cifar(root / "cifar10", 4),
        gpu_check.write_images(root / "celeba", 3, 178, 218),
        gpu_check.write_images(root / "images64", 3, 64, 64),
    )


def test_synthetic_cifar_is_read_by_torchvision_as_written(synthetic) -> None:
    data = torchvision_cifar.CIFAR10(str(synthetic.cifar), train=True)

    batch = pickle.loads((synthetic.cifar / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert len(data) == 5 * 4 and len(torchvision_cifar.CIFAR10(str(synthetic.cifar), False)) == 4
    image, label = data[0]
    expected = batch["data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(image), expected) and label == batch["labels"][0]


def test_timed_run_keeps_the_paper_trainer_settings(synthetic, tmp_path: Path) -> None:
    """ddm_cifar10's timed run keeps its precision, accumulation and SpeedOptions (compile off
    on a CPU), its data read from the synthetic set; a variant replaces precision and options."""
    config = yaml.safe_load((gpu_check.EXPERIMENTS / "ddm_cifar10.yaml").read_text())
    config["trainer"]["accumulate_grad_batches"] = 2
    args = gpu_check.argparse.Namespace(device="cpu", tiny=True)
    run = gpu_check.prepare(config, synthetic, args, gpu_check.PAPER, tmp_path / "a", 3)
    _, datamodule, trainer = gpu_check.build(run, tmp_path / "a")
    (speed,) = [c.config for c in trainer.callbacks if type(c).__name__ == "SpeedOptions"]
    assert trainer.precision == config["trainer"]["precision"] == "bf16-mixed"
    assert trainer.accumulate_grad_batches == 2 and trainer.max_steps == 3
    assert speed.tf32 and speed.channels_last and not speed.compile
    datamodule.setup("fit")
    assert (len(datamodule.train_set), len(datamodule.val_set)) == (5 * 4, 4)  # test_batch
    eager = gpu_check.prepare(config, synthetic, args, gpu_check.OPTION_VARIANTS[0], tmp_path, 3)
    assert eager["trainer"]["precision"] == "32-true"
    assert [c["init_args"] for c in eager["trainer"]["callbacks"]] == [{"compile": False}]


def test_paper_budgets_in_epochs_become_steps_at_the_global_batch() -> None:
    path = gpu_check.EXPERIMENTS / "dg_cifar10.yaml"
    config = yaml.safe_load(path.read_text())
    assert gpu_check.training_budget(config, path, 128) == 60 * 391  # ceil(50,000 / 128)
    path = gpu_check.EXPERIMENTS / "ddm_cifar10.yaml"
    assert gpu_check.training_budget(yaml.safe_load(path.read_text()), path, 128) == 800_000


def run_check(argv: list[str], capsys: pytest.CaptureFixture,
              monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:  # fmt: skip
    """gpu_check's command in this process (its md5 replacement undone afterwards): (exit
    status, standard output)."""
    monkeypatch.setattr(torchvision_cifar, "check_integrity", torchvision_cifar.check_integrity)
    with pytest.raises(SystemExit) as done:
        gpu_check.main(argv)
    return done.value.code, capsys.readouterr().out


def table_row(stem: str, out: str) -> re.Match | None:
    """The main table's row of a config: steps/s, img/s, peak MiB, sampling img/s, train h,
    50k FID h."""
    number = r" +([0-9.]+)"
    return re.search(rf"^{stem}{number * 6}$", out, re.MULTILINE)


def test_cpu_dry_run_runs_every_paper_config(capsys, monkeypatch) -> None:
    """``--device cpu --tiny``: exit status 0, a row with positive training and sampling rates
    for each paper config (DG's after its score run and fake set), the note saying that tiny
    numbers are a dry run, no speed-option table."""
    code, out = run_check(["--device", "cpu", "--tiny"], capsys, monkeypatch)
    configs = gpu_check.paper_configs()
    assert code == 0, out[-3000:]
    assert {path.stem.split("_")[0] for path in configs} == {"cdl", "cdm", "ddm", "dg", "soft"}
    for path in configs:
        row = table_row(path.stem, out)
        assert row and float(row[1]) > 0 and float(row[4]) > 0, path.stem
    assert gpu_check.TINY_NOTE in out and "ratio to float32 eager" not in out
    assert f"{len(configs)} configs in" in out and "; 0 failed" in out


def test_a_failing_config_fails_the_check(tmp_path: Path, capsys, monkeypatch) -> None:
    """A config the CLI rejects (an unknown key) and one that fails when training starts (a
    negative learning rate) each get a FAILED row, the check goes on to the next, and the exit
    status is 1."""
    base = yaml.safe_load((gpu_check.EXPERIMENTS / "ddm_cifar10.yaml").read_text())
    unknown_key, negative_lr = copy.deepcopy(base), copy.deepcopy(base)
    unknown_key["model"]["init_args"]["no_such_option"] = 1
    negative_lr["model"]["init_args"]["optimizer"]["init_args"]["lr"] = -1.0
    for stem, config in (("a_cifar10", unknown_key), ("b_cifar10", negative_lr)):
        (tmp_path / f"{stem}.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(gpu_check, "EXPERIMENTS", tmp_path)
    code, out = run_check(["--device", "cpu", "--tiny"], capsys, monkeypatch)
    assert code == 1
    assert re.search(r"^a_cifar10 +FAILED: ConfigRejectedError$", out, re.MULTILINE), out
    assert re.search(r"^b_cifar10 +FAILED: ValueError$", out, re.MULTILINE), out
    assert "2 configs in" in out and "; 2 failed" in out


@pytest.mark.slow
def test_cpu_dry_run_command_with_the_speed_option_table() -> None:
    """The command as a user runs it, with the speed-option table of ddm_cifar10 (compile is
    skipped on a CPU)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu", "--tiny",
         "--option-configs", "ddm_cifar10"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for path in gpu_check.paper_configs():
        row = table_row(path.stem, done.stdout)
        assert row and float(row[1]) > 0 and float(row[4]) > 0, path.stem
    for variant in ("float32 eager", "tf32", "bf16-mixed", "bf16 \\+ channels_last"):
        assert re.search(rf"^{variant} +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$", done.stdout,
                         re.MULTILINE), variant  # fmt: skip
    assert re.search(r"^bf16 \+ compile +skipped on CPU", done.stdout, re.MULTILINE)
