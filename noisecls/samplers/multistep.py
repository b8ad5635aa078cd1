"""Multistep samplers (one denoiser call per step), as plain functions with the signature of
:mod:`noisecls.samplers.ode`: multistep DPM-Solver-2, DPM-Solver++(2M) and its SDE variant,
UniPC (bh2) and linear multistep (LMS). Each is checked against diffusers' scheduler of the same
name on the same sigma grid (and noise) in tests/test_samplers_reference.py.

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
from numpy.polynomial import Polynomial
from torch import Tensor

from noisecls.denoisers import Denoiser
from noisecls.samplers.ode import StepCallback, _check_sigmas, call_denoiser, standard_noise


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


def sample_dpmpp_2m_sde(
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
    """DPM-Solver++(2M) SDE, data prediction, midpoint form (Lu et al. 2022, "DPM-Solver++",
    Algorithm 2 and its SDE variant, section 5; k-diffusion's ``sample_dpmpp_2m_sde``; diffusers'
    DPMSolverMultistepScheduler with algorithm_type "sde-dpmsolver++" at eta = 1). With
    h = log(sigma / sigma_next), r = h_prev / h and k = eta·h, in sigma space:

        x_next = (sigma_next/sigma)·e^{-k}·x + (1 - e^{-h-k})·(D + (D - D_prev)/(2r))
                 + s_noise·sigma_next·sqrt(1 - e^{-2k})·z,

    the first step without the D_prev term (first order) and the last, to 0, returning D.
    eta = 0 is the ODE solver DPM-Solver++(2M). NFE = N, one noise draw per step with eta > 0.
    """
    values = _check_sigmas(sigmas)
    previous: tuple[float, Tensor] | None = None  # (h, D) of the last step
    for i, (s, s_next) in enumerate(pairwise(values)):
        denoised = call_denoiser(denoiser, x, s, cond)
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            k = eta * h
            gain = -math.expm1(-h - k)
            x = (s_next / s * math.exp(-k)) * x + gain * denoised
            if previous is not None:
                x = x + (gain * 0.5 * h / previous[0]) * (denoised - previous[1])
            if eta > 0:
                noise = standard_noise(x, generator)
                x = x + (s_noise * s_next * math.sqrt(-math.expm1(-2 * k))) * noise
            previous = (h, denoised)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised})
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, midpoint form; diffusers'
    DPMSolverMultistepScheduler "dpmsolver++"): ``sample_dpmpp_2m_sde`` with eta = 0.
    NFE = N."""
    return sample_dpmpp_2m_sde(
        denoiser, x, sigmas, eta=0.0, generator=generator, cond=cond, callback=callback
    )


def _unipc_update(
    x: Tensor,
    sigma: float,
    target: float,
    history: list[tuple[float, Tensor]],
    order: int,
    evaluation: Tensor | None = None,
) -> Tensor:
    """One UniPC-bh2 update (Zhao et al. 2023, Algorithms 1-2 with B(h) = e^h - 1, data
    prediction) from x at sigma to ``target`` > 0, in sigma space (alpha = 1, lambda = -log
    sigma). ``history`` [(lambda, D)] ends with the evaluation at sigma (m0) and holds the
    ``order - 1`` before it. ``evaluation`` None: the predictor UniP-order; else the corrector
    UniC-order, with D at ``target`` (evaluated at the predicted point) as the extra node.

    With h = lambda_target - lambda_0, r_k = (lambda_k - lambda_0) / h and D1_k = (m_k - m0)/r_k:
        x_target = (target/sigma)·x + (1 - e^{-h})·m0 - B(h)·sum_k rho_k·D1_k,
    where rho solves R rho = g (R_ik = r_k^(i-1), g_i = i!·phi_{i+1}(-h)·(-h)^i / B(h), eq. 8 of
    the paper); the 2nd-order predictor uses rho = 1/2 (as the official code and diffusers).
    """
    lam0, m0 = history[-1]
    h = -math.log(target) - lam0
    hh = -h  # data prediction integrates in -lambda
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1  # bh2: B(h) = e^{hh} - 1
    rks, d1s = [], []
    for lam_k, m_k in reversed(history[-order:-1]):
        rks.append((lam_k - lam0) / h)
        d1s.append((m_k - m0) / rks[-1])
    if evaluation is not None:
        rks.append(1.0)
        d1s.append(evaluation - m0)
    g, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for i in range(1, len(rks) + 1):
        g.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if len(rks) <= 1:  # the 2nd-order predictor and the 1st-order corrector: rho = 1/2
        rhos = [0.5] * len(rks)
    else:
        matrix = torch.tensor([[r ** (i - 1) for r in rks] for i in range(1, len(rks) + 1)],
                              dtype=torch.float64)  # fmt: skip
        rhos = torch.linalg.solve(matrix, torch.tensor(g, dtype=torch.float64)).tolist()
    out = (target / sigma) * x - h_phi_1 * m0
    for rho, d1 in zip(rhos, d1s, strict=True):
        out = out - (b_h * rho) * d1
    return out


def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 2,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """UniPC with B(h) = e^h - 1 ("bh2"), data prediction (Zhao et al. 2023; diffusers'
    UniPCMultistepScheduler with solver_type "bh2", lower_order_final). Step i evaluates D at
    x_i, first corrects x_i with it (UniC, the order of the previous predictor: no extra call),
    then predicts x_{i+1} (UniP) with order min(order, i + 1, N - i); the last step, to 0,
    returns D. NFE = N. ``generator`` is unused (deterministic)."""
    if order < 1:
        raise ValueError(f"UniPC order must be >= 1, got {order}")
    values = _check_sigmas(sigmas)
    num_steps = len(values) - 1
    history: list[tuple[float, Tensor]] = []  # (lambda, D), newest last
    last: tuple[Tensor, float, int] | None = None  # (x, sigma, order) of the last predictor
    for i, (s, s_next) in enumerate(pairwise(values)):
        denoised = call_denoiser(denoiser, x, s, cond)
        if last is not None:
            x = _unipc_update(last[0], last[1], s, history, last[2], evaluation=denoised)
        history = [*history, (-math.log(s), denoised)][-order:]
        step_order = min(order, len(history), num_steps - i)
        last = (x, s, step_order)
        x = denoised if s_next == 0 else _unipc_update(x, s, s_next, history, step_order)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised})
    return x


def lms_coefficients(nodes: list[float], start: float, end: float) -> list[float]:
    """Weights w_j = int_start^end l_j(tau) dtau of the Lagrange basis polynomials l_j over
    ``nodes`` (the sigmas of the past derivatives, newest first), integrated exactly (the
    polynomial's antiderivative, not quadrature)."""
    weights = []
    for j, node in enumerate(nodes):
        others = [n for k, n in enumerate(nodes) if k != j]
        basis = Polynomial.fromroots(others) if others else Polynomial([1.0])
        basis = basis / math.prod(node - n for n in others)
        antiderivative = basis.integ()
        weights.append(float(antiderivative(end) - antiderivative(start)))
    return weights


def sample_lms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 4,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Linear multistep (Adams-Bashforth on the sigma grid; Karras et al. 2022 / k-diffusion's
    ``sample_lms``; diffusers' LMSDiscreteScheduler): with d_i = (x_i - D(x_i, sigma_i))/sigma_i,
    x_{i+1} = x_i + sum_j w_j·d_{i-j} over the last min(order, i + 1) derivatives, w_j the
    integral over [sigma_i, sigma_{i+1}] of their Lagrange interpolant's basis. NFE = N.
    ``generator`` is unused (deterministic)."""
    if order < 1:
        raise ValueError(f"LMS order must be >= 1, got {order}")
    values = _check_sigmas(sigmas)
    derivatives: list[Tensor] = []  # newest first
    for i, (s, s_next) in enumerate(pairwise(values)):
        denoised = call_denoiser(denoiser, x, s, cond)
        derivatives = [(x - denoised) / s, *derivatives[: order - 1]]
        nodes = [values[i - j] for j in range(len(derivatives))]
        weights = lms_coefficients(nodes, s, s_next)
        for w, d in zip(weights, derivatives, strict=True):
            x = x + w * d
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised})
    return x
