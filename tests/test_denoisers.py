"""Adapters: a network that outputs the exact target makes the adapter the exact denoiser."""

import pytest
import torch
from torch import nn

from noisecls.denoisers import EDMDenoiser, GuidedDenoiser, PredictionDenoiser
from noisecls.oracles import GaussianMixture
from noisecls.process.schedules import DiscreteSchedule, LogSNRSchedule, VESchedule


@pytest.fixture(scope="module")
def mixture():
    means = torch.tensor([[-1.0, 0.5], [1.2, -0.3]], dtype=torch.float64)
    return GaussianMixture.isotropic(torch.tensor([0.4, 0.6]), means, 0.3)


class OracleNet(nn.Module):
    """Receives what a backbone receives (scaled x, noise input) and returns the exact target."""

    def __init__(self, mixture, schedule, prediction):
        super().__init__()
        self.mixture, self.schedule, self.prediction = mixture, schedule, prediction

    def time_from_input(self, noise_in):
        if isinstance(self.schedule, DiscreteSchedule):
            return noise_in.double() + 1
        if isinstance(self.schedule, LogSNRSchedule):
            return noise_in.double() / 999
        sigma = torch.exp(4 * noise_in.double())
        return self.schedule.t_from_ve_sigma(sigma)

    def forward(self, x_in, noise_in, class_labels=None):
        t = self.time_from_input(noise_in)
        a, s = self.schedule.alpha(t)[:, None], self.schedule.sigma(t)[:, None]
        x0 = self.mixture.posterior_mean(x_in.double(), a[:, 0], s[:, 0])
        eps = (x_in.double() - a * x0) / s
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.prediction]


CASES = [
    (DiscreteSchedule(), "eps"),
    (DiscreteSchedule(), "x0"),
    (DiscreteSchedule(), "v"),
    (LogSNRSchedule(), "eps"),
    (LogSNRSchedule("cosine"), "v"),
    (VESchedule(), "eps"),
]


@pytest.mark.parametrize(
    ("schedule", "prediction"), CASES, ids=[f"{type(s).__name__}-{p}" for s, p in CASES]
)
def test_prediction_adapter_is_exact(mixture, schedule, prediction):
    denoiser = PredictionDenoiser(OracleNet(mixture, schedule, prediction), schedule, prediction)
    g = torch.Generator().manual_seed(0)
    x0, _ = mixture.sample(500, generator=g)
    sigma = torch.exp(torch.empty(500, dtype=torch.float64).uniform_(-3, 3, generator=g))
    if isinstance(schedule, VESchedule):
        sigma = sigma.clamp(schedule.sigma_min, schedule.sigma_max)
    x = x0 + sigma[:, None] * torch.randn(500, 2, generator=g, dtype=torch.float64)
    expected = mixture.denoiser()(x, sigma)
    assert torch.allclose(denoiser(x, sigma), expected, atol=1e-6)


def test_training_target_matches_network_output_of_the_oracle(mixture):
    """target(x0, eps) is the same quantity the exact network outputs, so the loss is zero in
    expectation only for the exact denoiser: E[target | x] = output."""
    schedule = DiscreteSchedule()
    denoiser = PredictionDenoiser(OracleNet(mixture, schedule, "v"), schedule, "v")
    g = torch.Generator().manual_seed(1)
    sigma = torch.full((20000,), 0.7, dtype=torch.float64)
    eps = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    # E[target | x] = output for the exact network: the residual has mean zero over the joint
    x0s, _ = mixture.sample(20000, generator=g)
    x = x0s + sigma[:, None] * eps
    residual = denoiser.target(x0s, eps, sigma) - denoiser.network_output(x, sigma)
    assert residual.mean(0).abs().max() < 4 * residual.std(0).max() / 20000**0.5


def test_edm_preconditioning_is_exact_with_the_ideal_network(mixture):
    class IdealF(nn.Module):
        def forward(self, x_in, c_noise, class_labels=None):
            sigma = torch.exp(4 * c_noise.double())
            sd2 = 0.25
            x = x_in.double() * (sigma**2 + sd2).sqrt()[:, None]
            c_skip = sd2 / (sigma**2 + sd2)
            c_out = sigma * 0.5 / (sigma**2 + sd2).sqrt()
            return (mixture.denoiser()(x, sigma) - c_skip[:, None] * x) / c_out[:, None]

    denoiser = EDMDenoiser(IdealF(), sigma_data=0.5)
    g = torch.Generator().manual_seed(2)
    x0 = mixture.sample(300, generator=g)[0].double()
    sigma = torch.exp(torch.empty(300, dtype=torch.float64).uniform_(-5, 4, generator=g))
    x = x0 + sigma[:, None] * torch.randn(300, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(denoiser(x, sigma), mixture.denoiser()(x, sigma), atol=1e-8)
    # the training target is the ideal F evaluated at the clean point's own noisy sample
    eps = (x - x0) / sigma[:, None]
    target = denoiser.target(x0, eps, sigma)
    assert torch.allclose(denoiser.denoise_from_output(target, x, sigma), x0, atol=1e-8)


def test_classifier_free_guidance_extrapolates_from_unconditional(mixture):
    """On a mixture, guidance weight w gives (1+w) E[x0|x,k] - w E[x0|x]."""
    den = mixture.denoiser()
    guided = GuidedDenoiser(den, guidance_weight=2.0, null_label=2)
    x = torch.randn(50, 2, dtype=torch.float64)
    sigma = torch.full((50,), 0.8, dtype=torch.float64)
    labels = torch.randint(0, 2, (50,))
    expected = 3 * den(x, sigma, class_labels=labels) - 2 * den(x, sigma)
    assert torch.allclose(guided(x, sigma, class_labels=labels), expected)
    assert torch.equal(
        GuidedDenoiser(den, 0.0, 2)(x, sigma, class_labels=labels),
        den(x, sigma, class_labels=labels),
    )


def test_v_prediction_needs_a_vp_schedule():
    with pytest.raises(ValueError, match="variance-preserving"):
        PredictionDenoiser(nn.Identity(), VESchedule(), "v")
