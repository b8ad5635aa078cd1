"""Samplers: stateless functions ``sample_<name>(denoiser, x, sigmas, *, generator, cond)``.

``SamplerConfig`` names one with its options (YAML-friendly) and ``run_sampler`` dispatches.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from noisecls.denoisers import CountingDenoiser, Denoiser
from noisecls.samplers.multistep import sample_dpm_solver_2m
from noisecls.samplers.ode import sample_ddim, sample_dpm_solver_2, sample_euler, sample_heun
from noisecls.samplers.parallel import ParallelSampleResult, sample_parallel
from noisecls.samplers.sde import sample_ddpm

SamplerName = Literal["euler", "ddim", "ddpm", "heun", "dpm_solver_2", "dpm_solver_2m"]


@dataclass
class SamplerConfig:
    """Which sampler to run and with what options.

    Args:
        name: euler | ddim | ddpm | heun | dpm_solver_2 (single-step) | dpm_solver_2m
            (multistep: the CDM paper's 25-NFE solver).
        num_steps: number of sigma intervals (NFE: N for euler/ddim/ddpm/dpm_solver_2m,
            2N - 1 for heun and dpm_solver_2).
        eta: DDIM stochasticity (ddim only).
        s_churn, s_tmin, s_tmax, s_noise: EDM stochastic Heun options (heun only).
        parallel: solve the euler / ddim / ddpm trajectory by Picard iteration
            (``sample_parallel``, ParaDiGMS); NFE is then the evaluations per sample summed
            over the sweeps.
        window, tolerance: the parallel sampler's sliding window (None: all steps) and tolerance.
    """

    name: SamplerName = "heun"
    num_steps: int = 18
    eta: float = 0.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
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
        if self.name not in ("euler", "ddim", "ddpm", "heun", "dpm_solver_2", "dpm_solver_2m"):
            raise ValueError(
                f"unknown sampler {self.name!r}; use euler, ddim, ddpm, heun, dpm_solver_2 or "
                "dpm_solver_2m"
            )
        if self.num_steps < 1:
            raise ValueError(f"sampler num_steps must be >= 1, got {self.num_steps}")
        if self.parallel and self.name not in ("euler", "ddim", "ddpm"):
            raise ValueError(
                f"the parallel (Picard) sampler runs euler, ddim or ddpm, not {self.name!r}"
            )
        if self.window is not None and self.window < 1:
            raise ValueError(f"sampler window must be >= 1, got {self.window}")
        if self.tolerance <= 0:
            raise ValueError(f"sampler tolerance must be positive, got {self.tolerance}")


def run_sampler(
    config: SamplerConfig,
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
) -> tuple[Tensor, int]:
    """Run the configured sampler from x at sigmas[0]; returns (samples, NFE)."""
    if config.parallel:
        eta = {"euler": 0.0, "ddim": config.eta, "ddpm": 1.0}[config.name]
        result = sample_parallel(
            denoiser, x, sigmas, eta=eta, window=config.window, tolerance=config.tolerance,
            generator=generator, cond=cond,
        )  # fmt: skip
        return result.samples, result.nfe
    counted = CountingDenoiser(denoiser)
    common = {"generator": generator, "cond": cond}
    if config.name == "euler":
        out = sample_euler(counted, x, sigmas, **common)
    elif config.name == "ddim":
        out = sample_ddim(counted, x, sigmas, eta=config.eta, **common)
    elif config.name == "ddpm":
        out = sample_ddpm(counted, x, sigmas, **common)
    elif config.name == "heun":
        out = sample_heun(
            counted, x, sigmas, s_churn=config.s_churn, s_tmin=config.s_tmin,
            s_tmax=config.s_tmax, s_noise=config.s_noise, **common,
        )  # fmt: skip
    elif config.name == "dpm_solver_2m":
        out = sample_dpm_solver_2m(counted, x, sigmas, **common)
    else:
        out = sample_dpm_solver_2(counted, x, sigmas, **common)
    return out, counted.nfe


__all__ = [
    "ParallelSampleResult",
    "SamplerConfig",
    "run_sampler",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm_solver_2",
    "sample_dpm_solver_2m",
    "sample_euler",
    "sample_heun",
    "sample_parallel",
]
