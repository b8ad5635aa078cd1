"""Multistep exponential-integrator samplers (one denoiser call per step), as plain functions
with the signature of :mod:`noisecls.samplers.ode`.

``sample_dpm_solver_2m``: DPM-Solver-2 in its multistep form, noise prediction (Lu et al. 2022,
"DPM-Solver"), with the Taylor ("heun") coefficient of the CDM paper's official sampler
(CDM.sample, 'second_order_dpm_solver', 25 NFE; diffusers' DPMSolverMultistepScheduler with
algorithm_type "dpmsolver", solver_type "heun"). In sigma space (alpha = 1, lambda = -log sigma)
its step from sigma_s to sigma_t, h = lambda_t - lambda_s, h_prev = lambda_s - lambda_prev, is

    x_t = x_s - (sigma_s - sigma_t)·eps_s - sigma_t·(e^h - h - 1)·(eps_s - eps_prev) / h_prev,

with eps = (x - D(x, sigma)) / sigma (sigma_t·(e^h - 1) = sigma_s - sigma_t): the first step is
DPM-Solver-1 (= DDIM), and the last one, to sigma = 0, returns D(x, sigma_s) (h is infinite).
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
            x = x - (s - s_next) * eps
            if previous is not None:
                h, h_prev = -math.log(s_next) - lam, lam - previous[0]
                x = x - (s_next * (math.expm1(h) - h) / h_prev) * (eps - previous[1])
        previous = (lam, eps)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised})
    return x
