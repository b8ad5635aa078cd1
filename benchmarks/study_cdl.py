"""CDL vs DDM at equal compute, through the CLI (issue: "an honest CDL-vs-DDM study").

From one trained DDM checkpoint (the base), for each seed: fine-tune N steps with CDL
(experiments/cdl_<data>.yaml, cdl_weight official) and, as the control, N steps of the same
module with cdl_weight 0 — the DDM continued with exactly the same optimizer, batches and
denoising noise, so the runs differ only by the contrastive term. Each checkpoint is then tested
with the config's callbacks plus:

* FID / KID (toy: Frechet distance of raw points) of DDIM-50 samples, sequential and parallel
  (Picard; ``sampler.parallel true``), and the parallel sampler's evaluations per sample
  (Picard sweeps x steps);
* ODE and ITD bits/dim of the test split (``nll`` and ``nll_itd``);
* denoising MSE on the data (x0 + sigma·eps) and off it (x0 + 1.5·sigma·eps, the denoiser told
  sigma: CDL's out-of-distribution claim).

    python benchmarks/study_cdl.py --data toy --base-steps 3000 --steps 1000 --seeds 0 1 2
    python benchmarks/study_cdl.py --data digits --base-steps 880 --steps 200 --seeds 0 1 2
    python benchmarks/study_cdl.py --data toy ... --cdl-weight 0.1   # a fixed 100x-official arm
    python benchmarks/study_cdl.py --data digits --base DEQ.ckpt --dequantize-train ...

``--dequantize-train`` (digits): both arms train on dequantized digits
(``data.init_args.dequantize_train``; give a base trained the same way) and FID scores the
samples quantized to the 17 levels (``FIDCallback(quantize_samples=true)``): the setting in
which the ITD and ODE likelihoods of one checkpoint agree (README, "ITD vs ODE").

Writes <out>/<data>/study.json and prints a table (mean ± sd over seeds, CDL/DDM ratio).
Nothing here is tuned to make CDL win: the configs are the shipped ones.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import yaml
from cli_runs import EXPERIMENTS, has_checkpoint, newest_checkpoint, noisecls, read_results

OOD_SCALE = 1.5


def test_config(data: str, out: Path, parallel: bool, dequantized: bool = False) -> Path:
    """cdl_<data>.yaml for testing: the config's callbacks (FID, NLL ODE + ITD, MSE) with every
    metric on in test, plus the off-distribution MSE; with ``parallel`` only the sample metric
    (FID / Frechet distance) under the Picard sampler."""
    config = yaml.safe_load((EXPERIMENTS / f"cdl_{data}.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    if parallel:
        keep = ("FIDCallback", "ResultsWriter")
        callbacks = [c for c in callbacks if c["class_path"].endswith(keep)]
        config["model"]["init_args"]["sampler"]["parallel"] = True
    else:
        mse = next(c for c in callbacks if c["class_path"].endswith("DenoisingMSECallback"))
        ood = {"class_path": mse["class_path"],
               "init_args": {**mse.get("init_args", {}), "noise_scale": OOD_SCALE}}  # fmt: skip
        callbacks = [*callbacks, ood]
    callbacks = [c for c in callbacks if not c["class_path"].endswith("SampleGridCallback")]
    if dequantized:
        fid = next(c for c in callbacks if c["class_path"].endswith("FIDCallback"))
        fid["init_args"] = {**fid.get("init_args", {}), "quantize_samples": True}
    config["trainer"]["callbacks"] = callbacks
    path = out / f"test_{data}{'_parallel' if parallel else ''}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_seed(
    data: str, base: Path, steps: int, seed: int, out: Path, cdl_weight: str, dequantized: bool
) -> dict[str, dict]:
    """Fine-tune CDL and continue the DDM from base for ``steps``; test both."""
    results = {}
    data_options = ["--data.init_args.dequantize_train", "true"] if dequantized else []
    for label, weight in (("CDL", cdl_weight), ("DDM", "0.0")):
        run = out / f"{label.lower()}_seed{seed}"
        if not has_checkpoint(run):
            noisecls("fit", "--config", str(EXPERIMENTS / f"cdl_{data}.yaml"),
                     "--model.init_args.init_from", str(base),
                     "--model.init_args.cdl_weight", weight, "--model.init_args.seed", str(seed),
                     "--seed_everything", str(seed), "--trainer.max_steps", str(steps),
                     "--trainer.default_root_dir", str(run), "--trainer.logger", "CSVLogger",
                     "--trainer.logger.save_dir", str(run / "logs"), *data_options,
                     cwd=out)  # fmt: skip
        ckpt = str(newest_checkpoint(run))
        metrics: dict[str, float] = {}
        for parallel in (False, True):
            test_dir = run / ("test_parallel" if parallel else "test")
            if not sorted(test_dir.rglob("results.json")):
                config = test_config(data, out, parallel, dequantized)
                noisecls("test", "--config", str(config), "--ckpt_path",
                         ckpt, "--trainer.default_root_dir", str(test_dir),
                         cwd=out)  # fmt: skip
            found = read_results(test_dir)
            if parallel:
                found = {
                    f"parallel {k}": v for k, v in found.items() if "fid" in k or "frechet" in k
                }
            metrics |= found
        results[label] = metrics
    return results


def summarise(per_seed: list[dict[str, dict]]) -> list[tuple[str, float, float, float, float]]:
    """(metric, DDM mean, DDM sd, CDL mean, CDL sd) for metrics both methods report."""
    rows = []
    keys = sorted(set(per_seed[0]["DDM"]) & set(per_seed[0]["CDL"]))
    # the oracle's curves and evaluation counts are the same for both: keep the sampler's NFE
    keys = [k for k in keys if "oracle" not in k and (not k.endswith("/nfe") or "parallel" in k)]
    for key in keys:
        ddm = [s["DDM"][key] for s in per_seed if key in s["DDM"]]
        cdl = [s["CDL"][key] for s in per_seed if key in s["CDL"]]
        sd = statistics.stdev if len(ddm) > 1 else (lambda v: 0.0)
        rows.append((key, statistics.mean(ddm), sd(ddm), statistics.mean(cdl), sd(cdl)))
    return rows


#: the rows of the README table (every metric is in study.json and the printed table)
HEADLINE = (
    "test/fid", "test/kid", "parallel test/fid", "parallel test/fid/nfe", "test/nll_bpd",
    "test/nll_itd_bpd", "test/denoise_mse/sigma=0.1", "test/denoise_mse/sigma=1",
    "test/denoise_mse_x1.5/sigma=0.1", "test/denoise_mse_x1.5/sigma=1", "test/cdl_accuracy",
    "test/cdl_loss",
)  # fmt: skip


def markdown(rows: list[tuple[str, float, float, float, float]]) -> str:
    """The headline rows as a markdown table (mean ± sd over seeds, CDL/DDM)."""
    lines = ["| metric | DDM continued | CDL fine-tuned | CDL/DDM |", "|---|---|---|---|"]
    for key, dm, ds, cm, cs in rows:
        if key in HEADLINE:
            ratio = cm / dm if dm else float("nan")
            lines.append(f"| {key} | {dm:.4g} ± {ds:.2g} | {cm:.4g} ± {cs:.2g} | {ratio:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["toy", "digits"], required=True)
    parser.add_argument("--base", type=Path, help="DDM checkpoint (default: train one)")
    parser.add_argument("--base-steps", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=500, help="fine-tuning steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/study_cdl"))
    parser.add_argument("--cdl-weight", default="official", help="the CDL arm's cdl_weight")
    parser.add_argument(
        "--dequantize-train",
        action="store_true",
        help="digits: train on dequantized data, FID of quantized samples",
    )
    args = parser.parse_args()
    if args.dequantize_train and args.data != "digits":
        parser.error("--dequantize-train is for --data digits (the toy is continuous)")
    out = (args.out / args.data).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = args.base
    if base is None:
        base_run = out / "base"
        if not has_checkpoint(base_run):
            deq = ["--data.init_args.dequantize_train", "true"] if args.dequantize_train else []
            noisecls("fit", "--config", str(EXPERIMENTS / f"ddm_{args.data}.yaml"), *deq,
                     "--trainer.max_steps", str(args.base_steps),
                     "--trainer.default_root_dir", str(base_run),
                     cwd=out)  # fmt: skip
        base = newest_checkpoint(base_run)
    per_seed = [
        run_seed(
            args.data, base.resolve(), args.steps, s, out, args.cdl_weight, args.dequantize_train
        )
        for s in args.seeds
    ]
    rows = summarise(per_seed)
    (out / "study.md").write_text(markdown(rows))
    (out / "study.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                "per_seed": per_seed}, indent=1))  # fmt: skip
    print(f"\nCDL (cdl_weight {args.cdl_weight}) vs DDM on {args.data}: {args.steps} steps from "
          f"{base.name}, seeds {args.seeds}")  # fmt: skip
    print(f"{'metric':<44}{'DDM':>22}{'CDL':>22}{'CDL/DDM':>9}")
    for key, dm, ds, cm, cs in rows:
        ratio = cm / dm if dm and math.isfinite(dm) else float("nan")
        print(f"{key:<44}{dm:>13.4g} ± {ds:<6.2g}{cm:>13.4g} ± {cs:<6.2g}{ratio:>9.3f}")


if __name__ == "__main__":
    main()
