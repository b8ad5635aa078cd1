"""Deterministic (probability-flow ODE) samplers and DDIM, as plain functions over a Denoiser.

Every sampler takes x at sigmas[0] in sigma space (x = x0 + sigma·eps), a descending float64
sigma grid ending in 0, an optional ``torch.Generator`` for any injected noise and ``cond`` (the
denoiser's keyword arguments, e.g. class_labels), and returns x at sigmas[-1]. Step arithmetic
is done in float64 on Python scalars; x keeps its dtype. ``callback(info)`` receives a dict
with i, x, sigma, sigma_next and denoised after every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

from noisecls.denoisers import Denoiser

StepCallback = Callable[[dict[str, Any]], None]


def call_denoiser(
    denoiser: Denoiser, x: Tensor, sigma: float | Tensor, cond: dict | None
) -> Tensor:
    """D(x, sigma·1_B, **cond) for a scalar sigma, or D(x, sigma, **cond) for per-sample
    sigmas [B]."""
    if isinstance(sigma, Tensor):
        sigma_batch = sigma.to(device=x.device, dtype=torch.float64)
    else:
        sigma_batch = torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float64)
    return denoiser(x, sigma_batch, **(cond or {}))


def per_sample(value: float | Tensor, x: Tensor) -> float | Tensor:
    """A scalar as is; per-sample values [B] shaped [B, 1, ...] in x's dtype, to scale x."""
    if isinstance(value, Tensor):
        return value.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return value


def standard_noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) noise shaped like x, drawn from ``generator``."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _check_sigmas(sigmas: Tensor) -> list[float]:
    values = [float(s) for s in sigmas]
    if len(values) < 2 or any(b >= a for a, b in pairwise(values)):
        raise ValueError("sigmas must be a strictly decreasing grid of at least two values")
    if values[-1] < 0:
        raise ValueError("sigmas must be non-negative")
    return values


def euler_to(
    denoiser: Denoiser, x: Tensor, denoised: Tensor, sigma: float, target: float, cond: dict | None
) -> Tensor:
    """One Euler step of the probability-flow ODE from sigma to ``target`` given D(x, sigma):
    x + (target - sigma)·(x - D)/sigma, written as D + (target/sigma)·(x - D) (exact at 0)."""
    return denoised + (target / sigma) * (x - denoised)


def dpm2_to(
    denoiser: Denoiser, x: Tensor, denoised: Tensor, sigma: float, target: float, cond: dict | None
) -> Tensor:
    """One DPM-Solver-2 step (Lu et al. 2022, Algorithm 4 with r1 = 1/2) from sigma to
    ``target`` given D(x, sigma): with lambda = -log sigma the midpoint is sqrt(sigma·target) and
    x_next = x - (sigma - target)·eps_hat(x_mid, sigma_mid), the exact exponential-integrator
    step. To target = 0 it is the (first-order) Euler step, which returns D. One extra call."""
    if target == 0:
        return denoised
    d = (x - denoised) / sigma
    mid = math.sqrt(sigma * target)
    x_mid = x + (mid - sigma) * d
    d_mid = (x_mid - call_denoiser(denoiser, x_mid, mid, cond)) / mid
    return x + (target - sigma) * d_mid


#: a deterministic step from sigma to a target sigma given D(x, sigma) (``euler_to``, ``dpm2_to``)
Step = Callable[[Denoiser, Tensor, Tensor, float, float, dict | None], Tensor]


def sample_ancestral(
    step: Step,
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling with a deterministic ``step``: each interval sigma -> sigma_next goes
    down to sigma_down with ``step`` and adds s_noise·sigma_up·z (``ancestral_step``; k-diffusion's
    ``sample_euler_ancestral`` / ``sample_dpm_2_ancestral``). eta = 0 is the ODE solver itself.
    Noise is drawn only for intervals with sigma_up > 0 (never on the last step to 0)."""
    values = _check_sigmas(sigmas)
    for i, (s, s_next) in enumerate(pairwise(values)):
        denoised = call_denoiser(denoiser, x, s, cond)
        down, up = ancestral_step(s, s_next, eta)
        x = step(denoiser, x, denoised, s, down, cond)
        if up > 0:
            x = x + (up * s_noise) * standard_noise(x, generator)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised})
    return x


def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler steps on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma.

    In sigma space this is exactly deterministic DDIM (Song et al. 2021). NFE = len(sigmas) - 1.
    """
    return sample_ancestral(
        euler_to, denoiser, x, sigmas, eta=0.0, generator=generator, cond=cond, callback=callback
    )


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of a DDIM(eta) step sigma -> sigma_next in sigma space.

    DDIM's sigma_eta (Song et al. 2021, eq. 16) rescaled to VE: sigma_up^2 =
    eta^2 · sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2, sigma_down^2 = sigma_next^2 -
    sigma_up^2. eta = 1 is the DDPM posterior q(x_next | x, x0) (variance beta-tilde).
    """
    if sigma_next == 0:
        return 0.0, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DDIM with stochasticity eta (0: deterministic, 1: DDPM ancestral). NFE = len(sigmas) - 1.

    Each step: x_next = x0_hat + sigma_down·eps_hat + s_noise·sigma_up·z, eps_hat =
    (x - x0_hat)/sigma. In sigma space this is k-diffusion's Euler ancestral sampler.
    """
    return sample_ancestral(
        euler_to, denoiser, x, sigmas, eta=eta, s_noise=s_noise, generator=generator, cond=cond,
        callback=callback,
    )  # fmt: skip


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    churn_override: Callable[[int], Tensor | None] | None = None,
    corrector: Denoiser | None = None,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """EDM's 2nd-order Heun sampler (Karras et al. 2022, Algorithm 2), with optional churn.

    With s_churn = 0 it is the deterministic ODE sampler (Algorithm 1): NFE = 2N - 1 for N steps
    ending at sigma = 0. ``corrector`` (default: ``denoiser``) evaluates the second-order stage,
    so a wrapper can act differently there (Discriminator Guidance weights its stages apart).
    ``churn_override(i)`` may return per-sample s_churn values [B] for step i (None: the scalar
    ``s_churn``); each sample then has its own sigma_hat (DG's adaptive boosting).
    """
    values = _check_sigmas(sigmas)
    corrector = denoiser if corrector is None else corrector
    num_steps = len(values) - 1
    max_gamma = math.sqrt(2) - 1
    for i, (s, s_next) in enumerate(pairwise(values)):
        in_range = s_tmin <= s <= s_tmax
        churns = churn_override(i) if churn_override is not None else None
        gamma: float | Tensor
        if churns is None:
            gamma = min(s_churn / num_steps, max_gamma) if in_range else 0.0
        else:
            gamma = (churns.to(torch.float64) / num_steps).clamp(max=max_gamma) * float(in_range)
        s_hat = s * (1 + gamma)
        if bool(torch.as_tensor(gamma).gt(0).any()):
            extra = (
                torch.sqrt(s_hat**2 - s**2)
                if isinstance(s_hat, Tensor)
                else math.sqrt(s_hat**2 - s**2)
            )
            x = x + per_sample(extra * s_noise, x) * standard_noise(x, generator)
        denoised = call_denoiser(denoiser, x, s_hat, cond)
        d = (x - denoised) / per_sample(s_hat, x)
        x_next = x + per_sample(s_next - s_hat, x) * d
        if s_next > 0:
            d_next = (x_next - call_denoiser(corrector, x_next, s_next, cond)) / s_next
            x_next = x + per_sample(s_next - s_hat, x) * 0.5 * (d + d_next)
        x = x_next
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s_hat, "sigma_next": s_next, "denoised": denoised})
    return x


def sample_dpm_solver_2(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver-2 (``dpm2_to``) in sigma space; the last step to sigma = 0 is first order.
    NFE = 2N - 1."""
    return sample_ancestral(
        dpm2_to, denoiser, x, sigmas, eta=0.0, generator=generator, cond=cond, callback=callback
    )
