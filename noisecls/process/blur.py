"""Soft Diffusion's corruption: x_t = C_t·x0 + s_t·eta, C_t a Gaussian blur (Daras et al. 2022).

The blur is applied in the orthonormal DCT-II basis, where it is exactly diagonal: a symmetric
convolution with half-sample-symmetric ("reflect": d c b a | a b c d) boundaries is
diagonalised by the DCT-II, so C_t = Mᵀ diag(c_t) M with M the orthonormal DCT and
c_t(f) = exp(-lambda_f·sigma_B(t)^2 / 2) per frequency f. Two choices of lambda (``kernel``):

* ``"discrete"``: lambda_k = 4 sin^2(pi k / 2n) per axis, the eigenvalues of the discrete
  Laplacian with reflecting boundaries. C is then exp(sigma^2/2 · Laplacian), the discrete
  Gaussian of Lindeberg's scale space, whose spatial kernel is e^{-s} I_n(s) with s = sigma^2
  (modified Bessel function): an exact semigroup with variance sigma^2.
* ``"continuous"``: lambda_k = (pi k / n)^2 per axis, the continuous heat equation as in inverse
  heat dissipation (Rissanen et al. 2023); for sigma >~ 2 px it equals convolution with the
  sampled Gaussian exp(-m^2 / 2 sigma^2) to float precision.

Both compose exactly: C(sigma_1) C(sigma_2) = C(sqrt(sigma_1^2 + sigma_2^2)). The blur acts on
the trailing spatial axes: (H, W) of images [B, C, H, W], L of signals [B, C, L] or [B, L]
(2-D toy points are 1-D signals of length 2; their one non-constant frequency gets blurred).

Time t in [0, 1]: t = 0 is the least corrupted level (sigma_B_min, s_min > 0), t = 1 the most.
``BlurNoiseProcess.position(t)`` maps t to a schedule position u in [0, 1] (uniform spacing:
u = t; ``"constant_distance"``: consecutive corrupted distributions at equal Wasserstein-2
distance, the paper's scheduling tool, fitted to the data's DCT spectrum).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
from torch import Tensor, nn

BlurKernel = Literal["discrete", "continuous"]


@functools.lru_cache(maxsize=32)
def _dct_matrix_cached(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.to(device=device, dtype=dtype)


def dct_matrix(
    n: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Orthonormal DCT-II matrix M [n, n] (scipy's ``dct(norm="ortho")``): X = M x, M⁻¹ = Mᵀ."""
    if n < 1:
        raise ValueError(f"DCT size must be >= 1, got {n}")
    return _dct_matrix_cached(n, torch.device(device or "cpu"), dtype)


def spatial_ndim(x: Tensor) -> int:
    """How many trailing axes the blur acts on: 2 for [B, C, H, W], 1 for [B, C, L] or [B, L]."""
    if x.ndim == 4:
        return 2
    if x.ndim in (2, 3):
        return 1
    raise ValueError(
        f"blur expects [B, C, H, W] images or [B, L] / [B, C, L] signals, got shape {list(x.shape)}"
    )


def dct(x: Tensor, ndim: int) -> Tensor:
    """Orthonormal DCT-II over the last ``ndim`` (1 or 2) axes of x, same shape."""
    for axis in range(-ndim, 0):
        m = dct_matrix(x.shape[axis], device=x.device, dtype=x.dtype)
        x = torch.movedim(torch.movedim(x, axis, -1) @ m.T, -1, axis)
    return x


def idct(x: Tensor, ndim: int) -> Tensor:
    """Inverse of :func:`dct` (the orthonormal DCT-III), same shape."""
    for axis in range(-ndim, 0):
        m = dct_matrix(x.shape[axis], device=x.device, dtype=x.dtype)
        x = torch.movedim(torch.movedim(x, axis, -1) @ m, -1, axis)
    return x


@functools.lru_cache(maxsize=32)
def _frequency_squared_cached(sizes: tuple[int, ...], kernel: str) -> Tensor:
    total = torch.zeros(sizes, dtype=torch.float64)
    for axis, n in enumerate(sizes):
        k = torch.arange(n, dtype=torch.float64)
        if kernel == "discrete":
            lam = 4 * torch.sin(math.pi * k / (2 * n)) ** 2
        else:
            lam = (math.pi * k / n) ** 2
        shape = [1] * len(sizes)
        shape[axis] = n
        total = total + lam.reshape(shape)
    return total


def frequency_squared(sizes: tuple[int, ...], kernel: BlurKernel = "discrete") -> Tensor:
    """lambda_f over a DCT grid of spatial ``sizes`` (sum over axes), float64 [*sizes].

    A Gaussian blur of std sigma (pixels) multiplies DCT coefficient f by exp(-lambda_f sigma^2/2).
    """
    if kernel not in ("discrete", "continuous"):
        raise ValueError(f"unknown blur kernel {kernel!r}; use discrete or continuous")
    return _frequency_squared_cached(tuple(int(n) for n in sizes), kernel)


def gaussian_blur(x: Tensor, sigma: Tensor | float, kernel: BlurKernel = "discrete") -> Tensor:
    """Blur x [B, ...] with per-sample std ``sigma`` (pixels; float or [B]) in the DCT domain.

    Exact and symmetric (C = Cᵀ); sigma = 0 is the identity. Computed in x's dtype.
    """
    nd = spatial_ndim(x)
    sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
    sig = sig.expand(x.shape[0]) if sig.numel() == 1 else sig
    if sig.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a float or have shape [B = {x.shape[0]}]")
    lam = frequency_squared(tuple(x.shape[-nd:]), kernel).to(x.device)
    gain = torch.exp(-0.5 * sig.reshape(-1, *[1] * nd) ** 2 * lam)  # [B, *spatial]
    gain = gain.reshape(x.shape[0], *[1] * (x.ndim - 1 - nd), *gain.shape[1:]).to(x.dtype)
    return idct(gain * dct(x, nd), nd)


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x (xp increasing), clamped at the ends."""
    x = x.clamp(xp[0], xp[-1])
    hi = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    lo = hi - 1
    w = ((x - xp[lo]) / (xp[hi] - xp[lo]).clamp_min(1e-300)).clamp(0, 1)
    return fp[lo] + w * (fp[hi] - fp[lo])


class BlurNoiseProcess(nn.Module):
    """x_t = C_t x0 + s_t·eta with C_t a DCT-domain Gaussian blur of std sigma_B(t).

    Args:
        blur_sigma_max: blur std (pixels) at t = 1.
        blur_sigma_min: blur std at t = 0 (0: no blur).
        blur_schedule: "linear" (sigma_B linear in u) or "log" (geometric; needs min > 0).
        noise_max: noise std s at t = 1.
        noise_min: noise std at t = 0; must be > 0 (the score (C_t h - x_t)/s_t^2 needs s > 0).
        noise_schedule: "geometric", "linear" or "constant" (s = noise_min throughout).
        kernel: "discrete" or "continuous" (see the module docstring).
        spacing: "uniform" (u = t) or "constant_distance" (fit with
            :meth:`fit_constant_distance`; training t ~ U(0, 1) and sampling grids uniform in t
            then step through equal W2 distances).
        spacing_grid: resolution of the t -> u table.

    The t -> u table is a buffer, so checkpoints carry a fitted spacing.
    """

    def __init__(
        self,
        blur_sigma_max: float = 20.0,
        blur_sigma_min: float = 0.0,
        blur_schedule: Literal["linear", "log"] = "linear",
        noise_max: float = 0.1,
        noise_min: float = 0.01,
        noise_schedule: Literal["geometric", "linear", "constant"] = "geometric",
        kernel: BlurKernel = "discrete",
        spacing: Literal["uniform", "constant_distance"] = "uniform",
        spacing_grid: int = 2048,
    ) -> None:
        super().__init__()
        if not 0 <= blur_sigma_min <= blur_sigma_max:
            raise ValueError(
                f"need 0 <= blur_sigma_min <= blur_sigma_max, got {blur_sigma_min}, "
                f"{blur_sigma_max}"
            )
        if blur_schedule not in ("linear", "log"):
            raise ValueError(f"unknown blur_schedule {blur_schedule!r}; use linear or log")
        if blur_schedule == "log" and blur_sigma_min <= 0:
            raise ValueError("blur_schedule 'log' needs blur_sigma_min > 0")
        if not 0 < noise_min <= noise_max:
            raise ValueError(
                f"need 0 < noise_min <= noise_max (the noise must stay positive for the score "
                f"to exist), got {noise_min}, {noise_max}"
            )
        if noise_schedule not in ("geometric", "linear", "constant"):
            raise ValueError(
                f"unknown noise_schedule {noise_schedule!r}; use geometric, linear or constant"
            )
        if kernel not in ("discrete", "continuous"):
            raise ValueError(f"unknown blur kernel {kernel!r}; use discrete or continuous")
        if spacing not in ("uniform", "constant_distance"):
            raise ValueError(f"unknown spacing {spacing!r}; use uniform or constant_distance")
        if spacing_grid < 2:
            raise ValueError(f"spacing_grid must be >= 2, got {spacing_grid}")
        self.blur_sigma_max, self.blur_sigma_min = blur_sigma_max, blur_sigma_min
        self.blur_schedule = blur_schedule
        self.noise_max, self.noise_min = noise_max, noise_min
        self.noise_schedule = noise_schedule
        self.kernel: BlurKernel = kernel
        self.spacing = spacing
        grid = torch.linspace(0, 1, spacing_grid, dtype=torch.float64)
        #: u(t) at t = linspace(0, 1, spacing_grid): identity until fitted.
        self.register_buffer("spacing_table", grid.clone())
        #: 1.0 once a constant-distance spacing has been fitted (float: EMA-safe).
        self.register_buffer("spacing_fitted", torch.zeros((), dtype=torch.float64))

    # ---- the schedule ---------------------------------------------------------------------
    @property
    def needs_fit(self) -> bool:
        """True while a constant-distance spacing still has to be fitted to data."""
        return self.spacing == "constant_distance" and float(self.spacing_fitted) < 0.5

    def position(self, t: Tensor) -> Tensor:
        """Schedule position u(t) in [0, 1] of times t [B] (float64)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        table = self.spacing_table.to(device=t.device, dtype=torch.float64)
        grid = torch.linspace(0, 1, table.numel(), dtype=torch.float64, device=t.device)
        return _interp(t, grid, table)

    def _blur_at(self, u: Tensor) -> Tensor:
        lo, hi = self.blur_sigma_min, self.blur_sigma_max
        if self.blur_schedule == "log":
            return lo * (hi / lo) ** u
        return lo + (hi - lo) * u

    def _noise_at(self, u: Tensor) -> Tensor:
        lo, hi = self.noise_min, self.noise_max
        if self.noise_schedule == "geometric":
            return lo * (hi / lo) ** u
        if self.noise_schedule == "linear":
            return lo + (hi - lo) * u
        return torch.full_like(u, lo)

    def blur_sigma(self, t: Tensor) -> Tensor:
        """Blur std sigma_B(t) in pixels, float64 [B]."""
        return self._blur_at(self.position(t))

    def noise_std(self, t: Tensor) -> Tensor:
        """Noise std s_t > 0, float64 [B]."""
        return self._noise_at(self.position(t))

    def blur(self, x: Tensor, t: Tensor) -> Tensor:
        """C_t x for x [B, ...] and t [B]."""
        return gaussian_blur(x, self.blur_sigma(t).to(x.device), self.kernel)

    def corrupt(self, x0: Tensor, t: Tensor, eta: Tensor) -> Tensor:
        """x_t = C_t x0 + s_t·eta, [B, ...]."""
        s = self.noise_std(t).to(device=x0.device, dtype=x0.dtype)
        return self.blur(x0, t) + s.reshape(-1, *[1] * (x0.ndim - 1)) * eta

    def attenuation(self, t: Tensor, spatial: tuple[int, ...]) -> Tensor:
        """Per-frequency gains c_t(f) of C_t, float64 [B, *spatial]."""
        lam = frequency_squared(spatial, self.kernel)
        sig = self.blur_sigma(t).to(lam.device).reshape(-1, *[1] * len(spatial))
        return torch.exp(-0.5 * sig**2 * lam)

    def sample_training_t(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """Training times t ~ U(0, 1), float64 [n]."""
        return torch.rand(n, generator=generator, device=device, dtype=torch.float64)

    def sampling_times(self, num_steps: int) -> Tensor:
        """Descending times 1 = t_0 > ... > t_N = 0 for an N-step sampler, float64 [N + 1]."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)

    # ---- the scheduling tool --------------------------------------------------------------
    def _gaussian_stats(self, u: Tensor, mean_f: Tensor, var_f: Tensor) -> tuple[Tensor, Tensor]:
        """Per-frequency mean c·mean_f and std sqrt(c^2 var_f + s^2) of q at positions u [B]."""
        nd = 2 if mean_f.ndim == 3 else 1
        spatial = tuple(mean_f.shape[-nd:])
        lam = frequency_squared(spatial, self.kernel).to(mean_f.device)
        sig = self._blur_at(u).to(mean_f.device).reshape(-1, *[1] * mean_f.ndim)
        c = torch.exp(-0.5 * sig**2 * lam)
        s = self._noise_at(u).to(mean_f.device).reshape(-1, *[1] * mean_f.ndim)
        return c * mean_f, (c**2 * var_f + s**2).sqrt()

    def _w2_between_positions(
        self, u_a: Tensor, u_b: Tensor, mean_f: Tensor, var_f: Tensor, chunk: int = 64
    ) -> Tensor:
        out = []
        for a, b in zip(u_a.split(chunk), u_b.split(chunk), strict=True):
            m_a, sd_a = self._gaussian_stats(a, mean_f, var_f)
            m_b, sd_b = self._gaussian_stats(b, mean_f, var_f)
            out.append(((m_a - m_b) ** 2 + (sd_a - sd_b) ** 2).flatten(1).sum(1).sqrt())
        return torch.cat(out)

    def w2_distance(self, t_a: Tensor, t_b: Tensor, mean_f: Tensor, var_f: Tensor) -> Tensor:
        """W2 distance between the Gaussian approximations of q_{t_a} and q_{t_b}, [B].

        The data are approximated by N(mean, Mᵀ diag(var_f) M), diagonal in the DCT basis
        (mean_f, var_f [*data_shape] from :func:`dct_spectrum`); then q_t is Gaussian with
        per-frequency mean c_t·mean_f and variance c_t^2 var_f + s_t^2, and
        W2^2 = sum_f (m_a - m_b)^2 + (sd_a - sd_b)^2 (Gaussians with commuting covariances).
        """
        mean_f, var_f = mean_f.to(torch.float64), var_f.to(torch.float64).clamp_min(0)
        return self._w2_between_positions(self.position(t_a), self.position(t_b), mean_f, var_f)

    def fit_constant_distance(self, mean_f: Tensor, var_f: Tensor) -> None:
        """Re-space the schedule so that consecutive levels are at equal W2 distance.

        The path u -> q(u) is measured on a fine grid of u (sum of W2 distances between
        neighbouring grid points, i.e. its W2 arc length); t is then the normalised arc length,
        so a uniform grid in t moves by the same distance per step (Soft Diffusion, section
        "Scheduling"). mean_f, var_f: per-frequency data statistics [*data_shape].
        """
        mean_f = mean_f.detach().to(torch.float64).cpu()
        var_f = var_f.detach().to(torch.float64).cpu().clamp_min(0)
        n = self.spacing_table.numel()
        fine = torch.linspace(0, 1, 4 * n, dtype=torch.float64)
        step = self._w2_between_positions(fine[:-1], fine[1:], mean_f, var_f)
        arc = torch.cat([step.new_zeros(1), torch.cumsum(step, 0)])
        if not float(arc[-1]) > 0:
            raise ValueError("the corruption path has zero length; widen blur or noise ranges")
        # keep t -> u strictly monotone where the path stalls
        arc = arc / arc[-1] + 1e-12 * torch.linspace(0, 1, arc.numel(), dtype=torch.float64)
        arc = arc / arc[-1]
        t_grid = torch.linspace(0, 1, n, dtype=torch.float64)
        self.spacing_table.copy_(_interp(t_grid, arc, fine).to(self.spacing_table.device))
        self.spacing_fitted.fill_(1.0)

    def extra_repr(self) -> str:
        return (
            f"blur={self.blur_schedule}[{self.blur_sigma_min}, {self.blur_sigma_max}] px "
            f"({self.kernel}), noise={self.noise_schedule}[{self.noise_min}, {self.noise_max}], "
            f"spacing={self.spacing}"
        )


def dct_spectrum(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-frequency mean and variance of samples x [N, ...] in the DCT basis, float64 [...]."""
    if x.shape[0] < 2:
        raise ValueError("dct_spectrum needs at least two samples")
    coeffs = dct(x.to(torch.float64), spatial_ndim(x))
    return coeffs.mean(0), coeffs.var(0)
