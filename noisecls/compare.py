"""``noisecls compare RUN_DIR...``: the ``results.json`` of many test runs as one table and plots.

Each RUN_DIR is a results.json file or a directory searched for them (``noisecls test`` writes
one per log directory, see :class:`noisecls.callbacks.ResultsWriter`); every results.json found
is one row. Writes into ``--out`` (atomically):

* ``compare.md``: run | method | step | sampler | NFE | FID | KID | one column per NLL estimator
  (bits/dim), with the estimator settings; printed as well;
* ``compare.csv``: one row per run, every test metric as a column (plus its sampler and NFE);
* ``fid_vs_nfe.png`` (FID against denoiser evaluations per sample, one point per run),
  ``denoise_mse.png`` (denoising MSE against sigma, a line per run and noise scale),
  ``nll.png`` (NLL per estimator, a bar per run); a plot without data is not written;
* with ``--wandb``: the table and the plots to a W&B run (project ``noisecls``, job type
  ``compare``; offline unless ``WANDB_MODE`` says otherwise).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noisecls.errors import NoiseclsError

__all__ = ["Run", "find_results", "load_runs", "main", "markdown_table", "wide_csv", "write_all"]

RESULTS = "results.json"
_SIGMA = re.compile(r"^test/(?P<family>[^/]+)/sigma=(?P<sigma>[0-9.eE+-]+)$")
#: test metrics that are whole-model numbers worth a column of the Markdown table
_NLL = re.compile(r"^test/(?P<name>\w*nll\w*_bpd\w*)$")
KID_NOTE = (
    "KID: unbiased squared MMD of the cubic polynomial kernel (x·y/d + 1)³ in the FID "
    "callback's feature space; it scales with the features (DigitsFeatures: 1e3..1e6, Inception: "
    "1e-3..1e-1), so compare it only within one feature space. NFE: denoiser evaluations per "
    "sample."
)


@dataclass
class Run:
    """One test run: where its results.json is, its label and records keyed by metric."""

    label: str
    path: Path
    model: str
    checkpoint: str | None
    step: int | None
    records: dict[str, dict[str, Any]]

    @property
    def method(self) -> str:
        return self.model.rpartition(".")[2]

    def value(self, metric: str) -> float | None:
        """The metric's value (None when the run has none; "nan"/"inf" strings as floats)."""
        record = self.records.get(metric)
        return None if record is None else float(record["value"])


# ---------------------------------------------------------------------------------------- reading
def find_results(path: Path) -> list[Path]:
    """The results.json files of ``path`` (itself, or those below it, in path order)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise NoiseclsError(f"{path} does not exist; pass run directories or results.json files")
    found = sorted(path.rglob(RESULTS))
    if not found:
        raise NoiseclsError(
            f"{path} holds no {RESULTS}; run `noisecls test --ckpt_path <its last.ckpt>` first"
        )
    return found


def _label(run_dir: Path, results: Path, several: bool) -> str:
    """The run directory's name, plus the log directory below it when it holds several runs."""
    if results == run_dir:
        return results.parent.name
    if not several:
        return run_dir.resolve().name
    return f"{run_dir.resolve().name}/{results.parent.relative_to(run_dir).as_posix()}"


def read_run(path: Path, label: str) -> Run:
    """Parse one results.json (one-line error if it is not one)."""
    try:
        payload = json.loads(path.read_text())
        records = {str(r["metric"]): r for r in payload["records"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise NoiseclsError(
            f"{path} is not a results.json of `noisecls test` ({type(err).__name__}: {err}); "
            "remove it or run the test again"
        ) from err
    step = payload.get("checkpoint_step")
    return Run(label=label, path=path, model=str(payload.get("model", "")),
               checkpoint=payload.get("checkpoint"), step=None if step is None else int(step),
               records=records)  # fmt: skip


def load_runs(paths: Sequence[Path], labels: Sequence[str] | None = None) -> list[Run]:
    """Every results.json under ``paths`` as a :class:`Run` (``labels``: one per path, for runs
    whose directory names do not tell them apart)."""
    if labels is not None and len(labels) != len(paths):
        raise NoiseclsError(f"--labels gives {len(labels)} names for {len(paths)} run directories")
    runs = []
    for i, path in enumerate(paths):
        found = find_results(path)
        for results in found:
            label = _label(path, results, len(found) > 1)
            if labels is not None:
                label = labels[i] + label.partition("/")[1] + label.partition("/")[2]
            runs.append(read_run(results, label))
    return runs


# ---------------------------------------------------------------------------------------- tables
def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def nll_metrics(runs: Sequence[Run]) -> list[str]:
    """The NLL metrics (``test/..nll.._bpd..``) any run has, sorted."""
    return sorted({m for run in runs for m in run.records if _NLL.match(m)})


def markdown_table(runs: Sequence[Run]) -> str:
    """The headline table: a row per run; FID with its sampler and NFE, KID ± its std, one column
    per NLL estimator (value and estimator settings)."""
    nlls = nll_metrics(runs)
    header = ["run", "method", "step", "sampler", "NFE", "FID", "KID"]
    header += [f"{_NLL.match(m)['name']} (bits/dim)" for m in nlls]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for run in runs:
        fid = run.records.get("test/fid", {})
        kid, kid_std = run.value("test/kid"), run.value("test/kid_std")
        kid_text = _fmt(kid) + (f" ± {kid_std:.2g}" if kid is not None and kid_std else "")
        cells = [run.label, run.method, _fmt(run.step), _fmt(fid.get("sampler")),
                 _fmt(fid.get("nfe")), _fmt(run.value("test/fid")), kid_text]  # fmt: skip
        for metric in nlls:
            record = run.records.get(metric)
            if record is None:
                cells.append("")
                continue
            how = [_fmt(record.get("sampler")), f"NFE {record['nfe']}" if record.get("nfe") else ""]
            how = [h for h in how if h]
            cells.append(_fmt(run.value(metric)) + (f" ({', '.join(how)})" if how else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{KID_NOTE}\n"


def wide_csv(runs: Sequence[Run]) -> str:
    """Every test metric of every run: a row per run, a column per metric (and ``<metric>
    sampler`` / ``<metric> NFE`` for metrics computed by a sampler or estimator)."""
    metrics = sorted({m for run in runs for m in run.records})
    described = [m for m in metrics if any(r.records.get(m, {}).get("sampler") for r in runs)]
    header = ["run", "method", "step", "checkpoint", "results", *metrics]
    header += [f"{m} {what}" for m in described for what in ("sampler", "NFE")]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for run in runs:
        row = [run.label, run.method, run.step, run.checkpoint, str(run.path)]
        row += [run.value(m) for m in metrics]
        for m in described:
            record = run.records.get(m, {})
            row += [record.get("sampler"), record.get("nfe")]
        writer.writerow(["" if v is None else v for v in row])
    return out.getvalue()


# ---------------------------------------------------------------------------------------- plots
def _figure(width: float = 6.0, height: float = 4.0) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def fid_vs_nfe_figure(runs: Sequence[Run]) -> Any | None:
    """FID against NFE per sample, a labelled point per run (None: no run has both)."""
    points = [(run.label, float(r["nfe"]), float(r["value"])) for run in runs
              if (r := run.records.get("test/fid")) and r.get("nfe")]  # fmt: skip
    if not points:
        return None
    fig, ax = _figure()
    for label, nfe, fid in points:
        ax.scatter([nfe], [fid], s=30)
        ax.annotate(label, (nfe, fid), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (denoiser evaluations per sample)")
    ax.set_ylabel("FID")
    ax.set_title("FID vs NFE", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def denoising_curves(run: Run) -> dict[str, list[tuple[float, float]]]:
    """The run's denoising-MSE curves: family (``denoise_mse``, ``denoise_mse_x1.5``, ...) ->
    [(sigma, MSE)] sorted by sigma."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for metric, record in run.records.items():
        if (m := _SIGMA.match(metric)) and m["family"].startswith("denoise_mse"):
            curves.setdefault(m["family"], []).append((float(m["sigma"]), float(record["value"])))
    return {family: sorted(points) for family, points in sorted(curves.items())}


def denoising_figure(runs: Sequence[Run]) -> Any | None:
    """Denoising MSE against sigma (log-log), a line per run and curve family."""
    curves = [(run.label, family, points) for run in runs
              for family, points in denoising_curves(run).items()]  # fmt: skip
    if not curves:
        return None
    fig, ax = _figure()
    for label, family, points in curves:
        sigmas, mses = zip(*points, strict=True)
        style = "-" if family == "denoise_mse" else "--"
        name = label if family == "denoise_mse" else f"{label} ({family})"
        ax.plot(sigmas, mses, style, marker="o", markersize=3, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sigma (noise std, data in [-1, 1])")
    ax.set_ylabel("MSE of E[x0 | x0 + sigma·eps]")
    ax.set_title("denoising MSE vs sigma", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def nll_figure(runs: Sequence[Run]) -> Any | None:
    """NLL in bits/dim per estimator: grouped bars, a group per estimator, a bar per run."""
    metrics = nll_metrics(runs)
    if not metrics:
        return None
    fig, ax = _figure(max(6.0, 1.2 * len(metrics) * max(1, len(runs)) / 2), 4.0)
    width = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        xs = [j + i * width for j, m in enumerate(metrics) if m in run.records]
        ys = [run.value(m) for m in metrics if m in run.records]
        if xs:
            ax.bar(xs, ys, width=width, label=run.label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))])
    ax.set_xticklabels([_NLL.match(m)["name"] for m in metrics], fontsize=8)
    ax.set_ylabel("NLL (bits/dim)")
    ax.set_title("NLL per estimator", fontsize=10)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


FIGURES = {"fid_vs_nfe.png": fid_vs_nfe_figure, "denoise_mse.png": denoising_figure,
           "nll.png": nll_figure}  # fmt: skip


# ---------------------------------------------------------------------------------------- output
def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_all(runs: Sequence[Run], out_dir: Path) -> dict[str, Path]:
    """Write compare.md, compare.csv and the plots into ``out_dir``; returns name -> path."""
    from noisecls.callbacks.denoising import save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, text in (("compare.md", markdown_table(runs)), ("compare.csv", wide_csv(runs))):
        _atomic_write(out_dir / name, text)
        written[name] = out_dir / name
    for name, make in FIGURES.items():
        fig = make(runs)
        if fig is not None:
            save_figure(fig, out_dir / name)
            written[name] = out_dir / name
    return written


def log_to_wandb(runs: Sequence[Run], written: dict[str, Path], out_dir: Path) -> str:
    """The comparison as a W&B run (table ``compare/results`` and the plots); returns its
    directory. Offline unless ``WANDB_MODE`` is set."""
    from noisecls.run_loggers import WANDB_PROJECT, OfflineWandbLogger

    rows = list(csv.reader(io.StringIO(wide_csv(runs))))
    config = {"runs": [str(r.path) for r in runs]}
    logger = OfflineWandbLogger(
        save_dir=out_dir, project=WANDB_PROJECT, name="compare", job_type="compare",
        config=config,
    )  # fmt: skip
    logger.log_table(key="compare/results", columns=rows[0], data=rows[1:])
    for name, path in written.items():
        if name.endswith(".png"):
            logger.log_image(key=f"compare/{name.removesuffix('.png')}", images=[str(path)])
    directory = str(logger.experiment.dir)
    logger.experiment.finish()
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    """``noisecls compare RUN_DIR... [--out DIR] [--labels ...] [--wandb]``; returns the exit
    status (a NoiseclsError is printed as one line by the ``noisecls`` entry point)."""
    parser = argparse.ArgumentParser(
        prog="noisecls compare", description=__doc__.splitlines()[0].partition(": ")[2]
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or results.json files")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/compare"),
        help="where compare.md / compare.csv / the plots go (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--labels", nargs="+", help="row names, one per RUN_DIR (default: names)")
    parser.add_argument("--wandb", action="store_true", help="also log the table and plots to W&B")
    args = parser.parse_args(list(argv) if argv is not None else None)
    runs = load_runs(args.runs, args.labels)
    written = write_all(runs, args.out)
    sys.stdout.write(markdown_table(runs) + "\n")
    for path in written.values():
        sys.stdout.write(f"wrote {path}\n")
    if args.wandb:
        sys.stdout.write(f"W&B run: {log_to_wandb(runs, written, args.out)}\n")
    return 0
