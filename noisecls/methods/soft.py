"""Soft Diffusion (Daras, Delbracio, Talebi, Dimakis, Milanfar 2022): blur + noise corruption,
Soft Score Matching, Momentum Sampler.

The corruption x_t = C_t x0 + s_t·eta (C_t a DCT-domain Gaussian blur) is a
:class:`~noisecls.process.blur.BlurNoiseProcess`, which is also the module's ``schedule``: the
process owns the noise schedule s_t (alpha = 1), so the base class's time / noise-level
plumbing and the checkpointed spacing live in one object. The network h(x_t, t) predicts x0
and is trained with the Soft Score Matching loss ||C_t (h(x_t, t) - x0)||², the error measured
after corruption; the score follows as grad log q_t(x_t) = (C_t h - x_t) / s_t² and drives the
momentum (or naive) sampler of :mod:`noisecls.samplers.momentum`.

Data statistics: with ``spacing: constant_distance`` the process's schedule is fitted to the
training data's DCT spectrum, and the starting distribution at t = 1 (a
:class:`~noisecls.process.blur.TerminalPrior`) is fitted to the training images; both happen
once, at the start of fit (or of test / predict of an unfitted model), from the first
``statistics_samples`` images of the DataModule's reference split, and are stored as buffers
(checkpoints carry them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils.data import DataLoader

from noisecls.data.base import collate_pairs
from noisecls.errors import NoiseclsError
from noisecls.methods.base import DiffusionModule, PredictConfig
from noisecls.process.blur import BlurNoiseProcess, TerminalPrior, dct_spectrum
from noisecls.randomness import per_example, randn_per_example
from noisecls.samplers.momentum import SoftSamplerConfig, run_soft_sampler

__all__ = ["SoftDenoiser", "SoftDiffusion", "SoftPredictor", "soft_score_matching_loss"]


def soft_score_matching_loss(
    x0_hat: Tensor, x0: Tensor, t: Tensor, process: BlurNoiseProcess
) -> Tensor:
    """Soft Score Matching: mean over elements of (C_t (x0_hat - x0))², a scalar.

    Minimised by C_t h(x_t, t) = C_t E[x0 | x_t] = E[C_t x0 | x_t] (the loss only sees h through
    C_t, so h is determined on the range of C_t); x0_hat, x0 [B, ...], t [B]. Computed in
    float32 at least (half-precision outputs of a mixed-precision network are promoted).
    """
    dtype = torch.promote_types(torch.promote_types(x0_hat.dtype, x0.dtype), torch.float32)
    return process.blur(x0_hat.to(dtype) - x0.to(dtype), t).pow(2).mean()


class SoftPredictor:
    """h(x_t, t) -> x0_hat: the backbone called as net(x_t, 999·t, class_labels) [B, ...]."""

    def __init__(self, net: nn.Module, process: BlurNoiseProcess) -> None:
        self.net, self.process = net, process

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor | None) -> Tensor:
        noise_in = self.process.noise_input(t).to(device=x.device, dtype=x.dtype)
        return self.net(x, noise_in, cond.get("class_labels"))


class SoftDenoiser:
    """The predictor in the Denoiser form D(x, sigma) = h(x, t(sigma)), t(sigma) the time whose
    noise std is sigma.

    It estimates E[x0 | x] for x drawn from the *blurred* marginal q_{t(sigma)}
    (x = C_t x0 + sigma·eta), which is the Denoiser contract only where the blur is off (at
    t = 0 with ``blur_sigma_min: 0``); callbacks that feed it x0 + sigma·eps (denoising MSE per
    sigma) measure something else for this method.
    """

    def __init__(self, predictor: SoftPredictor, process: BlurNoiseProcess) -> None:
        self.predictor, self.process = predictor, process

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor:
        t = self.process.t_from_ve_sigma(torch.as_tensor(sigma, dtype=torch.float64))
        return self.predictor(x, t.to(x.device).expand(x.shape[0]), **cond)


class SoftDiffusion(DiffusionModule):
    """Soft Diffusion: an x0 predictor trained with Soft Score Matching under blur + noise.

    Args:
        net: the backbone (UNet, ResidualMLP) predicting x0, called as net(x_t, 999·t, None).
        process: the corruption (blur and noise schedules, kernel, spacing); it is also the
            module's noise schedule.
        sampler: momentum or naive sampler and its number of steps (default momentum, 100).
        prior: starting distribution at t = 1: "data" (training images blurred to the last
            level, plus noise: inverse heat dissipation's choice) or "gaussian" (a Gaussian
            fitted to the blurred training images, plus noise).
        statistics_samples: training images used to fit the spacing and the prior (the data
            prior's bank holds them).
        Others: see ``DiffusionModule``. ``data_shape`` is required (the CLI links it).
    """

    def __init__(
        self,
        net: nn.Module,
        process: BlurNoiseProcess,
        sampler: SoftSamplerConfig | None = None,
        prior: Literal["data", "gaussian"] = "data",
        statistics_samples: int = 2048,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        data_shape: Sequence[int] | None = None,
        seed: int = 0,
        predict: PredictConfig | None = None,
    ) -> None:
        super().__init__(
            process, sampler or SoftSamplerConfig(), optimizer, lr_scheduler, data_shape, seed,
            predict,
        )  # fmt: skip
        self.save_configuration(["net", "process"])
        if not isinstance(process, BlurNoiseProcess):
            raise NoiseclsError("SoftDiffusion's process must be a BlurNoiseProcess")
        if self.data_shape is None:
            raise NoiseclsError(
                "SoftDiffusion needs model.init_args.data_shape (the CLI links it from the "
                "DataModule): its prior is built for one data shape"
            )
        self.net = net
        self.statistics_samples = statistics_samples
        terminal_gains = process.gains(torch.ones(1, dtype=torch.float64), self.data_shape)[0]
        self.prior = TerminalPrior(prior, self.data_shape, terminal_gains, statistics_samples)

    @property
    def process(self) -> BlurNoiseProcess:
        """The corruption (the same object as ``schedule``)."""
        return self.schedule  # type: ignore[return-value]

    def predictor(self) -> SoftPredictor:
        """h(x_t, t) -> x0_hat."""
        return SoftPredictor(self.net, self.process)

    def denoiser(self) -> SoftDenoiser:
        return SoftDenoiser(self.predictor(), self.process)

    # ---- training ------------------------------------------------------------------------
    def training_loss(
        self, x0: Tensor, labels: Tensor | None, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        t = per_example(
            generator,
            x0.shape[0],
            lambda m: self.process.sample_training_t(m, generator=generator, device=x0.device),
        )
        eta = randn_per_example(x0, generator)
        x_t = self.process.corrupt(x0, t, eta)
        x0_hat = self.predictor()(x_t, t)
        return soft_score_matching_loss(x0_hat, x0, t, self.process), {}

    def log_likelihood(self, x: Tensor, **kwargs: object) -> Tensor:
        """Not defined for Soft Diffusion (the paper reports none): raises NoiseclsError."""
        raise NoiseclsError(
            "Soft Diffusion has no likelihood estimator (the paper reports none): remove the "
            "NLLCallback from the config"
        )

    # ---- data statistics -----------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        """Whether the spacing (if constant-distance) and the prior are fitted to data."""
        return self.prior.fitted and not self.process.needs_fit

    @torch.no_grad()
    def fit_statistics(self, x0: Tensor) -> None:
        """Fit the constant-distance spacing (if configured) and the prior to x0 [N, *shape]."""
        x0 = x0.to(self.device)
        if self.process.needs_fit:
            self.process.fit_constant_distance(*dct_spectrum(x0))
        self.prior.fit(x0)

    def _training_images(self) -> Tensor:
        """The first ``statistics_samples`` images of the DataModule's reference split."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            raise NoiseclsError(
                "Soft Diffusion fits its schedule and prior to training data: give a DataModule "
                "(data: in the config) or call fit_statistics(x0)"
            )
        if hasattr(dm, "reference_dataset"):
            dataset = dm.reference_dataset()
        else:
            dataset = dm.train_dataloader().dataset
        n = min(len(dataset), self.statistics_samples)
        loader = DataLoader(dataset, batch_size=256, sampler=range(n), collate_fn=collate_pairs)
        return torch.cat([b[0] if isinstance(b, list | tuple) else b for b in loader])

    def _ensure_fitted(self) -> None:
        if not self.fitted:
            self.fit_statistics(self._training_images())

    def on_fit_start(self) -> None:
        self._ensure_fitted()

    def on_validation_start(self) -> None:
        self._ensure_fitted()

    def on_test_start(self) -> None:
        self._ensure_fitted()

    def on_predict_start(self) -> None:
        self._ensure_fitted()

    # ---- sampling ------------------------------------------------------------------------
    def initial_noise(
        self, n: int, sigma_max: float = 0.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """x_1 = y_1 + s_1·eta with y_1 from the prior, [n, *data_shape] (the process's t = 1
        marginal; ``sigma_max`` is not needed: s_1 is the process's)."""
        if not self.prior.fitted:
            raise NoiseclsError(
                "the Soft Diffusion prior is not fitted: train the model, load a checkpoint, or "
                "call fit_statistics(x0)"
            )
        y = self.prior.sample(n, generator=generator).to(self.device)
        s_1 = float(self.process.noise_std(torch.ones(1, dtype=torch.float64)))
        return y + s_1 * torch.randn(y.shape, generator=generator, device=self.device)

    def run_sampler(
        self,
        config: SoftSamplerConfig,
        x: Tensor,
        sigmas: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        cond: dict | None = None,
    ) -> tuple[Tensor, int]:
        """Run the momentum / naive sampler from x = x_1 down ``config.num_steps`` steps of the
        process's time grid (``sigmas``, the noise stds on that grid, are implied by it)."""
        if not isinstance(config, SoftSamplerConfig):
            raise NoiseclsError(
                "Soft Diffusion samples with its own samplers: give a sampler {name: momentum | "
                "naive, num_steps: N} (leave the callback's sampler unset to use the model's)"
            )
        times = self.process.sampling_times(config.num_steps)
        return run_soft_sampler(
            config, self.predictor(), self.process, x, times, generator=generator, cond=cond
        )

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        sampler: SoftSamplerConfig | None = None,
    ) -> tuple[Tensor, int]:
        """Draw n samples [n, *data_shape] with ``sampler`` (default: the module's); returns
        (samples, NFE). ``predict_step`` (the base class's) uses the same two hooks."""
        config = sampler or self.sampler
        return self.run_sampler(config, self.initial_noise(n, generator=generator),
                                generator=generator)  # fmt: skip
