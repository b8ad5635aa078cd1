"""Discrete DDPM variational bound (Ho et al. 2020, eq. 5) from any Denoiser.

-log p(x0) <= L_T + sum_{t=2}^{T} L_{t-1} + L_0, with
  L_T = KL(q(x_T | x0) || N(0, I)),
  L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), the reverse step using the posterior
  with x0_hat = D(x_t / sqrt(abar_t), sigma_t) and the same variance beta-tilde_t, so
  L_{t-1} = c_t^2 ||x0 - x0_hat||^2 / (2 beta-tilde_t), c_t = sqrt(abar_{t-1}) beta_t/(1 - abar_t),
  L_0 = -log p(x0 | x1): a Gaussian decoder N(x0_hat(x1), beta_1 I) for continuous data.
Each L_{t-1} is a one-sample Monte Carlo estimate over x_t ~ q(x_t | x0); the sum over t is
exact or, with ``num_levels`` given, an unbiased estimate from uniformly drawn levels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from noisecls.denoisers import Denoiser
from noisecls.process.schedules import DiscreteSchedule


def _denoise_at_level(
    denoiser: Denoiser,
    x0: Tensor,
    level: Tensor,
    schedule: DiscreteSchedule,
    generator: torch.Generator | None,
    cond: dict,
) -> Tensor:
    """x0_hat at levels [B] for x_t ~ q(x_t | x0)."""
    sigma = schedule.ve_sigma(level.double())
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x = x0 + sigma.to(x0).reshape(-1, *[1] * (x0.ndim - 1)) * eps
    return denoiser(x, sigma.to(x0.device), **cond)


def ddpm_elbo_nll(
    denoiser: Denoiser,
    x0: Tensor,
    schedule: DiscreteSchedule,
    *,
    num_levels: int | None = None,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
) -> Tensor:
    """Upper bound on -log p(x0) in nats [B] for continuous x0 [B, ...] (data scale).

    Args:
        num_levels: None sums every level 2..T exactly (T denoiser calls); an int draws that
            many levels uniformly (with replacement) and rescales, an unbiased estimate.
    """
    cond = cond or {}
    T = schedule.num_levels
    abar = schedule.alpha_bar.to(x0.device)
    betas = schedule.betas.to(x0.device)
    flat = x0.flatten(1).double()
    num_dims = flat.shape[1]

    # L_T: KL(N(sqrt(abar_T) x0, (1 - abar_T) I) || N(0, I))
    mean_sq = abar[T] * flat.pow(2).sum(1)
    var = 1 - abar[T]
    prior_kl = 0.5 * (num_dims * (var - 1 - torch.log(var)) + mean_sq)

    # L_0: -log N(x0; x0_hat(x1), beta_1 I) in data scale
    x0_hat = _denoise_at_level(
        denoiser, x0, torch.ones(x0.shape[0], device=x0.device), schedule, generator, cond
    )
    err = (flat - x0_hat.flatten(1).double()).pow(2).sum(1)
    decoder_nll = 0.5 * err / betas[0] + 0.5 * num_dims * torch.log(2 * math.pi * betas[0])

    if num_levels is None:
        levels = torch.arange(2, T + 1, device=x0.device)
        scale = 1.0
    else:
        levels = torch.randint(2, T + 1, (num_levels,), generator=generator, device=x0.device)
        scale = (T - 1) / num_levels
    diffusion = torch.zeros_like(prior_kl)
    for t in levels.tolist():
        level = torch.full((x0.shape[0],), float(t), device=x0.device)
        x0_hat = _denoise_at_level(denoiser, x0, level, schedule, generator, cond)
        coef = abar[t - 1].sqrt() * betas[t - 1] / (1 - abar[t])
        beta_tilde = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t - 1]
        err = (flat - x0_hat.flatten(1).double()).pow(2).sum(1)
        diffusion = diffusion + coef**2 * err / (2 * beta_tilde)
    return prior_kl + decoder_nll + scale * diffusion
