"""Does Discriminator Guidance improve samples? End to end through the CLI, as the configs'
headers run it (issue: "DG that improves samples").

``study`` — for each seed: train the score model (``ddm_<data>.yaml``, ``--score-steps``), write
its fake set (``noisecls predict``, as many samples as the training split), train the
discriminator (``dg_<data>.yaml`` with ``score_run``, ``--dg-steps``), then ``noisecls test`` of
best.ckpt (lowest held-out class-balanced BCE) at every guidance weight (0 = the score model
unguided). Prints and writes ``study.md`` / ``study.json``: FID (toy: Frechet distance of the
raw points) per weight, mean ± sd over seeds and the ratio to w = 0, and the discriminator's
held-out BCE / accuracy / ECE::

    python benchmarks/study_dg.py study --data toy --seeds 0 1 2
    python benchmarks/study_dg.py study --data digits --score-steps 1000 --seeds 0 1 2

``sweep`` — pick the guidance weight (and the window's end ``time_max``) of one trained DG on
validation samples, as the paper picks w: the DG config's FID at each setting with the FID
callback's sample seed set to 1 (the reported test uses 0: samples it never sees), one table
setting x FID / KID (``sweep.md``)::

    python benchmarks/study_dg.py sweep --config experiments/dg_digits.yaml \\
        --ckpt runs/dg_digits/lightning_logs/version_0/checkpoints/best.ckpt --weights 0 1 2 4 \\
        --time-max 1 0.5 0.2

Nothing is tuned to make DG win: the configs are the shipped ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml
from cli_runs import EXPERIMENTS, has_checkpoint, newest_checkpoint, noisecls, read_results

SAMPLE_METRICS = ("fid", "kid")


def weight_args(config: dict, weight: float, time_max: float | None = None) -> list[str]:
    """Command-line options setting the guidance weight w (and the window's time_max when
    given); Heun's corrector weight follows w when the config ties them (equal there), else it
    keeps its value."""
    guidance = config["model"]["init_args"].get("guidance", {})
    args = ["--model.init_args.guidance.weight", str(weight)]
    if guidance.get("second_order_weight") == guidance.get("weight", 2.0):
        args += ["--model.init_args.guidance.second_order_weight", str(weight)]
    if time_max is not None:
        args += ["--model.init_args.guidance.time_max", str(time_max)]
    return args


def label(weight: float, time_max: float | None) -> str:
    return f"w{weight:g}" + ("" if time_max is None else f"_tmax{time_max:g}")


def sample_metrics(run: Path, stage: str) -> dict[str, float]:
    """FID / KID (and their NFE) of the newest results under run."""
    return {k: v for k, v in read_results(run).items()
            if k.split("/")[0] == stage and k.split("/")[1] in SAMPLE_METRICS}  # fmt: skip


def validation_config(config_path: Path, out: Path) -> Path:
    """The DG config with only the sample metrics and the FID callback's seed set to 1 (samples
    other than the test's)."""
    config = yaml.safe_load(config_path.read_text())
    keep = ("FIDCallback", "ResultsWriter")
    callbacks = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(keep)]
    for c in callbacks:
        if c["class_path"].endswith("FIDCallback"):
            c.setdefault("init_args", {})["seed"] = 1
    config["trainer"]["callbacks"] = callbacks
    path = out / f"validate_{config_path.name}"
    path.write_text(yaml.safe_dump(config))
    return path


def sweep(
    config: Path, ckpt: Path, weights: list[float], time_maxes: list[float | None], out: Path,
    extra: list[str],
) -> dict:  # fmt: skip
    """ckpt at each (weight, time_max) with the validation samples (``noisecls test`` of
    :func:`validation_config`, whose FID samples come from seed 1): {label: {metric: value}}."""
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(config.read_text())
    validate = validation_config(config, out)
    table = {}
    for w in weights:
        for t in time_maxes if w else [None]:
            run = out / label(w, t)
            if not any(run.rglob("results.json")):
                noisecls("test", "--config", str(validate), "--ckpt_path", str(ckpt),
                         *weight_args(base, w, t), "--trainer.default_root_dir", str(run),
                         *extra, cwd=out)  # fmt: skip
            table[label(w, t)] = sample_metrics(run, "test")
    return table


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> dict:
    """Score model, fake set, discriminator and the guided tests of one seed."""
    score_config, dg_config = (EXPERIMENTS / f"{n}_{args.data}.yaml" for n in ("ddm", "dg"))
    seeds = ["--seed_everything", str(seed), "--model.init_args.seed", str(seed)]
    score = out / f"score_seed{seed}"
    if not has_checkpoint(score):
        noisecls("fit", "--config", str(score_config), *seeds, "--trainer.max_steps",
                 str(args.score_steps), "--trainer.default_root_dir", str(score),
                 cwd=out)  # fmt: skip
    if not (score / "samples" / "manifest.json").is_file():
        noisecls("predict", "--config", str(score_config), "--ckpt_path",
                 str(newest_checkpoint(score)), "--trainer.default_root_dir", str(score),
                 "--model.init_args.predict.num_samples", "train", cwd=out)  # fmt: skip
    dg = out / f"dg_seed{seed}"
    common = ["--config", str(dg_config), "--model.init_args.score_run", str(score)]
    if not has_checkpoint(dg, "best.ckpt"):
        noisecls("fit", *common, *seeds, "--trainer.max_steps", str(args.dg_steps),
                 "--trainer.default_root_dir", str(dg), cwd=out)  # fmt: skip
    best = newest_checkpoint(dg, "best.ckpt")
    config = yaml.safe_load(dg_config.read_text())
    result: dict = {"discriminator": {}, "weights": {}}
    for w in args.weights:
        time_max = args.time_max if w else None
        test = dg / f"test_{label(w, time_max)}"
        if not any(test.rglob("results.json")):
            noisecls("test", *common, "--ckpt_path", str(best), *weight_args(config, w, time_max),
                     "--trainer.default_root_dir", str(test), cwd=out)  # fmt: skip
        found = read_results(test)
        result["weights"][w] = sample_metrics(test, "test")
        result["discriminator"] = {k: v for k, v in found.items()
                                   if k in ("test/loss", "test/acc", "test/ece")}  # fmt: skip
    return result


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} ± {sd:.2g}"


def study_markdown(per_seed: list[dict], weights: list[float]) -> str:
    """Sample metrics per weight (mean ± sd over seeds, ratio of means to w = 0) and the
    discriminators' held-out test metrics."""
    metrics = sorted(k for k in per_seed[0]["weights"][weights[0]] if not k.endswith("/nfe"))
    lines = ["| w | " + " | ".join(metrics) + " | " + " | ".join(f"{m} / w=0" for m in metrics)
             + " |", "|---" * (1 + 2 * len(metrics)) + "|"]  # fmt: skip
    for w in weights:
        cells = [mean_sd([s["weights"][w][m] for s in per_seed]) for m in metrics]
        ratios = [statistics.mean(s["weights"][w][m] for s in per_seed)
                  / statistics.mean(s["weights"][weights[0]][m] for s in per_seed)
                  for m in metrics]  # fmt: skip
        lines.append(f"| {w:g} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{r:.3f}" for r in ratios) + " |")  # fmt: skip
    keys = sorted(per_seed[0]["discriminator"])
    lines += ["", "| discriminator (best.ckpt, test split) | " + " | ".join(keys) + " |",
              "|---" * (1 + len(keys)) + "|",
              "| mean ± sd | " + " | ".join(mean_sd([s["discriminator"][k] for s in per_seed])
                                           for k in keys) + " |"]  # fmt: skip
    return "\n".join(lines) + "\n"


def sweep_markdown(table: dict) -> str:
    metrics = sorted(next(iter(table.values())))
    lines = ["| guidance | " + " | ".join(metrics) + " |", "|---" * (1 + len(metrics)) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[m]:.4g}" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    study = sub.add_parser("study", help="score model -> fake set -> DG -> tests, per seed")
    study.add_argument("--data", choices=["toy", "digits"], required=True)
    study.add_argument("--score-steps", type=int, help="default: the DDM config's max_steps")
    study.add_argument("--dg-steps", type=int, help="default: the DG config's max_steps")
    study.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    study.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    study.add_argument("--time-max", type=float, help="guidance window end (default: config's)")
    study.add_argument("--out", type=Path, default=Path("runs/study_dg"))
    grid = sub.add_parser("sweep", help="guidance weight x FID/KID on validation samples")
    grid.add_argument("--config", type=Path, required=True)
    grid.add_argument("--ckpt", type=Path, required=True)
    grid.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    grid.add_argument("--time-max", type=float, nargs="+", default=[None],
                      help="guidance window ends to try with every weight > 0")  # fmt: skip
    grid.add_argument("--out", type=Path, default=Path("runs/dg_sweep"))
    args, extra = parser.parse_known_args()
    out = args.out.resolve()
    if args.command == "sweep":
        table = sweep(args.config.resolve(), args.ckpt.resolve(), args.weights, args.time_max, out,
                      extra)  # fmt: skip
        text = sweep_markdown(table)
        (out / "sweep.md").write_text(text)
        print(text)
        return
    for name, key in (("ddm", "score_steps"), ("dg", "dg_steps")):
        if getattr(args, key) is None:
            config = yaml.safe_load((EXPERIMENTS / f"{name}_{args.data}.yaml").read_text())
            setattr(args, key, config["trainer"]["max_steps"])
    out = out / args.data
    out.mkdir(parents=True, exist_ok=True)
    per_seed = [run_seed(args, s, out) for s in args.seeds]
    text = study_markdown(per_seed, args.weights)
    (out / "study.md").write_text(text)
    (out / "study.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                "per_seed": per_seed}, indent=1))  # fmt: skip
    print(f"\nDG on {args.data}: score model {args.score_steps} steps, discriminator "
          f"{args.dg_steps} steps, seeds {args.seeds}\n{text}")  # fmt: skip


if __name__ == "__main__":
    main()
