"""Parallel sampling by Picard iteration over the trajectory (ParaDiGMS, Shih et al. 2023).

A first-order sampler on a sigma grid s_0 > ... > s_N is x_{i+1} = x_i + f_i(x_i) + n_i with the
drift f_i(x) = (s_down_i / s_i - 1)·(x - D(x, s_i)) and injected noise n_i = s_up_i·z_i (DDIM with
stochasticity eta, ``ancestral_step``: eta = 0 is Euler = deterministic DDIM, eta = 1 is DDPM).
Picard iteration solves all steps at once (ParaDiGMS Algorithm 1):

    x^{k+1}_j = x_b + sum_{i=b}^{j-1} [f_i(x^k_i) + n_i],    j = b+1 .. b+p,

evaluating the p drifts of the window [b, b+p) in one batched denoiser call. After each sweep the
window slides to the first point whose update is above tolerance (ParaDiGMS section 3.2),

    mean_d((x^{k+1}_j - x^k_j)²) > tol² · v_j    (for any sample of the batch),

v_j = s_j² (s_{j-1}² - s_j²) / s_{j-1}² being the variance of the DDPM (eta = 1) noise of the step
into x_j, the normalisation ParaDiGMS uses for every discretisation (the ratio is the same in
sigma space and in the VP scaling). x_{b+1} is exact after one sweep, so the window always moves
by at least one step and N sweeps reproduce the sequential sampler exactly; the last point
(v_N = 0) is accepted once the points before it have converged. Steps entering the window start
from the last computed point. The noise z_i is drawn up front in the order the sequential
sampler draws it, so with the same generator both target the same trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

from noisecls.denoisers import Denoiser
from noisecls.samplers.ode import _check_sigmas, ancestral_step, standard_noise


@dataclass
class ParallelSampleResult:
    """Output of ``sample_parallel``.

    Attributes:
        samples: x at sigmas[-1], [B, ...].
        iterations: Picard sweeps (sequential rounds of batched denoiser calls).
        nfe: denoiser evaluations per sample, summed over sweeps (the window sizes).
        converged: whether every step met the tolerance within ``max_iterations``.
    """

    samples: Tensor
    iterations: int
    nfe: int
    converged: bool


def _step_variances(values: list[float]) -> list[float]:
    """v_j (j = 1..N) of the module docstring: DDPM step-noise variance into x_j, sigma space."""
    return [s_next**2 * (s**2 - s_next**2) / s**2 for s, s_next in pairwise(values)]


def sample_parallel(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    window: int | None = None,
    tolerance: float = 0.1,
    max_iterations: int | None = None,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
) -> ParallelSampleResult:
    """Picard / ParaDiGMS sampling of the DDIM(eta) discretisation (euler: 0, ddpm: 1).

    Args:
        denoiser: D(x, sigma, **cond); called on window·B points at once.
        x: starting point at sigmas[0], [B, ...] in sigma space.
        sigmas: strictly decreasing grid ending at the final sigma (usually 0), [N + 1].
        eta: DDIM stochasticity; the noise is pre-drawn from ``generator``.
        window: steps solved together (default: all N).
        tolerance: tau of the per-step test (module docstring); 0.1 is ParaDiGMS' default.
        max_iterations: cap on sweeps (default N, which always suffices).
        generator: source of the injected noise (same draws as ``sample_ddim``).
        cond: denoiser keyword arguments, per sample [B, ...].
    """
    values = _check_sigmas(sigmas)
    n_steps = len(values) - 1
    window = n_steps if window is None else window
    if window < 1:
        raise ValueError(f"parallel sampler window must be >= 1, got {window}")
    if tolerance <= 0:
        raise ValueError(f"parallel sampler tolerance must be positive, got {tolerance}")
    if not 0 <= eta <= 1:
        raise ValueError(f"parallel sampler eta must lie in [0, 1], got {eta}")
    max_iterations = n_steps if max_iterations is None else max_iterations
    batch = x.shape[0]
    coef, noise = [], []
    for s, s_next in pairwise(values):
        down, up = ancestral_step(s, s_next, eta)
        coef.append(down / s - 1)
        noise.append(up * standard_noise(x, generator) if up > 0 else torch.zeros_like(x))
    coef_t = torch.tensor(coef, dtype=x.dtype, device=x.device)
    noise_t = torch.stack(noise)  # [N, B, ...]
    threshold = tolerance**2 * torch.tensor(
        [0.0, *_step_variances(values)], dtype=torch.float64, device=x.device
    )  # [N + 1], per point
    traj = x.unsqueeze(0).repeat(n_steps + 1, *[1] * x.ndim)  # [N + 1, B, ...]
    cond_rep = {
        k: v.repeat(window, *[1] * (v.ndim - 1)) for k, v in (cond or {}).items() if v is not None
    }
    begin, iterations, nfe = 0, 0, 0
    while begin < n_steps and iterations < max_iterations:
        end = min(begin + window, n_steps)
        size = end - begin
        points = traj[begin:end]  # [p, B, ...]
        sig = torch.tensor(values[begin:end], dtype=torch.float64, device=x.device)
        flat = points.reshape(size * batch, *x.shape[1:])
        cond_w = {k: v[: size * batch] for k, v in cond_rep.items()}
        denoised = denoiser(flat, sig.repeat_interleave(batch), **cond_w).reshape(points.shape)
        shape = (size, *[1] * x.ndim)
        steps = coef_t[begin:end].reshape(shape) * (points - denoised) + noise_t[begin:end]
        new = traj[begin] + torch.cumsum(steps, dim=0)  # x_{begin+1} .. x_end
        err = (new - traj[begin + 1 : end + 1]).flatten(2).to(torch.float64).pow(2).mean(2)
        above = (err > threshold[begin + 1 : end + 1, None]).any(1)  # [p]
        traj[begin + 1 : end + 1] = new
        iterations += 1
        nfe += size
        # Slide to the first point above tolerance (it was computed from converged points).
        first = torch.nonzero(above)
        begin_next = begin + (int(first[0]) + 1 if first.numel() else size)
        end_next = min(begin_next + window, n_steps)
        if end_next > end:  # steps entering the window start from the last computed point
            traj[end + 1 : end_next + 1] = traj[end]
        begin = begin_next
    return ParallelSampleResult(traj[-1], iterations, nfe, begin >= n_steps)
