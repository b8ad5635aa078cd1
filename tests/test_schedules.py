"""Noise schedules: VP identity, monotone log-SNR, conversions that round-trip."""

import math

import pytest
import torch

from noisecls.process.schedules import (
    DiscreteSchedule,
    EDMSchedule,
    LogSNRSchedule,
    VESchedule,
    exponential_sigmas,
    karras_sigmas,
    vp_sigmas,
)

VP_SCHEDULES = [
    DiscreteSchedule("linear"),
    DiscreteSchedule("cosine"),
    DiscreteSchedule("dre_uniform"),
    LogSNRSchedule("linear"),
    LogSNRSchedule("cosine"),
]
ALL_SCHEDULES = [*VP_SCHEDULES, VESchedule(), EDMSchedule()]


def _times(schedule):
    if isinstance(schedule, DiscreteSchedule):
        return torch.arange(1, schedule.num_levels + 1, dtype=torch.float64)
    if isinstance(schedule, EDMSchedule):
        return torch.logspace(-3, math.log10(80), 200, dtype=torch.float64)
    # the cosine log-SNR is clipped at -20 just below t = 1; stay inside the invertible range
    t_max = 0.99 if getattr(schedule, "kind", "") == "cosine" else 1.0
    return torch.linspace(1e-3, t_max, 200, dtype=torch.float64)


@pytest.mark.parametrize("schedule", VP_SCHEDULES, ids=lambda s: f"{type(s).__name__}-{s.kind}")
def test_variance_preserving(schedule):
    t = _times(schedule)
    assert torch.allclose(schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2, torch.ones_like(t))


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=lambda s: type(s).__name__)
def test_log_snr_strictly_decreasing_and_ve_sigma_consistent(schedule):
    t = _times(schedule)
    lam = schedule.log_snr(t)
    assert torch.all(lam[1:] < lam[:-1])
    assert torch.allclose(schedule.ve_sigma(t), torch.exp(-lam / 2), rtol=1e-10)


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=lambda s: type(s).__name__)
def test_time_sigma_round_trip(schedule):
    t = _times(schedule)
    back = schedule.t_from_ve_sigma(schedule.ve_sigma(t))
    assert torch.allclose(back, t, rtol=1e-8, atol=1e-8)


def test_ddpm_linear_matches_ho_et_al():
    s = DiscreteSchedule("linear", 1000, 1e-4, 0.02)
    assert torch.allclose(s.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    assert s.alpha_bar[0] == 1
    # alpha_bar_T of the linear schedule is about 4.04e-5 (Ho et al. 2020)
    assert s.alpha_bar[-1].item() == pytest.approx(4.04e-5, rel=0.01)
    assert s.noise_input(torch.tensor([1.0, 1000.0])).tolist() == [0.0, 999.0]


def test_dre_uniform_schedule_is_linear_in_noise_std():
    s = DiscreteSchedule("dre_uniform", num_levels=9)
    t = torch.arange(1, 10, dtype=torch.float64)
    assert torch.allclose(s.sigma(t), t / 10)


def test_fractional_levels_interpolate_between_neighbours():
    s = DiscreteSchedule()
    lo, hi = s.ve_sigma(torch.tensor([10.0])), s.ve_sigma(torch.tensor([11.0]))
    mid = s.ve_sigma(torch.tensor([10.5]))
    assert lo < mid < hi


def test_strided_sampling_grid_uses_level_sigmas():
    s = DiscreteSchedule()
    sig = s.sampling_sigmas(50)
    assert sig.shape == (51,) and sig[-1] == 0
    assert torch.all(sig[1:] < sig[:-1])
    levels = s.sampling_levels(50)
    assert levels[0] == 1000 and levels[-1] == 1
    assert torch.allclose(sig[:-1], s.ve_sigma(levels.double()))


def test_add_noise_matches_definition():
    s = LogSNRSchedule()
    x0, eps = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    xt = s.add_noise(x0, t, eps)
    a, sg = s.alpha(t).float(), s.sigma(t).float()
    assert torch.allclose(xt, a[:, None, None, None] * x0 + sg[:, None, None, None] * eps)
    # in sigma space the same sample is x0 + ve_sigma * eps
    ve = xt / a[:, None, None, None]
    assert torch.allclose(ve, x0 + s.ve_sigma(t).float()[:, None, None, None] * eps, atol=1e-5)


def test_vp_sde_alpha_is_exp_of_integrated_beta():
    s = LogSNRSchedule("linear", beta_min=0.1, beta_max=20.0)
    t = torch.tensor([0.25, 1.0], dtype=torch.float64)
    big_b = 0.1 * t + 0.5 * 19.9 * t**2
    assert torch.allclose(s.alpha(t), torch.exp(-big_b / 2))


def test_karras_ladder_endpoints_and_rho():
    sig = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert sig.shape == (19,)
    assert sig[0].item() == pytest.approx(80.0) and sig[-2].item() == pytest.approx(0.002)
    assert sig[-1] == 0
    # the rho-th roots are evenly spaced
    roots = sig[:-1] ** (1 / 7)
    assert torch.allclose(roots.diff(), roots.diff()[0].expand(17))


def test_edm_training_sigmas_are_log_normal():
    s = EDMSchedule()
    g = torch.Generator().manual_seed(0)
    log_sigma = s.sample_training_t(200_000, generator=g).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown schedule kind"):
        DiscreteSchedule("quadratic")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESchedule(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="num_steps"):
        DiscreteSchedule().sampling_sigmas(0)


# ================================================================================= ladders
def test_exponential_and_karras_ladders_equal_diffusers():
    from diffusers import EulerDiscreteScheduler

    reference = EulerDiscreteScheduler()
    ends = torch.tensor([80.0, 0.002], dtype=torch.float64)
    theirs = torch.as_tensor(reference._convert_to_exponential(ends, 18), dtype=torch.float64)
    assert torch.allclose(exponential_sigmas(18, 0.002, 80.0)[:-1], theirs, rtol=1e-12)
    theirs = torch.as_tensor(reference._convert_to_karras(ends, 18), dtype=torch.float64)
    assert torch.allclose(karras_sigmas(18, 0.002, 80.0, 7.0)[:-1], theirs, rtol=1e-12)


def test_vp_ladder_is_k_diffusions_get_sigmas_vp():
    # k-diffusion: t = linspace(1, eps_s, n), sigma = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
    t = torch.linspace(1, 1e-3, 30, dtype=torch.float64)
    expected = torch.sqrt(torch.exp(19.9 * t**2 / 2 + 0.1 * t) - 1)
    sig = vp_sigmas(30, float(expected[-1]), float(expected[0]))
    assert sig[-1] == 0 and torch.allclose(sig[:-1], expected, rtol=1e-10)


@pytest.mark.parametrize("ladder", ["karras", "exponential", "vp"])
@pytest.mark.parametrize(
    "schedule",
    [
        DiscreteSchedule(),
        DiscreteSchedule("cosine"),
        LogSNRSchedule("linear"),
        VESchedule(),
        EDMSchedule(),
    ],
    ids=["ddpm-linear", "ddpm-cosine", "vp", "ve", "edm"],
)
def test_every_ladder_spans_every_schedules_range(schedule, ladder):
    sig = schedule.ladder(ladder, 12)
    low, high = schedule.sigma_range()
    assert sig.shape == (13,) and sig.dtype == torch.float64 and sig[-1] == 0
    assert float(sig[0]) == pytest.approx(high, rel=1e-12)
    assert float(sig[-2]) == pytest.approx(low, rel=1e-12)
    assert bool((sig[:-1].diff() < 0).all())
    assert torch.equal(schedule.ladder("schedule", 12), schedule.sampling_sigmas(12))
    with pytest.raises(ValueError, match="unknown sigma ladder"):
        schedule.ladder("linear", 12)


def test_discrete_schedule_between_levels_inverts_exactly():
    """At a sigma between two levels the fractional level has alpha = 1/sqrt(1 + sigma^2) and
    ve_sigma = sigma (what an eps / v network's input scaling relies on), and its network time
    input lies between the two levels' inputs."""
    s = DiscreteSchedule()
    grid = s.ve_sigma_at_levels()
    sigma = torch.sqrt(grid[100:400:50] * grid[101:401:50])  # geometric midpoints
    level = s.t_from_ve_sigma(sigma)
    assert bool(((level > torch.arange(101, 401, 50)) & (level < torch.arange(102, 402, 50))).all())
    assert torch.allclose(s.ve_sigma(level), sigma, rtol=1e-12)
    assert torch.allclose(s.alpha(level), 1 / torch.sqrt(1 + sigma**2), rtol=1e-12)
