"""Soft Diffusion's corruption: the DCT blur against direct convolutions (scipy as the reference),
its symmetry and composition along the schedule, the noise schedule, the constant-distance
spacing and the terminal prior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage
import scipy.special
import torch

from noisecls.process.blur import (
    BlurNoiseProcess,
    TerminalPrior,
    dct,
    dct_spectrum,
    gaussian_blur,
    idct,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(3, 2, 7, 5), (4, 9), (2, 3, 6)])
def test_dct_is_scipys_orthonormal_dct(shape):
    x = _randn(*shape)
    nd = 2 if len(shape) == 4 else 1
    axes = tuple(range(-nd, 0))
    ref = scipy.fft.dctn(x.numpy(), axes=axes, norm="ortho")
    np.testing.assert_allclose(dct(x, nd).numpy(), ref, atol=1e-13)
    np.testing.assert_allclose(idct(torch.from_numpy(ref), nd).numpy(), x.numpy(), atol=1e-13)


def _convolve_reflect(x: np.ndarray, kernel: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    for axis in axes:
        x = scipy.ndimage.convolve1d(x, kernel, axis=axis, mode="reflect")
    return x


@pytest.mark.parametrize("sigma", [0.5, 1.5, 4.0, 12.0])
def test_discrete_blur_is_a_reflect_convolution_with_the_discrete_gaussian(sigma):
    # kernel e^{-s} I_m(s), s = sigma^2 (Lindeberg's discrete Gaussian); at sigma = 12 it is
    # far wider than the 7x5 image, so the reflections wrap several times
    x = _randn(2, 3, 7, 5)
    radius = int(8 * sigma + 30)
    kernel = scipy.special.ive(np.arange(-radius, radius + 1), sigma**2)
    ref = _convolve_reflect(x.numpy(), kernel, (-2, -1))
    out = gaussian_blur(x, sigma, "discrete").numpy()
    np.testing.assert_allclose(out, ref, atol=1e-13)


@pytest.mark.parametrize("sigma", [2.0, 5.0])
def test_continuous_blur_is_a_reflect_convolution_with_the_sampled_gaussian(sigma):
    x = _randn(3, 16)
    radius = int(10 * sigma + 40)
    m = np.arange(-radius, radius + 1)
    kernel = np.exp(-(m**2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)
    ref = _convolve_reflect(x.numpy(), kernel, (-1,))
    np.testing.assert_allclose(gaussian_blur(x, sigma, "continuous").numpy(), ref, atol=1e-12)


def test_blur_is_symmetric_per_sample_and_identity_at_zero():
    x, y = _randn(3, 1, 6, 5, seed=1), _randn(3, 1, 6, 5, seed=2)
    sigma = torch.tensor([0.7, 2.0, 5.0], dtype=torch.float64)
    for kernel in ("discrete", "continuous"):
        lhs = (gaussian_blur(x, sigma, kernel) * y).flatten(1).sum(1)
        rhs = (x * gaussian_blur(y, sigma, kernel)).flatten(1).sum(1)
        torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-12)
        # a batch with per-sample sigmas is the per-sample blurs
        single = torch.cat([gaussian_blur(x[i : i + 1], float(s), kernel) for i, s in
                            enumerate(sigma)])  # fmt: skip
        torch.testing.assert_close(gaussian_blur(x, sigma, kernel), single, rtol=0, atol=1e-13)
    torch.testing.assert_close(gaussian_blur(x, 0.0), x, rtol=0, atol=1e-13)
    # the operator as a matrix: symmetric with eigenvalues in (0, 1]
    eye = torch.eye(30, dtype=torch.float64).reshape(30, 1, 6, 5)
    c = gaussian_blur(eye, 1.3).reshape(30, 30)
    torch.testing.assert_close(c, c.T, rtol=0, atol=1e-13)
    evals = torch.linalg.eigvalsh(c)
    assert float(evals.min()) > 0 and float(evals.max()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("blur_schedule", ["linear", "log"])
def test_blur_composes_along_the_schedule(blur_schedule):
    process = BlurNoiseProcess(
        blur_sigma_max=6.0, blur_sigma_min=0.3, blur_schedule=blur_schedule, kernel="discrete"
    )
    x = _randn(4, 2, 8, 6, seed=3)
    t1 = torch.tensor([0.1, 0.3, 0.5, 0.2], dtype=torch.float64)
    t2 = torch.tensor([0.4, 0.9, 0.5, 1.0], dtype=torch.float64)
    s1, s2 = process.blur_sigma(t1), process.blur_sigma(t2)
    # C_{t2} = C(sqrt(sigma_B(t2)^2 - sigma_B(t1)^2)) C_{t1}: the semigroup of the heat equation
    step = gaussian_blur(process.blur(x, t1), (s2**2 - s1**2).sqrt())
    torch.testing.assert_close(step, process.blur(x, t2), rtol=0, atol=1e-12)
    # and the schedule's endpoints and monotonicity
    ends = process.blur_sigma(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.tensor([0.3, 6.0], dtype=torch.float64))
    grid = process.blur_sigma(torch.linspace(0, 1, 101, dtype=torch.float64))
    assert bool((grid[1:] > grid[:-1]).all())


def test_corrupt_in_float32_matches_float64():
    process = BlurNoiseProcess(blur_sigma_max=4.0)
    x = _randn(5, 3, 8, 8, seed=4)
    eta = _randn(5, 3, 8, 8, seed=5)
    t = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = process.corrupt(x, t, eta)
    out = process.corrupt(x.float(), t, eta.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("noise_schedule", ["geometric", "linear"])
def test_noise_schedule_is_positive_increasing_and_invertible(noise_schedule):
    process = BlurNoiseProcess(noise_min=0.02, noise_max=0.2, noise_schedule=noise_schedule)
    t = torch.linspace(0, 1, 257, dtype=torch.float64)
    s = process.noise_std(t)
    assert float(s.min()) == pytest.approx(0.02) and float(s.max()) == pytest.approx(0.2)
    assert bool((s[1:] > s[:-1]).all()) and bool((s > 0).all())
    torch.testing.assert_close(process.t_from_ve_sigma(s), t, rtol=0, atol=1e-9)
    torch.testing.assert_close(process.sigma(t), s)
    assert bool((process.alpha(t) == 1).all())
    sig = process.sampling_sigmas(8)
    assert sig.shape == (10,) and float(sig[-1]) == 0 and float(sig[-2]) == pytest.approx(0.02)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"noise_min": 0.0}, "positive"),
        ({"noise_min": 0.1, "noise_max": 0.1}, "noise_min < noise_max"),
        ({"blur_schedule": "log", "blur_sigma_min": 0.0}, "blur_sigma_min > 0"),
        ({"kernel": "box"}, "discrete or continuous"),
    ],
)
def test_bad_process_settings_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        BlurNoiseProcess(**kwargs)


def test_constant_distance_spacing_equalises_consecutive_w2_distances():
    # a 1/f^2-like image spectrum, as natural images have
    k = torch.arange(16, dtype=torch.float64)
    lam = k[:, None] ** 2 + k[None, :] ** 2
    var_f = (1.0 / (1.0 + lam))[None].expand(3, 16, 16).contiguous()
    mean_f = torch.zeros(3, 16, 16, dtype=torch.float64)
    mean_f[:, 0, 0] = 2.0
    process = BlurNoiseProcess(blur_sigma_max=12.0, noise_min=0.01, noise_max=0.1,
                               spacing="constant_distance", spacing_grid=512)  # fmt: skip
    t = torch.linspace(0, 1, 33, dtype=torch.float64)

    def spread() -> float:
        d = process.w2_distance(t[:-1], t[1:], mean_f, var_f)
        return float(d.max() / d.min())

    assert process.needs_fit
    uniform = spread()
    process.fit_constant_distance(mean_f, var_f)
    assert not process.needs_fit
    assert uniform > 3.0  # uniform spacing moves very unevenly ...
    assert spread() < 1.02  # ... the fitted one by equal W2 steps
    u = process.position(t)
    assert float(u[0]) == 0 and float(u[-1]) == pytest.approx(1.0) and bool((u[1:] > u[:-1]).all())
    torch.testing.assert_close(process.time_at(u), t, rtol=0, atol=1e-9)
    # the fitted table travels with the state dict
    clone = BlurNoiseProcess(blur_sigma_max=12.0, noise_min=0.01, noise_max=0.1,
                             spacing="constant_distance", spacing_grid=512)  # fmt: skip
    clone.load_state_dict(process.state_dict())
    assert not clone.needs_fit
    torch.testing.assert_close(clone.position(t), u)


def test_dct_spectrum_is_the_per_frequency_mean_and_variance():
    x = _randn(500, 2, 4, 4, seed=6)
    mean_f, var_f = dct_spectrum(x)
    coeffs = torch.from_numpy(scipy.fft.dctn(x.numpy(), axes=(-2, -1), norm="ortho"))
    torch.testing.assert_close(mean_f, coeffs.mean(0))
    torch.testing.assert_close(var_f, coeffs.var(0))


def _training_images(n: int = 4000) -> torch.Tensor:
    """Smooth random images with a bright mean: [n, 2, 8, 8]."""
    z = _randn(n, 2, 8, 8, seed=7)
    return (
        gaussian_blur(z, 1.0) * 0.8
        + torch.tensor([0.5, -0.2], dtype=torch.float64)[None, :, None, None]
    )


def test_data_prior_draws_training_images_blurred_to_the_last_level():
    process = BlurNoiseProcess(blur_sigma_max=6.0)
    shape = (2, 8, 8)
    gains = process.gains(torch.ones(1, dtype=torch.float64), shape)[0]
    prior = TerminalPrior("data", shape, gains, num_samples=64)
    assert 0 < prior.index.numel() < 2 * 8 * 8  # only the surviving coefficients are stored
    x0 = _training_images(50)
    prior.fit(x0)
    assert round(float(prior.count)) == 50
    blurred = process.blur(x0, torch.ones(50, dtype=torch.float64))
    draws = prior.sample(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # every draw is (to the dropped coefficients' size) one of the blurred training images
    dist = torch.cdist(draws.flatten(1), blurred.flatten(1)).min(1).values
    assert float(dist.max()) < 1e-5
    with pytest.raises(RuntimeError, match="fitted"):
        TerminalPrior("data", shape, gains).sample(1)


def test_gaussian_prior_matches_the_blurred_data_moments():
    process = BlurNoiseProcess(blur_sigma_max=3.0)
    shape = (2, 8, 8)
    gains = process.gains(torch.ones(1, dtype=torch.float64), shape)[0]
    prior = TerminalPrior("gaussian", shape, gains)
    x0 = _training_images(4000)
    prior.fit(x0)
    blurred = process.blur(x0, torch.ones(4000, dtype=torch.float64)).flatten(1)
    draws = prior.sample(40000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws = draws.flatten(1)
    torch.testing.assert_close(draws.mean(0), blurred.mean(0), rtol=0, atol=0.01)
    cov_d, cov_b = torch.cov(draws.T), torch.cov(blurred.T)
    assert float((cov_d - cov_b).abs().max()) < 0.03 * float(cov_b.abs().max())
