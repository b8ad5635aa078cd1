"""Denoising MSE per noise level: how well ``pl_module.mmse_denoiser()`` (the method's E[x0 | x_t],
without sampling-only guidance such as classifier-free guidance) estimates it.

For each sigma of a fixed grid and each held-out x0: x = x0 + sigma·eps (sigma space, the
Denoiser contract), MSE = mean over elements of (D(x, sigma) - x0)², averaged over examples. The
noise eps of global batch b is drawn once from ``derive_seed(seed, b)`` and shared by all sigmas
(common random numbers: smooth curves, fair comparison between checkpoints and methods). When the
DataModule has an ``.oracle`` (a :class:`~noisecls.oracles.GaussianMixture`), its exact MMSE
denoiser is evaluated on the same x: that curve is the lower bound.

Out of distribution (CDL's claim): with ``noise_scale`` m != 1 the input is x0 + m·sigma·eps but
the denoiser is told sigma — a noisy point off the distribution it was trained on at that level —
and the curves are named ``denoise_mse_x<m>`` (the oracle's is still the exact E[x0 | x] at the
stated sigma, i.e. the best a denoiser told the wrong level can do: not a lower bound here).

Logged per level: ``val/denoise_mse/sigma=<s>`` and ``val/denoise_mse_oracle/sigma=<s>``
(``test/...`` in test); a table (W&B Table with a WandbLogger; always a CSV in
``<log dir>/denoising_mse/``) and a log-log plot (PNG next to the CSV; W&B image when available).
DDP: sharded and gathered in global order like the other metrics (world-size invariant).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from noisecls.callbacks.results import (
    EvaluationCallback,
    Stopwatch,
    atomic_write_text,
    gather_round,
    heldout_dataset,
    local_batches,
    log_directory,
    metric_prefix,
    rank_counts,
    record_metric,
    should_evaluate,
    split_batch,
    wandb_loggers,
)
from noisecls.randomness import derive_seed

__all__ = ["DEFAULT_SIGMAS", "DenoisingMSECallback", "sigma_key"]

#: A 1-2-5 log-spaced grid from EDM's sigma_min to its sigma_max.
DEFAULT_SIGMAS: tuple[float, ...] = (
    0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 80.0,
)  # fmt: skip


def sigma_key(sigma: float) -> str:
    """The log-key suffix of a noise level: ``sigma=0.002``, ``sigma=80``."""
    return f"sigma={sigma:g}"


class DenoisingMSECallback(EvaluationCallback):
    """Per-noise-level MSE of the method's denoiser on held-out data (and of the oracle's).

    Args:
        sigmas: noise levels (sigma space); default :data:`DEFAULT_SIGMAS`.
        num_samples: held-out examples (the first ones of the split); None: all.
        every_n_epochs: during fit, evaluate after epochs e with (e + 1) % n == 0 (0: only in
            validate / test).
        batch_size: examples per denoiser call, per rank.
        seed: base seed of the noise.
        plot: write the PNG plot (and log it to W&B).

    Attributes:
        last_result: after each evaluation: sigmas, mse [S], oracle_mse [S] or None, count,
            csv / png paths (rank 0), seconds.
    """

    def __init__(
        self,
        sigmas: list[float] | None = None,
        num_samples: int | None = 1024,
        every_n_epochs: int = 1,
        batch_size: int = 256,
        seed: int = 0,
        plot: bool = True,
        noise_scale: float = 1.0,
    ) -> None:
        if noise_scale <= 0:
            raise ValueError(f"DenoisingMSECallback needs noise_scale > 0, got {noise_scale}")
        self.noise_scale = float(noise_scale)
        self.sigmas = [float(s) for s in (sigmas if sigmas is not None else DEFAULT_SIGMAS)]
        if not self.sigmas or min(self.sigmas) <= 0:
            raise ValueError("DenoisingMSECallback needs positive sigmas")
        if batch_size < 1 or (num_samples is not None and num_samples < 1):
            raise ValueError("DenoisingMSECallback needs batch_size >= 1 and num_samples >= 1")
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.seed = seed
        self.plot = plot
        self.last_result: dict[str, Any] = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if should_evaluate(trainer, self.every_n_epochs):
            self.evaluate(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    def _errors(
        self, denoiser: Any, x0: Tensor, eps: Tensor, sigmas: list[float], cond: dict
    ) -> Tensor:
        """Per-example MSE [B, S] of ``denoiser`` at each sigma (float64), input noise
        ``noise_scale``·sigma."""
        cols = []
        for s in sigmas:
            sigma = torch.full((x0.shape[0],), s, device=x0.device, dtype=x0.dtype)
            out = denoiser(x0 + self.noise_scale * s * eps, sigma, **cond)
            err = (out.detach().to(torch.float64) - x0.to(torch.float64)) ** 2
            cols.append(err.reshape(x0.shape[0], -1).mean(1))
        return torch.stack(cols, dim=1)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Compute, log and write the per-level MSEs; returns ``last_result``."""
        out_dir = log_directory(trainer) / "denoising_mse"  # collective: every rank
        dataset = heldout_dataset(trainer)
        n = len(dataset)  # type: ignore[arg-type]
        if self.num_samples is not None:
            n = min(n, self.num_samples)
        oracle = getattr(trainer.datamodule, "oracle", None)
        device = pl_module.device
        S = len(self.sigmas)
        width = 2 * S if oracle is not None else S
        sums = torch.zeros(width, dtype=torch.float64, device=device)
        count = local_count = 0
        with Stopwatch() as watch, torch.inference_mode(False), torch.no_grad():
            denoiser = pl_module.mmse_denoiser()
            oracle_denoiser = oracle.to(device).denoiser() if oracle is not None else None
            workers = int(getattr(trainer.datamodule, "num_workers", 0) or 0)
            for b, batch in local_batches(dataset, n, self.batch_size, trainer, workers):
                errors = None
                if batch is not None:
                    x0, y = split_batch(batch)
                    x0 = x0.to(device=device, dtype=torch.float32)
                    g = torch.Generator(device=device).manual_seed(derive_seed(self.seed, b))
                    eps = torch.randn(x0.shape, generator=g, device=device, dtype=x0.dtype)
                    cond = {}
                    labels = pl_module.class_labels(y.to(device)) if y is not None else None
                    if labels is not None:
                        cond["class_labels"] = labels
                    errors = self._errors(denoiser, x0, eps, self.sigmas, cond)
                    if oracle_denoiser is not None:
                        oracle_errors = self._errors(oracle_denoiser, x0, eps, self.sigmas, cond)
                        errors = torch.cat([errors, oracle_errors], dim=1)
                    local_count += x0.shape[0]
                for rows in gather_round(
                    trainer, errors, self.batch_size, (width,), torch.float64, device
                ):
                    sums += rows.sum(0)
                    count += rows.shape[0]
        means = (sums / count).cpu()
        mse = means[:S].tolist()
        oracle_mse = means[S:].tolist() if oracle is not None else None
        per_rank = rank_counts(trainer, local_count, device)
        prefix = metric_prefix(trainer)
        stem = "denoise_mse" if self.noise_scale == 1 else f"denoise_mse_x{self.noise_scale:g}"
        curves = {stem: mse} | ({f"{stem}_oracle": oracle_mse} if oracle_mse else {})
        for name, values in curves.items():
            for s, value in zip(self.sigmas, values, strict=True):
                key = f"{prefix}/{name}/{sigma_key(s)}"
                pl_module.log(key, value, sync_dist=True)
                record_metric(trainer, key, value, samples=count, nfe=1, seconds=watch.seconds,
                              per_rank_samples=per_rank)  # fmt: skip
        result: dict[str, Any] = {"sigmas": list(self.sigmas), "mse": mse,
                                  "oracle_mse": oracle_mse, "count": count,
                                  "per_rank_count": per_rank, "seconds": watch.seconds,
                                  "csv": None, "png": None}  # fmt: skip
        if trainer.is_global_zero:
            self._write(trainer, out_dir, prefix, result)
        self.last_result = result
        return result

    def _write(self, trainer: L.Trainer, out_dir: Path, prefix: str, result: dict) -> None:
        scale = "" if self.noise_scale == 1 else f"_x{self.noise_scale:g}"
        stem = f"{prefix}{scale}_epoch{trainer.current_epoch:04d}_step{trainer.global_step:08d}"
        columns = ["sigma", "mse"] + (["oracle_mse"] if result["oracle_mse"] is not None else [])
        rows = []
        for i, s in enumerate(result["sigmas"]):
            row = [s, result["mse"][i]]
            if result["oracle_mse"] is not None:
                row.append(result["oracle_mse"][i])
            rows.append(row)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows(rows)
        csv_path = out_dir / f"{stem}.csv"
        atomic_write_text(csv_path, buffer.getvalue())
        result["csv"] = str(csv_path)
        loggers = wandb_loggers(trainer)
        for logger in loggers:
            logger.log_table(key=f"{prefix}/denoise_mse_table", columns=columns, data=rows)
        if self.plot:
            png_path = out_dir / f"{stem}.png"
            _plot(result, png_path, title=f"{prefix} denoising MSE, step {trainer.global_step}")
            result["png"] = str(png_path)
            for logger in loggers:
                logger.log_image(key=f"{prefix}/denoise_mse_plot", images=[str(png_path)])


def _plot(result: dict, path: Path, title: str) -> None:
    """Log-log plot of MSE against sigma (and the oracle's), written atomically as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.loglog(result["sigmas"], result["mse"], "o-", label="model")
    if result["oracle_mse"] is not None:
        ax.loglog(result["sigmas"], result["oracle_mse"], "k--", label="oracle (MMSE)")
    ax.set_xlabel("sigma")
    ax.set_ylabel("MSE per element")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib Figure as PNG through a temporary name and ``os.replace``."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
