"""Likelihood estimators against the analytic Gaussian-mixture log-density."""

import math

import pytest
import torch

from noisecls.likelihood import ddpm_elbo_nll, dequantize, nll_to_bits_per_dim, ode_log_likelihood
from noisecls.oracles import GaussianMixture
from noisecls.process.schedules import DiscreteSchedule


@pytest.fixture(scope="module")
def mixture():
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.0]], dtype=torch.float64)
    covs = torch.stack(
        [torch.eye(2) * 0.3, torch.tensor([[0.5, 0.2], [0.2, 0.3]]), torch.eye(2) * 0.2]
    ).double()
    return GaussianMixture(torch.tensor([0.3, 0.3, 0.4]), means, covs)


def test_ode_nll_of_oracle_matches_analytic_exact_trace(mixture):
    x, _ = mixture.sample(64, generator=torch.Generator().manual_seed(0))
    sigma_min, sigma_max = 1e-2, 80.0
    logp = ode_log_likelihood(
        mixture.denoiser(),
        x,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        prior_std=sigma_max,
        num_steps=64,
        trace="exact",
    )
    exact = mixture.noisy_log_prob(x, 1.0, sigma_min)
    per_dim_error = (logp - exact).abs() / 2
    assert per_dim_error.max() < 0.02, per_dim_error.max()


def test_ode_hutchinson_is_unbiased_around_exact_trace(mixture):
    x, _ = mixture.sample(16, generator=torch.Generator().manual_seed(1))
    kwargs = {"sigma_min": 1e-2, "sigma_max": 80.0, "prior_std": 80.0, "num_steps": 16}
    exact = ode_log_likelihood(mixture.denoiser(), x, trace="exact", **kwargs)
    g = torch.Generator().manual_seed(2)
    hutch = torch.stack(
        [
            ode_log_likelihood(
                mixture.denoiser(), x, trace="hutchinson", num_probes=4, generator=g, **kwargs
            )
            for _ in range(16)
        ]
    )
    standard_error = hutch.std(0) / 4 + 1e-3
    z = (hutch.mean(0) - exact) / standard_error
    assert z.abs().mean() < 1.5, z  # |z| ~ 0.8 on average for an unbiased estimate
    assert hutch.std(0).mean() > 0.05  # it is a random estimate


def test_elbo_is_an_upper_bound_on_the_nll(mixture):
    x, _ = mixture.sample(256, generator=torch.Generator().manual_seed(3))
    nll = -mixture.log_prob(x)
    schedule = DiscreteSchedule("linear", num_levels=1000)
    g = torch.Generator().manual_seed(4)
    bound = torch.stack(
        [ddpm_elbo_nll(mixture.denoiser(), x, schedule, generator=g) for _ in range(4)]
    ).mean(0)
    gap = (bound - nll).mean().item()
    assert gap > 0, gap  # a bound, on average over the Monte Carlo x_t
    assert gap < 1.0, gap  # and a reasonably tight one with the exact denoiser
    # a worse denoiser gives a looser bound
    shrunk = ddpm_elbo_nll(
        lambda z, s: 0.9 * mixture.denoiser()(z, s),
        x,
        schedule,
        generator=torch.Generator().manual_seed(4),
    )
    assert shrunk.mean() > bound.mean()


def test_elbo_level_subsampling_is_unbiased(mixture):
    x, _ = mixture.sample(64, generator=torch.Generator().manual_seed(5))
    schedule = DiscreteSchedule("linear", num_levels=200)
    full = torch.stack(
        [
            ddpm_elbo_nll(
                mixture.denoiser(), x, schedule, generator=torch.Generator().manual_seed(i)
            ).mean()
            for i in range(5)
        ]
    )
    g = torch.Generator().manual_seed(1)
    sub = torch.stack(
        [
            ddpm_elbo_nll(mixture.denoiser(), x, schedule, num_levels=20, generator=g).mean()
            for _ in range(40)
        ]
    )
    # the per-level terms are heavy-tailed: compare within three standard errors
    standard_error = (sub.var() / len(sub) + full.var() / len(full)).sqrt()
    assert (sub.mean() - full.mean()).abs() < 3 * standard_error


def test_dequantization_stays_in_the_bin():
    k = torch.arange(256, dtype=torch.float32)
    x = k / 255 * 2 - 1
    y = dequantize(x.repeat(50), 256, generator=torch.Generator().manual_seed(0))
    lo = (k / 256 * 2 - 1).repeat(50)
    assert torch.all(y >= lo) and torch.all(y < lo + 2 / 256)


def test_bits_per_dim_offset_for_8bit_data():
    # a uniform density on [-1, 1]^D has log p = -D log 2: 8-bit data then costs exactly 8 bits
    D = 3072
    nll = torch.tensor([D * math.log(2)])
    assert nll_to_bits_per_dim(nll, D, 256).item() == pytest.approx(8.0)
    assert nll_to_bits_per_dim(nll, D).item() == pytest.approx(1.0)
