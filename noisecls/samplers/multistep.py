"""Multistep exponential-integrator samplers (one denoiser call per step), as plain functions
with the signature of :mod:`noisecls.samplers.ode`.

``sample_dpm_solver_2m``: DPM-Solver-2 in its multistep form (Lu et al. 2022, "DPM-Solver",
section 3.3 / Appendix B, noise prediction, the solver the CDM paper runs with 25 NFE). In sigma
space (alpha = 1, lambda = -log sigma) its step from sigma_s to sigma_t, h = lambda_t - lambda_s,
r = (lambda_s - lambda_prev) / h, reads

    x_t = x_s - (sigma_s - sigma_t)·[eps_s + (eps_s - eps_prev) / (2 r)],

with eps = (x - D(x, sigma)) / sigma: the first step is DPM-Solver-1 (= DDIM), and the last one,
to sigma = 0, is first order too (h is infinite there), x_0 = D(x, sigma_s).
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import Tensor

from noisecls.denoisers import Denoiser
from noisecls.samplers.ode import StepCallback, _check_sigmas, call_denoiser


def sample_dpm_solver_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Multistep DPM-Solver-2 from x at sigmas[0] to sigmas[-1] = 0; NFE = N (one call per
    step). ``generator`` is unused (deterministic), accepted for the common signature."""
    values = _check_sigmas(sigmas)
    previous: tuple[float, Tensor] | None = None  # (lambda, eps) of the last step
    for i, (s, s_next) in enumerate(pairwise(values)):
        denoised = call_denoiser(denoiser, x, s, cond)
        eps = (x - denoised) / s
        lam = -math.log(s)
        if s_next == 0:
            x = denoised
        else:
            slope = eps
            if previous is not None:
                ratio = (previous[0] - lam) / (lam + math.log(s_next))  # r = h_prev / h
                slope = eps + (eps - previous[1]) / (2 * ratio)
            x = x - (s - s_next) * slope
        previous = (lam, eps)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised})
    return x
