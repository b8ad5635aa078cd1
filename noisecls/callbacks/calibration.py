"""Calibration of DG's discriminator on held-out real / fake pairs.

Theorem 1 of Kim et al. (2023) guides with the discriminator's log density ratio
log(d / (1 - d)), so what matters is not only accuracy but that d is a probability: among held-out
noisy examples the discriminator calls real with probability p, a fraction p should be real.
:class:`DiscriminatorCalibration` collects d, the target and the diffusion-time bin of every
evaluation example (what ``DG.validation_step`` / ``test_step`` return), logs the expected
calibration error ``{stage}/ece`` (overall and per time bin) and writes a reliability diagram,
one curve per time bin, to ``<log dir>/calibration/{stage}_step{global_step:07d}.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor

from noisecls.callbacks.denoising import save_figure
from noisecls.callbacks.results import log_directory, metric_prefix, wandb_loggers
from noisecls.errors import NoiseclsError

__all__ = ["DiscriminatorCalibration", "Reliability", "reliability"]


@dataclass
class Reliability:
    """A reliability diagram of probabilities in ``num_bins`` equal-width bins of [0, 1].

    Attributes:
        mean_prob: [bins] mean predicted probability per bin (nan where empty).
        frequency: [bins] observed fraction of positives per bin (nan where empty).
        count: [bins] examples per bin (int64).
        ece: expected calibration error, sum_b count_b / N · |frequency_b - mean_prob_b|.
    """

    mean_prob: Tensor
    frequency: Tensor
    count: Tensor
    ece: float


def reliability(prob: Tensor, target: Tensor, num_bins: int = 10) -> Reliability:
    """The reliability diagram of predicted probabilities ``prob`` [N] in [0, 1] against binary
    ``target`` [N] (1 = positive)."""
    if prob.numel() == 0:
        raise NoiseclsError("calibration needs at least one example")
    prob, target = prob.double().flatten(), target.double().flatten()
    index = (prob * num_bins).long().clamp(0, num_bins - 1)
    count = torch.bincount(index, minlength=num_bins)
    sum_prob = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, prob)
    sum_target = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, target)
    mean_prob, frequency = sum_prob / count, sum_target / count  # nan where count == 0
    ece = float(((sum_target - sum_prob).abs()).sum() / prob.numel())
    return Reliability(mean_prob, frequency, count, ece)


class DiscriminatorCalibration(L.Callback):
    """Logs ``{stage}/ece`` and ``{stage}/ece_t<lo>-<hi>`` per diffusion-time bin and writes the
    reliability diagram of DG's discriminator at every validation and test (rank 0 writes; the
    examples of all ranks are gathered).

    Args:
        num_bins: probability bins of the diagram and of the ECE.
    """

    def __init__(self, num_bins: int = 10) -> None:
        if num_bins < 2:
            raise NoiseclsError(f"DiscriminatorCalibration needs num_bins >= 2, got {num_bins}")
        self.num_bins = num_bins
        self.outputs: list[dict[str, Tensor]] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.outputs = []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or not {"prob", "is_real", "time_bin"} <= outputs.keys():
            raise NoiseclsError(
                "DiscriminatorCalibration needs a DG model (its validation_step returns the "
                "discriminator's probabilities); remove the callback for other methods"
            )
        self.outputs.append({k: outputs[k].detach() for k in ("prob", "is_real", "time_bin")})

    on_test_batch_end = on_validation_batch_end

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.outputs:
            return
        stage = metric_prefix(trainer)
        gathered = {
            k: pl_module.all_gather(torch.cat([o[k] for o in self.outputs])).flatten().cpu()
            for k in ("prob", "is_real", "time_bin")
        }
        overall = reliability(gathered["prob"], gathered["is_real"], self.num_bins)
        pl_module.log(f"{stage}/ece", overall.ece, rank_zero_only=True)
        lows, highs = pl_module.time_bin_edges()
        per_bin = {}
        for b, (lo, hi) in enumerate(zip(lows, highs, strict=True)):
            mask = gathered["time_bin"] == b
            if mask.any():
                per_bin[f"t{lo:.2f}-{hi:.2f}"] = reliability(
                    gathered["prob"][mask], gathered["is_real"][mask], self.num_bins
                )
        for name, rel in per_bin.items():
            pl_module.log(f"{stage}/ece_{name}", rel.ece, rank_zero_only=True)
        directory = log_directory(trainer)  # collective: every rank calls it
        if trainer.is_global_zero:
            path = directory / "calibration" / f"{stage}_step{trainer.global_step:07d}.png"
            save_figure(reliability_figure(overall, per_bin), path)
            for logger in wandb_loggers(trainer):
                logger.log_image(key=f"{stage}/calibration", images=[str(path)])
        self.outputs = []

    on_test_epoch_end = on_validation_epoch_end


def reliability_figure(overall: Reliability, per_bin: dict[str, Reliability]) -> Any:
    """A matplotlib Figure: observed fraction real vs predicted d, overall and per time bin,
    with the diagonal of perfect calibration."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="calibrated")
    for name, rel in per_bin.items():
        keep = rel.count > 0
        ax.plot(rel.mean_prob[keep], rel.frequency[keep], marker=".", linewidth=1,
                label=f"{name} (ECE {rel.ece:.3f})")  # fmt: skip
    keep = overall.count > 0
    ax.plot(overall.mean_prob[keep], overall.frequency[keep], marker="o", color="black",
            linewidth=2, label=f"all (ECE {overall.ece:.3f})")  # fmt: skip
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="discriminator d (predicted P(real))",
           ylabel="fraction real", title="DG discriminator calibration")  # fmt: skip
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig
