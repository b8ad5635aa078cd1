"""The evaluation protocol end to end on the real digits, through the `noisecls` command:
`fit --config experiments/ddm_digits.yaml` (shrunk from the command line), then `test
--ckpt_path` in one process and in two CPU DDP processes (gloo): results.json / results.md hold
FID, KID, NLL bits/dim and denoising MSE; DDP gives the same numbers with every sample counted
once."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from noisecls.callbacks import DigitsFeatures, FIDCallback
from noisecls.data import DigitsDataModule

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "ddm_digits.yaml"
#: evaluation sizes for the test runs (the shipped config uses 1000 samples, all held-out data)
FID_SAMPLES, NLL_EXAMPLES, MSE_EXAMPLES = 200, 40, 100
FEATURE_EPOCHS = 10  # DigitsFeatures training recipe for these runs (the config's: 30 epochs)


def noisecls(*args: str, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {
        **os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore",
        "NOISECLS_CACHE_DIR": str(cwd / "cache"), "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "noisecls.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def small_evaluation_config(path: Path) -> Path:
    """experiments/ddm_digits.yaml with the evaluation callbacks' sizes reduced (lists of
    callbacks cannot be edited item by item from the command line)."""
    config = yaml.safe_load(DIGITS.read_text())
    sizes = {
        "FIDCallback": {"num_samples": FID_SAMPLES, "batch_size": 64, "kid_subset_size": 100,
                        "kid_subsets": 10},
        "NLLCallback": {"num_samples": NLL_EXAMPLES, "batch_size": 16, "num_steps": 8},
        "DenoisingMSECallback": {"num_samples": MSE_EXAMPLES, "batch_size": 32},
    }  # fmt: skip
    for callback in config["trainer"]["callbacks"]:
        name = callback["class_path"].rsplit(".", 1)[-1]
        callback.setdefault("init_args", {}).update(sizes.get(name, {}))
        if name == "FIDCallback":
            extractor = callback["init_args"]["feature_extractor"]
            extractor.setdefault("init_args", {})["train_epochs"] = FEATURE_EPOCHS
    path.write_text(yaml.safe_dump(config))
    return path


def results(log_dir: Path) -> tuple[dict, dict[str, dict], list[str]]:
    payload = json.loads((log_dir / "results.json").read_text())
    records = {r["metric"]: r for r in payload["records"]}
    return payload, records, (log_dir / "results.md").read_text().splitlines()


class UniformNoise(L.LightningModule):
    """'Generates' uniform noise of the digits' shape: the far end of the FID scale."""

    def test_step(self, batch: object, batch_idx: int) -> None:
        return None

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cwd = tmp_path_factory.mktemp("digits_eval")
    quiet = ["--trainer.enable_progress_bar", "false"]
    fit = noisecls(
        "fit", "--config", str(DIGITS), "--trainer.max_steps", "33",
        "--trainer.check_val_every_n_epoch", "3", *quiet, cwd=cwd,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = next((cwd / "runs" / "ddm_digits").rglob("last.ckpt"))
    small = str(small_evaluation_config(cwd / "small.yaml"))
    common = ["--config", small, "--ckpt_path", str(ckpt), *quiet,
              "--model.init_args.sampler.num_steps", "10"]  # fmt: skip
    one = noisecls("test", *common, "--trainer.default_root_dir", "one", cwd=cwd)
    assert one.returncode == 0, one.stderr[-3000:]
    two = noisecls(
        "test", *common, "--trainer.default_root_dir", "two", "--trainer.strategy", "ddp",
        "--trainer.devices", "2", "--trainer.accelerator", "cpu", cwd=cwd,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    (one_dir,) = {p.parent for p in (cwd / "one").rglob("results.json")}
    (two_dir,) = {p.parent for p in (cwd / "two").rglob("results.json")}
    return {"cwd": cwd, "fit": ckpt.parents[1], "one": one_dir, "two": two_dir}


def test_fit_then_test_writes_the_results_file(evaluated: dict[str, Path]) -> None:
    # fit: validation every 3 epochs logs a sample grid (PNG without an image logger)
    assert list((evaluated["fit"] / "samples").glob("val_epoch0002_*.png"))
    payload, records, table = results(evaluated["one"])
    assert payload["world_size"] == 1 and payload["checkpoint"].endswith("last.ckpt")
    for name in ("test/fid", "test/kid", "test/kid_std"):
        r = records[name]
        assert r["samples"] == FID_SAMPLES and r["sampler"] == "ddim(10,clip=1)" and r["nfe"] == 10
    assert records["test/fid"]["value"] > 0 and math.isfinite(records["test/fid"]["value"])
    nll = records["test/nll_bpd"]
    assert nll["samples"] == NLL_EXAMPLES and nll["sampler"] == "ode(rk4,8,hutchinson,K=1)"
    assert nll["nfe"] == 4 * 8 and 0 < nll["value"] < 20
    curve = [r for name, r in records.items() if name.startswith("test/denoise_mse/sigma=")]
    assert len(curve) == 15 and all(r["samples"] == MSE_EXAMPLES for r in curve)
    # the denoising table and plot of the test run
    assert list((evaluated["one"] / "denoising_mse").glob("test_*.csv"))
    assert list((evaluated["one"] / "denoising_mse").glob("test_*.png"))
    # the Markdown table: the same metrics, with samples / sampler / NFE / seconds
    assert table[0] == "| metric | value | samples | sampler | NFE | seconds |"
    body = table[2 : table.index("")]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in body}
    assert "KID" in table[-1] and "feature space" in table[-1]  # the note under the table
    assert set(rows) == set(records)
    assert rows["test/fid"][2:5] == [str(FID_SAMPLES), "ddim(10,clip=1)", "10"]
    assert float(rows["test/fid"][1]) == pytest.approx(records["test/fid"]["value"], rel=1e-5)


def test_two_process_ddp_gives_the_same_numbers(evaluated: dict[str, Path]) -> None:
    payload, records, _ = results(evaluated["two"])
    _, single, _ = results(evaluated["one"])
    assert payload["world_size"] == 2
    names = [n for n in single if n != "test/loss"]  # loss: Lightning's own sharded loop
    assert len(names) == 3 + 1 + 15
    for name in names:
        assert records[name]["value"] == pytest.approx(single[name]["value"], rel=1e-9), name
        # each rank did part of the work and every sample / example was counted once
        split = records[name]["per_rank_samples"]
        assert len(split) == 2 and min(split) > 0, (name, split)
        assert sum(split) == records[name]["samples"] == single[name]["samples"], name
    assert records["test/fid"]["per_rank_samples"] == [128, 72]  # batches 0, 2 | 1, 3 of 64


def test_digits_features_are_a_real_digit_classifier(
    evaluated: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The feature network the runs trained (and cached) classifies held-out digits."""
    monkeypatch.setenv("NOISECLS_CACHE_DIR", str(evaluated["cwd"] / "cache"))
    features = DigitsFeatures(train_epochs=FEATURE_EPOCHS)
    assert features.weights_path.is_file()  # written once by the runs, read here
    dm = DigitsDataModule()
    dm.setup()
    accuracy = (features.logits(dm.test_set.x).argmax(1) == dm.test_set.y).float().mean()
    assert accuracy > 0.9, accuracy
    assert features(torch.zeros(3, 1, 8, 8)).shape == (3, 64)
    # the reference statistics `noisecls test` cached serve an in-process evaluation too
    cb = FIDCallback(num_samples=FID_SAMPLES, batch_size=64, kid_subset_size=100,
                     feature_extractor=features)  # fmt: skip
    trainer = L.Trainer(callbacks=[cb], logger=False, enable_progress_bar=False,
                        limit_test_batches=1, default_root_dir=str(evaluated["cwd"]))  # fmt: skip
    trainer.test(UniformNoise(), datamodule=dm, verbose=False)
    assert cb.last_result["real_stats_source"] == "cache"
    _, records, _ = results(evaluated["one"])
    assert cb.last_result["fid"] > records["test/fid"]["value"] > 0  # noise is farther still


@pytest.mark.slow
def test_trained_digits_model_beats_simple_baselines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """600 steps of the shipped digits config (~4 CPU minutes), evaluated with `noisecls test`:
    fewer bits/dim than the uniform distribution over the 17 levels, a lower denoising MSE than
    the best LINEAR denoiser (Wiener filter from the training covariance) up to sigma = 1, and
    samples far closer to the digits than noise is (same FID protocol)."""
    quiet = ["--trainer.enable_progress_bar", "false"]
    fit = noisecls("fit", "--config", str(DIGITS), "--trainer.max_steps", "600", *quiet,
                   cwd=tmp_path, timeout=1800)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    config = small_evaluation_config(tmp_path / "small.yaml")
    out = noisecls("test", "--config", str(config), "--ckpt_path", str(ckpt), *quiet,
                   "--trainer.default_root_dir", "eval", cwd=tmp_path, timeout=1800)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (log_dir,) = {p.parent for p in (tmp_path / "eval").rglob("results.json")}
    _, records, _ = results(log_dir)

    assert records["test/nll_bpd"]["value"] < math.log2(17) - 1  # measured: ~2.4

    dm = DigitsDataModule()
    eigenvalues = dm.train_covariance_eigenvalues()
    for sigma in (0.1, 0.2, 0.5, 1.0):
        wiener = (eigenvalues * sigma**2 / (eigenvalues + sigma**2)).mean().item()
        model = records[f"test/denoise_mse/sigma={sigma:g}"]["value"]
        assert model < wiener, (sigma, model, wiener)

    # the FID of uniform noise under the same protocol (extractor, reference statistics, count)
    monkeypatch.setenv("NOISECLS_CACHE_DIR", str(tmp_path / "cache"))
    cb = FIDCallback(num_samples=FID_SAMPLES, batch_size=64, kid_subset_size=100,
                     feature_extractor=DigitsFeatures(train_epochs=FEATURE_EPOCHS))  # fmt: skip
    trainer = L.Trainer(callbacks=[cb], logger=False, enable_progress_bar=False,
                        limit_test_batches=1, default_root_dir=str(tmp_path))  # fmt: skip
    trainer.test(UniformNoise(), datamodule=dm, verbose=False)
    assert cb.last_result["real_stats_source"] == "cache"  # the statistics the test run wrote
    assert records["test/fid"]["value"] < 0.3 * cb.last_result["fid"]
