"""Normalising CDM's level densities: annealed importance sampling down the noise levels.

CDM's one-pass likelihood (Theorem 3.2, ``noisecls.likelihood.cdm``) reads the level-t density
off two logits,

    log q_t(x) = f_t(x) - f_{T+1}(x) + log N(x; 0, I),                          (eq. 10 / 23)

which is a normalised density only if the classifier's per-level offsets are exact. The
gradient denoiser (eq. 8) never sees those offsets (grad_x of a per-level constant is 0) and the
cross-entropy barely constrains them: on the toy (README, "Why does CDM trail the DDM") a
cdm_toy model at its 6000-step budget has an x-dependent shape within KL(p_0 || q~_0) = 0.035
nats of the data but log Z_0 = log ∫ q_0 = -1.68 nats, i.e. almost all of its one-pass NLL
error is the normalisation.

This module estimates Z_t = ∫ q_t(x) dx for every level by annealed importance sampling (Neal,
"Annealed importance sampling", Statistics and Computing 2001): chains start exactly at
q_{T+1} = N(0, I) (Z_{T+1} = 1 by construction), and from level t to t - 1 each chain's log
weight gains log q_{t-1}(x) - log q_t(x) = f_{t-1}(x) - f_t(x), after which the chain takes
``mala_steps`` Metropolis-adjusted Langevin steps that leave q_{t-1} invariant (its score is
the gradient denoiser's, grad_x log q_{t-1} = grad_x [f_{t-1} - f_{T+1}] - x, and log q_{t-1}
is known up to Z, which is all the Metropolis ratio needs). Then mean_chains exp(log weight) at
level t is an unbiased estimate of Z_t (Neal 2001, section 3) whatever the classifier's
accuracy; the CDM's T + 1 neighbouring levels are close, the regime where AIS has low variance.
Subtracting log Z_t from f_t (``CDM.normalize_levels``) makes every q_t a normalised density
without changing the denoiser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from noisecls.denoisers import CDMDenoiser

__all__ = ["LevelNormalizers", "cdm_log_normalizers"]


class LevelNormalizers(NamedTuple):
    """AIS estimates of every level's normaliser and how far to trust them.

    Attributes:
        log_z: float64 [T + 2], log Z_t in nats (the last entry exactly 0).
        ess: float64 [T + 2], the effective sample size of the chains' weights at each level as
            a fraction of the chains, (sum w)^2 / (N sum w^2) in (0, 1]. Near 1 the estimate is
            reliable; small values mean a few chains carry the estimate, whose log is then
            unreliable and biased low (the one-pass NLL after normalising comes out too good).
    """

    log_z: Tensor
    ess: Tensor


def _log_q_and_score(
    denoiser: CDMDenoiser, x: Tensor, level: int, class_labels: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(log q_level(x) + log Z_level [B] float64, its x-gradient [B, ...], logits [B, T + 2]
    float64) at x [B, ...]: the model's unnormalised level density (eq. 10) and its score."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        f = denoiser.logits(x_in, class_labels)
        log_q = f[:, level] - f[:, -1] - 0.5 * x_in.pow(2).flatten(1).sum(1)
        (score,) = torch.autograd.grad(log_q.sum(), x_in)
    return log_q.detach().double(), score.detach(), f.detach().double()


def cdm_log_normalizers(
    denoiser: CDMDenoiser,
    data_shape: Sequence[int],
    *,
    num_chains: int = 256,
    mala_steps: int = 1,
    step_size: float | None = None,
    target_acceptance: float = 0.6,
    generator: torch.Generator | None = None,
    class_labels: Tensor | None = None,
    device: torch.device | str | None = None,
) -> LevelNormalizers:
    """log Z_t = log ∫ exp(f_t(x) - f_{T+1}(x)) N(x; 0, I) dx for t = 0..T + 1 by AIS.

    Args:
        denoiser: the CDM classifier (its ``logits``) in VP scaling.
        data_shape: shape of one sample (e.g. [2] or [C, H, W]).
        num_chains: AIS chains (one batch through the classifier per MALA evaluation).
        mala_steps: Langevin steps per level (each one forward and backward of the classifier
            on the batch of chains; the weights need the forward of the first).
        step_size: initial MALA step tau (x' = x + tau·score + sqrt(2·tau)·xi); default D^(-1/3)
            (the order of the optimal step for N(0, I) in D dimensions). After every step tau
            is multiplied by 1.05 when the mean acceptance exceeds ``target_acceptance``, else
            divided by 1.05.
        generator: the randomness of the chains (starting points, proposals, acceptances).
        class_labels: [num_chains] labels of a conditional classifier (default: its null
            label, i.e. the unconditional densities).
        device: where the chains live (default: the classifier's parameters' device).

    Returns:
        :class:`LevelNormalizers`: log Z_t in nats (float64 [T + 2]; the last entry is exactly 0,
        q_{T+1} = N(0, I)) and the weights' effective sample size per level. The estimate of
        Z_t (not of log Z_t) is unbiased; log of it is low by about half the relative variance
        of the weights, which a small effective sample size flags.
    """
    if num_chains < 1 or mala_steps < 0:
        raise ValueError(f"need num_chains >= 1, mala_steps >= 0; got {num_chains}, {mala_steps}")
    if device is None:
        device = next(denoiser.parameters(), torch.empty(0)).device
    dtype = next(denoiser.parameters(), torch.empty(0)).dtype
    dim = math.prod(data_shape)
    tau = step_size if step_size is not None else dim ** (-1 / 3)
    num = denoiser.num_levels + 2

    def randn(shape: Sequence[int]) -> Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    x = randn((num_chains, *data_shape))  # exact draws of q_{T+1} = N(0, I)
    log_w = torch.zeros(num_chains, dtype=torch.float64, device=device)
    log_z = torch.zeros(num, dtype=torch.float64, device=device)
    ess = torch.full((num,), float(num_chains), dtype=torch.float64, device=device)
    for level in range(num - 2, -1, -1):  # move the chains from level + 1 to level
        log_q, score, f = _log_q_and_score(denoiser, x, level, class_labels)
        log_w = log_w + f[:, level] - f[:, level + 1]
        log_z[level] = torch.logsumexp(log_w, 0) - math.log(num_chains)
        ess[level] = (2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)).exp()
        for _ in range(mala_steps):  # Metropolis-adjusted Langevin, invariant for q_level
            step = tau * score
            proposal = x + step + math.sqrt(2 * tau) * randn(x.shape)
            log_q_new, score_new, _ = _log_q_and_score(denoiser, proposal, level, class_labels)
            forward = (proposal - x - step).pow(2).flatten(1).sum(1).double()
            backward = (x - proposal - tau * score_new).pow(2).flatten(1).sum(1).double()
            log_ratio = log_q_new - log_q + (forward - backward) / (4 * tau)
            accept_prob = log_ratio.clamp(max=0).exp()
            u = torch.rand(num_chains, generator=generator, device=device, dtype=torch.float64)
            accept = u < accept_prob
            x = torch.where(accept.view(-1, *[1] * len(data_shape)), proposal, x)
            score = torch.where(accept.view(-1, *[1] * len(data_shape)), score_new, score)
            log_q = torch.where(accept, log_q_new, log_q)
            tau = tau * 1.05 if accept_prob.mean().item() > target_acceptance else tau / 1.05
    return LevelNormalizers(log_z, ess / num_chains)
