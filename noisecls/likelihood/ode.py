"""Probability-flow ODE log-likelihood (Song et al. 2021, section 4.3; Chen et al. 2018).

In sigma space the PF-ODE is dx/dlog(sigma) = x - D(x, sigma). Integrating from sigma_min to
sigma_max with the instantaneous change of variables,
    log p_{sigma_min}(x) = log N(x(sigma_max); 0, prior_std^2 I) + int div_x(x - D) dlog(sigma),
where div_x(x - D) = dim - tr(dD/dx). The trace is exact (one backward pass per dimension: for
low-dimensional data) or Hutchinson's estimate averaged over K Rademacher probes held fixed along
the path. Two solvers behind one function: fixed-step RK4 in log(sigma) ("rk4", 4 evaluations
per step) or torchdiffeq's adaptive Dormand-Prince 5(4) ("dopri5", error control by rtol / atol,
as Song et al. and Grathwohl et al. use). The state and the log-density change are integrated in
float64; the denoiser sees x in its input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from noisecls.denoisers import Denoiser

Solver = Literal["rk4", "dopri5"]
Trace = Literal["exact", "hutchinson"]
#: drift of the augmented ODE: (state [B, ...], log sigma) -> (dx/dlog sigma, d(delta)/dlog sigma)
Drift = Callable[[Tensor, float], tuple[Tensor, Tensor]]


@dataclass
class ODELikelihood:
    """What one probability-flow likelihood computation returns.

    Attributes:
        log_likelihood: log p_{sigma_min}(x) in nats, float64 [B] (= prior_log_prob +
            delta_log_prob).
        latent: x carried to sigma_max, float64 [B, ...] (the ODE's encoding of x).
        prior_log_prob: log N(latent; 0, prior_std^2 I), float64 [B].
        delta_log_prob: the integrated divergence int div(x - D) dlog(sigma), float64 [B].
        nfe: denoiser evaluations (per example: the batch is one call), from sigma_min to
            sigma_max.
        solver, rtol, atol, trace, num_probes, num_steps: how it was computed (rtol / atol for
            dopri5, num_steps for rk4, num_probes for hutchinson; None where not used).
    """

    log_likelihood: Tensor
    latent: Tensor
    prior_log_prob: Tensor
    delta_log_prob: Tensor
    nfe: int
    solver: str
    trace: str
    rtol: float | None = None
    atol: float | None = None
    num_probes: int | None = None
    num_steps: int | None = None


def _divergence_of_denoiser(
    denoiser: Denoiser, x: Tensor, sigma: Tensor, trace: str, probes: Tensor | None, cond: dict
) -> tuple[Tensor, Tensor]:
    """(D(x, sigma) detached, tr(dD/dx) [B] float64) by exact trace or the mean of Hutchinson's
    estimate over the probes [K, B, ...]."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        denoised = denoiser(x, sigma, **cond)
        tr = torch.zeros(x.shape[0], device=x.device, dtype=torch.float64)
        if trace == "exact":
            flat_d = denoised.flatten(1)
            for i in range(flat_d.shape[1]):
                (g,) = torch.autograd.grad(flat_d[:, i].sum(), x, retain_graph=True)
                tr += g.flatten(1)[:, i].double()
        else:
            assert probes is not None
            for v in probes:
                (g,) = torch.autograd.grad((denoised * v).sum(), x, retain_graph=True)
                tr += (g * v).flatten(1).sum(1).double()
            tr /= probes.shape[0]
    return denoised.detach(), tr


def rademacher_probes(num_probes: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """K Rademacher (+-1) probes shaped like x, [K, B, ...] in x's dtype."""
    draws = torch.randint(0, 2, (num_probes, *x.shape), generator=generator, device=x.device)
    return draws.to(x.dtype) * 2 - 1


def _integrate_rk4(drift: Drift, x: Tensor, lo: float, hi: float, num_steps: int):
    """Fixed-step classical RK4 of the augmented ODE from log sigma = lo to hi."""
    h = (hi - lo) / num_steps
    state, delta = x, torch.zeros(x.shape[0], device=x.device, dtype=torch.float64)
    s = lo
    for _ in range(num_steps):
        k1, l1 = drift(state, s)
        k2, l2 = drift(state + 0.5 * h * k1, s + 0.5 * h)
        k3, l3 = drift(state + 0.5 * h * k2, s + 0.5 * h)
        k4, l4 = drift(state + h * k3, s + h)
        state = state + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        delta = delta + h / 6 * (l1 + 2 * l2 + 2 * l3 + l4)
        s += h
    return state, delta


def _integrate_dopri5(drift: Drift, x: Tensor, lo: float, hi: float, rtol: float, atol: float):
    """torchdiffeq's adaptive dopri5 of the augmented ODE from log sigma = lo to hi (one step
    size for the whole batch, error control over the state and the log-density change)."""
    from torchdiffeq import odeint

    def func(t: Tensor, y: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return drift(y[0], float(t))

    times = torch.tensor([lo, hi], dtype=torch.float64, device=x.device)
    start = (x, torch.zeros(x.shape[0], device=x.device, dtype=torch.float64))
    state, delta = odeint(func, start, times, method="dopri5", rtol=rtol, atol=atol)
    return state[-1], delta[-1]


def ode_likelihood(
    denoiser: Denoiser,
    x: Tensor,
    *,
    sigma_min: float,
    sigma_max: float,
    prior_std: float,
    solver: Solver = "rk4",
    num_steps: int = 64,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    trace: Trace = "hutchinson",
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
) -> ODELikelihood:
    """log p_{sigma_min}(x) [B] for x [B, ...] in sigma space, with the latent and the NFE.

    Args:
        denoiser: D(x, sigma, **cond).
        sigma_min, sigma_max: integration range (x is treated as a sample at sigma_min).
        prior_std: std of the Gaussian the marginal at sigma_max is taken to be (the schedule's
            ``terminal_std(sigma_max)``).
        solver: "rk4" (``num_steps`` steps uniform in log sigma, 4 calls each) or "dopri5"
            (adaptive, relative / absolute tolerances ``rtol`` / ``atol``).
        trace: "exact" (dim backward passes per call) or "hutchinson" (``num_probes``
            Rademacher probes, drawn from ``generator`` and fixed along the path; the estimate's
            variance falls as 1/num_probes).
    """
    _check_options(solver, trace, num_steps, num_probes, rtol, atol, sigma_min, sigma_max)
    cond = cond or {}
    num_dims = x[0].numel()
    probes = rademacher_probes(num_probes, x, generator) if trace == "hutchinson" else None
    calls = 0

    def drift(state: Tensor, log_sigma: float) -> tuple[Tensor, Tensor]:
        nonlocal calls
        calls += 1
        sigma = torch.full((x.shape[0],), math.exp(log_sigma), dtype=torch.float64, device=x.device)
        denoised, tr = _divergence_of_denoiser(
            denoiser, state.to(x.dtype), sigma, trace, probes, cond
        )
        return state - denoised.double(), num_dims - tr

    lo, hi = math.log(sigma_min), math.log(sigma_max)
    start = x.detach().double()
    if solver == "rk4":
        latent, delta = _integrate_rk4(drift, start, lo, hi, num_steps)
    else:
        latent, delta = _integrate_dopri5(drift, start, lo, hi, rtol, atol)
    z = latent.flatten(1)
    prior = -0.5 * (z / prior_std).pow(2).sum(1) - num_dims * (
        math.log(prior_std) + 0.5 * math.log(2 * math.pi)
    )
    adaptive = solver == "dopri5"
    return ODELikelihood(
        log_likelihood=prior + delta, latent=latent, prior_log_prob=prior, delta_log_prob=delta,
        nfe=calls, solver=solver, trace=trace, rtol=rtol if adaptive else None,
        atol=atol if adaptive else None, num_probes=num_probes if probes is not None else None,
        num_steps=None if adaptive else num_steps,
    )  # fmt: skip


def ode_log_likelihood(denoiser: Denoiser, x: Tensor, **options) -> Tensor:
    """log p_{sigma_min}(x) in nats [B]: ``ode_likelihood(denoiser, x, **options)``'s
    ``log_likelihood`` (same keyword options)."""
    return ode_likelihood(denoiser, x, **options).log_likelihood


def _check_options(
    solver: str, trace: str, num_steps: int, num_probes: int, rtol: float, atol: float,
    sigma_min: float, sigma_max: float,
) -> None:  # fmt: skip
    if solver not in ("rk4", "dopri5"):
        raise ValueError(f"ODE solver must be rk4 or dopri5, got {solver!r}")
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"trace must be exact or hutchinson, got {trace!r}")
    if num_steps < 1 or num_probes < 1:
        raise ValueError(f"need num_steps >= 1 and num_probes >= 1, got {num_steps}, {num_probes}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"ODE tolerances must be positive, got rtol={rtol}, atol={atol}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
