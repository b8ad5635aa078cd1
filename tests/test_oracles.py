"""Gaussian-mixture oracles against independent computations (autograd, explicit MVNs, MC)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from noisecls.oracles import GaussianMixture, mmd_rbf, standard_normal_log_prob

F64 = torch.float64


def random_mixture(D: int, K: int = 3, seed: int = 0) -> GaussianMixture:
    """A mixture with distinct anisotropic covariances and unequal weights."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(K, generator=g, dtype=F64) + 0.3
    means = 2.0 * torch.randn(K, D, generator=g, dtype=F64)
    A = torch.randn(K, D, D, generator=g, dtype=F64) / math.sqrt(D)
    cov = A @ A.transpose(1, 2) + 0.2 * torch.eye(D, dtype=F64)
    return GaussianMixture(weights / weights.sum(), means, cov)


def random_map(D: int, seed: int = 1, d_out: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d_out = d_out or D
    return torch.eye(d_out, D, dtype=F64) + 0.4 * torch.randn(d_out, D, generator=g, dtype=F64)


def reference(gm: GaussianMixture, x, a, s, C=None):
    """Explicit per-sample MVNs and solves: (log p_t [N], posterior mean [N, D], r [N, K])."""
    N = x.shape[0]
    Cm = torch.eye(gm.dim, dtype=F64) if C is None else C
    Do = Cm.shape[0]
    a = torch.as_tensor(a, dtype=F64).expand(N)
    s = torch.as_tensor(s, dtype=F64).expand(N)
    loc = a[:, None, None] * (gm.means @ Cm.T)[None]  # [N, K, Do]
    cov = a[:, None, None, None] ** 2 * (Cm @ gm.covariances @ Cm.T)[None]
    cov = cov + s[:, None, None, None] ** 2 * torch.eye(Do, dtype=F64)
    log_n = MultivariateNormal(loc, covariance_matrix=cov).log_prob(x[:, None, :])  # [N, K]
    log_joint = log_n + gm.weights.log()
    resp = torch.softmax(log_joint, dim=1)
    resid = torch.linalg.solve(cov, (x[:, None, :] - loc)[..., None])[..., 0]  # [N, K, Do]
    gain = torch.einsum("kij,jl,nkl->nki", gm.covariances, Cm.T, resid)
    pm_k = gm.means[None] + a[:, None, None] * gain
    return torch.logsumexp(log_joint, 1), (resp[..., None] * pm_k).sum(1), resp


def per_sample_scales(N: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 0.2 + torch.rand(N, generator=g, dtype=F64), 0.1 + torch.rand(N, generator=g, dtype=F64)


# ---------------------------------------------------------------- exact formulas
@pytest.mark.parametrize("D", [2, 5])
@pytest.mark.parametrize("with_C", [False, True])
def test_log_prob_and_posterior_mean_match_explicit_mvn(D: int, with_C: bool) -> None:
    gm = random_mixture(D)
    C = random_map(D) if with_C else None
    N = 40
    a, s = per_sample_scales(N)
    x = torch.randn(N, D, dtype=F64, generator=torch.Generator().manual_seed(3)) * 2
    ref_lp, ref_pm, ref_r = reference(gm, x, a, s, C)
    torch.testing.assert_close(gm.noisy_log_prob(x, a, s, C), ref_lp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gm.posterior_mean(x, a, s, C), ref_pm, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gm.component_posterior(x, a, s, C), ref_r, rtol=1e-9, atol=1e-10)


def test_rectangular_and_rank_deficient_maps() -> None:
    """C with fewer outputs than inputs (singular C Sigma C^T) is fine while s > 0."""
    gm = random_mixture(4)
    C = random_map(4, d_out=3)
    a, s = per_sample_scales(20)
    x = torch.randn(20, 3, dtype=F64)
    ref_lp, ref_pm, _ = reference(gm, x, a, s, C)
    torch.testing.assert_close(gm.noisy_log_prob(x, a, s, C), ref_lp)
    pm = gm.posterior_mean(x, a, s, C)
    assert pm.shape == (20, 4)
    torch.testing.assert_close(pm, ref_pm)
    # A singular square blur-like map: averaging pairs of coordinates.
    P = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=F64)
    x4 = torch.randn(20, 4, dtype=F64)
    ref_lp, ref_pm, _ = reference(gm, x4, a, s, P)
    torch.testing.assert_close(gm.noisy_log_prob(x4, a, s, P), ref_lp)
    torch.testing.assert_close(gm.posterior_mean(x4, a, s, P), ref_pm)
    with pytest.raises(ValueError, match="singular"):
        gm.noisy_log_prob(x4, 1.0, 0.0, P)
    with pytest.raises(ValueError, match="positive-definite"):
        gm.noisy(1.0, 0.0, P)


@pytest.mark.parametrize("D", [2, 5])
@pytest.mark.parametrize("with_C", [False, True])
def test_score_is_autograd_of_log_prob(D: int, with_C: bool) -> None:
    gm = random_mixture(D, seed=D)
    C = random_map(D, seed=7) if with_C else None
    N = 64
    a, s = per_sample_scales(N, seed=5)
    x = (3 * torch.randn(N, D, dtype=F64)).requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.noisy_log_prob(x, a, s, C).sum(), x)
    torch.testing.assert_close(gm.noisy_score(x.detach(), a, s, C), grad, rtol=1e-9, atol=1e-10)


def test_noisy_mixture_matches_per_sample_functions() -> None:
    gm = random_mixture(3)
    C = random_map(3)
    a, s = 0.8, 0.6
    noisy = gm.noisy(a, s, C)
    x = torch.randn(50, 3, dtype=F64)
    torch.testing.assert_close(noisy.log_prob(x), gm.noisy_log_prob(x, a, s, C))
    torch.testing.assert_close(noisy.mean(), a * C @ gm.mean())
    expected_cov = a**2 * C @ gm.covariance() @ C.T + s**2 * torch.eye(3, dtype=F64)
    torch.testing.assert_close(noisy.covariance(), expected_cov)


def test_log_prob_integrates_to_one_on_a_grid() -> None:
    gm = GaussianMixture.isotropic([0.3, 0.7], torch.tensor([[-1.0, 0.0], [1.5, 0.5]]), 0.4)
    C = torch.tensor([[1.2, 0.3], [-0.2, 0.8]], dtype=F64)
    h = 0.05
    ticks = torch.arange(-6, 6, h, dtype=F64)
    grid = torch.cartesian_prod(ticks, ticks)
    for a, s, c in [(1.0, 0.0, None), (0.7, 0.5, None), (0.9, 0.3, C)]:
        total = gm.noisy_log_prob(grid, a, s, c).exp().sum() * h * h
        assert abs(float(total) - 1.0) < 1e-4, (a, s, c is None, float(total))


def test_edge_cases_clean_data_and_pure_noise() -> None:
    gm = random_mixture(4)
    x = 2 * torch.randn(30, 4, dtype=F64)
    ref_clean = torch.logsumexp(
        MultivariateNormal(gm.means, covariance_matrix=gm.covariances).log_prob(x[:, None])
        + gm.weights.log(),
        dim=1,
    )
    torch.testing.assert_close(gm.log_prob(x), ref_clean)
    torch.testing.assert_close(gm.noisy_log_prob(x, 1.0, 0.0), ref_clean)
    torch.testing.assert_close(gm.posterior_mean(x, 1.0, 0.0), x)
    # An invertible C at s = 0: the posterior mean inverts it.
    C = random_map(4)
    torch.testing.assert_close(gm.posterior_mean(x @ C.T, 1.0, 0.0, C), x)
    # Pure noise: standard normal, posterior = prior.
    torch.testing.assert_close(gm.noisy_log_prob(x, 0.0, 1.0), standard_normal_log_prob(x))
    torch.testing.assert_close(gm.posterior_mean(x, 0.0, 1.0), gm.mean().expand(30, 4))
    torch.testing.assert_close(gm.component_posterior(x, 0.0, 1.0), gm.weights.expand(30, -1))
    # standard_normal_log_prob against torch.distributions, with image-shaped input.
    img = torch.randn(5, 2, 3, dtype=F64)
    ref = MultivariateNormal(torch.zeros(6, dtype=F64), torch.eye(6, dtype=F64))
    torch.testing.assert_close(standard_normal_log_prob(img), ref.log_prob(img.reshape(5, 6)))


def test_tweedie_and_denoiser() -> None:
    gm = random_mixture(4, seed=11)
    N = 48
    a, s = per_sample_scales(N, seed=12)
    x = 2 * torch.randn(N, 4, dtype=F64)
    score = gm.noisy_score(x, a, s)
    pm = gm.posterior_mean(x, a, s)
    torch.testing.assert_close(pm, (x + s[:, None] ** 2 * score) / a[:, None])
    # Sigma space denoiser, image-shaped input [B, 2, 2] flattened to D = 4.
    den = gm.denoiser()
    sigma = s
    ximg = x.reshape(N, 2, 2)
    out = den(ximg, sigma)
    assert out.shape == ximg.shape
    expected = ximg + sigma[:, None, None] ** 2 * gm.noisy_score(x, 1.0, sigma).reshape(N, 2, 2)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(den.score(ximg, sigma), (out - ximg) / sigma[:, None, None] ** 2)
    # sigma = 0 gives back x; float32 in, float32 out.
    torch.testing.assert_close(den(x, torch.zeros(N, dtype=F64)), x)
    out32 = den(x.float(), sigma.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, out.reshape(N, 4).float(), rtol=1e-4, atol=1e-4)


def test_conditional_denoiser_and_score() -> None:
    gm = random_mixture(3, K=3, seed=4)
    N = 30
    x = 2 * torch.randn(N, 3, dtype=F64)
    sigma = torch.full((N,), 0.7, dtype=F64)
    labels = torch.arange(N) % 4  # label 3 = K is the unconditional ("null") label
    den = gm.denoiser()
    out = den(x, sigma, class_labels=labels)
    for k in range(3):
        comp = GaussianMixture.gaussian(gm.means[k], gm.covariances[k])
        rows = labels == k
        torch.testing.assert_close(out[rows], comp.posterior_mean(x[rows], 1.0, sigma[rows]))
        torch.testing.assert_close(
            gm.noisy_score(x[rows], 1.0, sigma[rows], component=labels[rows]),
            comp.noisy_score(x[rows], 1.0, sigma[rows]),
        )
        torch.testing.assert_close(
            gm.noisy_log_prob(x[rows], 1.0, 0.7, component=labels[rows]),
            comp.noisy_log_prob(x[rows], 1.0, 0.7),
        )
    null = labels == 3
    torch.testing.assert_close(out[null], den(x[null], sigma[null]))


# ---------------------------------------------------------------- Monte Carlo
def test_sample_moments_and_component_frequencies() -> None:
    gm = random_mixture(3, seed=21)
    n = 60_000
    g = torch.Generator().manual_seed(0)
    x, comp = gm.sample(n, generator=g, dtype=F64)
    assert x.shape == (n, 3) and comp.dtype == torch.long
    freq = torch.bincount(comp, minlength=3).to(F64) / n
    se = (gm.weights * (1 - gm.weights) / n).sqrt()
    assert ((freq - gm.weights).abs() < 5 * se).all()
    # Conditional on the component, the samples have mu_k, Sigma_k.
    for k in range(3):
        xk = x[comp == k]
        assert torch.allclose(
            xk.mean(0), gm.means[k], atol=5 * (gm.covariances[k].diag().max() / len(xk)) ** 0.5
        )
        assert torch.allclose(xk.T.cov(), gm.covariances[k], atol=0.06)
    # Same seed, same samples.
    x2, _ = gm.sample(n, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(x, x2)
    assert gm.sample(4)[0].dtype == torch.get_default_dtype()


def test_noisy_moments_match_monte_carlo() -> None:
    gm = random_mixture(3, seed=22)
    C = random_map(3, seed=9)
    a, s = 0.6, 0.8
    n = 100_000
    g = torch.Generator().manual_seed(1)
    x0, _ = gm.sample(n, generator=g, dtype=F64)
    xt = a * x0 @ C.T + s * torch.randn(n, 3, generator=g, dtype=F64)
    noisy = gm.noisy(a, s, C)
    cov = noisy.covariance()
    se_mean = (cov.diag() / n).sqrt()
    assert ((xt.mean(0) - noisy.mean()).abs() < 5 * se_mean).all()
    # Var of the empirical covariance entry ~ (S_ii S_jj + S_ij^2) / n for near-Gaussian data;
    # mixtures have heavier tails, so allow a wide factor: a wrong formula is off by O(1).
    se_cov = ((cov.diag()[:, None] * cov.diag()[None] + cov**2) / n).sqrt()
    assert ((xt.T.cov() - cov).abs() < 10 * se_cov).all()


@pytest.mark.parametrize("with_C", [False, True])
def test_posterior_mean_is_the_mmse_estimator(with_C: bool) -> None:
    """Orthogonality principle: x0 - E[x0|x_t] is uncorrelated with functions of x_t."""
    gm = random_mixture(2, seed=31)
    C = random_map(2, seed=8) if with_C else None
    n = 80_000
    g = torch.Generator().manual_seed(2)
    x0, _ = gm.sample(n, generator=g, dtype=F64)
    a = 0.3 + torch.rand(n, generator=g, dtype=F64)
    s = 0.2 + torch.rand(n, generator=g, dtype=F64)
    Cm = torch.eye(2, dtype=F64) if C is None else C
    xt = a[:, None] * x0 @ Cm.T + s[:, None] * torch.randn(n, 2, generator=g, dtype=F64)
    pm = gm.posterior_mean(xt, a, s, C)
    resid = x0 - pm  # [n, 2]
    feats = torch.stack(
        [torch.ones(n, dtype=F64), xt[:, 0], xt[:, 1], xt[:, 0] * xt[:, 1], a, s, s * xt[:, 0]],
        dim=1,
    )
    prods = resid[:, :, None] * feats[:, None, :]  # [n, 2, F]
    z = prods.mean(0) / (prods.std(0) / math.sqrt(n))
    assert z.abs().max() < 5, z
    # Any perturbation of the oracle has a higher MSE, with margin beyond MC noise.
    mse = resid.pow(2).sum(1).mean()
    wrong_noise = gm.posterior_mean(xt, a, 1.3 * s, C)
    wrong_scale = gm.posterior_mean(xt, 0.8 * a, s, C)
    for other in (wrong_noise, wrong_scale, 0.9 * pm + 0.1 * gm.mean(), pm + 0.05):
        assert (x0 - other).pow(2).sum(1).mean() > mse + 1e-3


# ---------------------------------------------------------------- noise-level classifier
LEVELS_A = torch.tensor([1.0, 0.95, 0.8, 0.55, 0.25], dtype=F64)
LEVELS_S = (1 - LEVELS_A**2).clamp_min(0.0025).sqrt()


def test_noise_level_posterior_is_bayes_on_level_densities() -> None:
    gm = random_mixture(3, seed=41)
    x = 2 * torch.randn(200, 3, dtype=F64)
    dens = gm.noise_level_log_densities(x, LEVELS_A, LEVELS_S)
    assert dens.shape == (200, 5)
    for l_ in range(5):
        torch.testing.assert_close(dens[:, l_], gm.noisy_log_prob(x, LEVELS_A[l_], LEVELS_S[l_]))
    post = gm.noise_level_log_posterior(x, LEVELS_A, LEVELS_S)
    torch.testing.assert_close(post.exp().sum(1), torch.ones(200, dtype=F64))
    torch.testing.assert_close(post, dens - torch.logsumexp(dens, 1, keepdim=True))
    prior = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=F64)
    post_p = gm.noise_level_log_posterior(x, LEVELS_A, LEVELS_S, prior.log())
    joint = dens + prior.log()
    torch.testing.assert_close(post_p, joint - torch.logsumexp(joint, 1, keepdim=True))
    # Shared C: fast path equals the per-level path and the per-sample functions.
    C = random_map(3)
    shared = gm.noise_level_log_densities(x, LEVELS_A, LEVELS_S, C)
    per_level = gm.noise_level_log_densities(x, LEVELS_A, LEVELS_S, C.expand(5, 3, 3))
    torch.testing.assert_close(shared, per_level)
    torch.testing.assert_close(shared[:, 2], gm.noisy_log_prob(x, LEVELS_A[2], LEVELS_S[2], C))


def test_noise_level_posterior_is_calibrated_and_optimal() -> None:
    gm = random_mixture(2, seed=42)
    prior = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=F64)
    n = 40_000
    g = torch.Generator().manual_seed(3)
    level = torch.multinomial(prior, n, replacement=True, generator=g)
    x0, _ = gm.sample(n, generator=g, dtype=F64)
    x = LEVELS_A[level, None] * x0 + LEVELS_S[level, None] * torch.randn(
        n, 2, generator=g, dtype=F64
    )
    post = gm.noise_level_log_posterior(x, LEVELS_A, LEVELS_S, prior.log())
    p = post.exp()
    # E_x[p(l | x)] = prior.
    assert ((p.mean(0) - prior).abs() < 0.01).all(), p.mean(0)
    # Calibration: accuracy of the argmax equals the mean max-posterior; likewise per bin.
    conf, pred = p.max(1)
    correct = (pred == level).to(F64)
    se = (correct.var() / n).sqrt()
    assert abs(correct.mean() - conf.mean()) < 4 * se
    for lo, hi in [(0.0, 0.5), (0.5, 0.8), (0.8, 1.01)]:
        m = (conf >= lo) & (conf < hi)
        if m.sum() > 500:
            se_bin = (correct[m].var() / m.sum()).sqrt()
            assert abs(correct[m].mean() - conf[m].mean()) < 4 * se_bin + 1e-3
    # Bayes optimality: classifiers built on wrong noise stds, or ignoring the prior, have a
    # higher log loss (paired difference, significant beyond MC noise).
    nll = -post.gather(1, level[:, None])[:, 0]
    for wrong_s, wrong_prior in [(1.2 * LEVELS_S, prior.log()), (LEVELS_S, None)]:
        wrong = gm.noise_level_log_posterior(x, LEVELS_A, wrong_s, wrong_prior)
        diff = -wrong.gather(1, level[:, None])[:, 0] - nll
        assert diff.mean() > 4 * diff.std() / math.sqrt(n), (diff.mean(), diff.std())


# ---------------------------------------------------------------- density ratio / DG
def test_log_density_ratio_and_discriminator_identity() -> None:
    p = random_mixture(2, seed=51)
    q = GaussianMixture(p.weights.flip(0), p.means + 0.5, p.covariances * 1.3)
    x = 2 * torch.randn(100, 2, dtype=F64)
    a, s = per_sample_scales(100)
    ratio = p.log_density_ratio(q, x, a, s)
    torch.testing.assert_close(ratio, p.noisy_log_prob(x, a, s) - q.noisy_log_prob(x, a, s))
    torch.testing.assert_close(p.optimal_discriminator_logit(q, x, a, s), ratio)
    # DG: model score + grad of the optimal logit = data score.
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(p.log_density_ratio(q, xg, a, s).sum(), xg)
    torch.testing.assert_close(q.noisy_score(x, a, s) + grad, p.noisy_score(x, a, s))
    # The optimal discriminator minimises the BCE on samples at one noise level.
    n = 30_000
    g = torch.Generator().manual_seed(4)
    a0, s0 = 0.8, 0.5
    xp = a0 * p.sample(n, generator=g, dtype=F64)[0] + s0 * torch.randn(
        n, 2, generator=g, dtype=F64
    )
    xq = a0 * q.sample(n, generator=g, dtype=F64)[0] + s0 * torch.randn(
        n, 2, generator=g, dtype=F64
    )

    def bce(logit_p: torch.Tensor, logit_q: torch.Tensor) -> float:
        sp = torch.nn.functional.softplus
        return float(sp(-logit_p).mean() + sp(logit_q).mean())

    lp, lq = p.log_density_ratio(q, xp, a0, s0), p.log_density_ratio(q, xq, a0, s0)
    best = bce(lp, lq)
    for scale, shift in [(0.8, 0.0), (1.25, 0.0), (1.0, 0.3), (1.0, -0.3)]:
        assert bce(scale * lp + shift, scale * lq + shift) > best + 2e-3


# ---------------------------------------------------------------- MMD
def test_mmd_rbf_matches_naive_and_separates() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 3, generator=g, dtype=F64)
    y = torch.randn(29, 3, generator=g, dtype=F64) + 0.3
    bws = (0.5, 1.0, 2.0)

    def k(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        d2 = ((u[:, None] - v[None]) ** 2).sum(-1)
        return sum(torch.exp(-d2 / (2 * b**2)) for b in bws)

    kxx, kyy = k(x, x), k(y, y)
    naive = (
        (kxx.sum() - kxx.diag().sum()) / (37 * 36)
        + (kyy.sum() - kyy.diag().sum()) / (29 * 28)
        - 2 * k(x, y).mean()
    )
    torch.testing.assert_close(mmd_rbf(x, y, bws), naive)
    torch.testing.assert_close(mmd_rbf(x, y, bws, chunk_size=5), naive)
    # High-dimensional path (matrix-product distances) agrees too.
    xh, yh = torch.randn(20, 8, dtype=F64), torch.randn(25, 8, dtype=F64)
    torch.testing.assert_close(mmd_rbf(xh, yh, bws), mmd_rbf(xh, yh, bws, chunk_size=3))

    gm = random_mixture(2, seed=61)
    shifted = GaussianMixture(gm.weights, gm.means + 0.5, gm.covariances)
    n = 2000
    s1 = gm.sample(n, generator=torch.Generator().manual_seed(6))[0]
    s2 = gm.sample(n, generator=torch.Generator().manual_seed(7))[0]
    s3 = shifted.sample(n, generator=torch.Generator().manual_seed(8))[0]
    same, diff = float(mmd_rbf(s1, s2)), float(mmd_rbf(s1, s3))
    assert abs(same) < 2e-3, same
    assert diff > 10 * max(abs(same), 1e-4), (same, diff)


# ---------------------------------------------------------------- validation
def test_constructors_and_properties() -> None:
    gm = GaussianMixture.isotropic([0.5, 0.5], torch.tensor([[0.0, 1.0], [2.0, 3.0]]), [0.5, 1.0])
    assert gm.dim == 2 and gm.num_components == 2
    torch.testing.assert_close(gm.covariances[1], torch.eye(2, dtype=F64))
    torch.testing.assert_close(gm.mean(), torch.tensor([1.0, 2.0], dtype=F64))
    # Closed-form mixture covariance: within + between-component variance.
    expected = 0.5 * (0.25 + 1.0) * torch.eye(2, dtype=F64) + torch.ones(2, 2, dtype=F64)
    torch.testing.assert_close(gm.covariance(), expected)
    single = GaussianMixture.gaussian(torch.zeros(2), torch.eye(2))
    x = torch.randn(10, 2)
    out = single.log_prob(x)
    assert out.dtype == torch.float32 and out.shape == (10,)
    torch.testing.assert_close(out, standard_normal_log_prob(x))
    assert gm.noisy_log_prob(torch.zeros(0, 2), 1.0, 0.5).shape == (0,)


@pytest.mark.parametrize(
    ("weights", "means", "cov", "match"),
    [
        (torch.ones(2, 1), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2), "weights"),
        (torch.tensor([0.5, 0.6]), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2), "sum to 1"),
        (torch.tensor([1.5, -0.5]), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2), "nonneg"),
        (torch.tensor([0.5, 0.5]), torch.zeros(3, 2), torch.eye(2).expand(2, 2, 2), "means"),
        (torch.tensor([0.5, 0.5]), torch.zeros(2, 2), torch.eye(3).expand(2, 3, 3), "covariances"),
        (
            torch.tensor([0.5, 0.5]),
            torch.zeros(2, 2),
            torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [2.0, 1.0]]]),
            "positive-definite",
        ),
        (
            torch.tensor([1.0]),
            torch.zeros(1, 2),
            torch.tensor([[[1.0, 0.5], [0.0, 1.0]]]),
            "symmetric",
        ),
    ],
)
def test_constructor_errors(weights, means, cov, match) -> None:
    with pytest.raises(ValueError, match=match):
        GaussianMixture(weights, means, cov)


def test_call_errors() -> None:
    gm = random_mixture(3)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="x must have shape"):
        gm.noisy_log_prob(torch.randn(4, 2), 1.0, 0.5)
    with pytest.raises(ValueError, match="a must be"):
        gm.noisy_score(x, torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="nonnegative"):
        gm.posterior_mean(x, 1.0, -0.1)
    with pytest.raises(ValueError, match="singular"):
        gm.noisy_log_prob(x, 0.0, 0.0)
    with pytest.raises(ValueError, match="C must have shape"):
        gm.noisy_log_prob(x, 1.0, 0.5, torch.eye(2))
    with pytest.raises(ValueError, match="same shape"):
        gm.noise_level_log_densities(x, torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="log_prior"):
        gm.noise_level_log_posterior(x, torch.ones(3), torch.ones(3), torch.zeros(2))
    with pytest.raises(ValueError, match="component"):
        gm.posterior_mean(x, 1.0, 0.5, component=torch.tensor([0, 1, 2, 7]))
    with pytest.raises(ValueError, match="dim"):
        gm.log_density_ratio(random_mixture(2), x, 1.0, 0.5)
    with pytest.raises(ValueError, match="shapes"):
        mmd_rbf(torch.randn(5, 2), torch.randn(5, 3))


def test_python_float_scales_keep_double_precision() -> None:
    """A Python float scale (0.1 has no exact float32 form) is taken at float64, identical to
    passing it as a float64 tensor: no silent rounding through float32."""
    mixture = GaussianMixture.isotropic(
        torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.5], [2.0, 0.0]]), torch.tensor(0.4)
    )
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    as_float = mixture.noisy_log_prob(x, 1.0, 0.1)
    as_double = mixture.noisy_log_prob(x, 1.0, torch.tensor(0.1, dtype=torch.float64))
    torch.testing.assert_close(as_float, as_double, rtol=0, atol=0)
    as_single = mixture.noisy_log_prob(x, 1.0, torch.tensor(0.1, dtype=torch.float32))
    assert (as_single - as_double).abs().max() > 1e-9  # float32 rounding is visible
