"""wrap_network: an external network in any declared parameterisation is the same Denoiser.

The networks below are the exact Gaussian-mixture posterior expressed the way an external
network of each kind would output it (from only what that network receives); the score networks
return the mixture's exact noisy score, so D = x + sigma²·score is Tweedie's formula checked
against the exact posterior mean.
"""

import math

import pytest
import torch
from torch import nn

from noisecls.errors import NoiseclsError
from noisecls.likelihood import ode_log_likelihood
from noisecls.oracles import GaussianMixture
from noisecls.pretrained import wrap_network
from noisecls.process.schedules import DiscreteSchedule, LogSNRSchedule
from noisecls.samplers import sample_heun


@pytest.fixture(scope="module")
def mixture():
    means = torch.tensor([[-1.0, 0.5], [1.2, -0.3]], dtype=torch.float64)
    return GaussianMixture.isotropic(torch.tensor([0.4, 0.6]), means, 0.3)


class SigmaNet(nn.Module):
    """net(x, sigma) in sigma space returning x0, eps or the score of p_sigma."""

    def __init__(self, mixture, kind):
        super().__init__()
        self.mixture, self.kind = mixture, kind

    def forward(self, x, sigma):
        if self.kind == "score":
            return self.mixture.noisy_score(x, 1.0, sigma)
        x0 = self.mixture.posterior_mean(x, 1.0, sigma)
        return x0 if self.kind == "x0" else (x - x0) / sigma[:, None]


class EDMNet(nn.Module):
    """EDM's raw F(c_in·x, c_noise) of the exact denoiser (Karras et al. 2022, Table 1)."""

    def __init__(self, mixture, sigma_data):
        super().__init__()
        self.mixture, self.sd = mixture, sigma_data

    def forward(self, x_in, c_noise):
        sigma = torch.exp(4 * c_noise)[:, None]
        x = x_in * (sigma**2 + self.sd**2).sqrt()
        x0 = self.mixture.posterior_mean(x, 1.0, sigma[:, 0])
        c_skip = self.sd**2 / (sigma**2 + self.sd**2)
        c_out = sigma * self.sd / (sigma**2 + self.sd**2).sqrt()
        return (x0 - c_skip * x) / c_out


class TimeNet(nn.Module):
    """net(x_t, time input) at the schedule's scaling returning eps, x0, v or the score of x_t."""

    def __init__(self, mixture, schedule, kind):
        super().__init__()
        self.mixture, self.schedule, self.kind = mixture, schedule, kind

    def forward(self, x_t, noise):
        discrete = isinstance(self.schedule, DiscreteSchedule)
        t = noise + 1 if discrete else noise / 999  # the 0-based DDPM timestep, or 999·t
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        if self.kind == "score":
            return self.mixture.noisy_score(x_t, a, s)
        x0 = self.mixture.posterior_mean(x_t, a, s)
        eps = (x_t - a[:, None] * x0) / s[:, None]
        return {"eps": eps, "x0": x0, "v": a[:, None] * eps - s[:, None] * x0}[self.kind]


def noisy_batch(mixture, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, _ = mixture.sample(n, generator=g)
    sigma = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-3, 3, generator=g))
    return x0 + sigma[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64), sigma


SIGMA_CASES = ["x0", "eps", "score"]
TIME_CASES = [
    (DiscreteSchedule(), "eps"),
    (DiscreteSchedule("cosine"), "v"),
    (DiscreteSchedule(), "score"),
    (LogSNRSchedule(), "x0"),
    (LogSNRSchedule(), "score"),
]


@pytest.mark.parametrize("kind", SIGMA_CASES)
def test_sigma_input_networks_give_the_exact_denoiser(mixture, kind):
    x, sigma = noisy_batch(mixture)
    denoiser = wrap_network(SigmaNet(mixture, kind), kind)
    assert torch.allclose(denoiser(x, sigma), mixture.denoiser()(x, sigma), atol=1e-6)


def test_edm_preconditioned_network_gives_the_exact_denoiser(mixture):
    x, sigma = noisy_batch(mixture)
    denoiser = wrap_network(EDMNet(mixture, 0.7), "edm", sigma_data=0.7)
    assert torch.allclose(denoiser(x, sigma), mixture.denoiser()(x, sigma), atol=1e-6)


@pytest.mark.parametrize(
    ("schedule", "kind"), TIME_CASES, ids=[f"{type(s).__name__}-{k}" for s, k in TIME_CASES]
)
def test_time_input_networks_give_the_exact_denoiser(mixture, schedule, kind):
    x, sigma = noisy_batch(mixture)
    denoiser = wrap_network(TimeNet(mixture, schedule, kind), kind, schedule=schedule)
    assert torch.allclose(denoiser(x, sigma), mixture.denoiser()(x, sigma), atol=1e-6)


def test_training_targets_are_what_the_exact_network_outputs(mixture):
    """E[target(x0, eps) | x] = the exact network's output, so the denoising loss of a wrapped
    network is minimised by the exact one (score target -eps/s, the denoising score matching
    target)."""
    schedule = DiscreteSchedule()
    denoiser = wrap_network(TimeNet(mixture, schedule, "score"), "score", schedule=schedule)
    g = torch.Generator().manual_seed(1)
    n = 20000
    sigma = torch.full((n,), 0.7, dtype=torch.float64)
    x0, _ = mixture.sample(n, generator=g)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    residual = denoiser.target(x0, eps, sigma) - denoiser.network_output(x0 + 0.7 * eps, sigma)
    assert residual.mean(0).abs().max() < 4 * residual.std(0).max() / n**0.5


def test_wrapped_network_likelihood_and_sampler_match_the_mixture(mixture):
    """The ODE log-likelihood through a wrapped eps network is the mixture's exact log-density
    (smoothed at sigma_min); Heun through it lands on the mixture (mean within 4 s.e.)."""
    denoiser = wrap_network(SigmaNet(mixture, "eps"), "eps")
    x, _ = mixture.sample(64, generator=torch.Generator().manual_seed(2))
    sigma_min, sigma_max = 0.01, 40.0
    log_p = ode_log_likelihood(
        denoiser, x, sigma_min=sigma_min, sigma_max=sigma_max, prior_std=sigma_max,
        num_steps=48, trace="exact",
    )  # fmt: skip
    exact = mixture.noisy_log_prob(x, 1.0, sigma_min)
    assert (log_p - exact).abs().max() < 0.02
    g = torch.Generator().manual_seed(3)
    sigmas = torch.cat(
        [torch.logspace(math.log10(40), -2, 32, dtype=torch.float64), torch.zeros(1)]
    )
    samples = sample_heun(denoiser, 40 * torch.randn(2000, 2, generator=g, dtype=torch.float64),
                          sigmas)  # fmt: skip
    se = mixture.covariance().diagonal().sqrt() / 2000**0.5
    assert ((samples.mean(0) - mixture.mean()).abs() < 4 * se).all()


def test_declaration_errors_are_one_line(mixture):
    with pytest.raises(NoiseclsError, match="VP schedule"):
        wrap_network(SigmaNet(mixture, "x0"), "v")
    with pytest.raises(NoiseclsError, match="no schedule"):
        wrap_network(EDMNet(mixture, 0.5), "edm", schedule=DiscreteSchedule())
    denoiser = wrap_network(SigmaNet(mixture, "x0"), "x0")
    x, sigma = noisy_batch(mixture, n=4)
    with pytest.raises(NoiseclsError, match="label_keyword"):
        denoiser(x, sigma, class_labels=torch.zeros(4, dtype=torch.long))
