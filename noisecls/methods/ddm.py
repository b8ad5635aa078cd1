"""DDM: the standard denoising diffusion baseline (eps / x0 / v losses, or EDM's loss)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from noisecls.denoisers import EDMDenoiser, PredictionDenoiser, TrainableDenoiser
from noisecls.methods.base import DiffusionModule, PredictConfig
from noisecls.process.schedules import EDMSchedule, NoiseSchedule, broadcast_like
from noisecls.randomness import per_example, randn_per_example
from noisecls.samplers import SamplerConfig


def build_trainable_denoiser(
    net: nn.Module, schedule: NoiseSchedule, prediction: Literal["eps", "x0", "v", "edm"]
) -> TrainableDenoiser:
    """The denoiser a backbone becomes under ``prediction`` ("edm": EDM preconditioning)."""
    if prediction == "edm":
        sigma_data = schedule.sigma_data if isinstance(schedule, EDMSchedule) else 0.5
        return EDMDenoiser(net, sigma_data=sigma_data)
    return PredictionDenoiser(net, schedule, prediction)


class DDM(DiffusionModule):
    """Denoising diffusion model: the loss is ||F(x_t) - target||^2 averaged over elements.

    With a DDPM schedule and eps prediction this is Ho et al.'s L_simple (uniform t); with an
    EDMSchedule and prediction="edm" it is EDM's loss (log-normal sigma, lambda = 1/c_out^2,
    Karras et al. 2022 eq. 8), since the preconditioned target absorbs the weight.

    Args:
        net: the backbone (UNet, ResidualMLP); called as net(x, noise_input, class_labels).
        prediction: what the network predicts: eps, x0, v, or edm (preconditioned F).
        class_conditional: feed the batch labels to the network (it must have num_classes).
        Others: see ``DiffusionModule``.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        prediction: Literal["eps", "x0", "v", "edm"] = "eps",
        class_conditional: bool = False,
        sampler: SamplerConfig | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        data_shape: Sequence[int] | None = None,
        seed: int = 0,
        predict: PredictConfig | None = None,
    ) -> None:
        super().__init__(schedule, sampler, optimizer, lr_scheduler, data_shape, seed, predict)
        self.save_configuration(["net"])
        self.net = net
        self.class_conditional = class_conditional
        self.model = build_trainable_denoiser(net, schedule, prediction)

    def class_labels(self, labels: Tensor | None) -> Tensor | None:
        return labels if self.class_conditional else None

    def denoiser(self) -> TrainableDenoiser:
        return self.model

    def noisy_batch(self, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(x, sigma, eps) with x = x0 + sigma·eps at training sigmas drawn from the schedule."""
        t = per_example(
            generator,
            x0.shape[0],
            lambda m: self.schedule.sample_training_t(m, generator=generator, device=x0.device),
        )
        sigma = self.schedule.ve_sigma(t)
        eps = randn_per_example(x0, generator)
        return x0 + broadcast_like(sigma, x0) * eps, sigma, eps

    def training_loss(
        self, x0: Tensor, labels: Tensor | None, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x, sigma, eps = self.noisy_batch(x0, generator)
        output = self.model.network_output(x, sigma, class_labels=labels)
        target = self.model.target(x0, eps, sigma).to(output.dtype)
        return torch.mean((output - target) ** 2), {}
