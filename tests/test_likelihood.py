"""Likelihood estimators against the analytic Gaussian-mixture log-density."""

import math

import pytest
import torch

from noisecls.likelihood import ddpm_elbo_nll, dequantize, nll_to_bits_per_dim, ode_log_likelihood
from noisecls.likelihood.ode import ode_likelihood
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


# ================================================================================= adaptive ODE
def test_adaptive_ode_transports_the_exact_density(mixture):
    """dopri5 with exact trace: the change of variables is exact along the flow, so the
    integrated divergence plus the TRUE noisy log-density at the latent (not the Gaussian prior)
    is log p_{sigma_min}(x) to the solver's tolerance; tighter tolerances cost more calls."""
    x, _ = mixture.sample(16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    kwargs = {"sigma_min": 1e-2, "sigma_max": 80.0, "prior_std": 80.0, "trace": "exact"}
    exact = mixture.noisy_log_prob(x, 1.0, 1e-2)
    errors, calls = [], []
    for tol in (1e-3, 1e-6):
        out = ode_likelihood(mixture.denoiser(), x, solver="dopri5", rtol=tol, atol=tol, **kwargs)
        transported = out.delta_log_prob + mixture.noisy_log_prob(out.latent, 1.0, 80.0)
        errors.append(float((transported - exact).abs().max()))
        calls.append(out.nfe)
        assert out.latent.shape == x.shape and out.solver == "dopri5" and out.rtol == tol
        assert torch.allclose(out.log_likelihood, out.prior_log_prob + out.delta_log_prob)
    assert errors[1] < 1e-4 and errors[1] < errors[0] / 10, errors
    assert calls[1] > calls[0] > 6, calls
    # the Gaussian prior at sigma_max = 80 is off by a few 1e-3 nats for this mixture
    assert float((out.log_likelihood - exact).abs().max()) < 1e-2


def test_rk4_path_counts_four_calls_per_step_and_agrees_with_dopri5(mixture):
    x, _ = mixture.sample(8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    kwargs = {"sigma_min": 1e-2, "sigma_max": 80.0, "prior_std": 80.0, "trace": "exact"}
    rk4 = ode_likelihood(mixture.denoiser(), x, solver="rk4", num_steps=24, **kwargs)
    adaptive = ode_likelihood(mixture.denoiser(), x, solver="dopri5", rtol=1e-5, atol=1e-5,
                              **kwargs)  # fmt: skip
    assert rk4.nfe == 4 * 24 and rk4.num_steps == 24 and rk4.rtol is None
    assert torch.allclose(rk4.log_likelihood, adaptive.log_likelihood, atol=2e-3)
    assert torch.equal(ode_log_likelihood(mixture.denoiser(), x, num_steps=24, **kwargs),
                       rk4.log_likelihood)  # fmt: skip


def test_hutchinson_spread_falls_as_one_over_root_k(mixture):
    x, _ = mixture.sample(8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    kwargs = {"sigma_min": 1e-2, "sigma_max": 80.0, "prior_std": 80.0, "num_steps": 1}
    g = torch.Generator().manual_seed(9)

    def spread(k: int) -> float:
        runs = [ode_log_likelihood(mixture.denoiser(), x, num_probes=k, generator=g, **kwargs)
                for _ in range(32)]  # fmt: skip
        return float(torch.stack(runs).std(0).mean())

    ratio = spread(16) / spread(1)
    assert 0.15 < ratio < 0.4, ratio  # 1/sqrt(16) = 0.25


def test_ode_likelihood_rejects_bad_options(mixture):
    x = torch.zeros(2, 2)
    base = {"sigma_min": 1e-2, "sigma_max": 80.0, "prior_std": 80.0}
    for options, message in [({"solver": "euler"}, "rk4 or dopri5"),
                             ({"num_probes": 0}, "num_probes"),
                             ({"solver": "dopri5", "rtol": 0.0}, "tolerances")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            ode_likelihood(mixture.denoiser(), x, **base, **options)


def test_results_name_each_estimator_with_its_settings() -> None:
    """The results tables' estimator column: solver and steps or tolerances, trace and probes
    for the ODE; points for the ITD; the level for CDM's one pass."""
    from noisecls.callbacks.likelihood import describe_estimator

    assert describe_estimator("ode", {"num_steps": 8}) == "ode(rk4,8,hutchinson,K=1)"
    dopri = {"solver": "dopri5", "rtol": 1e-4, "atol": 1e-6, "trace": "exact"}
    assert describe_estimator("ode", dopri) == "ode(dopri5,rtol=0.0001,atol=1e-06,exact)"
    assert describe_estimator("itd", {"num_points": 256}) == "itd(256)"
    assert describe_estimator("cdm", {}) == "cdm(level=0)"
