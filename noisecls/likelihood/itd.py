"""Information-theoretic log-density estimate (Kong, Brekelmans & Ver Steeg, ICLR 2023).

For data u in R^d and the VP channel u_a = sqrt(sigmoid(a))·u + sqrt(sigmoid(-a))·eps at log-SNR a,
the pointwise I-MMSE identity (ITD eq. 5, written in log-SNR) reads, for any reference density q,

    -log p(u) = -log q(u) + 1/2 ∫ [mmse_p(u, a) - mmse_q(u, a)] da,                      (1)

with mmse(u, a) = E_eps ||eps - eps_hat(u_a, a)||^2 the pointwise noise-prediction error of the
optimal predictor. Here q = N(m, Σ) is the Gaussian fitted to the data, whose optimal predictor is
linear: in Σ's eigenbasis (w = Vᵀ(u - m), e = Vᵀeps, gamma = e^a)

    eps_k - eps_hat_k = (gamma·λ_k·e_k - sqrt(gamma)·w_k) / (1 + gamma·λ_k),                (2)
    mmse_q(u, a) = sum_k (gamma·w_k² + gamma²·λ_k²) / (1 + gamma·λ_k)²,

whose average over u ~ q is the usual mmse_G(a) = sum_k sigmoid(a + log λ_k). Using the pointwise
-log q(u) and mmse_q(u, a) (rather than the Gaussian entropy and mmse_G(a), as the official code
does) makes (1) an estimate of each absolute -log p(u), not only of differences.

The a-integral is estimated by importance sampling from a truncated logistic (ITD section 3.2;
defaults loc = -mean(log λ), scale = sqrt(1 + 3/π·var(log λ)), clip = 3 as in the official code),
stratified over the quantiles. By default mmse_q is replaced by the error (2) of the Gaussian
predictor at the *same* eps (a control variate with the same expectation), which removes the
noise the two terms share.

The density of noised data p_zeta (u = sqrt(sigmoid(zeta))·x + sqrt(sigmoid(-zeta))·eps1, the VP
channel at log-SNR zeta) follows from the same denoiser of p: re-noising u at a equals noising x
once at a' = logit(sigmoid(a)·sigmoid(zeta)) (CDL, Wu et al. 2024, section 3), and the optimal
predictor of the second noise is the fraction kappa = sqrt(sigmoid(-a) / (1 - sigmoid(a')))
of the predicted total noise. Its Gaussian reference is N(sqrt(sigmoid(zeta))·m, sigmoid(zeta)·Σ +
sigmoid(-zeta)·I), same eigenvectors. zeta = +inf is clean data.

Denoisers are called in sigma space: the channel at log-SNR a is x + sigma·eps with
sigma = exp(-a/2), whatever schedule the network was trained under.

The integration range. Identity (1) needs every a in (-inf, inf); a trained network is valid
only on its schedule's log-SNR range [a_min, a_max] (sigma_max .. sigma_min). The choice here,
for a network (``log_snr_limits`` given):

* the estimate is of the data density smoothed at sigma_min = exp(-a_max/2), p_s = p * N(0,
  sigma_min² I) — the density the probability-flow ODE estimates too, so the two agree. Its
  channel at any log-SNR a is the data's at a' = logit(sigmoid(a)·sigmoid(a_max)) <= a_max (the
  same composition as p_zeta's), so the network is never called above its range however large a
  is, and the integral runs to a_max + ``SMOOTHED_TAIL``, where both errors have decayed (the
  neglected tail is below D·exp(-SMOOTHED_TAIL) nats, the Gaussian reference's own bound). On
  lattice (8-bit-like) data this matters: truncating at a_max instead dropped the whole high-SNR
  part of the integral, where a reference fitted to constant pixels (variance floored at 1e-5)
  still errs and the data's denoiser does not (27 bits/dim on digits for an ODE value of 2.3).
  With data quantized in bins of width h the smoothed density differs from the dequantized one
  mostly within ~sigma_min of the bin edges: small when sigma_min << h (digits: 0.01 vs 0.125;
  8-bit: 0.01 vs 0.0078 is not small, and the same holds for the ODE figure).
* below a_min the integral is cut: there p's and the reference's errors differ by O(e^a) (both
  predictors tend to the same linear one at low SNR), a relative error of order exp(a_min)
  (4e-5 for the linear DDPM schedule's a_min = -10.1, 1.6e-4 for EDM's sigma_max = 80).

Without limits (an exact denoiser, valid at every a) the range is loc ± clip·scale of the
importance distribution and the estimate is of p itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from noisecls.denoisers import Denoiser

_LOG_2PI = math.log(2 * math.pi)
#: how far above a_max the integral of a smoothed density runs (see the module docstring).
SMOOTHED_TAIL = 12.0


@dataclass
class ITDConfig:
    """Options of the ITD estimator (per data set: set them in the experiment YAML).

    Args:
        num_points: log-SNR integration points per sample.
        loc, scale: the logistic importance distribution of log-SNR; None takes the official
            data-driven defaults from the reference covariance spectrum
            (loc = -mean(log λ), scale = sqrt(1 + 3/π·var(log λ))).
        clip: truncation of the logistic, in units of ``scale`` around ``loc``.
        control_variate: use the Gaussian reference's error at the same noise instead of its
            expectation (same mean, lower variance).
        min_eigenvalue: floor on the reference covariance eigenvalues (data units²), so
            constant pixels (zero variance) keep the reference density finite.
        reference: "full" Gaussian (eigenvectors of the covariance, D x D) or "diagonal"
            (per-dimension variances; for high-dimensional data).
    """

    num_points: int = 100
    loc: float | None = None
    scale: float | None = None
    clip: float = 3.0
    control_variate: bool = True
    min_eigenvalue: float = 1e-5
    reference: Literal["full", "diagonal"] = "full"

    def __post_init__(self) -> None:
        if self.num_points < 1:
            raise ValueError(f"itd.num_points must be >= 1, got {self.num_points}")
        if self.clip <= 0 or (self.scale is not None and self.scale <= 0):
            raise ValueError("itd.clip and itd.scale must be positive")
        if self.min_eigenvalue <= 0:
            raise ValueError(f"itd.min_eigenvalue must be positive, got {self.min_eigenvalue}")
        if self.reference not in ("full", "diagonal"):
            raise ValueError(f"itd.reference must be full or diagonal, got {self.reference!r}")


# ---- log-SNR importance distribution ---------------------------------------------------------
def logistic_defaults(eigenvalues: Tensor) -> tuple[float, float]:
    """Official data-driven (loc, scale) of the log-SNR logistic from covariance eigenvalues [D].

    The MMSE curve of N(0, Σ) is sum_k sigmoid(a + log λ_k), a mixture of logistic CDFs centred
    at -log λ_k; loc is their mean and the scale widens the unit logistic by their spread
    (the official code's sqrt(1 + 3/π·var(log λ))).
    """
    log_eig = torch.log(eigenvalues.to(torch.float64))
    var = float(log_eig.var()) if log_eig.numel() > 1 else 0.0
    return float(-log_eig.mean()), math.sqrt(1 + 3 / math.pi * var)


def truncated_logistic(
    shape: tuple[int, ...],
    loc: float,
    scale: float,
    low: float,
    high: float,
    *,
    stratified: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw log-SNRs from a logistic(loc, scale) truncated to [low, high] by inverse CDF.

    Returns (a, 1 / q(a)), both float64 of ``shape``; the importance weight
    1/q(a) = scale·(F(high) - F(low)) / (sigmoid(z)·sigmoid(-z)), z = (a - loc)/scale, so that
    mean(weight·f(a)) estimates ∫_low^high f(a) da. ``stratified`` draws one uniform per
    quantile stratum along the last dimension (still unbiased, lower variance).
    """
    if not low < high:
        raise ValueError(f"empty log-SNR range [{low}, {high}]")
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    if stratified:
        n = shape[-1]
        u = (torch.arange(n, device=device, dtype=torch.float64) + u) / n
    lo_cdf = torch.sigmoid(torch.tensor((low - loc) / scale, dtype=torch.float64))
    hi_cdf = torch.sigmoid(torch.tensor((high - loc) / scale, dtype=torch.float64))
    p = (lo_cdf + (hi_cdf - lo_cdf) * u).to(u)
    z = torch.logit(p)
    a = (loc + scale * z).clamp(low, high)
    z = (a - loc) / scale
    weight = scale * float(hi_cdf - lo_cdf) / (torch.sigmoid(z) * torch.sigmoid(-z))
    return a, weight


# ---- the Gaussian reference --------------------------------------------------------------------
class GaussianReference:
    """q = N(mean, V diag(λ) Vᵀ) on flattened data, and its noised versions q_zeta.

    Args:
        mean: [D]; eigenvalues: [D] (> 0); eigenvectors: [D, D] (columns) or None for an
            axis-aligned (diagonal) covariance. Stored as float64.
    """

    def __init__(self, mean: Tensor, eigenvalues: Tensor, eigenvectors: Tensor | None) -> None:
        if mean.ndim != 1 or eigenvalues.shape != mean.shape:
            raise ValueError("reference mean and eigenvalues must both have shape [D]")
        if eigenvectors is not None and eigenvectors.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"reference eigenvectors must be [D, D], got {eigenvectors.shape}")
        if (eigenvalues <= 0).any():
            raise ValueError("reference eigenvalues must be positive (set itd.min_eigenvalue)")
        self.mean = mean.to(torch.float64)
        self.eigenvalues = eigenvalues.to(torch.float64)
        self.eigenvectors = None if eigenvectors is None else eigenvectors.to(torch.float64)

    @classmethod
    def fit(
        cls, mean: Tensor, covariance: Tensor, *, min_eigenvalue: float, diagonal: bool = False
    ) -> GaussianReference:
        """From a data mean [D] and covariance [D, D]; eigenvalues floored at min_eigenvalue."""
        cov = covariance.to(torch.float64)
        if diagonal:
            return cls(mean, cov.diagonal().clamp_min(min_eigenvalue), None)
        lam, vec = torch.linalg.eigh(0.5 * (cov + cov.T))
        return cls(mean, lam.clamp_min(min_eigenvalue), vec)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def to(self, device: torch.device) -> GaussianReference:
        vec = None if self.eigenvectors is None else self.eigenvectors.to(device)
        return GaussianReference(self.mean.to(device), self.eigenvalues.to(device), vec)

    def _rotate(self, v: Tensor) -> Tensor:
        """Vᵀ v for v [N, D] (float64)."""
        return v if self.eigenvectors is None else v @ self.eigenvectors

    def _noised(self, data_log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """Mean scale c [N, 1] and eigenvalues [N, D] of q_zeta (zeta = +inf: q itself)."""
        s = torch.sigmoid(data_log_snr.to(torch.float64))[:, None]
        return s.sqrt(), s * self.eigenvalues + (1 - s)

    def centered(self, u: Tensor, data_log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """(w = Vᵀ(u - c·m) [N, D], eigenvalues of q_zeta [N, D]) for u [N, ...]."""
        c, lam = self._noised(data_log_snr)
        flat = u.reshape(u.shape[0], -1).to(torch.float64)
        return self._rotate(flat - c * self.mean), lam

    def log_prob(self, u: Tensor, data_log_snr: Tensor) -> Tensor:
        """log q_zeta(u) [N] for u [N, ...] and zeta [N] (+inf: clean)."""
        w, lam = self.centered(u, data_log_snr)
        return -0.5 * (self.dim * _LOG_2PI + lam.log().sum(1) + (w**2 / lam).sum(1))

    def eps_error(self, w: Tensor, lam: Tensor, log_snr: Tensor, eps: Tensor | None) -> Tensor:
        """||eps - eps_hat_q||² at log-SNR a [N] (eq. 2) for the same eps [N, ...], or its
        expectation mmse_q(u, a) when eps is None; [N] float64."""
        gamma = torch.exp(log_snr.to(torch.float64))[:, None]
        denom = 1 + gamma * lam
        if eps is None:
            return ((gamma * w**2 + (gamma * lam) ** 2) / denom**2).sum(1)
        e = self._rotate(eps.reshape(eps.shape[0], -1).to(torch.float64))
        return (((gamma * lam * e - gamma.sqrt() * w) / denom) ** 2).sum(1)


# ---- the estimator ----------------------------------------------------------------------------
def _model_eps_error(
    denoiser: Denoiser,
    u: Tensor,
    log_snr: Tensor,
    eps: Tensor,
    data_log_snr: Tensor,
    cond: dict,
    min_log_snr: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(||eps - eps_hat_{p_zeta}(u_a, a)||² [N] float64, valid [N] bool) from the denoiser of p,
    via a' = logit(sigmoid(a)·sigmoid(zeta)).

    u [N, ...], log_snr a [N], eps [N, ...], data_log_snr zeta [N] (+inf for clean u). Rows
    whose a' lies below ``min_log_snr`` (the network's a_min) are not valid: the denoiser is
    called there at a_min instead and the caller discards the result.
    """
    a = log_snr.to(torch.float64)
    zeta = data_log_snr.to(torch.float64)
    log_s_eff = F.logsigmoid(a) + F.logsigmoid(zeta)  # log sigmoid(a')
    # log(1 - sigmoid(a')) = log(sigmoid(-a) + sigmoid(a)·sigmoid(-zeta))
    log_1m_s_eff = torch.logaddexp(F.logsigmoid(-a), F.logsigmoid(a) + F.logsigmoid(-zeta))
    valid = torch.ones_like(a, dtype=torch.bool)
    if min_log_snr is not None:
        valid = log_s_eff - log_1m_s_eff >= min_log_snr
    sigma = torch.exp(0.5 * (log_1m_s_eff - log_s_eff))  # exp(-a'/2)
    if min_log_snr is not None:
        sigma = sigma.clamp(max=math.exp(-0.5 * min_log_snr))
    scale_u = torch.exp(0.5 * (F.logsigmoid(a) - log_s_eff))  # sqrt(s(a)) / sqrt(s(a'))
    scale_e = torch.exp(0.5 * (F.logsigmoid(-a) - log_s_eff))
    kappa = torch.exp(0.5 * (F.logsigmoid(-a) - log_1m_s_eff))

    def bc(v: Tensor) -> Tensor:
        return v.to(u.dtype).reshape(-1, *[1] * (u.ndim - 1))

    # sigma space of the a'-channel: y = u_a / sqrt(s(a')) = x + sigma·n.
    y = bc(scale_u) * u + bc(scale_e) * eps
    denoised = denoiser(y, sigma.to(u.device), **cond)
    eps_hat = bc(kappa / sigma) * (y - denoised)
    return (eps - eps_hat).flatten(1).to(torch.float64).pow(2).sum(1), valid


def itd_log_density_at(
    denoiser: Denoiser,
    u: Tensor,
    reference: GaussianReference,
    log_snr: Tensor,
    weights: Tensor,
    eps: Tensor,
    *,
    data_log_snr: Tensor | None = None,
    log_snr_limits: tuple[float, float] | None = None,
    control_variate: bool = True,
    cond: dict | None = None,
) -> Tensor:
    """log p_zeta(u) [N] estimated at given integration draws (eq. 1).

    Args:
        u: points [N, ...] (VP scaling of p_zeta; data scale for clean data).
        log_snr, weights: integration log-SNRs and importance weights [N, K]
            (``truncated_logistic``).
        eps: channel noise [N, K, ...]; pass the same draws to two calls (common random numbers)
            so that the Monte Carlo noise of a difference of log-densities cancels.
        data_log_snr: zeta [N] of the density to estimate (None or +inf: the data density p).
        log_snr_limits: (a_min, a_max), the network's log-SNR range: estimate p_zeta smoothed
            at sigma_min = exp(-a_max/2) (the network is never called above a_max), and take
            the reference's error for the denoiser's where the effective log-SNR a' falls
            below a_min (the integrand is O(e^a') there; see the module docstring). None: p_zeta
            itself, for a denoiser valid at every log-SNR.
        control_variate: Gaussian error at the same eps instead of its expectation.
        cond: the denoiser's keyword arguments (per sample, [N, ...]).
    The denoiser is called once on all N·K points; gradients flow to its parameters.
    """
    n, k = log_snr.shape
    if eps.shape[:2] != (n, k) or eps.shape[2:] != u.shape[1:]:
        raise ValueError(f"eps must have shape [N, K, ...] = {(n, k, *u.shape[1:])}")
    if data_log_snr is None:
        data_log_snr = torch.full((n,), math.inf, dtype=torch.float64, device=u.device)
    log_jacobian = 0.0
    if log_snr_limits is not None:
        u, data_log_snr, log_jacobian = smoothed_channel(u, data_log_snr, log_snr_limits[1])
    ref = reference.to(u.device) if reference.mean.device != u.device else reference
    zeta_rep = data_log_snr.to(torch.float64).repeat_interleave(k)
    u_rep = u.repeat_interleave(k, dim=0)
    a_flat = log_snr.reshape(-1)
    eps_flat = eps.reshape(n * k, *u.shape[1:]).to(u.dtype)
    cond_rep = {
        name: v.repeat_interleave(k, dim=0) for name, v in (cond or {}).items() if v is not None
    }
    model_err, valid = _model_eps_error(
        denoiser, u_rep, a_flat, eps_flat, zeta_rep, cond_rep,
        None if log_snr_limits is None else log_snr_limits[0],
    )  # fmt: skip
    w, lam = ref.centered(u, data_log_snr)
    gauss_err = ref.eps_error(
        w.repeat_interleave(k, dim=0),
        lam.repeat_interleave(k, dim=0),
        a_flat,
        eps_flat if control_variate else None,
    )
    model_err = torch.where(valid, model_err, gauss_err)
    gap = (weights.reshape(-1) * (model_err - gauss_err)).reshape(n, k).mean(1)
    return ref.log_prob(u, data_log_snr) - 0.5 * gap + log_jacobian


def itd_integration_draws(
    u: Tensor,
    num_points: int,
    loc: float,
    scale: float,
    low: float,
    high: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(log_snr [N, K], weights [N, K], eps [N, K, ...]) for ``itd_log_density_at``:
    stratified truncated-logistic log-SNRs and standard normal channel noise."""
    n = u.shape[0]
    a, w = truncated_logistic(
        (n, num_points), loc, scale, low, high, stratified=True, generator=generator,
        device=u.device,
    )  # fmt: skip
    eps = torch.randn(
        (n, num_points, *u.shape[1:]), generator=generator, device=u.device, dtype=u.dtype
    )
    return a, w, eps


def itd_log_snr_range(
    config: ITDConfig,
    reference: GaussianReference,
    limits: tuple[float, float] | None = None,
) -> tuple[float, float, float, float]:
    """(loc, scale, low, high): the log-SNR importance distribution (a logistic truncated to
    [low, high]) and so the integration range.

    Without ``limits``: loc, scale from the config or the data-driven defaults of the
    reference spectrum, range loc ± clip·scale (an exact denoiser: the density p itself).
    With ``limits`` = (a_min, a_max), the log-SNR range a network was trained on: the range is
    [a_min, a_max + SMOOTHED_TAIL] for the density smoothed at sigma_min = exp(-a_max/2) (see
    the module docstring; ``itd_log_density_at(log_snr_limits=...)``), and the default
    loc, scale come from the smoothed reference's spectrum sigmoid(a_max)·λ + sigmoid(-a_max).
    """
    eigenvalues = reference.eigenvalues
    if limits is not None:
        keep = torch.sigmoid(torch.tensor(limits[1], dtype=torch.float64))
        eigenvalues = keep * eigenvalues + (1 - keep)
    default_loc, default_scale = logistic_defaults(eigenvalues)
    loc = default_loc if config.loc is None else config.loc
    scale = default_scale if config.scale is None else config.scale
    if limits is None:
        low, high = loc - config.clip * scale, loc + config.clip * scale
    else:
        low, high = limits[0], limits[1] + SMOOTHED_TAIL
    if not low < high:
        raise ValueError(f"the ITD log-SNR range [{low:.3g}, {high:.3g}] is empty")
    return loc, scale, low, high


def smoothed_channel(
    u: Tensor, data_log_snr: Tensor, smoothing_log_snr: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Density of p_zeta smoothed at sigma_s = exp(-a_s/2) in terms of an unsmoothed one.

    Smoothing u ~ p_zeta in sigma space, u + sigma_s·n, and rescaling by sqrt(sigmoid(a_s)) is
    the VP channel at zeta' = logit(sigmoid(a_s)·sigmoid(zeta)), so
    log (p_zeta * N(0, sigma_s²))(u) = log p_zeta'(sqrt(sigmoid(a_s))·u) + D/2·log sigmoid(a_s).
    Returns (sqrt(sigmoid(a_s))·u, zeta' [N] float64, the log-Jacobian D/2·log sigmoid(a_s)).
    """
    a_s = torch.tensor(smoothing_log_snr, dtype=torch.float64, device=u.device)
    log_keep = F.logsigmoid(a_s)
    log_s = log_keep + F.logsigmoid(data_log_snr.to(torch.float64))  # log sigmoid(zeta')
    zeta = log_s - torch.log(-torch.expm1(log_s))  # logit, exact where sigmoid(zeta') ~ 1
    scaled = u * torch.exp(0.5 * log_keep).to(u.dtype)
    return scaled, zeta, 0.5 * u[0].numel() * log_keep


def itd_log_likelihood(
    denoiser: Denoiser,
    x: Tensor,
    reference: GaussianReference,
    config: ITDConfig | None = None,
    *,
    data_log_snr: Tensor | None = None,
    log_snr_limits: tuple[float, float] | None = None,
    chunk_points: int = 4096,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
) -> Tensor:
    """log p(x) (or log p_zeta(x) for ``data_log_snr`` zeta [B]) in nats [B] for x [B, ...].

    ``config.num_points`` integration points per sample, evaluated in chunks of about
    ``chunk_points`` denoiser rows. ``log_snr_limits`` = (a_min, a_max), the log-SNR range the
    denoiser is valid on (a schedule's): the estimate is then of the density smoothed at
    sigma_min = exp(-a_max/2), the ODE estimator's target (see the module docstring).
    """
    config = config or ITDConfig()
    if x.shape[0] and x[0].numel() != reference.dim:
        raise ValueError(
            f"x has {x[0].numel()} dimensions per sample but the reference has {reference.dim}"
        )
    loc, scale, low, high = itd_log_snr_range(config, reference, log_snr_limits)
    rows = max(1, chunk_points // config.num_points)
    out = []
    for start in range(0, x.shape[0], rows):
        sl = slice(start, start + rows)
        draws = itd_integration_draws(x[sl], config.num_points, loc, scale, low, high, generator)
        cond_chunk = {name: v[sl] for name, v in (cond or {}).items() if v is not None}
        zeta = None if data_log_snr is None else data_log_snr[sl]
        estimate = itd_log_density_at(
            denoiser, x[sl], reference, *draws, data_log_snr=zeta,
            log_snr_limits=log_snr_limits, control_variate=config.control_variate, cond=cond_chunk,
        )  # fmt: skip
        out.append(estimate)
    return torch.cat(out) if out else x.new_zeros(0, dtype=torch.float64)
