"""The ITD log-density estimator (noisecls.likelihood.itd) against analytic Gaussian and
Gaussian-mixture densities, with the oracle MMSE denoiser: log p(x) and log p(x) - log p_zeta(x)
match within a Monte Carlo error that shrinks like 1/sqrt(number of integration points)."""

from __future__ import annotations

import math

import pytest
import torch

from noisecls.likelihood.itd import (
    SMOOTHED_TAIL,
    GaussianReference,
    ITDConfig,
    itd_integration_draws,
    itd_log_density_at,
    itd_log_likelihood,
    itd_log_snr_range,
    logistic_defaults,
    truncated_logistic,
)
from noisecls.oracles import GaussianMixture

N = 100  # points per check
POINTS = (8, 64, 512)  # integration points per estimate
# Monte Carlo tolerance c / sqrt(K) on the RMSE over the points (about 1.5x the measured value)
GAUSS_C, MIX_C, MIX_NO_CV_C = 7.0, 11.0, 40.0


def correlated_gaussian() -> GaussianMixture:
    a = torch.tensor([[1.0, 0.0, 0.0], [0.7, 0.6, 0.0], [0.2, -0.5, 0.4]], dtype=torch.float64)
    cov = a @ a.T + 0.05 * torch.eye(3, dtype=torch.float64)
    return GaussianMixture.gaussian(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), cov)


def mixture() -> GaussianMixture:
    means = torch.tensor([[-2.0, 0.5], [1.5, -1.0], [0.5, 2.5]], dtype=torch.float64)
    return GaussianMixture.isotropic([0.3, 0.5, 0.2], means, torch.tensor([0.4, 0.8, 0.3]))


def vp_noised(
    x: torch.Tensor, zeta: float, g: torch.Generator
) -> tuple[torch.Tensor, float, float]:
    """(sqrt(sigmoid(zeta))·x + sqrt(sigmoid(-zeta))·eps, signal scale, noise std)."""
    a, s = math.sqrt(1 / (1 + math.exp(-zeta))), math.sqrt(1 / (1 + math.exp(zeta)))
    return a * x + s * torch.randn(x.shape, generator=g, dtype=x.dtype), a, s


def rmse(err: torch.Tensor) -> float:
    return float(err.pow(2).mean().sqrt())


def estimate(gm, ref, x, k, seed, zeta=None, clip=6.0, control_variate=True):
    config = ITDConfig(num_points=k, clip=clip, control_variate=control_variate)
    zeta_t = None if zeta is None else torch.full((x.shape[0],), zeta, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    return itd_log_likelihood(gm.denoiser(), x, ref, config, data_log_snr=zeta_t, generator=g)


def assert_mc_convergence(errors: dict[int, torch.Tensor], c: float) -> None:
    """The RMSE over the points is within the Monte Carlo tolerance c/sqrt(K) at every K and
    shrinks like it (at least a factor 4 from the fewest to 64x more points); the mean error
    (bias) is within 4 standard errors plus a small allowance for the truncated integral."""
    ks = sorted(errors)
    r = {k: rmse(errors[k]) for k in ks}
    for k in ks:
        assert r[k] < c / math.sqrt(k), (k, r)
    assert r[ks[-1]] < r[ks[0]] / 4, r
    assert r[ks[1]] < r[ks[0]], r
    for k in ks:
        e = errors[k]
        assert abs(float(e.mean())) < 4 * float(e.std()) / math.sqrt(e.numel()) + 0.02, (k, r)


def test_gaussian_log_density_converges_to_analytic():
    gm = correlated_gaussian()
    g = torch.Generator().manual_seed(0)
    x, _ = gm.sample(N, generator=g, dtype=torch.float64)
    # A diagonal reference (ignores the correlations), so the MMSE gap is not zero.
    ref = GaussianReference.fit(gm.mean(), gm.covariance(), min_eigenvalue=1e-6, diagonal=True)
    exact = gm.log_prob(x)
    errors = {k: estimate(gm, ref, x, k, seed=k) - exact for k in POINTS}
    assert_mc_convergence(errors, c=GAUSS_C)


def test_gaussian_reference_of_itself_is_exact():
    """With the full Gaussian reference of a Gaussian, model and reference errors coincide at
    the same noise (control variate): the estimate equals log p(x) for any K."""
    gm = correlated_gaussian()
    x, _ = gm.sample(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = GaussianReference.fit(gm.mean(), gm.covariance(), min_eigenvalue=1e-9)
    est = estimate(gm, ref, x, 3, seed=0)
    torch.testing.assert_close(est, gm.log_prob(x), atol=1e-8, rtol=0)


def test_gaussian_noised_log_ratio_converges_to_analytic():
    gm = correlated_gaussian()
    g = torch.Generator().manual_seed(2)
    x, _ = gm.sample(N, generator=g, dtype=torch.float64)
    ref = GaussianReference.fit(gm.mean(), gm.covariance(), min_eigenvalue=1e-6, diagonal=True)
    zeta = 1.0
    u, a, s = vp_noised(x, zeta, g)
    points = torch.cat([x, u])  # clean data (y = +1) and noised data (y = -1)
    exact = gm.log_prob(points) - gm.noisy_log_prob(points, a, s)
    errors = {}
    for k in POINTS:
        # common random numbers: the same seed for both estimates
        diff = estimate(gm, ref, points, k, seed=k) - estimate(gm, ref, points, k, k, zeta=zeta)
        errors[k] = diff - exact
    assert_mc_convergence(errors, c=GAUSS_C)


def test_mixture_log_density_converges_to_analytic():
    gm = mixture()
    g = torch.Generator().manual_seed(3)
    x, _ = gm.sample(N, generator=g, dtype=torch.float64)
    ref = GaussianReference.fit(gm.mean(), gm.covariance(), min_eigenvalue=1e-6)
    exact = gm.log_prob(x)
    errors = {k: estimate(gm, ref, x, k, seed=k) - exact for k in POINTS}
    assert_mc_convergence(errors, c=MIX_C)
    # without the control variate it still converges (the reference term is then its mean)
    plain = {k: estimate(gm, ref, x, k, k, control_variate=False) - exact for k in POINTS}
    assert_mc_convergence(plain, c=MIX_NO_CV_C)


@pytest.mark.parametrize("zeta", [0.0, 3.0])
def test_mixture_noised_density_and_log_ratio(zeta):
    gm = mixture()
    g = torch.Generator().manual_seed(4)
    x, _ = gm.sample(N, generator=g, dtype=torch.float64)
    ref = GaussianReference.fit(gm.mean(), gm.covariance(), min_eigenvalue=1e-6)
    u, a, s = vp_noised(x, zeta, g)
    points = torch.cat([x[: N // 2], u[: N // 2]])
    exact_zeta = gm.noisy_log_prob(points, a, s)
    exact_ratio = gm.log_prob(points) - exact_zeta
    dens, ratio = {}, {}
    for k in POINTS:
        log_p_zeta = estimate(gm, ref, points, k, seed=10 + k, zeta=zeta)
        dens[k] = log_p_zeta - exact_zeta
        ratio[k] = estimate(gm, ref, points, k, seed=10 + k) - log_p_zeta - exact_ratio
    assert_mc_convergence(dens, c=MIX_C)
    assert_mc_convergence(ratio, c=MIX_C)


def test_common_random_numbers_cancel_noise_in_the_ratio():
    """Shared draws make the log-ratio far less noisy than independent draws."""
    gm = mixture()
    g = torch.Generator().manual_seed(5)
    x, _ = gm.sample(N, generator=g, dtype=torch.float64)
    ref = GaussianReference.fit(gm.mean(), gm.covariance(), min_eigenvalue=1e-6)
    zeta, k = 2.0, 16
    _, a, s = vp_noised(x, zeta, g)
    exact = gm.log_prob(x) - gm.noisy_log_prob(x, a, s)
    shared = estimate(gm, ref, x, k, 7) - estimate(gm, ref, x, k, 7, zeta=zeta)
    independent = estimate(gm, ref, x, k, 7) - estimate(gm, ref, x, k, 8, zeta=zeta)
    assert rmse(shared - exact) < 0.5 * rmse(independent - exact)


def test_gradients_flow_to_the_denoiser():
    """log p estimates are differentiable in the denoiser's parameters (CDL trains through
    them)."""
    gm = mixture()
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    oracle = gm.denoiser()

    def denoiser(x, sigma, **cond):
        return scale * oracle(x, sigma)

    x, _ = gm.sample(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = GaussianReference.fit(gm.mean(), gm.covariance(), min_eigenvalue=1e-6)
    loc, sc, lo, hi = itd_log_snr_range(ITDConfig(), ref)
    draws = itd_integration_draws(x, 8, loc, sc, lo, hi, torch.Generator().manual_seed(1))
    itd_log_density_at(denoiser, x, ref, *draws).sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad) and scale.grad != 0


def test_truncated_logistic_importance_weights():
    """mean(weight·f(a)) integrates f over [low, high]: here f = 1 and f = sigmoid'."""
    g = torch.Generator().manual_seed(0)
    a, w = truncated_logistic((4, 4096), 1.0, 2.0, -3.0, 7.0, stratified=True, generator=g)
    assert a.min() >= -3.0 and a.max() <= 7.0
    torch.testing.assert_close(float((w).mean()), 10.0, rtol=2e-3, atol=0)
    f = torch.sigmoid(a) * torch.sigmoid(-a)
    exact = float(torch.sigmoid(torch.tensor(7.0)) - torch.sigmoid(torch.tensor(-3.0)))
    torch.testing.assert_close(float((w * f).mean()), exact, rtol=2e-3, atol=0)


def test_logistic_defaults_follow_the_official_formula():
    eig = torch.tensor([0.01, 0.1, 1.0, 4.0], dtype=torch.float64)
    loc, scale = logistic_defaults(eig)
    log_eig = eig.log()
    assert loc == pytest.approx(float(-log_eig.mean()))
    assert scale == pytest.approx(math.sqrt(1 + 3 / math.pi * float(log_eig.var())))


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="num_points"):
        ITDConfig(num_points=0)
    with pytest.raises(ValueError, match="reference"):
        ITDConfig(reference="spectral")  # type: ignore[arg-type]
    gm = mixture()
    ref = GaussianReference.fit(gm.mean(), gm.covariance(), min_eigenvalue=1e-6)
    with pytest.raises(ValueError, match="dimensions"):
        itd_log_likelihood(gm.denoiser(), torch.zeros(2, 3), ref)
    with pytest.raises(ValueError, match="empty"):
        itd_log_snr_range(ITDConfig(), ref, limits=(25.0, 10.0))


def test_a_network_range_is_covered_not_truncated():
    """With a network's log-SNR range (a_min, a_max) the integral runs over [a_min, a_max +
    SMOOTHED_TAIL] (the smoothed density; the network is never called above a_max), whatever the
    importance distribution: a loc outside the range shifts the sampling, not the range."""
    gm = mixture()
    ref = GaussianReference.fit(gm.mean(), gm.covariance(), min_eigenvalue=1e-6)
    for config in (ITDConfig(), ITDConfig(loc=30.0, scale=1.0)):
        _, _, low, high = itd_log_snr_range(config, ref, limits=(-10.1, 9.2))
        assert (low, high) == (-10.1, 9.2 + SMOOTHED_TAIL)
