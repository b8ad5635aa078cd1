"""CDM's exact log-likelihood in one forward pass (Yadin et al. 2024, Theorem 3.2).

For levels t in {0, ..., T + 1} drawn with prior pi and x_{T+1} ~ N(0, I), Bayes' rule gives
(eq. 10 / 23)

    log p_t(x) = log pi_{T+1} - log pi_t + log p(t | x) - log p(T + 1 | x) + log N(x; 0, I).

The classifier's logits f approximate log p(. | x) up to a per-x constant, which cancels in the
difference f_t - f_{T+1}: one network call gives log p_t(x) at every level, t = 0 being the data
density. x is in the classifier's (VP) scaling: x_t = sqrt(abar_t)·x0 + sqrt(1 - abar_t)·eps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from noisecls.denoisers import CDMDenoiser
from noisecls.oracles import standard_normal_log_prob


def cdm_log_density(
    logits: Tensor, x: Tensor, level: int | Tensor = 0, log_prior: Tensor | None = None
) -> Tensor:
    """log p_t(x) in nats [B] from logits [B, T + 2] at x [B, ...] (Theorem 3.2).

    Args:
        level: the level t (an int, or long [B]); 0 is the clean-data density.
        log_prior: log pi over the T + 2 levels ([T + 2], normalised here); None = uniform,
            the paper's choice, for which the prior term vanishes.
    """
    num = logits.shape[1]
    level = torch.as_tensor(level, device=logits.device).long().expand(logits.shape[0])
    if ((level < 0) | (level >= num)).any():
        raise ValueError(f"CDM levels lie in 0..{num - 1}, got {level.unique().tolist()}")
    f = logits.to(torch.float64)
    out = f.gather(1, level[:, None])[:, 0] - f[:, -1]
    if log_prior is not None:
        prior = torch.log_softmax(torch.as_tensor(log_prior).to(f), dim=0)
        if prior.shape != (num,):
            raise ValueError(f"log_prior must have shape [{num}], got {tuple(prior.shape)}")
        out = out + prior[-1] - prior[level]
    return out + standard_normal_log_prob(x.to(torch.float64))


def cdm_log_likelihood(
    denoiser: CDMDenoiser,
    x: Tensor,
    *,
    level: int | Tensor = 0,
    class_labels: Tensor | None = None,
    log_prior: Tensor | None = None,
) -> Tensor:
    """log p_t(x) in nats [B] of x [B, ...] with one classifier call (float64 result).

    ``class_labels`` None gives the unconditional density (the null label of a conditional
    net); labels give log p_t(x | y).
    """
    return cdm_log_density(denoiser.logits(x, class_labels), x, level, log_prior)
