"""Soft Diffusion's samplers (Daras et al. 2022): they take the corruption, not a sigma ladder.

Both walk a descending time grid 1 = t_0 > ... > t_N = 0 of a blur + noise process
x_t = C_t x0 + s_t·eta (``noisecls.process.blur.BlurNoiseProcess``) with an x0 predictor
h(x_t, t) ~ E[x0 | x_t]. With t = t_i, t' = t_{i+1}, x0_hat = h(x_t, t):

* naive: x_{t'} = C_{t'} x0_hat + s_{t'}·noise (re-corrupt the estimate). It loses detail:
  with the exact predictor on Gaussian data of variance v at a frequency with gain c, a step at
  (nearly) fixed c and s maps the relative signal variance r (state variance c² v r + s²) to
  (r + a) / (1 + a)², a = s² / (c² v), whose fixed point is 1 / (2 + a): over many steps about
  half the variance.
* momentum (the paper's Momentum Sampler): a reverse-SDE noise step at fixed blur, then a deblur
  step along the prediction,
      y = C_t x0_hat,  eps_hat = y - x_t  (= s_t^2 · grad log q_t(x_t), the soft score),
      z = x_t - ((s_{t'}/s_t)^2 - 1)·eps_hat + sqrt(s_t^2 - s_{t'}^2)·noise,
      x_{t'} = z + C_{t'} x0_hat - y.

After the last step the sampler returns h(x_{t_N}, t_N) (``denoise_final``; NFE N + 1) or the
state x_{t_N} itself (NFE N).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from noisecls.process.blur import dct, idct, spatial_ndim
from noisecls.process.schedules import NoiseSchedule

__all__ = [
    "Corruption",
    "SoftSamplerConfig",
    "X0Predictor",
    "run_soft_sampler",
    "sample_momentum",
    "sample_naive",
]


class X0Predictor(Protocol):
    """h(x [B, ...], t [B] float64, **cond) -> x0_hat [B, ...]: an estimate of E[x0 | x_t = x]."""

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor | None) -> Tensor: ...


class Corruption(Protocol):
    """What the samplers need of the process: the DCT gains of C_t and the noise std s_t."""

    def gains(self, t: Tensor, data_shape: tuple[int, ...]) -> Tensor: ...

    def noise_std(self, t: Tensor) -> Tensor: ...


def _check_times(times: Tensor) -> Tensor:
    times = torch.as_tensor(times, dtype=torch.float64)
    if times.ndim != 1 or times.numel() < 2 or not bool((times[1:] < times[:-1]).all()):
        raise ValueError("times must be a strictly decreasing grid of at least two values")
    return times


def _sample(
    predictor: X0Predictor,
    process: Corruption,
    x: Tensor,
    times: Tensor,
    momentum: bool,
    generator: torch.Generator | None,
    cond: dict | None,
    denoise_final: bool,
) -> Tensor:
    """Both samplers in the DCT basis, where C_t is the diagonal of gains c_t: the state is
    X = dct(x) and every blur is a product (the noise is drawn there too: the orthonormal DCT
    of white noise is white noise)."""
    times = _check_times(times)
    cond = cond or {}
    nd = spatial_ndim(x)
    shape = tuple(x.shape[1:])
    X = dct(x, nd)
    for i in range(times.numel() - 1):
        # the process gets times of shape [1]: one set of gains for the whole batch
        t, t_next = times[i : i + 1].to(x.device), times[i + 1 : i + 2].to(x.device)
        X0 = dct(predictor(idct(X, nd), t.expand(x.shape[0]), **cond), nd)
        c_next = process.gains(t_next, shape).to(x.dtype)
        s_next = float(process.noise_std(t_next))
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if not momentum:
            X = c_next * X0 + s_next * noise
            continue
        c = process.gains(t, shape).to(x.dtype)
        s = float(process.noise_std(t))
        Y = c * X0
        eps_hat = Y - X
        # noise step at fixed blur (s -> s_next), then the deblur step (C_t -> C_{t_next})
        Z = X - ((s_next / s) ** 2 - 1) * eps_hat + max(s**2 - s_next**2, 0.0) ** 0.5 * noise
        X = Z + (c_next - c) * X0
    x = idct(X, nd)
    if denoise_final:
        return predictor(x, times[-1:].to(x.device).expand(x.shape[0]), **cond)
    return x


def sample_momentum(
    predictor: X0Predictor,
    process: Corruption,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    denoise_final: bool = True,
) -> Tensor:
    """Momentum Sampler from x = x_{times[0]} [B, ...] down the descending grid ``times``."""
    return _sample(predictor, process, x, times, True, generator, cond, denoise_final)


def sample_naive(
    predictor: X0Predictor,
    process: Corruption,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    denoise_final: bool = True,
) -> Tensor:
    """Naive sampler (re-corrupt the x0 estimate at each level); see the module docstring."""
    return _sample(predictor, process, x, times, False, generator, cond, denoise_final)


@dataclass
class SoftSamplerConfig:
    """Which Soft Diffusion sampler to run.

    Args:
        name: momentum | naive.
        num_steps: number of time intervals N (grid uniform in the process's time t).
        denoise_final: return h(x_0, 0) rather than the final (slightly noisy) state.
    """

    name: Literal["momentum", "naive"] = "momentum"
    num_steps: int = 100
    denoise_final: bool = True

    def __post_init__(self) -> None:
        if self.name not in ("momentum", "naive"):
            raise ValueError(f"unknown Soft Diffusion sampler {self.name!r}; use momentum or naive")
        if self.num_steps < 1:
            raise ValueError(f"sampler num_steps must be >= 1, got {self.num_steps}")

    def sigmas(self, process: NoiseSchedule) -> Tensor:
        """The process's noise stds on the sampler's time grid (``sampling_sigmas``), as
        ``SamplerConfig.sigmas`` gives them for sigma-space samplers."""
        return process.sampling_sigmas(self.num_steps)


def run_soft_sampler(
    config: SoftSamplerConfig,
    predictor: X0Predictor,
    process: Corruption,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
) -> tuple[Tensor, int]:
    """Run the configured sampler from x at times[0] down ``times``; returns (samples, NFE)."""
    sampler = sample_momentum if config.name == "momentum" else sample_naive
    out = sampler(
        predictor, process, x, times, generator=generator, cond=cond,
        denoise_final=config.denoise_final,
    )  # fmt: skip
    return out, len(times) - 1 + int(config.denoise_final)
