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

from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from noisecls.process.schedules import NoiseSchedule, broadcast_like


@runtime_checkable
class Denoiser(Protocol):
    """D(x [B, ...], sigma [B], **cond) -> x0_hat [B, ...] in sigma space."""

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor: ...


def score_from_denoiser(denoised: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (Tweedie), [B, ...]."""
    return (denoised - x) / broadcast_like(sigma, x) ** 2


class TrainableDenoiser(nn.Module):
    """A denoiser whose training target is expressed in the network's own output space.

    ``network_output`` and ``target`` let a loss compare raw network outputs with their targets
    (eps, x0, v or EDM's F target) without dividing by small sigmas; ``forward`` is the Denoiser.
    """

    def network_output(self, x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor:
        """Raw network output at sigma-space input x [B, ...], sigma [B]."""
        raise NotImplementedError

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

    def network_output(self, x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor:
        t, a, _ = self._scales(sigma)
        x_in = broadcast_like(a, x) * x
        noise_in = self.schedule.noise_input(t).to(device=x.device, dtype=x.dtype)
        return self.net(x_in, noise_in, cond.get("class_labels"))

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

    def network_output(self, x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor:
        _, _, c_in, c_noise = self._coefficients(sigma)
        return self.net(broadcast_like(c_in, x) * x, c_noise.to(x), cond.get("class_labels"))

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


class CountingDenoiser(nn.Module):
    """Wraps a Denoiser and counts its calls (network function evaluations, NFE)."""

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.nfe = 0

    def forward(self, x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma, **cond)
