"""CDM on the real 8x8 digits through the `noisecls` command: `fit --config
experiments/cdm_digits.yaml` (shrunk), then `test --ckpt_path`: results.json / results.md hold
FID / KID (digits features), the one-pass NLL in bits/dim (standard and paper convention) and the
denoising MSE per noise level, next to a DDM of the same backbone (experiments/ddm_digits.yaml)
in the slow test."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"cdm": ROOT / "experiments" / "cdm_digits.yaml",
           "ddm": ROOT / "experiments" / "ddm_digits.yaml"}  # fmt: skip
QUIET = ["--trainer.enable_progress_bar", "false"]
FEATURE_EPOCHS = 10  # DigitsFeatures training for these runs (the configs': 30 epochs)


def noisecls(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {
        **os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore",
        "NOISECLS_CACHE_DIR": str(cwd / "cache"), "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "noisecls.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def shrunk(config: Path, out: Path, fid_samples: int, examples: int) -> Path:
    """``config`` with the evaluation callbacks' sizes reduced (a list of callbacks cannot be
    edited item by item from the command line) and evaluation only in ``test``."""
    data = yaml.safe_load(config.read_text())
    sizes = {
        "FIDCallback": {"num_samples": fid_samples, "batch_size": 100, "kid_subset_size": 50,
                        "kid_subsets": 10},
        "NLLCallback": {"num_samples": examples, "batch_size": 100, "num_steps": 8},
        "DenoisingMSECallback": {"num_samples": examples, "batch_size": 100},
        "SampleGridCallback": {"num_samples": 16},
    }  # fmt: skip
    for callback in data["trainer"]["callbacks"]:
        name = callback["class_path"].rsplit(".", 1)[-1]
        args = callback.setdefault("init_args", {})
        args.update(sizes.get(name, {}))
        if name == "NLLCallback" and args.get("estimator") != "ode":
            args.pop("num_steps")  # CDM's one-pass estimator has no steps
        if "every_n_epochs" in args:
            args["every_n_epochs"] = 0
        if name == "FIDCallback":
            extractor = args["feature_extractor"]
            extractor.setdefault("init_args", {})["train_epochs"] = FEATURE_EPOCHS
    out.write_text(yaml.safe_dump(data))
    return out


def fit_and_test(
    method: str, cwd: Path, steps: int, fid_samples: int, examples: int, sampler_steps: int
) -> dict[str, dict]:
    """Fit ``method``'s digits config for ``steps`` steps, test its checkpoint; the records of
    results.json by metric."""
    config = shrunk(CONFIGS[method], cwd / f"{method}.yaml", fid_samples, examples)
    root = ["--trainer.default_root_dir", f"runs/{method}"]
    fit = noisecls(
        "fit", "--config", str(config), "--trainer.max_steps", str(steps),
        "--trainer.check_val_every_n_epoch", "1000", *root, *QUIET, cwd=cwd,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = next((cwd / "runs" / method).rglob("last.ckpt"))
    test = noisecls(
        "test", "--config", str(config), "--ckpt_path", str(ckpt), *root, *QUIET,
        "--model.init_args.sampler.num_steps", str(sampler_steps), cwd=cwd,
    )  # fmt: skip
    assert test.returncode == 0, test.stderr[-3000:]
    (results,) = (cwd / "runs" / method).rglob("results.json")
    payload = json.loads(results.read_text())
    assert payload["checkpoint"] == str(ckpt)
    assert (results.parent / "results.md").is_file()
    return {r["metric"]: r for r in payload["records"]}


def check_cdm_records(records: dict[str, dict], fid_samples: int, examples: int) -> None:
    for name in ("test/fid", "test/kid"):
        assert records[name]["samples"] == fid_samples and math.isfinite(records[name]["value"])
    nll = records["test/nll_bpd"]  # NLLCallback: CDM's one-pass estimate, dequantized
    assert nll["samples"] == examples and nll["sampler"] == "cdm(level=0)" and nll["nfe"] == 1
    assert 0 < nll["value"] < 50
    # the module's own per-batch logs: standard and paper convention (density at the pixel
    # values + log2(17 / 2) bits for the 17-level digits)
    assert math.isfinite(records["test/cdm_nll_bpd"]["value"])
    assert math.isfinite(records["test/cdm_nll_bpd_paper"]["value"])
    curve = [r for name, r in records.items() if name.startswith("test/denoise_mse/sigma=")]
    assert len(curve) == 15 and all(r["samples"] == examples for r in curve)


def test_fit_then_test_reports_fid_nll_and_denoising_mse(tmp_path):
    """A few steps of training (the default suite checks the wiring; -m slow trains for real)."""
    records = fit_and_test("cdm", tmp_path, steps=4, fid_samples=100, examples=100,
                           sampler_steps=5)  # fmt: skip
    check_cdm_records(records, 100, 100)
    assert records["test/fid"]["sampler"] == "ddim(5,clip=1)" and records["test/fid"]["nfe"] == 5


@pytest.mark.slow
def test_cdm_next_to_a_ddm_of_the_same_backbone(tmp_path):
    """Both digits configs, same U-Net trunk, steps and evaluation: the table of the two."""
    steps, fid_samples, examples = 400, 500, 180
    records = {
        m: fit_and_test(m, tmp_path, steps, fid_samples, examples, sampler_steps=50)
        for m in ("cdm", "ddm")
    }
    check_cdm_records(records["cdm"], fid_samples, examples)
    keys = ["test/fid", "test/kid", "test/nll_bpd", "test/cdm_nll_bpd_paper"] + [
        f"test/denoise_mse/sigma={s}" for s in ("0.1", "0.5", "1", "5")
    ]
    print(f"\n{'metric':<28}{'CDM':>12}{'DDM':>12}")
    for key in keys:
        row = [records[m].get(key, {}).get("value", float("nan")) for m in ("cdm", "ddm")]
        print(f"{key:<28}{row[0]:>12.4f}{row[1]:>12.4f}")
    for m in ("cdm", "ddm"):
        assert records[m]["test/fid"]["samples"] == fid_samples
        assert records[m]["test/nll_bpd"]["samples"] == examples
    # both learned to denoise: far below the identity denoiser's MSE sigma^2 at sigma = 1
    for m in ("cdm", "ddm"):
        assert records[m]["test/denoise_mse/sigma=1"]["value"] < 0.5
