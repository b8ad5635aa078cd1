"""Stochastic samplers: DDPM ancestral sampling (EDM's stochastic Heun is ``sample_heun`` with
``s_churn > 0`` in ode.py, since its deterministic part is the same Heun step)."""

from __future__ import annotations

import torch
from torch import Tensor

from noisecls.denoisers import Denoiser
from noisecls.samplers.ode import StepCallback, sample_ddim


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
    return sample_ddim(
        denoiser, x, sigmas, eta=1.0, generator=generator, cond=cond, callback=callback
    )
