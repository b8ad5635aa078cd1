"""One command for the cross-method digits table: every method trained and tested on the 8x8
digits at one shared step budget on the CPU, then ``noisecls compare``.

    python benchmarks/reproduce_digits.py                # the configs' budgets (4000 steps ...)
    python benchmarks/reproduce_digits.py --steps 1000   # one shared budget for every fit
    python benchmarks/reproduce_digits.py --steps 2000 --jobs 2   # two processes at once
    python benchmarks/reproduce_digits.py --steps 2 --fid-samples 50 --nll-examples 10 \\
        --sampler-steps 5 --fake-samples 100 --feature-epochs 1   # a smoke run (CI)

Rows (experiments/*_digits.yaml, shipped settings unless an option above shrinks them):

========================  ==================================================================
DDM                       ddm_digits.yaml
CDM                       cdm_digits.yaml
CDL                       cdl_digits.yaml from scratch
CDL fine-tune             cdl_digits.yaml from the DDM's last.ckpt (``init_from``)
DG guided / unguided      dg_digits.yaml, ``score_run`` the DDM run (its checkpoint and predict
                          samples); its best.ckpt; unguided: guidance weight 0
Soft momentum / naive     soft_digits.yaml; naive: ``sampler.name naive`` at test
========================  ==================================================================

Every run lives in ``--out/<row>`` (fit: ``<row>/lightning_logs/version_0``; tests:
``<row>/test...``); finished steps are skipped when the command is repeated (a fit with a
``last.ckpt``, a test with a ``results.json``; predict resumes by itself). The table goes to
``--out/compare/compare.md`` with plots, and ``--out/reproduce.md`` adds date, commit and options.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


@dataclass
class Row:
    """One row of the table: a fit (or a reused one) and a test of its last.ckpt."""

    label: str
    config: str
    fit_args: list[str] = field(default_factory=list)
    test_args: list[str] = field(default_factory=list)
    fit_from: str | None = None  # reuse another row's fit
    checkpoint: str = "last.ckpt"  # tested if the fit wrote it (else last.ckpt)
    sampler_override: bool = True  # --sampler-steps applies (DG guides with the fake set's)


DDM = Row("ddm", "ddm_digits")


def rows_after_ddm(ddm_dir: Path, ddm_ckpt: Path) -> list[Row]:
    """The rows that start from the DDM (the CDL fine-tune from its checkpoint; DG guides the
    DDM run ``ddm_dir``: its checkpoint and its predict samples in ``ddm_dir/samples``)."""
    dg = ["--model.init_args.score_run", str(ddm_dir)]
    return [
        Row("dg_guided", "dg_digits", dg, checkpoint="best.ckpt", sampler_override=False),
        Row(
            "dg_unguided",
            "dg_digits",
            dg,
            ["--model.init_args.guidance.weight", "0"],
            fit_from="dg_guided",
            checkpoint="best.ckpt",
            sampler_override=False,
        ),
        Row("cdl_finetune", "cdl_digits", ["--model.init_args.init_from", str(ddm_ckpt)]),
    ]


# rows that need nothing from the DDM, one chain per list (a row may reuse its chain's fits)
INDEPENDENT = [
    [Row("cdm", "cdm_digits")],
    [Row("cdl", "cdl_digits")],
    [
        Row("soft_momentum", "soft_digits"),
        Row(
            "soft_naive",
            "soft_digits",
            test_args=["--model.init_args.sampler.name", "naive"],
            fit_from="soft_momentum",
        ),
    ],
]
ROW_ORDER = ["ddm", "cdm", "cdl", "cdl_finetune", "dg_guided", "dg_unguided", "soft_momentum",
             "soft_naive"]  # fmt: skip


def noisecls(*args: str, cwd: Path, log: Path | None = None) -> None:
    """Run one CLI command, its output to this terminal (or appended to ``log``); stop the whole
    run if it fails."""
    print("$ noisecls " + " ".join(args), flush=True)
    start = time.perf_counter()
    command = [sys.executable, "-m", "noisecls.cli", *args]
    if log is None:
        done = subprocess.run(command, cwd=cwd)
    else:
        with log.open("a") as stream:
            done = subprocess.run(command, cwd=cwd, stdout=stream, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        where = f", its output in {log}" if log else ""
        sys.exit(f"reproduce_digits: `noisecls {args[0]}` failed (exit {done.returncode}{where})")
    print(f"  ({time.perf_counter() - start:.0f} s{f', {log.name}' if log else ''})", flush=True)


def last_checkpoint(run: Path, name: str = "last.ckpt") -> Path | None:
    """The newest ``name`` of a fit directory (else its newest last.ckpt; None if neither)."""
    found = sorted(run.glob(f"lightning_logs/version_*/checkpoints/{name}"))
    if not found and name != "last.ckpt":
        return last_checkpoint(run)
    return found[-1] if found else None


def shrunk_config(name: str, args: argparse.Namespace, out: Path) -> Path:
    """experiments/<name>.yaml, or a copy with the evaluation callbacks shrunk by the options
    (callback lists cannot be edited item by item from the command line)."""
    source = EXPERIMENTS / f"{name}.yaml"
    sizes: dict[str, dict] = {}
    if args.fid_samples:
        sizes["FIDCallback"] = {"num_samples": args.fid_samples,
                                "batch_size": min(250, args.fid_samples),
                                "kid_subset_size": max(2, args.fid_samples // 2)}  # fmt: skip
    if args.nll_examples:
        sizes["NLLCallback"] = {"num_samples": args.nll_examples}
        sizes["DenoisingMSECallback"] = {"num_samples": args.nll_examples}
    if not sizes and args.feature_epochs is None:
        return source
    config = yaml.safe_load(source.read_text())
    for callback in config["trainer"]["callbacks"]:
        kind = callback["class_path"].rsplit(".", 1)[-1]
        callback.setdefault("init_args", {}).update(sizes.get(kind, {}))
        if kind == "FIDCallback" and args.feature_epochs is not None:
            extractor = callback["init_args"]["feature_extractor"]
            extractor.setdefault("init_args", {})["train_epochs"] = args.feature_epochs
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def common_args(row: Row, args: argparse.Namespace, out: Path) -> list[str]:
    """--config (shrunk if asked), --wandb and the sampler override of a row's commands."""
    config = str(shrunk_config(row.config, args, out))
    common = ["--config", config, "--wandb", str(not args.no_wandb).lower()]
    if row.sampler_override and args.sampler_steps:
        common += ["--model.init_args.sampler.num_steps", str(args.sampler_steps)]
    return common


def run_row(row: Row, args: argparse.Namespace, out: Path) -> Path:
    """Fit (unless reused or done) and test one row; returns its test directory."""
    common = common_args(row, args, out)
    log = out / "logs" / f"{row.label}.log" if args.jobs > 1 else None
    fit_dir = out / (row.fit_from or row.label)
    if row.fit_from is None and last_checkpoint(fit_dir) is None:
        steps = ["--trainer.max_steps", str(args.steps)] if args.steps else []
        noisecls("fit", *common, *row.fit_args, *steps, "--trainer.default_root_dir",
                 str(fit_dir), cwd=out, log=log)  # fmt: skip
    ckpt = last_checkpoint(fit_dir, row.checkpoint)
    if ckpt is None:
        sys.exit(f"reproduce_digits: no last.ckpt under {fit_dir}")
    test_dir = out / row.label / "test"
    if not list(test_dir.rglob("results.json")):
        noisecls("test", *common, *row.fit_args, *row.test_args, "--ckpt_path", str(ckpt),
                 "--trainer.default_root_dir", str(test_dir), cwd=out, log=log)  # fmt: skip
    return test_dir


def ddm_chain(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    """The DDM, its fake set (``predict``), then the rows that start from it: DG guided /
    unguided on its samples and the CDL fine-tune of its checkpoint."""
    tests = {DDM.label: run_row(DDM, args, out)}
    ddm_dir = out / DDM.label
    ddm_ckpt = last_checkpoint(ddm_dir)
    if not (ddm_dir / "samples" / "manifest.json").is_file():
        log = out / "logs" / "ddm.log" if args.jobs > 1 else None
        noisecls("predict", *common_args(DDM, args, out), "--ckpt_path", str(ddm_ckpt),
                 "--model.init_args.predict.num_samples", str(args.fake_samples),
                 "--trainer.default_root_dir", str(ddm_dir), cwd=out, log=log)  # fmt: skip
    for row in rows_after_ddm(ddm_dir, ddm_ckpt):
        tests[row.label] = run_row(row, args, out)
    return tests


def independent_chain(rows: list[Row], args: argparse.Namespace, out: Path) -> dict[str, Path]:
    """Rows that need nothing from the DDM, in order (a row may reuse an earlier one's fit)."""
    return {row.label: run_row(row, args, out) for row in rows}


def run_all(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    """Every row's test directory, in the table's order. With ``--jobs N`` up to N chains run at
    once (each CLI process with cpu_count / N torch threads unless OMP_NUM_THREADS is set);
    chains in the order that keeps two workers busy about equally on the digits budgets."""
    chains = [lambda: ddm_chain(args, out)]
    chains += [lambda rows=rows: independent_chain(rows, args, out) for rows in INDEPENDENT]
    if args.jobs > 1:
        (out / "logs").mkdir(exist_ok=True)
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done: dict[str, Path] = {}
        for tests in pool.map(lambda chain: chain(), chains):
            done |= tests
    return {label: done[label] for label in ROW_ORDER}


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="training steps of every fit (default: each "
                        "config's max_steps)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce_digits"))
    parser.add_argument("--fid-samples", type=int, help="FID/KID samples (default: config's)")
    parser.add_argument("--nll-examples", type=int, help="held-out examples for NLL and MSE")
    parser.add_argument("--sampler-steps", type=int, help="sampler steps at test (not DG's)")
    parser.add_argument("--fake-samples", default="train", help="DG's fake set size (default: "
                        "as many as the training digits)")  # fmt: skip
    parser.add_argument("--feature-epochs", type=int, help="DigitsFeatures training epochs")
    parser.add_argument("--no-wandb", action="store_true", help="CSV logs only")
    parser.add_argument("--jobs", type=int, default=1, help="CLI processes at once (their "
                        "output then goes to --out/logs/<row>.log)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    tests = run_all(args, out)

    compare_dir = out / "compare"
    noisecls("compare", *map(str, tests.values()), "--labels", *tests, "--out", str(compare_dir),
             cwd=out)  # fmt: skip
    minutes = (time.perf_counter() - started) / 60
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_minutes = (children.ru_utime + children.ru_stime) / 60
    options = " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    header = (
        f"Digits, every method on the CPU ({os.cpu_count()} cores): `python "
        f"benchmarks/reproduce_digits.py {options}`, steps per fit: "
        f"{args.steps or 'as in the configs'}, run {dt.date.today().isoformat()} at commit "
        f"{git_commit()}, {minutes:.0f} minutes wall, {cpu_minutes:.0f} CPU-minutes in its "
        "processes (wall time on idle cores is about CPU-minutes / cores; other load on the "
        "machine stretches the wall time, not the CPU time).\n\n"
    )
    (out / "reproduce.md").write_text(header + (compare_dir / "compare.md").read_text())
    print(f"\nwrote {out / 'reproduce.md'} ({minutes:.1f} minutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
