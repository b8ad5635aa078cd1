"""Analytic Gaussian-mixture oracles: the test suite's ground truth for every method.

Convention of the whole project: a noisy sample is ``x_t = a·C·x0 + s·eps`` with eps ~ N(0, I),
a the signal scale, s the noise std (both per sample) and C an optional fixed linear map
([D_out, D]; identity when None, a blur for Soft Diffusion). "Sigma space" (VE scaling) is
a = 1, s = sigma.

For p0 = sum_k w_k N(mu_k, Sigma_k) every quantity the methods learn is closed-form:

* the noisy marginal p_t = sum_k w_k N(a C mu_k, a² C Sigma_k Cᵀ + s² I) (``noisy``,
  ``noisy_log_prob``) and its score (``noisy_score``);
* the posterior mean E[x0 | x_t] = sum_k r_k(x_t) [mu_k + a Sigma_k Cᵀ (a² C Sigma_k Cᵀ + s² I)⁻¹
  (x_t - a C mu_k)] with component posterior r_k (``posterior_mean``, ``component_posterior``),
  which in sigma space is the MMSE denoiser (``denoiser``);
* the noise-level posterior p(level | x) of the optimal CDM classifier
  (``noise_level_log_posterior``, ``noise_level_log_densities``);
* the log density ratio of two mixtures, whose sigmoid is the optimal Discriminator-Guidance
  discriminator (``log_density_ratio``, ``optimal_discriminator_logit``).

Everything is computed in float64 from one eigendecomposition per component of C Sigma_k Cᵀ =
V_k diag(m_k) V_kᵀ, so per-sample a, s cost only elementwise work: the noisy covariance is
V_k diag(a² m_k + s² ) V_kᵀ. Inputs are processed in chunks (N up to ~1e5 with D = 64 is fine),
results come back in the input's dtype and device, and all operations are differentiable in x.

``mmd_rbf`` is the kernel two-sample statistic used to compare generated samples with a mixture.

``DCTGaussian`` is Soft Diffusion's oracle: Gaussian data whose covariance is diagonal in the
orthonormal DCT basis, corrupted by a DCT-domain blur plus noise, where every quantity is
per-frequency and closed-form (``log_prob``, ``score``, ``posterior_mean``).

``DequantizedLattice`` is the pixel-like oracle: independent dimensions, each K-level data with
uniform dequantization (some dimensions constant, like the digits' borders), whose exact log
density, noisy log density and MMSE denoiser (truncated-normal means) are closed-form — the
ground truth of the likelihood estimators on image-like data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from noisecls.process.blur import dct, idct, spatial_ndim

__all__ = [
    "DCTGaussian",
    "GaussianMixture",
    "GaussianMixtureDenoiser",
    "mmd_rbf",
    "standard_normal_log_prob",
]

_LOG_2PI = math.log(2.0 * math.pi)
# Elements of the [n, K, D_out] intermediates per chunk (float64: 32 MiB).
_CHUNK_ELEMENTS = 1 << 22

ScaleLike = float | int | Tensor


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """log N(x; 0, I) of x [N, ...] summed over all non-batch dimensions, [N] (x's dtype)."""
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    out = -0.5 * (flat.shape[1] * _LOG_2PI + flat.pow(2).sum(dim=1))
    return out.to(x.dtype if x.is_floating_point() else torch.get_default_dtype())


@dataclass(frozen=True)
class _Decomposition:
    """Eigendecomposition of the clean covariances seen through C.

    V [K, Do, Do] and m [K, Do] with C Sigma_k Cᵀ = V_k diag(m_k) V_kᵀ (m >= 0, numerically
    zero eigenvalues set to exactly 0); Cmu_V [K, Do] = V_kᵀ C mu_k; B [K, D, Do] = Sigma_k Cᵀ V_k
    (posterior-mean gain); d_in = D, d_out = Do.
    """

    V: Tensor
    m: Tensor
    Cmu_V: Tensor
    B: Tensor
    d_in: int
    d_out: int


class GaussianMixture:
    """A Gaussian mixture p0 = sum_k w_k N(mu_k, Sigma_k) with closed-form noisy statistics.

    Args:
        weights: [K] nonnegative, summing to 1 (to 1e-6; renormalised exactly).
        means: [K, D].
        covariances: [K, D, D] symmetric positive-definite.

    Parameters are stored as float64 tensors on one device (``.to(device)`` moves them); every
    method computes in float64 and returns results in the dtype/device of its input x.
    """

    def __init__(self, weights: Tensor, means: Tensor, covariances: Tensor) -> None:
        weights = torch.as_tensor(weights)
        means = torch.as_tensor(means)
        covariances = torch.as_tensor(covariances)
        if weights.ndim != 1 or weights.shape[0] == 0:
            raise ValueError(f"weights must have shape [K] with K >= 1, got {tuple(weights.shape)}")
        K = weights.shape[0]
        if means.ndim != 2 or means.shape[0] != K or means.shape[1] == 0:
            raise ValueError(
                f"means must have shape [K, D] = [{K}, D] with D >= 1, got {tuple(means.shape)}"
            )
        D = means.shape[1]
        if covariances.shape != (K, D, D):
            raise ValueError(
                f"covariances must have shape [K, D, D] = [{K}, {D}, {D}], "
                f"got {tuple(covariances.shape)}"
            )
        device = means.device
        weights = weights.to(device=device, dtype=torch.float64)
        means = means.to(dtype=torch.float64)
        covariances = covariances.to(device=device, dtype=torch.float64)
        if not (torch.isfinite(weights).all() and torch.isfinite(means).all()):
            raise ValueError("weights and means must be finite")
        if not torch.isfinite(covariances).all():
            raise ValueError("covariances must be finite")
        if (weights < 0).any():
            raise ValueError(f"weights must be nonnegative, got {weights.tolist()}")
        total = float(weights.sum())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1, they sum to {total:.8g}")
        scale = covariances.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-300)
        asym = ((covariances - covariances.transpose(1, 2)).abs() / scale).max()
        if float(asym) > 1e-8:
            raise ValueError(f"covariances must be symmetric (max relative asymmetry {asym:.3g})")
        covariances = 0.5 * (covariances + covariances.transpose(1, 2))
        chol, info = torch.linalg.cholesky_ex(covariances)
        if (info != 0).any():
            bad = torch.nonzero(info).flatten().tolist()
            raise ValueError(f"covariances must be positive-definite; components {bad} are not")
        self.weights = weights / weights.sum()
        self.means = means
        self.covariances = covariances
        self.cholesky = chol
        self._identity_decomposition: _Decomposition | None = None

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def gaussian(cls, mean: Tensor, cov: Tensor) -> GaussianMixture:
        """A single Gaussian N(mean [D], cov [D, D]) as a K = 1 mixture."""
        mean = torch.as_tensor(mean)
        cov = torch.as_tensor(cov)
        if mean.ndim != 1:
            raise ValueError(f"mean must have shape [D], got {tuple(mean.shape)}")
        return cls(torch.ones(1, dtype=torch.float64), mean[None], cov[None])

    @classmethod
    def isotropic(
        cls, weights: Tensor | Sequence[float], means: Tensor, std: float | Tensor
    ) -> GaussianMixture:
        """Mixture of N(mu_k, std_k² I): weights [K], means [K, D], std a float or [K]."""
        means = torch.as_tensor(means, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64, device=means.device)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(means.shape)}")
        K, D = means.shape
        std_t = torch.as_tensor(std, dtype=torch.float64, device=means.device)
        if std_t.ndim == 0:
            std_t = std_t.expand(K)
        if std_t.shape != (K,):
            raise ValueError(
                f"std must be a float or have shape [K] = [{K}], got {tuple(std_t.shape)}"
            )
        if (std_t <= 0).any():
            raise ValueError("std must be positive")
        eye = torch.eye(D, dtype=torch.float64, device=means.device)
        return cls(weights, means, std_t[:, None, None] ** 2 * eye)

    def to(self, device: torch.device | str) -> GaussianMixture:
        """A copy whose parameters live on ``device`` (computation stays float64)."""
        return GaussianMixture(
            self.weights.to(device), self.means.to(device), self.covariances.to(device)
        )

    # ------------------------------------------------------------------ basic properties
    @property
    def dim(self) -> int:
        """D, the data dimension."""
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        """K, the number of components."""
        return self.weights.shape[0]

    @property
    def device(self) -> torch.device:
        """Device of the stored parameters."""
        return self.means.device

    def mean(self) -> Tensor:
        """Mixture mean sum_k w_k mu_k, [D] float64."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Mixture covariance sum_k w_k (Sigma_k + mu_k mu_kᵀ) - m mᵀ, [D, D] float64."""
        m = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covariances)
        second = second + torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        return second - torch.outer(m, m)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw n samples: (x [n, D] in ``dtype`` (default: torch's default), component [n] long).

        ``generator`` must live on the mixture's device.
        """
        if n < 0:
            raise ValueError(f"n must be nonnegative, got {n}")
        dtype = dtype or torch.get_default_dtype()
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, device=self.device, generator=generator)
        x = self.means[component] + torch.einsum("nij,nj->ni", self.cholesky[component], z)
        return x.to(dtype), component

    def log_prob(self, x: Tensor) -> Tensor:
        """Clean-data log-density log p0(x) of x [N, D] (or [N, ...] flattening to D), [N]."""
        return self.noisy_log_prob(x, 1.0, 0.0)

    # ------------------------------------------------------------------ noisy marginals
    def noisy(
        self, a: float | Tensor, s: float | Tensor, C: Tensor | None = None
    ) -> GaussianMixture:
        """The marginal of x_t = a·C·x0 + s·eps for scalar a, s: a new mixture in D_out dims.

        Components are N(a C mu_k, a² C Sigma_k Cᵀ + s² I); raises ValueError if that is singular
        (s = 0 with a singular C, or a = s = 0).
        """
        a_f, s_f = float(a), float(s)
        Cm = self._check_map(C)
        if Cm is None:
            means, cov = a_f * self.means, a_f**2 * self.covariances
        else:
            means = a_f * self.means @ Cm.T
            cov = a_f**2 * Cm @ self.covariances @ Cm.T
        eye = torch.eye(cov.shape[-1], dtype=torch.float64, device=self.device)
        return GaussianMixture(self.weights, means, cov + s_f**2 * eye)

    def noisy_log_prob(
        self,
        x: Tensor,
        a: ScaleLike,
        s: ScaleLike,
        C: Tensor | None = None,
        component: Tensor | None = None,
    ) -> Tensor:
        """log p_t(x) for x [N, D_out] (or [N, ...]), a and s floats or [N]: returns [N].

        With ``component`` (long [N], values in [0, K); K or -1 mean "unconditional") it is the
        class-conditional log p_t(x | k) instead.
        """
        log_joint, _, _ = self._evaluate(x, a, s, C, need_score=False, need_mean=False)
        if component is None:
            out = torch.logsumexp(log_joint, dim=1)
        else:
            idx, valid = self._check_component(component, log_joint.shape[0])
            cond = (log_joint - torch.log(self.weights)).gather(1, idx[:, None])[:, 0]
            out = torch.where(valid, cond, torch.logsumexp(log_joint, dim=1))
        return self._out(out, x)

    def component_posterior(
        self, x: Tensor, a: ScaleLike, s: ScaleLike, C: Tensor | None = None
    ) -> Tensor:
        """p(k | x_t = x) for x [N, D_out] (or [N, ...]), a and s floats or [N]: returns [N, K]."""
        log_joint, _, _ = self._evaluate(x, a, s, C, need_score=False, need_mean=False)
        return self._out(torch.softmax(log_joint, dim=1), x)

    def noisy_score(
        self,
        x: Tensor,
        a: ScaleLike,
        s: ScaleLike,
        C: Tensor | None = None,
        component: Tensor | None = None,
    ) -> Tensor:
        """grad_x log p_t(x) for x [N, D_out] (or [N, ...]), a and s floats or [N]: x's shape.

        ``component`` (long [N]; K or -1 = unconditional) gives grad_x log p_t(x | k) instead.
        """
        _, score, _ = self._evaluate(
            x, a, s, C, need_score=True, need_mean=False, component=component
        )
        return self._out(score, x).reshape(x.shape)

    def posterior_mean(
        self,
        x: Tensor,
        a: ScaleLike,
        s: ScaleLike,
        C: Tensor | None = None,
        component: Tensor | None = None,
    ) -> Tensor:
        """E[x0 | x_t = x] for x [N, D_out] (or [N, ...]), a and s floats or [N].

        Returns [N, D], reshaped to x's shape when D_out = D. ``component`` (long [N]; K or -1 =
        unconditional) gives E[x0 | x_t = x, k] instead. At a = 1, s = 0 with C = I this is x; at
        a = 0 it is the mixture mean (or mu_k).
        """
        _, _, mean = self._evaluate(
            x, a, s, C, need_score=False, need_mean=True, component=component
        )
        out = self._out(mean, x)
        if out.shape[1] == math.prod(x.shape[1:]):
            out = out.reshape(x.shape)
        return out

    def denoiser(self) -> GaussianMixtureDenoiser:
        """The exact MMSE denoiser D(x, sigma, class_labels=None) = E[x0 | x0 + sigma·eps = x]."""
        return GaussianMixtureDenoiser(self)

    # ------------------------------------------------------------------ noise-level posterior
    def noise_level_log_densities(
        self,
        x: Tensor,
        a_levels: Tensor | Sequence[float],
        s_levels: Tensor | Sequence[float],
        C: Tensor | None = None,
    ) -> Tensor:
        """log p_l(x) of x [N, D_out] under each noisy marginal l: returns [N, L].

        a_levels, s_levels: [L]; C: None, one [D_out, D] map shared by all levels, or [L, D_out, D]
        (one per level, as in Soft Diffusion). These are the optimal CDM logits up to a per-x
        constant.
        """
        a_l = self._levels(a_levels, "a_levels")
        s_l = self._levels(s_levels, "s_levels")
        if a_l.shape != s_l.shape:
            raise ValueError(
                f"a_levels and s_levels must have the same shape [L], got "
                f"{tuple(a_l.shape)} and {tuple(s_l.shape)}"
            )
        L = a_l.shape[0]
        if C is not None and torch.as_tensor(C).ndim == 3:
            Cs = torch.as_tensor(C)
            if Cs.shape[0] != L:
                raise ValueError(
                    f"per-level C must have shape [L = {L}, D_out, D], got {tuple(Cs.shape)}"
                )
            cols = [self.noisy_log_prob(x, a_l[i], s_l[i], Cs[i]) for i in range(L)]
            return torch.stack(cols, dim=1)
        # Shared C: project x once per chunk, then only elementwise work per level.
        dec = self._decomposition(C)
        flat = self._flatten(x, dec.d_out)
        log_w = torch.log(self.weights)
        for i in range(L):
            self._check_scales(a_l[i : i + 1], s_l[i : i + 1], dec)
        chunks = []
        for xc in flat.split(self._chunk_size(dec.d_out)):
            xV = torch.einsum("nd,kde->nke", xc, dec.V)
            cols = []
            for i in range(L):
                lam = a_l[i] ** 2 * dec.m + s_l[i] ** 2  # [K, Do]
                z = xV - a_l[i] * dec.Cmu_V
                log_n = -0.5 * (dec.d_out * _LOG_2PI + lam.log().sum(-1) + (z**2 / lam).sum(-1))
                cols.append(torch.logsumexp(log_w + log_n, dim=1))
            chunks.append(torch.stack(cols, dim=1))
        return self._out(torch.cat(chunks), x)

    def noise_level_log_posterior(
        self,
        x: Tensor,
        a_levels: Tensor | Sequence[float],
        s_levels: Tensor | Sequence[float],
        log_prior: Tensor | None = None,
        C: Tensor | None = None,
    ) -> Tensor:
        """log p(level | x) for x drawn from sum_l pi_l p_l: returns [N, L] (rows logsumexp to 0).

        The optimal noise-level classifier of CDM. ``log_prior`` [L] is log pi (normalised here;
        uniform when None). a_levels, s_levels, C as in ``noise_level_log_densities``.
        """
        dens = self.noise_level_log_densities(x, a_levels, s_levels, C).to(torch.float64)
        L = dens.shape[1]
        if log_prior is None:
            prior = torch.zeros(L, dtype=torch.float64, device=dens.device)
        else:
            prior = torch.as_tensor(log_prior).to(device=dens.device, dtype=torch.float64)
            if prior.shape != (L,):
                raise ValueError(f"log_prior must have shape [L] = [{L}], got {tuple(prior.shape)}")
        return self._out(torch.log_softmax(dens + prior, dim=1), x)

    # ------------------------------------------------------------------ density ratios
    def log_density_ratio(
        self,
        other: GaussianMixture,
        x: Tensor,
        a: ScaleLike = 1.0,
        s: ScaleLike = 0.0,
        C: Tensor | None = None,
    ) -> Tensor:
        """log p_t(x) - q_t(x) with p = self, q = other, x [N, D_out], a and s floats or [N]: [N].

        sigmoid of it is the Bayes-optimal discriminator D(x) = p_t / (p_t + q_t) between data p
        (label 1) and model q (label 0) at equal class priors: the optimal Discriminator-Guidance
        discriminator, whose logit's x-gradient corrects the model score into the data score.
        """
        if other.dim != self.dim:
            raise ValueError(f"other mixture has dim {other.dim}, expected {self.dim}")
        return self.noisy_log_prob(x, a, s, C) - other.noisy_log_prob(x, a, s, C)

    def optimal_discriminator_logit(
        self,
        other: GaussianMixture,
        x: Tensor,
        a: ScaleLike = 1.0,
        s: ScaleLike = 0.0,
        C: Tensor | None = None,
    ) -> Tensor:
        """Alias of ``log_density_ratio``: the optimal real (self) vs fake (other) logit."""
        return self.log_density_ratio(other, x, a, s, C)

    # ------------------------------------------------------------------ internals
    def _check_map(self, C: Tensor | None) -> Tensor | None:
        if C is None:
            return None
        Cm = torch.as_tensor(C).to(device=self.device, dtype=torch.float64)
        if Cm.ndim != 2 or Cm.shape[1] != self.dim:
            raise ValueError(f"C must have shape [D_out, D = {self.dim}], got {tuple(Cm.shape)}")
        return Cm.detach()

    def _decomposition(self, C: Tensor | None) -> _Decomposition:
        if C is None and self._identity_decomposition is not None:
            return self._identity_decomposition
        Cm = self._check_map(C)
        if Cm is None:
            M, Cmu, SCt = self.covariances, self.means, self.covariances
        else:
            SCt = self.covariances @ Cm.T  # [K, D, Do]
            M = Cm @ SCt  # [K, Do, Do]
            M = 0.5 * (M + M.transpose(1, 2))
            Cmu = self.means @ Cm.T
        m, V = torch.linalg.eigh(M)
        tol = m.abs().amax(dim=1, keepdim=True) * m.shape[1] * torch.finfo(torch.float64).eps * 8
        m = torch.where(m > tol, m, torch.zeros_like(m))
        dec = _Decomposition(
            V=V,
            m=m,
            Cmu_V=torch.einsum("kd,kde->ke", Cmu, V),
            B=SCt @ V,
            d_in=self.dim,
            d_out=M.shape[-1],
        )
        if C is None:
            self._identity_decomposition = dec
        return dec

    def _flatten(self, x: Tensor, d_out: int) -> Tensor:
        if x.ndim < 2 or math.prod(x.shape[1:]) != d_out:
            raise ValueError(
                f"x must have shape [N, {d_out}] (or [N, ...] with {d_out} elements per sample), "
                f"got {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], d_out).to(device=self.device, dtype=torch.float64)

    def _per_sample(self, v: ScaleLike, n: int, name: str) -> Tensor:
        t = torch.as_tensor(v, dtype=torch.float64, device=self.device)
        if t.numel() == 1:
            return t.reshape(1).expand(n)
        if t.numel() != n:
            raise ValueError(
                f"{name} must be a float or have N = {n} entries, got {tuple(t.shape)}"
            )
        return t.reshape(n)

    def _levels(self, v: Tensor | Sequence[float], name: str) -> Tensor:
        t = torch.as_tensor(v, dtype=torch.float64, device=self.device).detach()
        if t.ndim != 1 or t.shape[0] == 0:
            raise ValueError(f"{name} must have shape [L] with L >= 1, got {tuple(t.shape)}")
        return t

    @staticmethod
    def _check_scales(a: Tensor, s: Tensor, dec: _Decomposition) -> None:
        if not (torch.isfinite(a).all() and torch.isfinite(s).all()):
            raise ValueError("a and s must be finite")
        if (s < 0).any():
            raise ValueError("the noise std s must be nonnegative")
        if a.numel() == 0:
            return
        # Smallest eigenvalue of the noisy covariance over samples and components.
        lam_min = (a[:, None] ** 2 * dec.m.amin(dim=1)[None] + s[:, None] ** 2).min()
        if lam_min <= 0:
            raise ValueError(
                "the noisy covariance a² C Sigma Cᵀ + s² I is singular (s = 0 with a = 0 or a "
                "singular C): the density is not defined there"
            )

    def _check_component(self, component: Tensor, n: int) -> tuple[Tensor, Tensor]:
        c = torch.as_tensor(component).to(self.device).reshape(-1)
        if c.numel() == 1:
            c = c.expand(n)
        if c.shape != (n,) or c.is_floating_point():
            raise ValueError(f"component must be an integer tensor of shape [N = {n}]")
        K = self.num_components
        if ((c < -1) | (c > K)).any():
            raise ValueError(f"component values must lie in [0, {K}) (or {K} / -1 = unconditional)")
        valid = (c >= 0) & (c < K)
        return torch.where(valid, c, torch.zeros_like(c)).long(), valid

    def _chunk_size(self, d_out: int) -> int:
        return max(1, _CHUNK_ELEMENTS // (self.num_components * max(d_out, self.dim)))

    def _evaluate(
        self,
        x: Tensor,
        a: ScaleLike,
        s: ScaleLike,
        C: Tensor | None,
        need_score: bool,
        need_mean: bool,
        component: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """log w_k + log N_k(x) [N, K] and, on request, the score [N, Do] and posterior mean [N, D].

        Score and mean mix the per-component terms with the component posterior, or with the
        one-hot ``component`` where it is given and valid.
        """
        dec = self._decomposition(C)
        flat = self._flatten(x, dec.d_out)
        n = flat.shape[0]
        a_t = self._per_sample(a, n, "a")
        s_t = self._per_sample(s, n, "s")
        self._check_scales(a_t, s_t, dec)
        onehot = valid = None
        if component is not None:
            idx, valid = self._check_component(component, n)
            onehot = torch.nn.functional.one_hot(idx, self.num_components).to(torch.float64)
        log_w = torch.log(self.weights)
        log_joints, scores, means = [], [], []
        step = self._chunk_size(dec.d_out)
        for start in range(0, max(n, 1), step):  # one (empty) chunk when n = 0
            sl = slice(start, start + step)
            xc, ac, sc = flat[sl], a_t[sl, None, None], s_t[sl, None, None]
            xV = torch.einsum("nd,kde->nke", xc, dec.V)  # V_kᵀ x
            z = xV - ac * dec.Cmu_V  # V_kᵀ (x - a C mu_k), [n, K, Do]
            lam = ac**2 * dec.m + sc**2  # eigenvalues of the noisy covariance, [n, K, Do]
            zl = z / lam
            log_n = -0.5 * (dec.d_out * _LOG_2PI + lam.log().sum(-1) + (z * zl).sum(-1))
            log_joint = log_w + log_n
            log_joints.append(log_joint)
            if not (need_score or need_mean):
                continue
            resp = torch.softmax(log_joint, dim=1)
            if onehot is not None:
                resp = torch.where(valid[sl, None], onehot[sl], resp)
            if need_score:
                scores.append(-torch.einsum("nke,kde->nd", resp[..., None] * zl, dec.V))
            if need_mean:
                gain = resp[..., None] * (ac * zl)
                means.append(resp @ self.means + torch.einsum("nke,kde->nd", gain, dec.B))
        score = torch.cat(scores) if need_score else None
        mean = torch.cat(means) if need_mean else None
        return torch.cat(log_joints), score, mean

    @staticmethod
    def _out(t: Tensor, x: Tensor) -> Tensor:
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        return t.to(device=x.device, dtype=dtype)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, D={self.dim})"


class GaussianMixtureDenoiser:
    """Exact MMSE denoiser of a mixture in sigma space: D(x, sigma) = E[x0 | x0 + sigma·eps = x].

    x [B, D] or [B, ...] flattening to D; sigma a float or [B] (sigma = 0 returns x). Optional
    ``class_labels`` (long [B]) conditions on the component: E[x0 | x, k]; label K (the
    "null" label of classifier-free guidance) or -1 means unconditional. Output has x's shape and
    dtype.
    """

    def __init__(self, mixture: GaussianMixture) -> None:
        self.mixture = mixture

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Tensor | None) -> Tensor:
        labels = cond.get("class_labels")
        out = self.mixture.posterior_mean(x, 1.0, sigma, component=labels)
        return out.reshape(x.shape)

    def score(self, x: Tensor, sigma: Tensor | float, **cond: Tensor | None) -> Tensor:
        """grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma², x's shape."""
        return self.mixture.noisy_score(x, 1.0, sigma, component=cond.get("class_labels"))


def mmd_rbf(
    x: Tensor,
    y: Tensor,
    bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
    chunk_size: int = 1024,
) -> Tensor:
    """Unbiased squared MMD between samples x [N, D] and y [M, D] (N, M >= 2), 0-dim float64.

    Kernel k(u, v) = sum_b exp(-|u - v|² / (2 b²)) over ``bandwidths`` (absolute length scales,
    so standardise data of very different scale first). The estimate averages k over distinct
    pairs within x and within y, minus twice the mean cross term: ~0 (and possibly slightly
    negative) for two samples of one distribution. Computed in float64, in row chunks (memory
    O(chunk_size · max(N, M))).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must have shapes [N, D] and [M, D], got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("mmd_rbf needs at least two samples in each set")
    bw = torch.as_tensor(list(bandwidths), dtype=torch.float64, device=x.device)
    if bw.ndim != 1 or bw.numel() == 0 or (bw <= 0).any():
        raise ValueError(f"bandwidths must be nonempty positive floats, got {bandwidths}")
    gamma = 0.5 / bw**2  # [B]
    x = x.detach().to(torch.float64)
    y = y.detach().to(device=x.device, dtype=torch.float64)

    def kernel_sum(u: Tensor, v: Tensor) -> Tensor:
        total = u.new_zeros(())
        for uc in u.split(chunk_size):
            d2 = (uc[:, None, :] - v[None]).pow(2).sum(-1) if uc.shape[1] <= 4 else None
            if d2 is None:
                d2 = (uc.pow(2).sum(1, keepdim=True) + v.pow(2).sum(1) - 2 * uc @ v.T).clamp_min(0)
            for g in gamma:
                total = total + torch.exp(-d2 * g).sum()
        return total

    n, m = x.shape[0], y.shape[0]
    n_bw = bw.numel()
    # Diagonal terms k(u, u) = n_bw each are removed for the unbiased within-set averages.
    kxx = (kernel_sum(x, x) - n * n_bw) / (n * (n - 1))
    kyy = (kernel_sum(y, y) - m * n_bw) / (m * (m - 1))
    kxy = kernel_sum(x, y) / (n * m)
    return kxx + kyy - 2 * kxy


class DCTGaussian:
    """Gaussian data N(Mᵀ m, Mᵀ diag(v) M), diagonal in the orthonormal DCT basis M, under a
    DCT-domain blur plus noise x_t = C x0 + s·eta with C = Mᵀ diag(c) M (Soft Diffusion).

    Per frequency f the corrupted marginal is N(c_f m_f, c_f² v_f + s²), independent across f
    (X = M x; M is orthonormal, so densities need no Jacobian):

    * log q(x) = sum_f log N(X_f; c_f m_f, c_f² v_f + s²)              (``log_prob``)
    * grad log q(x) = Mᵀ [-(X - c m) / (c² v + s²)]                    (``score``)
    * E[x0 | x_t = x] = Mᵀ [m + c v (X - c m) / (c² v + s²)]            (``posterior_mean``)

    so C E[x0 | x_t] = x_t + s² grad log q_t(x_t) (Tweedie for C x0 in Gaussian noise).

    Args:
        mean: DCT coefficients m of the data mean, [*shape] (shape (C, H, W) for images, (L,) or
            (C, L) for signals; the DCT acts on the trailing spatial axes as in
            ``noisecls.process.blur``).
        variance: per-frequency variances v > 0, [*shape].

    Gains c are broadcastable to [N, *shape] (e.g. ``BlurNoiseProcess.gains(t, shape)``), s is a
    float or [N]. Computation is float64; results come back in x's dtype and device.
    """

    def __init__(self, mean: Tensor, variance: Tensor) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float64)
        variance = torch.as_tensor(variance, dtype=torch.float64)
        if mean.shape != variance.shape or mean.ndim not in (1, 2, 3):
            raise ValueError(
                f"mean and variance must share a shape (L,), (C, L) or (C, H, W), got "
                f"{tuple(mean.shape)} and {tuple(variance.shape)}"
            )
        if not bool((variance > 0).all()):
            raise ValueError("variances must be positive")
        self.mean, self.variance = mean, variance
        self.shape = tuple(mean.shape)
        self.ndim = spatial_ndim(mean[None])

    def _coeffs(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape [N, *{self.shape}], got {tuple(x.shape)}")
        return dct(x.to(torch.float64), self.ndim)

    def _moments(self, gains: Tensor | float, s: ScaleLike, n: int) -> tuple[Tensor, Tensor]:
        """(c [N or 1, *shape], c² v + s² [N, *shape]) in float64."""
        c = torch.as_tensor(gains, dtype=torch.float64)
        c = c.expand(self.shape)[None] if c.ndim <= len(self.shape) else c
        s_t = torch.as_tensor(s, dtype=torch.float64).reshape(-1, *[1] * len(self.shape))
        if not bool((s_t >= 0).all()):
            raise ValueError("the noise std s must be nonnegative")
        var = c**2 * self.variance + s_t**2
        return c, var.expand(n, *self.shape) if var.shape[0] == 1 else var

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n clean samples x0, float64 [n, *shape]."""
        z = torch.randn(n, *self.shape, dtype=torch.float64, generator=generator)
        return idct(self.mean + self.variance.sqrt() * z, self.ndim)

    def sample_corrupted(
        self, n: int, gains: Tensor | float, s: ScaleLike, generator: torch.Generator | None = None
    ) -> Tensor:
        """n draws of x_t = C x0 + s·eta directly from the marginal, float64 [n, *shape]."""
        c, var = self._moments(gains, s, n)
        z = torch.randn(n, *self.shape, dtype=torch.float64, generator=generator)
        return idct(c * self.mean + var.sqrt() * z, self.ndim)

    def marginal_variance(self, gains: Tensor | float, s: ScaleLike) -> Tensor:
        """Per-frequency variance c² v + s² of x_t, float64 [N or 1, *shape]."""
        return self._moments(gains, s, 1)[1]

    def log_prob(self, x: Tensor, gains: Tensor | float, s: ScaleLike) -> Tensor:
        """log q_t(x) for x [N, *shape], [N]."""
        X = self._coeffs(x)
        c, var = self._moments(gains, s, X.shape[0])
        z2 = (X - c * self.mean) ** 2 / var
        out = -0.5 * (_LOG_2PI + var.log() + z2).flatten(1).sum(1)
        return out.to(device=x.device, dtype=x.dtype)

    def score(self, x: Tensor, gains: Tensor | float, s: ScaleLike) -> Tensor:
        """grad_x log q_t(x) for x [N, *shape], same shape."""
        X = self._coeffs(x)
        c, var = self._moments(gains, s, X.shape[0])
        return idct(-(X - c * self.mean) / var, self.ndim).to(device=x.device, dtype=x.dtype)

    def posterior_mean(self, x: Tensor, gains: Tensor | float, s: ScaleLike) -> Tensor:
        """E[x0 | x_t = x] for x [N, *shape], same shape (the optimal Soft Diffusion predictor)."""
        X = self._coeffs(x)
        c, var = self._moments(gains, s, X.shape[0])
        gain = c * self.variance / var
        out = idct(self.mean + gain * (X - c * self.mean), self.ndim)
        return out.to(device=x.device, dtype=x.dtype)

    def basis(self) -> Tensor:
        """The orthonormal DCT as a matrix M [D, D] on flattened samples: M x = dct(x)."""
        d = math.prod(self.shape)
        eye = torch.eye(d, dtype=torch.float64).reshape(d, *self.shape)
        return dct(eye, self.ndim).reshape(d, d).T

    def operator(self, gains: Tensor) -> Tensor:
        """The blur C = Mᵀ diag(c) M as a matrix [D, D] for one set of gains (shape broadcastable
        to ``shape``), for comparisons with :class:`GaussianMixture` and its ``C`` argument."""
        m = self.basis()
        c = torch.as_tensor(gains, dtype=torch.float64).expand(self.shape).reshape(-1)
        return m.T @ (c[:, None] * m)

    def to_mixture(self) -> GaussianMixture:
        """The same distribution as a one-component :class:`GaussianMixture` on flattened x."""
        m = self.basis()
        cov = m.T @ (self.variance.reshape(-1, 1) * m)
        return GaussianMixture.gaussian(m.T @ self.mean.reshape(-1), 0.5 * (cov + cov.T))


# ---- dequantized lattice data (pixel-like) ----------------------------------------------------
def _log_normal_cdf_difference(alpha: Tensor, beta: Tensor) -> Tensor:
    """log(Phi(beta) - Phi(alpha)) for alpha < beta, stable in both tails (float64)."""
    upper = alpha + beta > 0  # both mostly in the upper tail: use the mirrored difference
    hi = torch.where(upper, torch.special.log_ndtr(-alpha), torch.special.log_ndtr(beta))
    lo = torch.where(upper, torch.special.log_ndtr(-beta), torch.special.log_ndtr(alpha))
    z = (lo - hi).clamp(max=-1e-300)  # log of the ratio, < 0
    log1mexp = torch.where(z > -math.log(2), torch.log(-torch.expm1(z)), torch.log1p(-torch.exp(z)))
    return hi + log1mexp


class DequantizedLattice:
    """Product over D dimensions of dequantized lattice distributions: pixel-like exact oracle.

    Dimension d takes bin j of K equal bins of [low, high] (width h = (high - low) / K) with
    probability ``probs[d, j]`` and is uniform inside it — K-level data with uniform
    dequantization; a dimension with one non-zero probability is a constant pixel (like the
    digits' borders). In sigma space (y = x + sigma·eps) every quantity factorises over
    dimensions and is closed-form per bin [a_j, b_j], with alpha = (a_j - y)/sigma,
    beta = (b_j - y)/sigma:

    * noisy density p_sigma(y_d) = sum_j probs_j·(Phi(beta) - Phi(alpha)) / h (p_t(x) =
      prod_d p_sigma(y_d) / a^D);
    * MMSE denoiser E[x_d | y] = sum_j r_j·(y_d + sigma·(phi(alpha) - phi(beta)) /
      (Phi(beta) - Phi(alpha))), r_j ∝ probs_j·(Phi(beta) - Phi(alpha)) (truncated-normal means);
    * clean density p(x_d) = probs_{j(x_d)} / h.

    Args:
        probs: [D, K] bin probabilities (rows sum to 1; zeros allowed).
        low, high: the data range (default [-1, 1], the project's pixel range).
    """

    def __init__(self, probs: Tensor, low: float = -1.0, high: float = 1.0) -> None:
        probs = probs.to(torch.float64)
        if probs.ndim != 2 or (probs < 0).any():
            raise ValueError("probs must be a non-negative [D, K] tensor")
        if not torch.allclose(probs.sum(1), torch.ones(probs.shape[0], dtype=torch.float64)):
            raise ValueError("each row of probs must sum to 1")
        if not low < high:
            raise ValueError(f"need low < high, got [{low}, {high}]")
        self.probs, self.low, self.high = probs, float(low), float(high)
        self.width = (self.high - self.low) / probs.shape[1]
        self.edges = self.low + self.width * torch.arange(probs.shape[1] + 1, dtype=torch.float64)

    @property
    def dim(self) -> int:
        return self.probs.shape[0]

    @property
    def num_bins(self) -> int:
        return self.probs.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n dequantized samples [n, D] (float64): a bin per dimension, then uniform inside it."""
        bins = torch.multinomial(self.probs, n, replacement=True, generator=generator).T
        u = torch.rand(n, self.dim, generator=generator, dtype=torch.float64)
        return self.low + self.width * (bins + u)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) in nats [N] of x [N, D] (-inf outside the support)."""
        x = x.to(torch.float64)
        bins = torch.floor((x - self.low) / self.width).long()
        inside = (bins >= 0) & (bins < self.num_bins)
        p = self.probs.gather(1, bins.clamp(0, self.num_bins - 1).T).T  # [N, D]
        log_p = torch.where(inside, p.log() - math.log(self.width), -math.inf)
        return log_p.sum(1)

    def _scales(self, x: Tensor, a: ScaleLike, s: ScaleLike) -> tuple[Tensor, Tensor]:
        """Per-sample (a [N], s [N]) float64 on x's device."""
        n = x.shape[0]
        a = torch.as_tensor(a, dtype=torch.float64, device=x.device).reshape(-1).expand(n)
        s = torch.as_tensor(s, dtype=torch.float64, device=x.device).reshape(-1).expand(n)
        if (a <= 0).any() or (s <= 0).any():
            raise ValueError("the lattice's noisy quantities need a > 0 and s > 0")
        return a, s

    def _bin_terms(self, y: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(log mass_j [N, D, K], alpha, beta [N, D, K]) of y [N, D] (sigma space) at sigma [N]:
        mass_j = Phi(beta) - Phi(alpha), the chance that y - sigma·eps lies in bin j."""
        s = sigma.reshape(-1, 1, 1)
        y3 = y.unsqueeze(-1)
        alpha = (self.edges[:-1].to(y3.device) - y3) / s
        beta = (self.edges[1:].to(y3.device) - y3) / s
        return _log_normal_cdf_difference(alpha, beta), alpha, beta

    def noisy_log_prob(self, x: Tensor, a: ScaleLike, s: ScaleLike) -> Tensor:
        """log p_t(x) [N] of x = a·x0 + s·eps, x [N, D], a > 0, s > 0 (scalars or [N])."""
        a, s = self._scales(x, a, s)
        y = x.to(torch.float64) / a[:, None]
        log_mass, _, _ = self._bin_terms(y, s / a)
        log_w = self.probs.log().to(log_mass.device) + log_mass
        per_dim = torch.logsumexp(log_w, dim=-1) - math.log(self.width)
        return per_dim.sum(1) - self.dim * a.log()

    def posterior_mean(self, x: Tensor, a: ScaleLike, s: ScaleLike) -> Tensor:
        """E[x0 | x] [N, D] (x's dtype) for x = a·x0 + s·eps, a > 0, s > 0."""
        a, s = self._scales(x, a, s)
        y, sigma = x.to(torch.float64) / a[:, None], s / a
        log_mass, alpha, beta = self._bin_terms(y, sigma)
        r = torch.softmax(self.probs.log().to(log_mass.device) + log_mass, dim=-1)
        # truncated-normal mean of N(y, sigma²) on bin j: y + sigma·(phi(alpha) - phi(beta))/mass
        log_phi0 = -0.5 * _LOG_2PI
        mills = torch.exp(log_phi0 - 0.5 * alpha**2 - log_mass) - torch.exp(
            log_phi0 - 0.5 * beta**2 - log_mass
        )
        edges = self.edges.to(y.device)
        mean_in_bin = (y.unsqueeze(-1) + sigma.reshape(-1, 1, 1) * mills).clamp(
            edges[:-1], edges[1:]
        )
        return (r * mean_in_bin).sum(-1).to(x.dtype)

    def denoiser(self) -> LatticeDenoiser:
        """The exact MMSE denoiser D(x, sigma) in sigma space."""
        return LatticeDenoiser(self)


class LatticeDenoiser:
    """Denoiser protocol over a :class:`DequantizedLattice`: D(x [B, ...], sigma [B]) = E[x0|x]
    (inputs flattened to [B, D] and reshaped back)."""

    def __init__(self, lattice: DequantizedLattice) -> None:
        self.lattice = lattice

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Tensor | None) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        return self.lattice.posterior_mean(flat, 1.0, sigma).reshape(x.shape)
