"""Soft Diffusion's corruption: x_t = C_t·x0 + s_t·eta, C_t a Gaussian blur (Daras et al. 2022).

The blur is applied in the orthonormal DCT-II basis, where it is exactly diagonal: a symmetric
convolution with half-sample-symmetric ("reflect": d c b a | a b c d) boundaries is
diagonalised by the DCT-II, so C_t = Mᵀ diag(c_t) M with M the orthonormal DCT and
c_t(f) = exp(-lambda_f·sigma_B(t)^2 / 2) per frequency f. Two choices of lambda (``kernel``):

* ``"discrete"``: lambda_k = 4 sin^2(pi k / 2n) per axis, the eigenvalues of the discrete
  Laplacian with reflecting boundaries. C is then exp(sigma^2/2 · Laplacian), the discrete
  Gaussian of Lindeberg's scale space, whose spatial kernel is e^{-s} I_m(s) with s = sigma^2
  (modified Bessel function): an exact semigroup with variance sigma^2.
* ``"continuous"``: lambda_k = (pi k / n)^2 per axis, the continuous heat equation as in inverse
  heat dissipation (Rissanen et al. 2023); for sigma >~ 2 px it equals convolution with the
  sampled Gaussian exp(-m^2 / 2 sigma^2) / (sqrt(2 pi) sigma) to float precision.

Both compose exactly: C(sigma_1) C(sigma_2) = C(sqrt(sigma_1^2 + sigma_2^2)). The blur acts on
the trailing spatial axes: (H, W) of images [B, C, H, W], L of signals [B, C, L] or [B, L]
(2-D toy points are 1-D signals of length 2; their one non-constant frequency gets blurred).

Time t in [0, 1]: t = 0 is the least corrupted level (sigma_B_min, s_min > 0), t = 1 the most.
``BlurNoiseProcess.position(t)`` maps t to a schedule position u in [0, 1] (uniform spacing:
u = t; ``"constant_distance"``: consecutive corrupted distributions at equal Wasserstein-2
distance, the paper's scheduling tool, fitted to the data's DCT spectrum). The process is also
the method's :class:`~noisecls.process.schedules.NoiseSchedule` (alpha = 1, sigma = s_t), so the
noise level of a time and the time of a noise level are answered in one place.

:class:`TerminalPrior` is the reverse process's starting distribution at t = 1: training images
blurred to the last level (as in inverse heat dissipation) or a Gaussian fitted to them.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
from torch import Tensor, nn

from noisecls.process.schedules import NoiseSchedule

__all__ = [
    "BlurNoiseProcess",
    "TerminalPrior",
    "apply_gains",
    "dct",
    "dct_matrix",
    "dct_spectrum",
    "frequency_squared",
    "gaussian_blur",
    "idct",
    "spatial_ndim",
]

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


def _spatial_ndim(batched_ndim: int, shape: tuple[int, ...]) -> int:
    if batched_ndim == 4:
        return 2
    if batched_ndim in (2, 3):
        return 1
    raise ValueError(
        f"blur expects [B, C, H, W] images or [B, L] / [B, C, L] signals, got shape {list(shape)}"
    )


def spatial_ndim(x: Tensor) -> int:
    """How many trailing axes the blur acts on: 2 for [B, C, H, W], 1 for [B, C, L] or [B, L]."""
    return _spatial_ndim(x.ndim, tuple(x.shape))


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


def blur_gains(sigma: Tensor, data_shape: tuple[int, ...], kernel: BlurKernel) -> Tensor:
    """DCT-domain gains c(f) = exp(-lambda_f sigma^2 / 2) of blurs with stds ``sigma`` [B] (px).

    Returns float64 [B, 1, ..., 1, *spatial], broadcastable against data [B, *data_shape].
    """
    data_shape = tuple(data_shape)
    nd = _spatial_ndim(len(data_shape) + 1, data_shape)
    lam = frequency_squared(data_shape[len(data_shape) - nd :], kernel).to(sigma.device)
    sig = sigma.to(torch.float64).reshape(-1, *[1] * nd)
    gains = torch.exp(-0.5 * sig**2 * lam)  # [B, *spatial]
    return gains.reshape(gains.shape[0], *[1] * (len(data_shape) - nd), *gains.shape[1:])


def apply_gains(x: Tensor, gains: Tensor) -> Tensor:
    """idct(gains · dct(x)) for x [B, ...] and gains broadcastable to x: a blur in the DCT basis.

    Computed in x's dtype (autocast does not lower a float32 blur to half precision).
    """
    nd = spatial_ndim(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return idct(gains.to(device=x.device, dtype=x.dtype) * dct(x, nd), nd)


def gaussian_blur(x: Tensor, sigma: Tensor | float, kernel: BlurKernel = "discrete") -> Tensor:
    """Blur x [B, ...] with per-sample std ``sigma`` (pixels; float or [B]) in the DCT domain.

    Exact and symmetric (C = Cᵀ); sigma = 0 is the identity. Computed in x's dtype.
    """
    sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
    sig = sig.expand(x.shape[0]) if sig.numel() == 1 else sig
    if sig.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a float or have shape [B = {x.shape[0]}]")
    return apply_gains(x, blur_gains(sig, tuple(x.shape[1:]), kernel))


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x (xp increasing), clamped at the ends."""
    x = x.clamp(xp[0], xp[-1])
    hi = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    lo = hi - 1
    w = ((x - xp[lo]) / (xp[hi] - xp[lo]).clamp_min(1e-300)).clamp(0, 1)
    return fp[lo] + w * (fp[hi] - fp[lo])


class BlurNoiseProcess(nn.Module, NoiseSchedule):
    """x_t = C_t x0 + s_t·eta with C_t a DCT-domain Gaussian blur of std sigma_B(t).

    Args:
        blur_sigma_max: blur std (pixels) at t = 1.
        blur_sigma_min: blur std at t = 0 (0: no blur).
        blur_schedule: "linear" (sigma_B linear in u) or "log" (geometric; needs min > 0).
        noise_max: noise std s at t = 1.
        noise_min: noise std at t = 0; must be > 0 (the score (C_t h - x_t)/s_t^2 needs s > 0)
            and < noise_max (s_t is strictly increasing, so a noise level names one time).
        noise_schedule: "geometric" (log s linear in u) or "linear".
        kernel: "discrete" or "continuous" (see the module docstring).
        spacing: "uniform" (u = t) or "constant_distance" (fitted to data with
            :meth:`fit_constant_distance`; training t ~ U(0, 1) and sampling grids uniform in t
            then step through equal W2 distances).
        spacing_grid: resolution of the t -> u table.

    As a ``NoiseSchedule``: alpha = 1, sigma = s_t (variance exploding, no rescaling), the
    network's time input is 999·t. The t -> u table is a buffer, so checkpoints carry a fitted
    spacing.
    """

    variance_preserving = False

    def __init__(
        self,
        blur_sigma_max: float = 20.0,
        blur_sigma_min: float = 0.0,
        blur_schedule: Literal["linear", "log"] = "linear",
        noise_max: float = 0.1,
        noise_min: float = 0.01,
        noise_schedule: Literal["geometric", "linear"] = "geometric",
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
        if not 0 < noise_min < noise_max:
            raise ValueError(
                f"need 0 < noise_min < noise_max (the noise must stay positive for the score "
                f"to exist, and increase so that a noise level names one time), got "
                f"{noise_min}, {noise_max}"
            )
        if noise_schedule not in ("geometric", "linear"):
            raise ValueError(f"unknown noise_schedule {noise_schedule!r}; use geometric or linear")
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
        #: u(t) at t = linspace(0, 1, spacing_grid), increasing, u(0) = 0, u(1) = 1.
        self.register_buffer("spacing_table", grid.clone())
        #: 1.0 once a constant-distance spacing has been fitted (float, so EMA averaging of
        #: buffers leaves it intact).
        self.register_buffer("spacing_fitted", torch.zeros((), dtype=torch.float64))

    # ---- the schedule ---------------------------------------------------------------------
    @property
    def needs_fit(self) -> bool:
        """True while a constant-distance spacing still has to be fitted to data."""
        return self.spacing == "constant_distance" and float(self.spacing_fitted) < 0.5

    def _grid(self, device: torch.device) -> tuple[Tensor, Tensor]:
        table = self.spacing_table.to(device=device, dtype=torch.float64)
        return torch.linspace(0, 1, table.numel(), dtype=torch.float64, device=device), table

    def position(self, t: Tensor) -> Tensor:
        """Schedule position u(t) in [0, 1] of times t [B], float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        grid, table = self._grid(t.device)
        return _interp(t, grid, table)

    def time_at(self, u: Tensor) -> Tensor:
        """Inverse of :meth:`position`: the time t of schedule positions u [B], float64."""
        u = torch.as_tensor(u, dtype=torch.float64)
        grid, table = self._grid(u.device)
        return _interp(u, table, grid)

    def _blur_at(self, u: Tensor) -> Tensor:
        lo, hi = self.blur_sigma_min, self.blur_sigma_max
        if self.blur_schedule == "log":
            return lo * (hi / lo) ** u
        return lo + (hi - lo) * u

    def _noise_at(self, u: Tensor) -> Tensor:
        lo, hi = self.noise_min, self.noise_max
        if self.noise_schedule == "geometric":
            return lo * (hi / lo) ** u
        return lo + (hi - lo) * u

    def _position_of_noise(self, s: Tensor) -> Tensor:
        lo, hi = self.noise_min, self.noise_max
        s = s.to(torch.float64).clamp(lo, hi)
        if self.noise_schedule == "geometric":
            return torch.log(s / lo) / math.log(hi / lo)
        return (s - lo) / (hi - lo)

    def blur_sigma(self, t: Tensor) -> Tensor:
        """Blur std sigma_B(t) in pixels, float64 [B]."""
        return self._blur_at(self.position(t))

    def noise_std(self, t: Tensor) -> Tensor:
        """Noise std s_t > 0, float64 [B]."""
        return self._noise_at(self.position(t))

    # ---- NoiseSchedule -------------------------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))

    def sigma(self, t: Tensor) -> Tensor:
        return self.noise_std(t)

    def t_from_ve_sigma(self, ve_sigma: Tensor) -> Tensor:
        """The time whose noise std is ``ve_sigma`` [B] (clamped to [noise_min, noise_max])."""
        return self.time_at(self._position_of_noise(ve_sigma))

    def noise_input(self, t: Tensor) -> Tensor:
        """999·t, the network's time input (score_sde's DDPM++ convention)."""
        return 999 * torch.as_tensor(t, dtype=torch.float64)

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

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """Noise stds s_t at :meth:`sampling_times` then 0, float64 [N + 2] (the NoiseSchedule
        contract). Sigma-space samplers cannot run this process (its marginals are blurred):
        Soft Diffusion samples with ``noisecls.samplers.momentum``."""
        s = self.noise_std(self.sampling_times(num_steps))
        return torch.cat([s, s.new_zeros(1)])

    # ---- the corruption ------------------------------------------------------------------
    def gains(self, t: Tensor, data_shape: tuple[int, ...]) -> Tensor:
        """Per-frequency gains c_t(f) of C_t, float64 [B, 1, ..., *spatial] (see blur_gains)."""
        return blur_gains(self.blur_sigma(t), tuple(data_shape), self.kernel)

    def blur(self, x: Tensor, t: Tensor) -> Tensor:
        """C_t x for x [B, ...] and t [B] (or [1]: one time for the whole batch)."""
        return apply_gains(x, self.gains(t.to(x.device), tuple(x.shape[1:])))

    def _noise_like(self, t: Tensor, x: Tensor) -> Tensor:
        s = self.noise_std(t.to(x.device))
        return s.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)

    def corrupt(self, x0: Tensor, t: Tensor, eta: Tensor) -> Tensor:
        """x_t = C_t x0 + s_t·eta for x0, eta [B, ...] and t [B] (or [1]), [B, ...]."""
        return self.blur(x0, t) + self._noise_like(t, x0) * eta

    def score(self, x0_hat: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """grad_x log q_t(x) = (C_t x0_hat - x) / s_t^2 where x0_hat = E[x0 | x_t = x].

        Tweedie's formula for y = C_t x0 observed through Gaussian noise of std s_t:
        E[C_t x0 | x_t] = x_t + s_t^2 grad log q_t(x_t) (Soft Diffusion, section 3). [B, ...]
        """
        return (self.blur(x0_hat, t) - x) / self._noise_like(t, x) ** 2

    # ---- the scheduling tool --------------------------------------------------------------
    def _gaussian_stats(self, u: Tensor, mean_f: Tensor, var_f: Tensor) -> tuple[Tensor, Tensor]:
        """Per-frequency mean c·mean_f and std sqrt(c^2 var_f + s^2) of q at positions u [B]."""
        c = blur_gains(self._blur_at(u), tuple(mean_f.shape), self.kernel).to(mean_f.device)
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


class TerminalPrior(nn.Module):
    """Starting distribution of the reverse process: the law of y_1 = C_1 x0 (noise added apart).

    * ``kind="data"``: C_1 x0 for x0 drawn uniformly from a bank of up to ``num_samples``
      training images (inverse heat dissipation's prior);
    * ``kind="gaussian"``: a Gaussian fitted to C_1 x0 (mean and full covariance).

    Only the DCT coefficients whose gain at t = 1 is at least ``min_gain`` are stored (for a
    strong final blur a handful per channel); the others are < min_gain·|x0_f| and set to 0.

    Args:
        kind: "data" or "gaussian".
        data_shape: shape of one sample.
        terminal_gains: c_1(f), float, broadcastable to ``data_shape`` (from
            ``BlurNoiseProcess.gains(ones(1), data_shape)[0]``).
        num_samples: bank size ("data"); training images fitted ("gaussian" uses all given).
        min_gain: smallest gain of a stored coefficient.

    State (buffers, so checkpoints carry it; float so EMA averaging of buffers leaves it intact):
    ``bank`` [num_samples, K] and ``count`` (rows filled) for "data"; ``mean`` [K], ``scale``
    [K, K] (a square root of the covariance) and ``count`` for "gaussian".
    """

    #: Largest stored state (elements) before the construction refuses (a weak final blur).
    MAX_ELEMENTS = 1 << 25

    def __init__(
        self,
        kind: Literal["data", "gaussian"],
        data_shape: tuple[int, ...],
        terminal_gains: Tensor,
        num_samples: int = 2048,
        min_gain: float = 1e-6,
    ) -> None:
        super().__init__()
        if kind not in ("data", "gaussian"):
            raise ValueError(f"unknown prior {kind!r}; use data or gaussian")
        if num_samples < 2:
            raise ValueError(f"the prior needs num_samples >= 2, got {num_samples}")
        self.kind = kind
        self.data_shape = tuple(data_shape)
        self.ndim = _spatial_ndim(len(self.data_shape) + 1, self.data_shape)
        gains = torch.as_tensor(terminal_gains, dtype=torch.float64)
        gains = gains.expand(self.data_shape).reshape(-1)
        self.index = torch.nonzero(gains >= min_gain).flatten()  # [K], fixed by the config
        self.kept_gains = gains[self.index]
        k = self.index.numel()
        size = num_samples * k if kind == "data" else k * k
        if size > self.MAX_ELEMENTS:
            raise ValueError(
                f"{k} of {gains.numel()} DCT coefficients survive the final blur, too many for a "
                f"{kind} prior: raise blur_sigma_max (or lower the prior's num_samples)"
            )
        if kind == "data":
            self.register_buffer("bank", torch.zeros(num_samples, k))
        else:
            self.register_buffer("mean", torch.zeros(k, dtype=torch.float64))
            self.register_buffer("scale", torch.zeros(k, k, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return float(self.count) > 0.5

    def _coefficients(self, x0: Tensor) -> Tensor:
        """Stored DCT coefficients of C_1 x0 for x0 [N, *data_shape], float64 [N, K]."""
        coeffs = dct(x0.to(torch.float64), self.ndim).reshape(x0.shape[0], -1)
        index = self.index.to(x0.device)
        return coeffs[:, index] * self.kept_gains.to(x0.device)

    @torch.no_grad()
    def fit(self, x0: Tensor) -> None:
        """Fit to training images x0 [N, *data_shape] (N >= 2; the bank keeps the first rows)."""
        if tuple(x0.shape[1:]) != self.data_shape or x0.shape[0] < 2:
            raise ValueError(
                f"the prior needs >= 2 samples of shape {self.data_shape}, got {tuple(x0.shape)}"
            )
        coeffs = self._coefficients(x0.to(self.count.device))
        if self.kind == "data":
            n = min(coeffs.shape[0], self.bank.shape[0])
            self.bank.zero_()
            self.bank[:n] = coeffs[:n].to(self.bank.dtype)
            self.count.fill_(n)
            return
        mean = coeffs.mean(0)
        centred = coeffs - mean
        cov = centred.T @ centred / (coeffs.shape[0] - 1)
        evals, evecs = torch.linalg.eigh(cov)
        self.mean.copy_(mean)
        self.scale.copy_(evecs * evals.clamp_min(0).sqrt())
        self.count.fill_(coeffs.shape[0])

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """n draws of C_1 x0, [n, *data_shape] on the prior's device."""
        if not self.fitted:
            raise RuntimeError("the terminal prior has not been fitted to data")
        device = self.count.device
        if self.kind == "data":
            rows = torch.randint(round(float(self.count)), (n,), generator=generator, device=device)
            coeffs = self.bank[rows].to(torch.float64)
        else:
            z = torch.randn(
                n, self.mean.numel(), generator=generator, device=device, dtype=torch.float64
            )
            coeffs = self.mean + z @ self.scale.T
        full = torch.zeros(n, math.prod(self.data_shape), dtype=torch.float64, device=device)
        full[:, self.index.to(device)] = coeffs
        out = idct(full.reshape(n, *self.data_shape), self.ndim)
        return out.to(dtype or torch.get_default_dtype())

    def extra_repr(self) -> str:
        return f"kind={self.kind}, coefficients={self.index.numel()}"
