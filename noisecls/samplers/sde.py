"""Stochastic samplers: DDPM ancestral sampling, Euler ancestral and DPM-2 ancestral (EDM's
stochastic Heun is ``sample_heun`` with ``s_churn > 0`` in ode.py, since its deterministic part is
the same Heun step; DPM-Solver++(2M) SDE is in multistep.py).

Every ancestral sampler goes down each interval sigma -> sigma_next to sigma_down with a
deterministic step and adds s_noise·sigma_up·z, z ~ N(0, I) from ``generator`` (one draw per
interval with sigma_up > 0), with (sigma_down, sigma_up) from ``ancestral_step(eta)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from noisecls.denoisers import Denoiser
from noisecls.samplers.ode import StepCallback, dpm2_to, euler_to, sample_ancestral


def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2 with sigma_t^2 = beta-tilde_t).

    Each step draws x_next ~ q(x_next | x, x0 = D(x, sigma)), the Gaussian bridge, which in sigma
    space is DDIM with eta = 1. On a strided grid the step uses the strided betas
    1 - alpha_bar_next / alpha_bar (not the unstrided beta_t). NFE = len(sigmas) - 1.
    """
    return sample_euler_ancestral(
        denoiser, x, sigmas, eta=1.0, generator=generator, cond=cond, callback=callback
    )


def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler ancestral (k-diffusion; diffusers' EulerAncestralDiscreteScheduler at eta = 1):
    an Euler step to sigma_down, then noise sigma_up. The same as DDIM(eta). NFE = N."""
    return sample_ancestral(
        euler_to, denoiser, x, sigmas, eta=eta, s_noise=s_noise, generator=generator, cond=cond,
        callback=callback,
    )  # fmt: skip


def sample_dpm_2_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-2 ancestral (k-diffusion; diffusers' KDPM2AncestralDiscreteScheduler at eta = 1): a
    DPM-Solver-2 step to sigma_down (midpoint sqrt(sigma·sigma_down)), then noise sigma_up. The
    last step, to 0, is an Euler step. NFE = 2N - 1."""
    return sample_ancestral(
        dpm2_to, denoiser, x, sigmas, eta=eta, s_noise=s_noise, generator=generator, cond=cond,
        callback=callback,
    )  # fmt: skip
