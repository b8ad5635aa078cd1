"""Noise schedules: how clean data x0 becomes x_t = alpha(t)·x0 + sigma(t)·eps.

Every schedule also answers in *sigma space* (VE scaling, as in EDM / k-diffusion): dividing
x_t by alpha(t) gives x = x0 + ve_sigma(t)·eps with ve_sigma = sigma/alpha. Samplers and
likelihood estimators only see VE sigmas; the schedule converts back to its own time variable
(``t_from_ve_sigma``) and network input (``noise_input``) when a network is called.

Time variables: the discrete DDPM schedule uses integer levels t in {0, ..., T} (t = 0 is clean
data, alpha_bar_0 = 1); continuous VP / VE schedules use t in [0, 1]; EDM uses t = sigma.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor


def broadcast_like(values: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample values [B] to [B, 1, ..., 1] so they broadcast against x [B, ...]."""
    return values.reshape(values.shape[0], *([1] * (x.ndim - 1))).to(x.dtype)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM's sigma ladder (Karras et al. 2022, eq. 5), descending, float64, with a final 0.

    Returns:
        Tensor[num_steps + 1]: sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min > sigma_N = 0.
    """
    _check_ladder(num_steps, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def exponential_sigmas(num_steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """A ladder uniform in log(sigma) (k-diffusion's ``get_sigmas_exponential``; diffusers'
    ``use_exponential_sigmas``), descending, float64 [num_steps + 1] with a final 0."""
    _check_ladder(num_steps, sigma_min, sigma_max)
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps,
                                dtype=torch.float64)  # fmt: skip
    return torch.cat([log_sigmas.exp(), log_sigmas.new_zeros(1)])


def vp_sigmas(
    num_steps: int,
    sigma_min: float,
    sigma_max: float,
    beta_min: float = 0.1,
    beta_max: float = 20.0,
) -> Tensor:
    """The VP SDE's ladder (Song et al. 2021; k-diffusion's ``get_sigmas_vp``): times uniform in
    t for sigma(t) = sqrt(exp(beta_min·t + (beta_max - beta_min)·t^2/2) - 1), between the times
    of sigma_max and sigma_min (k-diffusion's fixed ends t = 1 and eps_s = 1e-3 are sigma_max =
    sigma(1) ~ 157 and sigma_min = sigma(1e-3) ~ 0.01). Descending, float64 [num_steps + 1]
    with a final 0."""
    _check_ladder(num_steps, sigma_min, sigma_max)
    vp = LogSNRSchedule("linear", beta_min=beta_min, beta_max=beta_max)
    ends = vp.t_from_ve_sigma(torch.tensor([sigma_max, sigma_min], dtype=torch.float64))
    t = torch.linspace(float(ends[0]), float(ends[1]), num_steps, dtype=torch.float64)
    sigmas = vp.ve_sigma(t)
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # the ends exactly, not through exp / log
    return torch.cat([sigmas, sigmas.new_zeros(1)])


Ladder = Literal["schedule", "karras", "exponential", "vp"]
LADDERS: tuple[str, ...] = ("schedule", "karras", "exponential", "vp")


def ladder_sigmas(
    ladder: Ladder, num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0
) -> Tensor:
    """The named sigma ladder between sigma_max and sigma_min (karras: ``karras_sigmas`` with
    ``rho``; exponential; vp), float64 [num_steps + 1] ending in 0. ("schedule", the schedule's
    own grid, is ``NoiseSchedule.sampling_sigmas``.)"""
    if ladder == "karras":
        return karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    if ladder == "exponential":
        return exponential_sigmas(num_steps, sigma_min, sigma_max)
    if ladder == "vp":
        return vp_sigmas(num_steps, sigma_min, sigma_max)
    raise ValueError(f"unknown sigma ladder {ladder!r}; use one of {', '.join(LADDERS)}")


def _check_ladder(num_steps: int, sigma_min: float, sigma_max: float) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")


class NoiseSchedule(ABC):
    """x_t = alpha(t)·x0 + sigma(t)·eps, with conversions to sigma space.

    Subclasses define ``alpha``, ``sigma``, ``t_from_ve_sigma``, ``noise_input``,
    ``sample_training_t`` and ``sampling_sigmas``; the rest follows.
    """

    #: True when alpha(t)^2 + sigma(t)^2 = 1 (variance preserving).
    variance_preserving: bool = True

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale alpha(t) for times t [B] (float64 in, float64 out)."""

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise standard deviation sigma(t) in the schedule's own scaling, [B]."""

    @abstractmethod
    def t_from_ve_sigma(self, ve_sigma: Tensor) -> Tensor:
        """Inverse of ``ve_sigma``: the (possibly fractional) time with that VE sigma, [B]."""

    @abstractmethod
    def noise_input(self, t: Tensor) -> Tensor:
        """The scalar the backbone receives as its noise-level input at time t, [B]."""

    @abstractmethod
    def sample_training_t(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """Draw n training times from the schedule's training distribution, [n]."""

    @abstractmethod
    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """Descending VE sigmas for a num_steps sampler, float64 [num_steps + 1], last = 0."""

    # ---- derived quantities -------------------------------------------------------------
    def log_snr(self, t: Tensor) -> Tensor:
        """log(alpha^2 / sigma^2) at t, [B]; decreasing in t."""
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def ve_sigma(self, t: Tensor) -> Tensor:
        """sigma(t) / alpha(t): the noise std once x_t is rescaled to x0 + ve_sigma·eps, [B]."""
        return self.sigma(t) / self.alpha(t)

    def alpha_from_ve_sigma(self, ve_sigma: Tensor) -> Tensor:
        """alpha at the time whose VE sigma is given (1/sqrt(1+s^2) for VP, 1 for VE), [B]."""
        return self.alpha(self.t_from_ve_sigma(ve_sigma))

    def add_noise(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = alpha(t)·x0 + sigma(t)·eps for x0, eps [B, ...] and t [B]."""
        return broadcast_like(self.alpha(t), x0) * x0 + broadcast_like(self.sigma(t), x0) * eps

    def sigma_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max): the smallest and largest VE sigma the schedule samples at
        (the ends of its own grid), the ends of every other ladder."""
        sigmas = self.sampling_sigmas(2)
        return float(sigmas[-2]), float(sigmas[0])

    def ladder(self, ladder: Ladder, num_steps: int, rho: float = 7.0) -> Tensor:
        """Sampling sigmas, float64 [num_steps + 1] ending in 0: the schedule's own grid
        (``"schedule"``) or the named ladder (``ladder_sigmas``) between ``sigma_range()``.

        A network trained on this schedule is evaluated at any sigma in that range through
        ``t_from_ve_sigma`` (see the subclasses: a discrete schedule gives a fractional level).
        """
        if ladder == "schedule":
            return self.sampling_sigmas(num_steps)
        sigma_min, sigma_max = self.sigma_range()
        return ladder_sigmas(ladder, num_steps, sigma_min, sigma_max, rho)

    def terminal_std(self, ve_sigma_max: float) -> float:
        """Std of the sampler's starting point x_T in sigma space (VP: sqrt(1 + s^2); VE: s)."""
        if self.variance_preserving:
            return math.sqrt(1.0 + ve_sigma_max**2)
        return ve_sigma_max


def _t_tensor(t: Tensor | float | int) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class DiscreteSchedule(NoiseSchedule):
    """DDPM's discrete variance-preserving schedule over levels t = 0..T (t = 0: clean data).

    Args:
        kind: "linear" (Ho et al.: betas linear in [beta_start, beta_end]), "cosine" (Nichol &
            Dhariwal, s = 0.008, betas clipped at 0.999) or "dre_uniform" (CDM(unif.), section 4.3
            of Yadin et al. 2024: sqrt(1 - alpha_bar_t) = t / (T + 1)).
        num_levels: T, the number of noisy levels.
        beta_start, beta_end: endpoints of the linear betas.

    The network input for level t is the 0-based beta index t - 1 (the original DDPM code's
    convention). Between two levels (a sigma off the grid, e.g. on a Karras ladder or at a Heun
    / DPM-Solver midpoint), ``t_from_ve_sigma`` returns the fractional level whose log(ve_sigma)
    interpolates linearly between its neighbours' and ``alpha`` / ``sigma`` at that level invert
    it exactly (alpha = 1/sqrt(1 + sigma^2) still holds), so an eps / x0 / v network
    (``PredictionDenoiser``) sees the correctly scaled input and the fractional time input t - 1
    (its sinusoidal embedding is continuous); the CDM classifier interpolates its level logits
    (``CDMDenoiser``). Sigmas outside [sigma_1, sigma_T] clamp to the end levels.
    """

    def __init__(
        self,
        kind: Literal["linear", "cosine", "dre_uniform"] = "linear",
        num_levels: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> None:
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        self.kind = kind
        self.num_levels = num_levels
        T = num_levels
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
            alpha_bar = torch.cumprod(1 - betas, 0)
        elif kind == "cosine":
            steps = torch.arange(T + 1, dtype=torch.float64) / T
            f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
            alpha_bar = torch.cumprod(1 - betas, 0)
        elif kind == "dre_uniform":
            levels = torch.arange(1, T + 1, dtype=torch.float64)
            alpha_bar = 1 - (levels / (T + 1)) ** 2
        else:
            raise ValueError(f"unknown schedule kind {kind!r}; use linear, cosine or dre_uniform")
        #: alpha_bar[t] for t = 0..T, float64 [T + 1], alpha_bar[0] = 1.
        self.alpha_bar = torch.cat([alpha_bar.new_ones(1), alpha_bar])
        self._log_ve_sigma = 0.5 * torch.log((1 - self.alpha_bar[1:]) / self.alpha_bar[1:])

    @property
    def betas(self) -> Tensor:
        """beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} for t = 1..T, float64 [T]."""
        return 1 - self.alpha_bar[1:] / self.alpha_bar[:-1]

    def _lookup(self, t: Tensor) -> Tensor:
        """alpha_bar at (possibly fractional) levels t, interpolating log(ve_sigma)."""
        t = _t_tensor(t)
        if torch.all(t == t.round()):
            return self.alpha_bar.to(t.device)[t.long()]
        log_s = self._log_ve_sigma.to(t.device)
        idx = (t - 1).clamp(0, self.num_levels - 1)
        lo = (
            idx.floor().long().clamp(max=self.num_levels - 2) if self.num_levels > 1 else idx.long()
        )
        frac = idx - lo
        hi = (lo + 1).clamp(max=self.num_levels - 1)
        ve = torch.exp(log_s[lo] * (1 - frac) + log_s[hi] * frac)
        return 1 / (1 + ve**2)

    def alpha(self, t: Tensor) -> Tensor:
        return self._lookup(t).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        return (1 - self._lookup(t)).sqrt()

    def ve_sigma_at_levels(self) -> Tensor:
        """VE sigma of levels 1..T, float64 [T], increasing."""
        return self._log_ve_sigma.exp()

    def t_from_ve_sigma(self, ve_sigma: Tensor) -> Tensor:
        log_s = self._log_ve_sigma.to(ve_sigma.device)
        x = torch.log(ve_sigma.to(torch.float64).clamp_min(1e-30)).clamp(log_s[0], log_s[-1])
        hi = torch.searchsorted(log_s, x.contiguous()).clamp(1, self.num_levels - 1)
        lo = hi - 1
        frac = ((x - log_s[lo]) / (log_s[hi] - log_s[lo])).clamp(0, 1)
        return lo.to(torch.float64) + frac + 1

    def noise_input(self, t: Tensor) -> Tensor:
        return _t_tensor(t) - 1

    def sample_training_t(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """Uniform integer levels in 1..T (float64 [n])."""
        t = torch.randint(1, self.num_levels + 1, (n,), generator=generator, device=device)
        return t.to(torch.float64)

    def sampling_levels(self, num_steps: int) -> Tensor:
        """num_steps evenly strided levels T = t_0 > ... > t_{n-1} >= 1, as in DDIM (long [n])."""
        if not 1 <= num_steps <= self.num_levels:
            raise ValueError(f"num_steps must be in 1..{self.num_levels}, got {num_steps}")
        levels = torch.linspace(self.num_levels, 1, num_steps, dtype=torch.float64).round().long()
        return torch.unique_consecutive(levels)

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """VE sigmas of the strided levels, then 0: the strided chain uses strided betas."""
        sig = self.ve_sigma_at_levels()[self.sampling_levels(num_steps) - 1]
        return torch.cat([sig, sig.new_zeros(1)])


class LogSNRSchedule(NoiseSchedule):
    """Continuous variance-preserving schedule defined by its log-SNR lambda(t), t in [t_min, 1].

    alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), ve_sigma = exp(-lambda / 2).

    Args:
        kind: "linear" — the VP SDE of Song et al. with beta(t) = beta_min + t(beta_max -
            beta_min), so alpha(t) = exp(-B(t)/2), B(t) = beta_min t + (beta_max - beta_min) t^2/2;
            "cosine" — lambda(t) = -2 log tan(pi t / 2), clipped to [logsnr_min, logsnr_max].
        t_min: smallest training / sampling time (1e-5 for the VP SDE as in DG; 1e-3 for the
            probability-flow likelihood convention of Song et al.).
    The network input is 999·t (score_sde's DDPM++ convention).
    """

    def __init__(
        self,
        kind: Literal["linear", "cosine"] = "linear",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        logsnr_min: float = -20.0,
        logsnr_max: float = 20.0,
        t_min: float = 1e-5,
    ) -> None:
        if kind not in ("linear", "cosine"):
            raise ValueError(f"unknown log-SNR schedule kind {kind!r}; use linear or cosine")
        self.kind = kind
        self.beta_min, self.beta_max = beta_min, beta_max
        self.logsnr_min, self.logsnr_max = logsnr_min, logsnr_max
        self.t_min = t_min

    def integrated_beta(self, t: Tensor) -> Tensor:
        """B(t) = int_0^t beta(s) ds of the linear VP SDE, [B]."""
        t = _t_tensor(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def lambda_(self, t: Tensor) -> Tensor:
        """log-SNR lambda(t), float64 [B]."""
        t = _t_tensor(t)
        if self.kind == "linear":
            return -torch.log(torch.expm1(self.integrated_beta(t)))
        lam = -2 * torch.log(torch.tan(math.pi * t / 2))
        return lam.clamp(self.logsnr_min, self.logsnr_max)

    def t_from_lambda(self, lam: Tensor) -> Tensor:
        """Inverse of ``lambda_``, [B]."""
        lam = _t_tensor(lam)
        if self.kind == "linear":
            big_b = torch.log1p(torch.exp(-lam))  # B(t) = log(1 + e^{-lambda})
            a, b = 0.5 * (self.beta_max - self.beta_min), self.beta_min
            return (-b + torch.sqrt(b**2 + 4 * a * big_b)) / (2 * a)
        lam = lam.clamp(self.logsnr_min, self.logsnr_max)
        return 2 / math.pi * torch.atan(torch.exp(-lam / 2))

    def sample_t_uniform_log_snr(
        self,
        n: int,
        t_min: float,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """Times t in [t_min, 1] whose log-SNR is uniform on [lambda(1), lambda(t_min)], float64
        [n]: density -d lambda/dt / (lambda(t_min) - lambda(1)). For the linear VP SDE, lambda =
        -log(exp(B(t)) - 1) and the density is proportional to beta(t) / (1 - exp(-B(t))), DG's
        importance sampling of discriminator training times (the official
        ``get_diffusion_time``); inverse-CDF sampling in lambda."""
        ends = self.lambda_(torch.tensor([t_min, 1.0], dtype=torch.float64))
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        lam = ends[0].to(u.device) + u * (ends[1] - ends[0]).to(u.device)
        return self.t_from_lambda(lam).clamp(t_min, 1.0)

    def log_snr(self, t: Tensor) -> Tensor:
        return self.lambda_(t)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.sigmoid(self.lambda_(t)).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sigmoid(-self.lambda_(t)).sqrt()

    def ve_sigma(self, t: Tensor) -> Tensor:
        return torch.exp(-self.lambda_(t) / 2)

    def t_from_ve_sigma(self, ve_sigma: Tensor) -> Tensor:
        return self.t_from_lambda(-2 * torch.log(ve_sigma.to(torch.float64)))

    def noise_input(self, t: Tensor) -> Tensor:
        return 999 * _t_tensor(t)

    def sample_training_t(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """Uniform t in [t_min, 1], float64 [n]."""
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return self.t_min + (1 - self.t_min) * u

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """VE sigmas at num_steps times uniform in [t_min, 1] (descending), then 0."""
        t = torch.linspace(1, self.t_min, num_steps, dtype=torch.float64)
        return torch.cat([self.ve_sigma(t), torch.zeros(1, dtype=torch.float64)])


class VESchedule(NoiseSchedule):
    """Variance-exploding schedule (Song et al. SMLD): alpha = 1, sigma(t) = s_min (s_max/s_min)^t.

    The network input is log(sigma) / 4 (EDM's c_noise convention). Training t ~ U(0, 1).
    """

    variance_preserving = False

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(_t_tensor(t))

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _t_tensor(t)

    def t_from_ve_sigma(self, ve_sigma: Tensor) -> Tensor:
        ratio = math.log(self.sigma_max / self.sigma_min)
        return torch.log(ve_sigma.to(torch.float64) / self.sigma_min) / ratio

    def noise_input(self, t: Tensor) -> Tensor:
        return torch.log(self.sigma(t)) / 4

    def sample_training_t(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        return torch.rand(n, generator=generator, device=device, dtype=torch.float64)

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        t = torch.linspace(1, 0, num_steps, dtype=torch.float64)
        return torch.cat([self.sigma(t), torch.zeros(1, dtype=torch.float64)])


class EDMSchedule(NoiseSchedule):
    """EDM (Karras et al. 2022): alpha = 1, t = sigma; log-normal training sigmas, rho ladder.

    Args:
        sigma_min, sigma_max, rho: the sampling ladder (eq. 5; defaults 0.002, 80, 7).
        p_mean, p_std: ln(sigma) ~ N(p_mean, p_std^2) during training (defaults -1.2, 1.2).
        sigma_data: data std used by EDM preconditioning (0.5).
    """

    variance_preserving = False

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_data: float = 0.5,
    ) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(_t_tensor(t))

    def sigma(self, t: Tensor) -> Tensor:
        return _t_tensor(t)

    def t_from_ve_sigma(self, ve_sigma: Tensor) -> Tensor:
        return ve_sigma.to(torch.float64)

    def noise_input(self, t: Tensor) -> Tensor:
        return torch.log(_t_tensor(t)) / 4

    def sample_training_t(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
        return torch.exp(self.p_mean + self.p_std * z)

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        return karras_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho)
