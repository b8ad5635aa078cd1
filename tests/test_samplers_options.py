"""SamplerConfig's options reaching the samplers: sigma ladders for any schedule (a DDPM network
evaluated between its levels), x0 clipping, no autograd graph unless the denoiser takes input
gradients, and one-line errors for options a sampler would ignore."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from noisecls.denoisers import (
    ClampedDenoiser,
    CountingDenoiser,
    GuidedDenoiser,
    PredictionDenoiser,
    needs_input_grad,
)
from noisecls.oracles import GaussianMixture
from noisecls.process.schedules import DiscreteSchedule
from noisecls.samplers import SamplerConfig, run_sampler


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.0]], dtype=torch.float64)
    return GaussianMixture.isotropic(torch.tensor([0.3, 0.3, 0.4]), means, 0.3)


class OracleNet(nn.Module):
    """A 'network' trained to perfection on a DiscreteSchedule: from its VP input x_t and time
    input t - 1 (possibly fractional) it returns the mixture's exact eps or v at that level."""

    def __init__(self, mixture: GaussianMixture, schedule: DiscreteSchedule, target: str):
        super().__init__()
        self.mixture, self.schedule, self.target = mixture, schedule, target

    def forward(self, x_t: Tensor, noise_in: Tensor, labels: Tensor | None) -> Tensor:
        level = noise_in.double() + 1
        a, s = self.schedule.alpha(level)[:, None], self.schedule.sigma(level)[:, None]
        x0 = self.mixture.posterior_mean(x_t, a[:, 0], s[:, 0])
        eps = (x_t - a * x0) / s
        return eps if self.target == "eps" else a * eps - s * x0


@pytest.mark.parametrize("target", ["eps", "v"])
def test_a_ddpm_network_between_its_levels_is_the_exact_denoiser(mixture, target):
    """Off the 1000-level grid (a Karras ladder's sigmas), the eps / v adapter feeds the network
    the fractional level and the matching input scaling: with a perfect network the adapter is
    the exact denoiser at that sigma."""
    schedule = DiscreteSchedule()
    denoiser = PredictionDenoiser(OracleNet(mixture, schedule, target), schedule, target)
    sigmas = schedule.ladder("karras", 18)[:-1]
    grid = schedule.ve_sigma_at_levels()
    assert (sigmas[1:-1, None] - grid).abs().min() > 1e-6  # strictly between levels
    x = mixture.sample(len(sigmas), generator=torch.Generator().manual_seed(0))[0].double()
    x = x + sigmas[:, None] * torch.randn(x.shape, dtype=torch.float64)
    assert torch.allclose(denoiser(x, sigmas), mixture.denoiser()(x, sigmas), atol=1e-9)


def test_heun_on_the_karras_ladder_of_a_ddpm_schedule_samples_the_data(mixture):
    schedule = DiscreteSchedule()
    denoiser = PredictionDenoiser(OracleNet(mixture, schedule, "eps"), schedule, "eps")
    config = SamplerConfig("heun", 18, ladder="karras", rho=7.0)
    sigmas = config.sigmas(schedule)
    g = torch.Generator().manual_seed(1)
    x = schedule.terminal_std(float(sigmas[0])) * torch.randn(2000, 2, generator=g).double()
    samples, nfe = run_sampler(config, denoiser, x, sigmas)
    assert nfe == 35
    assert (samples.mean(0) - mixture.mean()).norm() < 0.08
    assert (torch.cov(samples.T) - mixture.covariance()).norm() < 0.15


def test_clip_x0_keeps_every_denoised_estimate_in_range():
    far = GaussianMixture.isotropic(torch.tensor([0.5, 0.5]),
                                    torch.tensor([[-3.0, 0.0], [3.0, 0.0]]), 0.1)  # fmt: skip
    sigmas = DiscreteSchedule().ladder("karras", 10)
    x = 160 * torch.randn(500, 2, generator=torch.Generator().manual_seed(2)).double()
    for name in ("euler", "ddpm", "dpmpp_2m", "unipc"):
        free, _ = run_sampler(SamplerConfig(name, 10), far.denoiser(), x, sigmas)
        clipped, _ = run_sampler(SamplerConfig(name, 10, clip_x0=1.0), far.denoiser(), x, sigmas,
                                 generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert free.abs().max() > 2.5  # the data lie near x = +-3
        assert clipped.abs().max() <= 1.0  # the last step returns a clipped estimate
    with pytest.raises(ValueError, match="clip_x0"):
        SamplerConfig(clip_x0=0.0)


class Recorder(nn.Module):
    """A network denoiser (parameters with gradients) that records the grad mode of each call."""

    def __init__(self, needs_grad: bool = False) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.modes: list[bool] = []
        if needs_grad:
            self.needs_input_grad = True

    def forward(self, x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor:
        self.modes.append(torch.is_grad_enabled())
        return self.scale * x / (1 + sigma[:, None] ** 2)


def test_sampling_keeps_no_graph_unless_the_denoiser_needs_input_gradients():
    sigmas = DiscreteSchedule().ladder("karras", 4)
    x = torch.randn(3, 2)
    plain = Recorder()
    out, _ = run_sampler(SamplerConfig("heun", 4), plain, x, sigmas)
    assert plain.modes == [False] * 7 and out.grad_fn is None and torch.is_grad_enabled()
    wanting = Recorder(needs_grad=True)
    run_sampler(SamplerConfig("euler", 4), wanting, x, sigmas)
    assert wanting.modes == [True] * 4  # the caller's mode, left to the denoiser
    # the decision travels through wrappers (guidance, counting, clipping)
    wrapped = ClampedDenoiser(CountingDenoiser(GuidedDenoiser(Recorder(True), 1.0, 0)), 1.0)
    assert needs_input_grad(wrapped) and not needs_input_grad(lambda x, s: x)


def test_sampler_config_rejects_options_its_sampler_ignores():
    cases = [
        (dict(name="heun", eta=0.5), "takes no eta"),
        (dict(name="euler", order=2), "takes no order"),
        (dict(name="lms", order=5), "order must be in 1..4"),
        (dict(name="unipc", order=4), "order must be in 1..3"),
        (dict(name="unipc", parallel=True), "parallel"),
        (dict(name="euler", ladder="linear"), "unknown sigma ladder"),
        (dict(name="dpmpp_2m_sde", eta=-1.0), "eta must be >= 0"),
        (dict(name="rk4"), "unknown sampler"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            SamplerConfig(**options)
        assert "\n" not in str(info.value)
    # a record written before the new options existed still loads, with the old behaviour
    old = SamplerConfig.from_record({"name": "ddim", "num_steps": 10, "eta": 0.0,
                                     "s_tmax": "inf", "parallel": False})  # fmt: skip
    assert old.ladder == "schedule" and old.clip_x0 is None and math.isinf(old.s_tmax)
