"""Samplers driven by the exact oracle denoiser of a 2-D Gaussian mixture."""

import math

import pytest
import torch

from noisecls.oracles import GaussianMixture, mmd_rbf
from noisecls.process.schedules import DiscreteSchedule, karras_sigmas
from noisecls.samplers import (
    SamplerConfig,
    run_sampler,
    sample_ddim,
    sample_dpm_solver_2,
    sample_dpm_solver_2m,
)
from noisecls.samplers.ode import ancestral_step

N = 3000


@pytest.fixture(scope="module")
def mixture():
    angles = torch.arange(4, dtype=torch.float64) * math.pi / 2
    means = torch.stack([2 * angles.cos(), 2 * angles.sin()], 1)
    return GaussianMixture.isotropic(torch.tensor([0.1, 0.2, 0.3, 0.4]), means, 0.4)


@pytest.fixture(scope="module")
def data(mixture):
    x, _ = mixture.sample(N, generator=torch.Generator().manual_seed(1))
    return x.float()


def _sample(mixture, name, sigmas, seed=0, **opts):
    g = torch.Generator().manual_seed(seed)
    x = float(sigmas[0]) * torch.randn(N, 2, generator=g)
    if name == "ddpm":  # VP prior in sigma space has variance 1 + sigma_max^2
        x = x * math.sqrt(1 + float(sigmas[0]) ** 2) / float(sigmas[0])
    cfg = SamplerConfig(name=name, num_steps=len(sigmas) - 1, **opts)
    return run_sampler(cfg, mixture.denoiser(), x, sigmas, generator=g)


def _moment_error(samples, mixture):
    mean_err = (samples.double().mean(0) - mixture.mean()).norm()
    cov_err = (torch.cov(samples.double().T) - mixture.covariance()).norm()
    return mean_err.item(), cov_err.item()


SAMPLERS = [
    ("euler", karras_sigmas(200, 0.002, 80.0), {}, 200),
    ("ddim", karras_sigmas(200, 0.002, 80.0), {"eta": 0.5}, 200),
    ("heun", karras_sigmas(50, 0.002, 80.0), {}, 99),
    ("heun", karras_sigmas(50, 0.002, 80.0), {"s_churn": 10.0}, 99),
    ("dpm_solver_2", karras_sigmas(50, 0.002, 80.0), {}, 99),
    ("dpm_solver_2m", karras_sigmas(50, 0.002, 80.0), {}, 50),
    ("ddpm", DiscreteSchedule().sampling_sigmas(1000), {}, 1000),
]


@pytest.mark.parametrize(
    ("name", "sigmas", "opts", "nfe"), SAMPLERS, ids=[f"{s[0]}-{i}" for i, s in enumerate(SAMPLERS)]
)
def test_sampler_reproduces_the_mixture(mixture, data, name, sigmas, opts, nfe):
    samples, used = _sample(mixture, name, sigmas, **opts)
    assert used == nfe
    mean_err, cov_err = _moment_error(samples, mixture)
    assert mean_err < 0.12 and cov_err < 0.35, (mean_err, cov_err)
    # the MMD to a fresh data sample is at the level of two data samples' MMD
    reference = mmd_rbf(data[: N // 2], data[N // 2 :]).abs().item()
    mmd = mmd_rbf(samples, data).item()
    assert mmd < max(4 * reference, 2e-3), (mmd, reference)
    # component weights are recovered: assign samples to the nearest mean
    nearest = torch.cdist(samples.double(), mixture.means).argmin(1)
    freq = torch.bincount(nearest, minlength=4).double() / N
    assert torch.allclose(freq, mixture.weights, atol=0.03), freq


@pytest.mark.parametrize("name", ["ddim", "heun"])
def test_more_steps_are_much_closer(mixture, data, name):
    coarse, _ = _sample(mixture, name, karras_sigmas(3 if name == "heun" else 5, 0.002, 80.0))
    fine, _ = _sample(mixture, name, karras_sigmas(50, 0.002, 80.0))
    mmd_coarse, mmd_fine = mmd_rbf(coarse, data).item(), mmd_rbf(fine, data).item()
    assert mmd_fine < 0.25 * mmd_coarse, (mmd_fine, mmd_coarse)


def test_deterministic_samplers_follow_the_same_ode(mixture):
    """Euler (1st order) on a fine grid and Heun on a coarser one land on the same points."""
    g = torch.Generator().manual_seed(3)
    x = 80.0 * torch.randn(200, 2, generator=g, dtype=torch.float64)
    den = mixture.denoiser()
    euler, _ = run_sampler(SamplerConfig("euler", 2000), den, x, karras_sigmas(2000, 0.002, 80.0))
    heun, _ = run_sampler(SamplerConfig("heun", 100), den, x, karras_sigmas(100, 0.002, 80.0))
    dpm, _ = run_sampler(
        SamplerConfig("dpm_solver_2", 100), den, x, karras_sigmas(100, 0.002, 80.0)
    )
    assert (euler - heun).abs().max() < 0.05
    assert (dpm - heun).abs().max() < 0.05


def test_same_generator_same_samples(mixture):
    sig = karras_sigmas(10, 0.002, 80.0)
    a, _ = _sample(mixture, "ddim", sig, seed=5, eta=1.0)
    b, _ = _sample(mixture, "ddim", sig, seed=5, eta=1.0)
    c, _ = _sample(mixture, "ddim", sig, seed=6, eta=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ancestral_step_is_the_ddpm_posterior():
    # eta = 1: sigma_down = s_next^2 / s and the added variance is the bridge variance
    down, up = ancestral_step(2.0, 1.0, 1.0)
    assert down == pytest.approx(0.5) and up**2 == pytest.approx(1.0 * (4 - 1) / 4)
    assert ancestral_step(2.0, 1.0, 0.0) == (1.0, 0.0)


def test_sampler_config_rejects_nonsense():
    with pytest.raises(ValueError, match="unknown sampler"):
        SamplerConfig(name="rk45")
    with pytest.raises(ValueError, match="num_steps"):
        SamplerConfig(num_steps=0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        run_sampler(
            SamplerConfig("euler", 2),
            lambda x, s: x,
            torch.zeros(2, 2),
            torch.tensor([1.0, 2.0, 0.0]),
        )


@pytest.mark.parametrize(
    ("name", "order"), [("ddim", 1), ("dpm_solver_2", 2), ("dpm_solver_2m", 2)]
)
def test_ode_solvers_converge_at_their_order(name, order):
    """On Gaussian data N(0, v) the probability-flow ODE is solved in closed form,
    x(sigma) = x_T·sqrt(v + sigma²) / sqrt(v + sigma_T²); halving the step (in log sigma)
    divides the error at sigma_min by ~2^order. The grids stop at sigma_min > 0 (the last step to
    0 is a different, first-order step)."""
    v = 0.25
    gaussian = GaussianMixture.gaussian(torch.zeros(1, dtype=torch.float64),
                                        torch.full((1, 1), v, dtype=torch.float64))  # fmt: skip
    x_t = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None] * 80.0
    solver = {"ddim": sample_ddim, "dpm_solver_2": sample_dpm_solver_2,
              "dpm_solver_2m": sample_dpm_solver_2m}[name]  # fmt: skip
    errors = []
    for steps in (16, 32, 64):
        sigmas = torch.logspace(math.log10(80.0), math.log10(0.05), steps + 1, dtype=torch.float64)
        sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
        exact = x_t * math.sqrt(v + 0.05**2) / math.sqrt(v + 80.0**2)
        stop = {}

        def record(info, stop=stop, last=float(sigmas[-2])):
            if info["sigma_next"] == last:
                stop["x"] = info["x"]

        solver(gaussian.denoiser(), x_t.clone(), sigmas, callback=record)
        errors.append(float((stop["x"] - exact).abs().max()))
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.35 for r in rates), (errors, rates)
