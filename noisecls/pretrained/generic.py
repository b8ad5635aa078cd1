"""Any network called as net(x, sigma) or net(x, t), with a declared parameterisation, as a
noisecls Denoiser (k-diffusion- or EDM-style networks whose code the user has installed).

``wrap_network(net, parameterisation, schedule=...)`` picks the adapter; the conversions are the
ones of :mod:`noisecls.denoisers` (``PredictionDenoiser``, ``EDMDenoiser``) wherever they apply:

=================  ==========================================  =================================
parameterisation   network called as                           x0_hat = D(x, sigma)
=================  ==========================================  =================================
x0, no schedule    net(x, sigma)                               out
eps, no schedule   net(x, sigma)                               x - sigma·out
score, no schedule net(x, sigma)                               x + sigma²·out
edm                net(c_in·x, ln(sigma)/4) (EDM's raw F)      c_skip·x + c_out·out
eps / x0 / v       net(alpha·x, schedule.noise_input(t))       PredictionDenoiser's reading
score, schedule    net(alpha·x, schedule.noise_input(t))       x - sigma·(-s·out)
=================  ==========================================  =================================

Here x = x0 + sigma·eps (sigma space), t = schedule.t_from_ve_sigma(sigma), alpha = alpha(t),
s = schedule.sigma(t). ``schedule.noise_input`` is the schedule's time convention: the 0-based
DDPM timestep for a ``DiscreteSchedule``, 999·t for ``LogSNRSchedule``, ln(sigma)/4 for VE / EDM.
A network with its own preconditioning inside (EDM's ``EDMPrecond``, k-diffusion's wrapped
models) is "x0" without a schedule.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from noisecls.denoisers import (
    EDMDenoiser,
    PredictionDenoiser,
    TrainableDenoiser,
)
from noisecls.errors import NoiseclsError
from noisecls.process.schedules import NoiseSchedule, broadcast_like

Parameterisation = Literal["eps", "x0", "v", "edm", "score"]


class ExternalNetwork(nn.Module):
    """Presents ``net(x, noise)`` as a noisecls backbone ``(x_in, noise_in, class_labels)``.

    Args:
        net: called as net(x [B, ...], noise [B]) (float, x's dtype) and returns [B, ...].
        label_keyword: keyword under which class labels [B] are passed (e.g. "class_labels" for
            EDM's networks); None: the network takes no labels and refuses them.
    """

    def __init__(self, net: nn.Module, label_keyword: str | None = None) -> None:
        super().__init__()
        self.net = net
        self.label_keyword = label_keyword

    def forward(self, x_in: Tensor, noise_in: Tensor, class_labels: Tensor | None = None) -> Tensor:
        noise_in = noise_in.to(device=x_in.device, dtype=x_in.dtype)
        if class_labels is None:
            return self.net(x_in, noise_in)
        if self.label_keyword is None:
            raise NoiseclsError(
                "class labels given to a network wrapped without label_keyword; name the keyword "
                "its forward takes them under"
            )
        return self.net(x_in, noise_in, **{self.label_keyword: class_labels})


class SigmaInputDenoiser(TrainableDenoiser):
    """A network called in sigma space, net(x, sigma), whose output is x0, eps or the score
    grad_x log p_sigma(x) (x [B, ...], sigma [B] in x's dtype)."""

    def __init__(self, net: nn.Module, prediction: Literal["x0", "eps", "score"]) -> None:
        super().__init__()
        if prediction not in ("x0", "eps", "score"):
            raise ValueError(f"a sigma-input network predicts x0, eps or score, not {prediction!r}")
        self.net = net
        self.prediction = prediction

    def network_input(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return x, sigma.to(device=x.device, dtype=x.dtype)

    def target(self, x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
        if self.prediction == "x0":
            return x0
        if self.prediction == "eps":
            return eps
        return -eps / broadcast_like(sigma, eps)

    def denoise_from_output(self, output: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        if self.prediction == "x0":
            return output
        s = broadcast_like(sigma, x)
        if self.prediction == "eps":
            return x - s * output
        return x + s**2 * output


class ScorePredictionDenoiser(PredictionDenoiser):
    """A network at the schedule's scaling whose output is the score of x_t = alpha·x0 + s·eps,
    grad log p_t(x_t) = -eps / s: read as eps = -s·output, then as ``PredictionDenoiser``'s eps."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule) -> None:
        super().__init__(net, schedule, "eps")

    def _noise_std(self, sigma: Tensor, like: Tensor) -> Tensor:
        _, _, s = self._scales(sigma)
        return broadcast_like(s.to(like.device), like)

    def target(self, x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
        return -eps / self._noise_std(sigma, eps)

    def denoise_from_output(self, output: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        return super().denoise_from_output(-self._noise_std(sigma, x) * output, x, sigma)


def wrap_network(
    net: nn.Module,
    parameterisation: Parameterisation,
    *,
    schedule: NoiseSchedule | None = None,
    sigma_data: float = 0.5,
    label_keyword: str | None = None,
) -> TrainableDenoiser:
    """The Denoiser of ``net`` under ``parameterisation`` (see the module table).

    Args:
        net: the external network, called as net(x, noise) (+ labels under ``label_keyword``).
        parameterisation: eps | x0 | v | edm | score.
        schedule: None: net(x, sigma) in sigma space (x0 / eps / score); a NoiseSchedule: net
            sees the schedule's scaling and time input (eps / x0 / v / score; v needs a VP
            schedule). Not used with "edm".
        sigma_data: EDM's data std ("edm" only).
    """
    backbone = ExternalNetwork(net, label_keyword)
    if parameterisation == "edm":
        if schedule is not None:
            raise NoiseclsError("EDM preconditioning has its own noise input: give no schedule")
        return EDMDenoiser(backbone, sigma_data=sigma_data)
    if schedule is None:
        if parameterisation == "v":
            raise NoiseclsError("v-prediction is defined on a VP schedule: pass schedule")
        return SigmaInputDenoiser(backbone, parameterisation)
    if parameterisation == "score":
        return ScorePredictionDenoiser(backbone, schedule)
    return PredictionDenoiser(backbone, schedule, parameterisation)
