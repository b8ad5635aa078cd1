"""The Denoiser protocol and the adapters that turn networks into denoisers.

A Denoiser is any callable ``D(x, sigma, **cond) -> x0_hat`` in *sigma space*: x = x0 + sigma·eps
(VE scaling), x [B, ...], sigma [B] (float), and the return value estimates E[x0 | x]. The score
is (D(x, sigma) - x) / sigma^2. Every sampler and likelihood estimator consumes only this, so a
CDM classifier, a CDL-trained net, a DG-corrected pair or an external network all plug into every
sampler.

Adapters here wrap a backbone ``net(x_in, noise_input, class_labels)`` trained under some
``NoiseSchedule``: they convert sigma to the schedule's time, rescale x to the schedule's scaling
and read the network's output as eps, x0 or v (``PredictionDenoiser``) or apply EDM's
preconditioning (``EDMDenoiser``). Method-specific denoisers (CDM's gradient denoiser, the DG
correction) live here too, next to classifier-free guidance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from noisecls.errors import NoiseclsError
from noisecls.process.schedules import (
    DiscreteSchedule,
    LogSNRSchedule,
    NoiseSchedule,
    broadcast_like,
)


@runtime_checkable
class Denoiser(Protocol):
    """D(x [B, ...], sigma [B], **cond) -> x0_hat [B, ...] in sigma space."""

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor: ...


def needs_input_grad(denoiser: Denoiser) -> bool:
    """Whether a denoiser differentiates through its input (CDM's gradient denoiser, the DG
    correction): its optional ``needs_input_grad`` attribute (wrappers forward their inner
    denoiser's), False when absent. Samplers run the others under ``torch.no_grad``, so a network
    denoiser keeps no graph across steps; these decide themselves (they enable gradients inside
    and return detached outputs unless the caller differentiates through x)."""
    return bool(getattr(denoiser, "needs_input_grad", False))


def score_from_denoiser(denoised: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (Tweedie), [B, ...]."""
    return (denoised - x) / broadcast_like(sigma, x) ** 2


def gradient_ready(x: Tensor, who: str) -> tuple[Tensor, bool]:
    """For denoisers that take input gradients: x usable in autograd (an inference tensor is
    cloned), and whether the caller differentiates through x (keep the graph). Raises a one-line
    error under inference mode, which forbids input gradients."""
    if torch.is_inference_mode_enabled():
        raise NoiseclsError(
            f"{who} needs input gradients, which inference mode forbids: set "
            "trainer.inference_mode: false (the noisecls CLI default)"
        )
    differentiate = torch.is_grad_enabled() and x.requires_grad
    return (x.clone() if x.is_inference() else x), differentiate


class TrainableDenoiser(nn.Module):
    """A denoiser whose training target is expressed in the network's own output space.

    ``network_output`` and ``target`` let a loss compare raw network outputs with their targets
    (eps, x0, v or EDM's F target) without dividing by small sigmas; ``forward`` is the Denoiser.
    """

    net: nn.Module

    def network_input(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(x_in [B, ...], noise_in [B]): what the backbone sees for sigma-space x and sigma [B]
        (its own scaling and noise-level input; a frozen feature extractor reuses this)."""
        raise NotImplementedError

    def network_output(self, x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor:
        """Raw network output at sigma-space input x [B, ...], sigma [B]."""
        x_in, noise_in = self.network_input(x, sigma)
        return self.net(x_in, noise_in, cond.get("class_labels"))

    def target(self, x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
        """What ``network_output`` should equal for x = x0 + sigma·eps, [B, ...]."""
        raise NotImplementedError

    def denoise_from_output(self, output: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """x0_hat from a raw network output, [B, ...]."""
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor:
        return self.denoise_from_output(self.network_output(x, sigma, **cond), x, sigma)


class PredictionDenoiser(TrainableDenoiser):
    """Wrap a net that predicts eps, x0 or v at the schedule's scaling and time input.

    With a = alpha(t(sigma)), s = sigma_sched(t(sigma)) (so sigma = s / a), the network sees
    x_sched = a·x and ``schedule.noise_input(t)``. Its output is read as
      eps: x0_hat = x - sigma·eps_hat;  x0: x0_hat = output;
      v (VP only, v = a·eps - s·x0, Salimans & Ho 2022): x0_hat = a·x_sched - s·v_hat.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        prediction: Literal["eps", "x0", "v"] = "eps",
    ) -> None:
        super().__init__()
        if prediction not in ("eps", "x0", "v"):
            raise ValueError(f"prediction must be eps, x0 or v, got {prediction!r}")
        if prediction == "v" and not schedule.variance_preserving:
            raise ValueError("v-prediction needs a variance-preserving schedule (alpha^2+s^2=1)")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction

    def _scales(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = self.schedule.t_from_ve_sigma(sigma)
        return t, self.schedule.alpha(t), self.schedule.sigma(t)

    def network_input(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        t, a, _ = self._scales(sigma)
        x_in = broadcast_like(a, x) * x
        return x_in, self.schedule.noise_input(t).to(device=x.device, dtype=x.dtype)

    def target(self, x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        _, a, s = self._scales(sigma)
        return broadcast_like(a, x0) * eps - broadcast_like(s, x0) * x0

    def denoise_from_output(self, output: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        if self.prediction == "eps":
            return x - broadcast_like(sigma, x) * output
        if self.prediction == "x0":
            return output
        _, a, s = self._scales(sigma)
        a, s = broadcast_like(a, x), broadcast_like(s, x)
        return a * (a * x) - s * output


class EDMDenoiser(TrainableDenoiser):
    """EDM preconditioning (Karras et al. 2022, Table 1):
    D(x, sigma) = c_skip·x + c_out·F(c_in·x, c_noise), with c_skip = sd^2/(sigma^2+sd^2),
    c_out = sigma·sd/sqrt(sigma^2+sd^2), c_in = 1/sqrt(sigma^2+sd^2), c_noise = ln(sigma)/4.
    The EDM loss weight lambda = 1/c_out^2 makes ||F - target||^2 the weighted loss.
    The coefficients are computed in float64 outside the network.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def _coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = sigma.to(torch.float64)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in = 1 / (s**2 + sd2).sqrt()
        return c_skip, c_out, c_in, s.log() / 4

    def network_input(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        _, _, c_in, c_noise = self._coefficients(sigma)
        return broadcast_like(c_in, x) * x, c_noise.to(x)

    def target(self, x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
        c_skip, c_out, _, _ = self._coefficients(sigma)
        x = x0 + broadcast_like(sigma, x0) * eps
        return (x0 - broadcast_like(c_skip, x0) * x) / broadcast_like(c_out, x0)

    def denoise_from_output(self, output: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        c_skip, c_out, _, _ = self._coefficients(sigma)
        return broadcast_like(c_skip, x) * x + broadcast_like(c_out, x) * output


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance: D = (1 + w)·D(x | c) - w·D(x | null) (Ho & Salimans 2022).

    ``null_label`` is the label index the network reserves for "no class" (its num_classes).
    Both branches run in one batched call. w = 0 returns the conditional denoiser.
    """

    def __init__(self, denoiser: Denoiser, guidance_weight: float, null_label: int) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.guidance_weight = guidance_weight
        self.null_label = null_label

    def forward(self, x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor:
        labels = cond.get("class_labels")
        if labels is None:
            raise ValueError("classifier-free guidance needs class_labels")
        if self.guidance_weight == 0:
            return self.denoiser(x, sigma, **cond)
        null = torch.full_like(labels, self.null_label)
        both = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=torch.cat([labels, null])
        )
        cond_out, uncond_out = both.chunk(2)
        w = self.guidance_weight
        return (1 + w) * cond_out - w * uncond_out

    @property
    def needs_input_grad(self) -> bool:
        return needs_input_grad(self.denoiser)


class CountingDenoiser(nn.Module):
    """Wraps a Denoiser and counts its calls (``nfe``) and the rows it evaluated (``rows``:
    a call on x [B, ...] adds B). For a batch of n samples, ``rows / n`` is the number of
    denoiser evaluations per sample, also when an estimator evaluates several noise levels of
    each sample in one chunked call (ITD: 256 points in 8 calls of 32 points -> 256)."""

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.nfe = 0
        self.rows = 0

    def forward(self, x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor:
        self.nfe += 1
        self.rows += x.shape[0]
        return self.denoiser(x, sigma, **cond)

    @property
    def needs_input_grad(self) -> bool:
        return needs_input_grad(self.denoiser)


class ClampedDenoiser(nn.Module):
    """D clamped to [-bound, bound] (x0 clipping: DDPM's / ADM's ``clip_denoised`` for images in
    [-1, 1]): the estimate of x0 is projected onto the data range before the sampler uses it."""

    def __init__(self, denoiser: Denoiser, bound: float) -> None:
        super().__init__()
        if not bound > 0:
            raise ValueError(f"the x0 clipping bound must be positive, got {bound}")
        self.denoiser = denoiser
        self.bound = bound

    def forward(self, x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor:
        return self.denoiser(x, sigma, **cond).clamp(-self.bound, self.bound)

    @property
    def needs_input_grad(self) -> bool:
        return needs_input_grad(self.denoiser)


class CDMDenoiser(nn.Module):
    """CDM's gradient denoiser (Yadin et al. 2024, Theorem 3.1) over a noise-level classifier.

    The classifier ``net(x_t, None, class_labels) -> f [B, T + 2]`` scores the levels
    {0 (clean, alpha_bar = 1), 1..T (the schedule's), T + 1 (pure noise, alpha_bar = 0)}, with
    f_t(x) ~ log p(t | x) up to a per-x constant, for x_t = sqrt(abar_t)·x0 + sqrt(1 - abar_t)·eps
    (VP scaling, no time input). Eq. (8):

        eps_hat(x_t, t) = sqrt(1 - abar_t)·(grad_x [f_{T+1}(x) - f_t(x)] at x_t + x_t),

    exact for the cross-entropy-optimal classifier under any level prior with full support. The
    gradient of a whole batch comes from one autograd call on sum_b F_b (sample b's F depends
    on x_b only). As a Denoiser, sigma [B] maps to the level t(sigma) of the schedule; a level
    between two integers (Heun / DPM-Solver midpoints) interpolates f_t linearly between them,
    which is exact at integer levels. Gradients are enabled inside; the output is detached unless
    the caller differentiates through x (x.requires_grad, e.g. an ODE likelihood's divergence).

    Args:
        net: the classifier backbone (a ``LogitsHead(num_logits=T + 2, cumsum=True)``).
        schedule: the DiscreteSchedule of levels 1..T.
        null_label: the label the net reserves for "no class" (its num_classes), used when a
            class-conditional net is called without labels; None for unconditional nets.
    """

    #: its output is an input gradient of the classifier (see :func:`needs_input_grad`)
    needs_input_grad = True

    def __init__(
        self, net: nn.Module, schedule: DiscreteSchedule, null_label: int | None = None
    ) -> None:
        super().__init__()
        if not isinstance(schedule, DiscreteSchedule):
            raise ValueError("the CDM denoiser needs a DiscreteSchedule (levels 0..T+1)")
        self.net = net
        self.schedule = schedule
        self.null_label = null_label

    @property
    def num_levels(self) -> int:
        """T: levels 0..T+1 give T + 2 logits."""
        return self.schedule.num_levels

    def level_alpha_bar(self, device: torch.device | None = None) -> Tensor:
        """alpha_bar of levels 0..T+1, float64 [T + 2]: 1, the schedule's, then 0."""
        abar = self.schedule.alpha_bar
        return torch.cat([abar, abar.new_zeros(1)]).to(device)

    def logits(self, x_t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """f(x_t) [B, T + 2] for x_t [B, ...] in VP scaling (class_labels [B] or None)."""
        if class_labels is None and self.null_label is not None:
            class_labels = torch.full(
                (x_t.shape[0],), self.null_label, device=x_t.device, dtype=torch.long
            )
        f = self.net(x_t, None, class_labels)
        expected = (x_t.shape[0], self.num_levels + 2)
        if tuple(f.shape) != expected:
            raise ValueError(
                f"the CDM classifier returned logits of shape {list(f.shape)}, expected "
                f"{list(expected)}: set the head's num_logits to T + 2 = {expected[1]}"
            )
        return f

    def predict_eps(
        self,
        x_t: Tensor,
        level: Tensor,
        class_labels: Tensor | None = None,
        *,
        create_graph: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """(eps_hat [B, ...], logits [B, T + 2]) at x_t [B, ...] (VP scaling) and levels [B].

        ``level`` is float in [0, T + 1] (fractional levels interpolate the logits). eps_hat is
        0 at level 0 and x_t at level T + 1 by construction (Algorithm 1's remark). With
        ``create_graph`` the result stays differentiable in the parameters (training: the MSE
        loss backpropagates through the input gradient).
        """
        level = level.to(device=x_t.device, dtype=torch.float64)
        lo = level.floor().long().clamp(0, self.num_levels + 1)
        hi = level.ceil().long().clamp(0, self.num_levels + 1)
        with torch.enable_grad():
            x_in = x_t if x_t.requires_grad else x_t.detach().requires_grad_(True)
            f = self.logits(x_in, class_labels)
            frac = (level - lo).to(f.dtype)[:, None]
            f_t = torch.lerp(f.gather(1, lo[:, None]), f.gather(1, hi[:, None]), frac)[:, 0]
            big_f = f[:, -1] - f_t  # F(x, t) = f_{T+1}(x) - f_t(x)
            (grad,) = torch.autograd.grad(big_f.sum(), x_in, create_graph=create_graph)
        abar = self._alpha_bar_at(level)
        eps = broadcast_like((1 - abar).sqrt(), x_t) * (grad + x_in)
        return eps, f

    def add_noise(self, x0: Tensor, level: Tensor, eps: Tensor) -> Tensor:
        """x_t = sqrt(abar_t)·x0 + sqrt(1 - abar_t)·eps (eq. 3) at integer levels [B] in 0..T+1."""
        abar = self.level_alpha_bar(x0.device)[level.long()]
        return broadcast_like(abar.sqrt(), x0) * x0 + broadcast_like((1 - abar).sqrt(), x0) * eps

    def _alpha_bar_at(self, level: Tensor) -> Tensor:
        """alpha_bar at float levels [B] in [0, T + 1] (0 at T + 1; schedule lookup below)."""
        inside = level.clamp(1, self.num_levels)
        abar = self.schedule.alpha(inside) ** 2
        abar = torch.where(level <= 0, torch.ones_like(abar), abar)
        return torch.where(level > self.num_levels, torch.zeros_like(abar), abar)

    def level_from_sigma(self, sigma: Tensor) -> Tensor:
        """Level t(sigma) in [1, T], float64 [B]; within 1e-6 of an integer it snaps to it."""
        level = self.schedule.t_from_ve_sigma(sigma)
        nearest = level.round()
        return torch.where((level - nearest).abs() < 1e-6, nearest, level)

    def forward(self, x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor:
        """x0_hat [B, ...] for x = x0 + sigma·eps in sigma space, sigma [B]."""
        x, differentiate = gradient_ready(x, "the CDM denoiser")
        level = self.level_from_sigma(sigma.to(x.device))
        a = broadcast_like(self.schedule.alpha(level).to(x.device), x)
        eps, _ = self.predict_eps(
            a * x, level, cond.get("class_labels"), create_graph=differentiate
        )
        denoised = x - broadcast_like(sigma.to(x.device), x) * eps
        return denoised if differentiate else denoised.detach()


class DiscriminatorGuidedDenoiser(nn.Module):
    """Discriminator Guidance (Kim et al. 2023, eq. 8) as a Denoiser wrapper.

    The guided score is s_theta + w·grad_x log(d/(1 - d)) with d the real-vs-fake discriminator;
    in sigma space, where score = (D - x)/sigma^2, that is

        D_dg(x, sigma) = D(x, sigma) + w·sigma^2·grad_x log(d/(1 - d))(x_vp, tau),

    where the discriminator lives on the linear VP SDE: tau(sigma) solves 1 + sigma^2 =
    exp(B(tau)) and x_vp = x / sqrt(1 + sigma^2) (``schedule.t_from_ve_sigma`` and
    ``schedule.alpha``). The gradient is taken with respect to the sigma-space x, so the chain
    rule factor 1/sqrt(1 + sigma^2) is included. With the Bayes-optimal discriminator
    d* = p_t / (p_t + q_t), log(d*/(1 - d*)) = log p_t - log q_t and D_dg is exactly the data
    denoiser (Theorem 1). The correction costs one forward + backward pass of the discriminator
    and no extra evaluations of ``denoiser``.

    Args:
        denoiser: the score model's Denoiser.
        discriminator: ``discriminator(x_vp [B, ...], tau float64 [B], class_labels) -> logit
            [B]`` (log(d/(1 - d)) before clipping).
        schedule: the discriminator's VP schedule (``LogSNRSchedule(kind="linear")``).
        weight: w (the paper's first-order Heun weight is 2.0).
        time_min, time_max: the correction applies where tau(sigma) lies in [time_min, time_max]
            (per sample; defaults 0.01 and 1.0 as in the paper).
        prob_clip: d is clipped to [prob_clip, 1 - prob_clip] (1e-5 as in training), i.e. the
            logit to +-log((1 - c)/c) (zero gradient where saturated); 0 disables clipping.
        boost_factor, boost_period: adaptive boosting (the paper's appendix; official sampler):
            on every ``boost_period``-th call (counted from ``reset()``) the correction of
            samples that the discriminator judges fake (logit < 0) is multiplied by
            ``boost_factor``. ``boost_factor = 1`` disables it. Counting calls assumes one call per
            sampler step (the first-order stage).

    The output is detached unless the caller differentiates through x (x.requires_grad with
    gradients enabled, e.g. an ODE likelihood's divergence), then the graph is kept.
    """

    #: the correction is an input gradient of the discriminator (see :func:`needs_input_grad`)
    needs_input_grad = True

    def __init__(
        self,
        denoiser: Denoiser,
        discriminator: Callable[[Tensor, Tensor, Tensor | None], Tensor],
        schedule: LogSNRSchedule,
        weight: float = 2.0,
        time_min: float = 0.01,
        time_max: float = 1.0,
        prob_clip: float = 1e-5,
        boost_factor: float = 1.0,
        boost_period: int = 2,
    ) -> None:
        super().__init__()
        if not isinstance(schedule, LogSNRSchedule) or schedule.kind != "linear":
            raise NoiseclsError(
                "the DG discriminator lives on the linear VP SDE: pass "
                "LogSNRSchedule(kind='linear') as its schedule"
            )
        if not 0.0 <= prob_clip < 0.5:
            raise NoiseclsError(f"prob_clip must lie in [0, 0.5), got {prob_clip}")
        if boost_period < 1 or boost_factor < 0:
            raise NoiseclsError("boost_period must be >= 1 and boost_factor >= 0")
        self.denoiser = denoiser
        self.discriminator = discriminator
        self.schedule = schedule
        self.weight = weight
        self.time_min, self.time_max = time_min, time_max
        self.prob_clip = prob_clip
        self.boost_factor, self.boost_period = boost_factor, boost_period
        self.calls = 0
        self.last_log_ratio: Tensor | None = None

    def reset(self) -> None:
        """Restart the call counter of adaptive boosting (call before each sampling run)."""
        self.calls = 0

    def log_ratio(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Clipped log(d/(1 - d)) [B] at sigma-space x [B, ...] and sigma [B] (differentiable)."""
        tau = self.schedule.t_from_ve_sigma(sigma.to(x.device))
        x_vp = broadcast_like(self.schedule.alpha(tau).to(x.device), x) * x
        logit = self.discriminator(x_vp, tau, class_labels).reshape(x.shape[0])
        if self.prob_clip > 0:
            bound = math.log((1 - self.prob_clip) / self.prob_clip)
            logit = logit.clamp(-bound, bound)
        return logit

    def correction(
        self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, *, create_graph: bool
    ) -> Tensor:
        """w·sigma^2·grad_x log(d/(1 - d)) [B, ...], zero outside [time_min, time_max]."""
        sigma = sigma.to(x.device)
        tau = self.schedule.t_from_ve_sigma(sigma)
        active = (tau >= self.time_min) & (tau <= self.time_max)
        self.calls += 1
        if self.weight == 0 or not bool(active.any()):
            self.last_log_ratio = None
            return torch.zeros_like(x)
        with torch.enable_grad():
            x_in = x if x.requires_grad else x.detach().requires_grad_(True)
            log_ratio = self.log_ratio(x_in, sigma, class_labels)
            (grad,) = torch.autograd.grad(log_ratio.sum(), x_in, create_graph=create_graph)
        self.last_log_ratio = log_ratio.detach()
        scale = self.weight * sigma.to(torch.float64) ** 2 * active.to(torch.float64)
        if self.boost_factor != 1 and (self.calls - 1) % self.boost_period == 0:
            boost = torch.where(log_ratio.detach() < 0, self.boost_factor, 1.0)
            scale = scale * boost.to(scale)
        return broadcast_like(scale, x) * grad

    def forward(self, x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor:
        x, differentiate = gradient_ready(x, "Discriminator Guidance")
        denoised = self.denoiser(x, sigma, **cond)
        extra = self.correction(x, sigma, cond.get("class_labels"), create_graph=differentiate)
        out = denoised + extra.to(denoised.dtype)
        return out if differentiate else out.detach()
