"""Samplers: stateless functions ``sample_<name>(denoiser, x, sigmas, *, generator, cond)``.

``SamplerConfig`` names one with its options (YAML-friendly), and its sigma ladder;
``run_sampler`` dispatches (x0 clipping, NFE counting, and no autograd graph unless the
denoiser needs input gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from typing import Literal, get_args

import torch
from torch import Tensor

from noisecls.denoisers import ClampedDenoiser, CountingDenoiser, Denoiser, needs_input_grad
from noisecls.process.schedules import LADDERS, Ladder, NoiseSchedule
from noisecls.samplers.multistep import (
    sample_dpm_solver_2m,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_lms,
    sample_unipc,
)
from noisecls.samplers.ode import sample_ddim, sample_dpm_solver_2, sample_euler, sample_heun
from noisecls.samplers.parallel import ParallelSampleResult, sample_parallel
from noisecls.samplers.sde import sample_ddpm, sample_dpm_2_ancestral, sample_euler_ancestral

SamplerName = Literal[
    "euler", "ddim", "ddpm", "heun", "dpm_solver_2", "dpm_solver_2m", "dpmpp_2m", "dpmpp_2m_sde",
    "unipc", "lms", "euler_ancestral", "dpm_2_ancestral",
]  # fmt: skip
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
#: samplers whose ``eta`` defaults to 1 (stochastic); every other one's to 0
_STOCHASTIC = ("dpmpp_2m_sde", "euler_ancestral", "dpm_2_ancestral")
#: which options each sampler reads (beyond num_steps, the ladder and clip_x0)
_OPTIONS: dict[str, tuple[str, ...]] = {
    "ddim": ("eta",),
    "heun": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "dpmpp_2m_sde": ("eta", "s_noise"),
    "euler_ancestral": ("eta", "s_noise"),
    "dpm_2_ancestral": ("eta", "s_noise"),
    "unipc": ("order",),
    "lms": ("order",),
}
_DEFAULT_ORDER = {"unipc": 2, "lms": 4}
_MAX_ORDER = {"unipc": 3, "lms": 4}
_PARALLEL = ("euler", "ddim", "ddpm")


@dataclass
class SamplerConfig:
    """Which sampler to run, with what options, on which sigma ladder.

    Args:
        name: euler | ddim | ddpm | heun | dpm_solver_2 (single-step) | dpm_solver_2m
            (multistep: the CDM paper's 25-NFE solver) | dpmpp_2m | dpmpp_2m_sde (DPM-Solver++)
            | unipc (bh2) | lms | euler_ancestral | dpm_2_ancestral.
        num_steps: number of sigma intervals N (NFE: 2N - 1 for heun, dpm_solver_2 and
            dpm_2_ancestral; N for every other sampler).
        eta: stochasticity of ddim / euler_ancestral / dpm_2_ancestral / dpmpp_2m_sde (0: the
            ODE solver). None: 1 for the last three, 0 for ddim.
        s_churn, s_tmin, s_tmax: EDM stochastic Heun options (heun only).
        s_noise: scale of injected noise (heun's churn, the ancestral samplers, dpmpp_2m_sde).
        order: unipc (1..3, default 2) and lms (1..4, default 4) order; None: the default.
        ladder: the sigma grid: ``schedule`` (the schedule's own), ``karras`` (EDM's rho ladder,
            eq. 5), ``exponential`` (uniform in log sigma) or ``vp`` (uniform in the VP SDE's
            time), the last three between the schedule's ``sigma_range()``. Any ladder works for
            any schedule: a discrete (DDPM) network is evaluated at fractional levels (see
            ``DiscreteSchedule``).
        rho: the karras ladder's rho (EDM: 7).
        clip_x0: clamp every denoised estimate to [-clip_x0, clip_x0] (DDPM / ADM's x0
            clipping for images in [-1, 1]); None: no clipping.
        parallel: solve the euler / ddim / ddpm trajectory by Picard iteration
            (``sample_parallel``, ParaDiGMS); NFE is then the evaluations per sample summed
            over the sweeps.
        window, tolerance: the parallel sampler's sliding window (None: all steps) and tolerance.
    """

    name: SamplerName = "heun"
    num_steps: int = 18
    eta: float | None = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    order: int | None = None
    ladder: Ladder = "schedule"
    rho: float = 7.0
    clip_x0: float | None = None
    parallel: bool = False
    window: int | None = None
    tolerance: float = 0.1

    @classmethod
    def from_record(cls, record: dict) -> SamplerConfig:
        """The config a JSON record of it describes (as ``noisecls predict`` manifests store
        it: non-finite floats as the strings "inf" / "nan")."""
        floats = {f.name for f in fields(cls) if "float" in str(f.type)}
        values = {k: float(v) if k in floats and isinstance(v, str) else v
                  for k, v in record.items()}  # fmt: skip
        return cls(**values)

    def __post_init__(self) -> None:
        if self.name not in SAMPLER_NAMES:
            names = ", ".join(SAMPLER_NAMES)
            raise ValueError(f"unknown sampler {self.name!r}; use one of {names}")
        if self.num_steps < 1:
            raise ValueError(f"sampler num_steps must be >= 1, got {self.num_steps}")
        if self.eta is None:  # resolved here, so records and comparisons see the value used
            self.eta = 1.0 if self.name in _STOCHASTIC else 0.0
        if self.order is None:
            self.order = _DEFAULT_ORDER.get(self.name)
        self._check_options()
        if self.parallel and self.name not in _PARALLEL:
            raise ValueError(
                f"the parallel (Picard) sampler runs euler, ddim or ddpm, not {self.name!r}"
            )
        if self.window is not None and self.window < 1:
            raise ValueError(f"sampler window must be >= 1, got {self.window}")
        if self.tolerance <= 0:
            raise ValueError(f"sampler tolerance must be positive, got {self.tolerance}")

    def _check_options(self) -> None:
        """One-line errors for values, and for options the named sampler would ignore."""
        reads = _OPTIONS.get(self.name, ())
        if self.eta != (1.0 if self.name in _STOCHASTIC else 0.0) and "eta" not in reads:
            raise ValueError(f"sampler {self.name!r} takes no eta (ddim and the SDE samplers do)")
        if self.eta is not None and self.eta < 0:
            raise ValueError(f"sampler eta must be >= 0, got {self.eta}")
        if self.order is not None and "order" not in reads:
            raise ValueError(f"sampler {self.name!r} takes no order (unipc and lms do)")
        if self.order is not None and not 1 <= self.order <= _MAX_ORDER[self.name]:
            raise ValueError(
                f"{self.name} order must be in 1..{_MAX_ORDER[self.name]}, got {self.order}"
            )
        if self.ladder not in LADDERS:
            raise ValueError(f"unknown sigma ladder {self.ladder!r}; use {', '.join(LADDERS)}")
        if self.rho <= 0:
            raise ValueError(f"sampler rho must be positive, got {self.rho}")
        if self.clip_x0 is not None and self.clip_x0 <= 0:
            raise ValueError(f"sampler clip_x0 must be positive (or null), got {self.clip_x0}")

    def sigmas(self, schedule: NoiseSchedule) -> Tensor:
        """The sampling sigmas for ``schedule``: float64 [num_steps + 1], descending to 0."""
        return schedule.ladder(self.ladder, self.num_steps, self.rho)


def sampling_grad_mode(denoiser: Denoiser) -> AbstractContextManager:
    """``torch.no_grad()``, unless the denoiser needs input gradients (``needs_input_grad``):
    then the caller's mode (the denoiser enables gradients where it takes them)."""
    return nullcontext() if needs_input_grad(denoiser) else torch.no_grad()


def _sampler_call(config: SamplerConfig) -> Callable[..., Tensor]:
    """The sampler function of ``config``, with its options bound: f(denoiser, x, sigmas, *,
    generator, cond)."""
    options = {k: getattr(config, k) for k in _OPTIONS.get(config.name, ())}
    function = {
        "euler": sample_euler, "ddim": sample_ddim, "ddpm": sample_ddpm, "heun": sample_heun,
        "dpm_solver_2": sample_dpm_solver_2, "dpm_solver_2m": sample_dpm_solver_2m,
        "dpmpp_2m": sample_dpmpp_2m, "dpmpp_2m_sde": sample_dpmpp_2m_sde,
        "unipc": sample_unipc, "lms": sample_lms, "euler_ancestral": sample_euler_ancestral,
        "dpm_2_ancestral": sample_dpm_2_ancestral,
    }[config.name]  # fmt: skip
    return lambda *args, **kwargs: function(*args, **options, **kwargs)


def run_sampler(
    config: SamplerConfig,
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
) -> tuple[Tensor, int]:
    """Run the configured sampler from x at sigmas[0]; returns (samples, NFE).

    The denoiser is clamped to [-clip_x0, clip_x0] when ``config.clip_x0`` is set, and runs
    under ``torch.no_grad`` unless it needs input gradients (``sampling_grad_mode``).
    """
    if config.clip_x0 is not None:
        denoiser = ClampedDenoiser(denoiser, config.clip_x0)
    with sampling_grad_mode(denoiser):
        if config.parallel:
            eta = {"euler": 0.0, "ddim": config.eta, "ddpm": 1.0}[config.name]
            result = sample_parallel(
                denoiser, x, sigmas, eta=eta, window=config.window, tolerance=config.tolerance,
                generator=generator, cond=cond,
            )  # fmt: skip
            return result.samples, result.nfe
        counted = CountingDenoiser(denoiser)
        out = _sampler_call(config)(counted, x, sigmas, generator=generator, cond=cond)
    return out, counted.nfe


__all__ = [
    "SAMPLER_NAMES",
    "ParallelSampleResult",
    "SamplerConfig",
    "run_sampler",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm_2_ancestral",
    "sample_dpm_solver_2",
    "sample_dpm_solver_2m",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "sample_parallel",
    "sample_unipc",
    "sampling_grad_mode",
]
