"""The new samplers against independent implementations: diffusers' schedulers (0.42) driven on
the same sigma grid with the same denoiser (a Gaussian mixture's exact E[x0 | x]) and, where the
algorithm injects noise, the same noise; plus the exact Gaussian ODE solution for convergence
order. diffusers' VP schedulers (DPM-Solver++, UniPC) see x / sqrt(1 + sigma^2) and an x0
("sample") prediction; its sigma-space schedulers (LMS, Euler / DPM-2 ancestral) see x and the
eps prediction (x - D) / sigma."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

from noisecls.oracles import GaussianMixture
from noisecls.process.schedules import exponential_sigmas, karras_sigmas
from noisecls.samplers import (
    SamplerConfig,
    run_sampler,
    sample_dpm_2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler_ancestral,
    sample_lms,
    sample_unipc,
)

SHAPE = (64, 2)


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.0]], dtype=torch.float64)
    return GaussianMixture.isotropic(torch.tensor([0.3, 0.3, 0.4]), means, 0.3)


def _start(sigma_max: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sigma_max * torch.randn(SHAPE, generator=g, dtype=torch.float64)


def _on_grid(scheduler, sigmas: torch.Tensor):
    """The scheduler set up for len(sigmas) - 1 steps, then given our sigma grid."""
    scheduler.set_timesteps(len(sigmas) - 1)
    scheduler.sigmas = sigmas.clone()
    scheduler.set_begin_index(0)
    return scheduler


def _run_vp(scheduler, mixture, x, sigmas, noises=None):
    """diffusers' VP-space loop: sample = x / sqrt(1 + sigma^2), model output = D(x, sigma)."""
    _on_grid(scheduler, sigmas)
    sample = x / math.sqrt(1 + float(sigmas[0]) ** 2)
    for i, t in enumerate(scheduler.timesteps):
        s = float(sigmas[i])
        denoised = mixture.denoiser()(sample * math.sqrt(1 + s**2), s)
        extra = {"variance_noise": noises[i]} if noises is not None and i < len(noises) else {}
        sample = scheduler.step(denoised, t, sample, **extra).prev_sample
    return sample.double()  # at sigma = 0 the VP and sigma-space samples coincide


def _eps(mixture, x, s):
    return (x - mixture.denoiser()(x, s)) / s


VP_CASES = {
    "dpmpp_2m": (sample_dpmpp_2m, {},
                 dict(algorithm_type="dpmsolver++", solver_order=2, prediction_type="sample")),
    "unipc_2": (sample_unipc, {"order": 2},
                dict(solver_type="bh2", solver_order=2, prediction_type="sample")),
    "unipc_3": (sample_unipc, {"order": 3},
                dict(solver_type="bh2", solver_order=3, prediction_type="sample")),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(VP_CASES))
@pytest.mark.parametrize("grid", ["karras", "exponential"])
def test_deterministic_multistep_equals_diffusers(mixture, case, grid):
    fn, options, scheduler_options = VP_CASES[case]
    if grid == "karras":
        sigmas = karras_sigmas(12, 0.002, 80.0)
    else:
        sigmas = exponential_sigmas(20, 0.01, 20.0)
    x = _start(float(sigmas[0]))
    ours = fn(mixture.denoiser(), x.clone(), sigmas, **options)
    cls = UniPCMultistepScheduler if case.startswith("unipc") else DPMSolverMultistepScheduler
    theirs = _run_vp(cls(**scheduler_options), mixture, x, sigmas)
    # diffusers casts its update to float32: agreement to float32 rounding
    assert (ours - theirs).abs().max() < 2e-5, (ours - theirs).abs().max()


def test_dpmpp_2m_sde_equals_diffusers_with_the_same_noise(mixture):
    sigmas = karras_sigmas(12, 0.002, 80.0)
    x = _start(80.0)
    ours = sample_dpmpp_2m_sde(mixture.denoiser(), x.clone(), sigmas,
                               generator=torch.Generator().manual_seed(7))  # fmt: skip
    # the noise the sampler drew: one N(0, I) per step to sigma > 0, from its generator
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(11)]
    scheduler = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2,
                                            prediction_type="sample")  # fmt: skip
    theirs = _run_vp(scheduler, mixture, x, sigmas, noises)
    assert (ours - theirs).abs().max() < 2e-5
    deterministic = sample_dpmpp_2m(mixture.denoiser(), x.clone(), sigmas)
    assert (ours - deterministic).abs().max() > 0.1  # the noise mattered


def test_lms_equals_diffusers(mixture):
    sigmas = karras_sigmas(15, 0.002, 80.0)
    x = _start(80.0)
    ours = sample_lms(mixture.denoiser(), x.clone(), sigmas, order=4)
    scheduler = _on_grid(LMSDiscreteScheduler(), sigmas)
    sample = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        sample = scheduler.step(_eps(mixture, sample, float(sigmas[i])), t, sample).prev_sample
    assert (ours - sample).abs().max() < 1e-8


@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2_ancestral"])
def test_ancestral_samplers_equal_diffusers_with_the_same_generator(mixture, name):
    sigmas = karras_sigmas(10, 0.002, 80.0)
    x = _start(80.0)
    fn = sample_euler_ancestral if name == "euler_ancestral" else sample_dpm_2_ancestral
    ours = fn(mixture.denoiser(), x.clone(), sigmas, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sample = x.clone()
    if name == "euler_ancestral":
        scheduler = _on_grid(EulerAncestralDiscreteScheduler(), sigmas)
        for i, t in enumerate(scheduler.timesteps):
            eps = _eps(mixture, sample, float(sigmas[i]))
            sample = scheduler.step(eps, t, sample, generator=g).prev_sample
    else:
        scheduler = _kdpm2_on_grid(sigmas)
        for t in scheduler.timesteps:
            first = scheduler.state_in_first_order
            k = scheduler.step_index or 0
            s = float(scheduler.sigmas[k] if first else scheduler.sigmas_interpol[k - 1])
            sample = scheduler.step(_eps(mixture, sample, s), t, sample, generator=g).prev_sample
    assert (ours - sample).abs().max() < 1e-5, (ours - sample).abs().max()


def _kdpm2_on_grid(sigmas: torch.Tensor) -> KDPM2AncestralDiscreteScheduler:
    """KDPM2AncestralDiscreteScheduler on our grid: its set_timesteps derives interleaved
    (sigma, sigma_up, sigma_down, midpoint) tables from its own sigmas; rebuilt here from ours
    in its layout (each interval's entries repeated for its two stages)."""
    scheduler = KDPM2AncestralDiscreteScheduler()
    scheduler.set_timesteps(len(sigmas) - 1)
    nxt = torch.cat([sigmas[1:], sigmas.new_zeros(1)])
    up = (nxt**2 * (sigmas**2 - nxt**2) / sigmas.clamp_min(1e-300) ** 2).clamp_min(0).sqrt()
    down = (nxt**2 - up**2).sqrt()
    down[-1] = 0.0
    mid = sigmas.log().lerp(down.log(), 0.5).exp()
    mid[-2:] = 0.0

    def interleave(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([v[:1], v[1:].repeat_interleave(2), v[-1:]])

    scheduler.sigmas, scheduler.sigmas_interpol = interleave(sigmas), interleave(mid)
    scheduler.sigmas_up, scheduler.sigmas_down = interleave(up), interleave(down)
    scheduler.set_begin_index(0)
    return scheduler


def test_run_sampler_counts_and_names(mixture):
    sigmas = karras_sigmas(8, 0.002, 80.0)
    x = _start(80.0)
    expected = {"dpmpp_2m": 8, "dpmpp_2m_sde": 8, "unipc": 8, "lms": 8, "euler_ancestral": 8,
                "dpm_2_ancestral": 15}  # fmt: skip
    for name, nfe in expected.items():
        g = torch.Generator().manual_seed(0)
        out, used = run_sampler(SamplerConfig(name, 8), mixture.denoiser(), x, sigmas, generator=g)
        assert used == nfe and torch.isfinite(out).all(), name
    assert SamplerConfig("euler_ancestral").eta == 1.0 and SamplerConfig("ddim").eta == 0.0
    assert SamplerConfig("unipc").order == 2 and SamplerConfig("lms").order == 4


@pytest.mark.parametrize(("name", "order", "rate"), [("dpmpp_2m", None, 2), ("unipc", 1, 2),
                                                     ("lms", 3, 3)])  # fmt: skip
def test_multistep_solvers_converge_at_their_order(name, order, rate):
    """Gaussian data N(0, v): the probability-flow ODE's solution is x·sqrt(v + s^2)/sqrt(v +
    S^2); halving the log-sigma step divides the error at sigma_min by ~2^rate. UniPC-1 is a
    DDIM predictor whose UniC corrector raises the order to 2 (Zhao et al. 2023, Theorem 3.2);
    at higher orders its first-order last step (lower_order_final) muddles the rate."""
    v = 0.25
    gaussian = GaussianMixture.gaussian(torch.zeros(1, dtype=torch.float64),
                                        torch.full((1, 1), v, dtype=torch.float64))  # fmt: skip
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None] * 80.0
    fn = {"dpmpp_2m": sample_dpmpp_2m, "unipc": sample_unipc, "lms": sample_lms}[name]
    options = {} if order is None else {"order": order}
    errors = []
    for steps in (24, 48, 96):
        sigmas = exponential_sigmas(steps, 0.05, 80.0)[:-1]  # stop at sigma_min, not 0
        exact = x * math.sqrt(v + 0.05**2) / math.sqrt(v + 80.0**2)
        errors.append(float((fn(gaussian.denoiser(), x, sigmas, **options) - exact).abs().max()))
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(r - rate) < 0.4 for r in rates), (errors, rates)
