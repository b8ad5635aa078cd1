"""The parallel (Picard / ParaDiGMS) sampler against the sequential one, with the exact MMSE
denoiser of a Gaussian mixture: same noise, same samples (to tolerance), far fewer sequential
sweeps than steps, for the Euler, DDIM(eta) and DDPM discretisations."""

from __future__ import annotations

import pytest
import torch

from noisecls.oracles import GaussianMixture
from noisecls.process.schedules import DiscreteSchedule, EDMSchedule, LogSNRSchedule
from noisecls.samplers import (
    SamplerConfig,
    run_sampler,
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_parallel,
)


def mixture() -> GaussianMixture:
    means = torch.tensor([[-2.0, 0.5], [1.5, -1.0], [0.5, 2.5]], dtype=torch.float64)
    return GaussianMixture.isotropic([0.3, 0.5, 0.2], means, torch.tensor([0.4, 0.8, 0.3]))


def start(schedule, sigmas, n=128, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    std = schedule.terminal_std(float(sigmas[0]))
    return std * torch.randn(n, 2, generator=g, dtype=torch.float64)


SEQUENTIAL = {
    "euler": (0.0, lambda d, x, s, g: sample_euler(d, x, s, generator=g)),
    "ddim": (0.5, lambda d, x, s, g: sample_ddim(d, x, s, eta=0.5, generator=g)),
    "ddpm": (1.0, lambda d, x, s, g: sample_ddpm(d, x, s, generator=g)),
}


@pytest.mark.parametrize(
    ("name", "schedule"),
    [
        ("euler", DiscreteSchedule()),
        ("ddim", DiscreteSchedule()),
        ("ddpm", DiscreteSchedule()),
        ("euler", EDMSchedule()),
        ("ddpm", LogSNRSchedule()),
    ],
    ids=["euler-ddpm", "ddim-ddpm", "ddpm-ddpm", "euler-edm", "ddpm-vp"],
)
def test_parallel_matches_sequential_in_few_sweeps(name, schedule):
    num_steps = 160
    eta, sequential = SEQUENTIAL[name]
    den = mixture().denoiser()
    sigmas = schedule.sampling_sigmas(num_steps)
    x = start(schedule, sigmas, n=32)
    seq = sequential(den, x, sigmas, torch.Generator().manual_seed(1))
    out = sample_parallel(
        den, x, sigmas, eta=eta, tolerance=0.01, generator=torch.Generator().manual_seed(1)
    )
    assert out.converged
    assert out.iterations <= num_steps // 4, out.iterations  # measured: 22-38 sweeps
    assert out.nfe >= num_steps
    # data spread ~ 2; the tolerance bounds each step's residual update, not the final error
    assert (out.samples - seq).abs().max() < 0.02
    # a looser tolerance converges in fewer sweeps
    loose = sample_parallel(
        den, x, sigmas, eta=eta, tolerance=0.1, generator=torch.Generator().manual_seed(1)
    )
    assert loose.iterations <= out.iterations
    assert (loose.samples - seq).abs().max() < 0.3


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sliding_window_and_exactness(eta):
    """A window of one step is the sequential sampler (N sweeps); N sweeps of any window are
    exact; a small window still converges to the sequential samples."""
    schedule = DiscreteSchedule()
    sigmas = schedule.sampling_sigmas(60)
    den = mixture().denoiser()
    x = start(schedule, sigmas, n=32)
    seq = sample_ddim(den, x, sigmas, eta=eta, generator=torch.Generator().manual_seed(3))

    def par(**kw):
        return sample_parallel(
            den, x, sigmas, eta=eta, generator=torch.Generator().manual_seed(3), **kw
        )

    one = par(window=1)
    assert one.iterations == 60 and one.nfe == 60
    torch.testing.assert_close(one.samples, seq, atol=1e-10, rtol=0)
    exact = par(tolerance=1e-12)
    torch.testing.assert_close(exact.samples, seq, atol=1e-9, rtol=0)
    assert exact.iterations <= 60
    small = par(window=8, tolerance=0.01)
    assert small.converged and small.iterations < 60
    assert small.nfe <= 8 * small.iterations
    assert (small.samples - seq).abs().max() < 0.02


def test_class_conditioning_is_passed_per_sample():
    gm = mixture()
    den = gm.denoiser()
    schedule = EDMSchedule()
    sigmas = schedule.sampling_sigmas(40)
    x = start(schedule, sigmas, n=12)
    labels = torch.arange(12) % 3
    seq = sample_euler(den, x, sigmas, cond={"class_labels": labels})
    out = sample_parallel(den, x, sigmas, window=10, tolerance=1e-3, cond={"class_labels": labels})
    assert (out.samples - seq).abs().max() < 5e-3
    # conditioning matters: samples end near their component's mean
    dist = (out.samples[:, None] - gm.means[None]).norm(dim=-1)
    assert (dist.argmin(1) == labels).float().mean() > 0.9


def test_sampler_config_runs_the_parallel_sampler():
    schedule = DiscreteSchedule()
    sigmas = schedule.sampling_sigmas(100)
    den = mixture().denoiser()
    x = start(schedule, sigmas, n=16)
    config = SamplerConfig("ddpm", 100, parallel=True, tolerance=0.01)
    out, nfe = run_sampler(config, den, x, sigmas, generator=torch.Generator().manual_seed(5))
    seq, seq_nfe = run_sampler(
        SamplerConfig("ddpm", 100), den, x, sigmas, generator=torch.Generator().manual_seed(5)
    )
    assert seq_nfe == 100 and nfe >= 100
    assert (out - seq).abs().max() < 0.02


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="parallel"):
        SamplerConfig("heun", parallel=True)
    with pytest.raises(ValueError, match="window"):
        SamplerConfig("ddim", window=0)
    with pytest.raises(ValueError, match="tolerance"):
        SamplerConfig("ddim", tolerance=0.0)
    den = mixture().denoiser()
    sigmas = DiscreteSchedule().sampling_sigmas(10)
    with pytest.raises(ValueError, match="eta"):
        sample_parallel(den, torch.zeros(2, 2), sigmas, eta=2.0)
    with pytest.raises(ValueError, match="decreasing"):
        sample_parallel(den, torch.zeros(2, 2), sigmas.flip(0))
