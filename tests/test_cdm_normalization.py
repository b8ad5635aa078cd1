"""CDM's level normalisation by annealed importance sampling, against exact answers.

With the exact noise-level classifier of a Gaussian mixture (its logits are the exact level
log-densities log p_t(x), ``GaussianMixture.noise_level_log_densities``) plus arbitrary
per-level offsets o_t, the model's level densities are q_t = p_t·exp(o_t - o_{T+1}), so the
normalisers are known exactly: log Z_t = o_t - o_{T+1}. The AIS estimate must recover them, and
the one-pass likelihood after ``normalize_levels``-style subtraction must be the exact log p_0.
For a (random, untrained) network classifier on 2-D data, Z_0 is checked by quadrature on a grid,
and the gradient denoiser must be exactly unchanged by the normalisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from noisecls.denoisers import CDMDenoiser
from noisecls.likelihood import cdm_log_density
from noisecls.likelihood.cdm_normalization import cdm_log_normalizers
from noisecls.methods import CDM
from noisecls.nets import LogitsHead, ResidualMLP
from noisecls.oracles import GaussianMixture, standard_normal_log_prob
from noisecls.process.schedules import DiscreteSchedule

T = 100
#: AIS error allowed on log Z_t (nats). Measured spread of the level-0 error of the exact
#: classifier below over 4 chain seeds: sd ~0.04 with 256 chains, ~0.01 with 1024 (T = 100 levels
#: are 10x coarser than the configs' 1000); the toy target is 0.14 nats/point (0.1 bits/dim in
#: 2-D), so the estimator must be well inside it.
TOL = 0.05


STD = 0.3


class ExactClassifier(nn.Module):
    """Logits log p_t(x) + o_t over levels 0..T+1 of an isotropic Gaussian mixture (std STD)
    in VP scaling: p_t = sum_k w_k N(a_t·mu_k, (a_t²·STD² + s_t²) I), all levels at once."""

    def __init__(self, mixture: GaussianMixture, schedule: DiscreteSchedule, offsets: Tensor):
        super().__init__()
        abar = torch.cat([schedule.alpha_bar, torch.zeros(1, dtype=torch.float64)])
        self.mixture, self.a, self.s = mixture, abar.sqrt(), (1 - abar).sqrt()
        self.offsets = nn.Parameter(offsets.double())

    def forward(self, x: Tensor, t: Tensor | None, labels: Tensor | None) -> Tensor:
        var = (self.a**2 * STD**2 + self.s**2)[None, :, None]  # [1, L, 1]
        diff = x[:, None, None, :] - self.a[None, :, None, None] * self.mixture.means  # [B,L,K,D]
        log_n = -0.5 * (diff.pow(2).sum(-1) / var + x.shape[1] * torch.log(2 * math.pi * var))
        return torch.logsumexp(self.mixture.weights.log() + log_n, dim=2) + self.offsets


def mixture() -> GaussianMixture:
    means = torch.tensor([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]], dtype=torch.float64)
    return GaussianMixture.isotropic([0.5, 0.3, 0.2], means, STD)


def test_ais_recovers_the_offsets_of_the_exact_classifier_and_the_exact_nll():
    schedule = DiscreteSchedule("cosine", num_levels=T)
    mix = mixture()
    g0 = torch.Generator().manual_seed(0)
    offsets = 3 * torch.randn(T + 2, generator=g0, dtype=torch.float64)
    denoiser = CDMDenoiser(ExactClassifier(mix, schedule, offsets), schedule)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    exact_logits = mix.noise_level_log_densities(x, denoiser.net.a, denoiser.net.s) + offsets
    torch.testing.assert_close(denoiser.logits(x), exact_logits)  # the oracle's, vectorised
    g = torch.Generator().manual_seed(1)
    log_z, ess = cdm_log_normalizers(denoiser, [2], num_chains=1024, generator=g)
    expected = offsets - offsets[-1]
    assert ess[-1] == 1 and 0.3 < ess[0] <= 1  # exact classifier: AIS weights stay balanced
    assert log_z[-1] == 0
    assert (log_z - expected).abs().max() < TOL
    # The one-pass likelihood with the normalisers removed is the exact data density.
    x0, _ = mix.sample(500, torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = denoiser.logits(x0)
    raw = cdm_log_density(logits, x0)
    fixed = cdm_log_density(logits - log_z, x0)
    exact = mix.log_prob(x0)
    assert (raw - exact).mean().abs() > 1  # the offsets moved it (o_0 - o_{T+1})
    assert (fixed - exact).abs().max() < TOL


def small_cdm() -> CDM:
    torch.manual_seed(0)
    head = LogitsHead(T + 2, hidden_channels=16, cumsum=True)
    net = ResidualMLP(dim=2, hidden=16, num_blocks=1, time_conditioning=False, head=head)
    with torch.no_grad():  # a smooth random classifier (default init: a random walk of ~T steps)
        head.linear.weight.mul_(0.05)
        head.linear.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    return CDM(net=net, schedule=DiscreteSchedule("cosine", num_levels=T), data_shape=(2,))


def log_z0_on_grid(model: CDM, h: float = 0.05, half_width: float = 7.0) -> float:
    """log ∫ q_0 by the midpoint rule on [-half_width, half_width]^2."""
    ax = torch.arange(-half_width + h / 2, half_width, h)
    grid = torch.cartesian_prod(ax, ax)
    with torch.no_grad():
        f = model.model.logits(grid).double()
    log_q = f[:, 0] - f[:, -1] + standard_normal_log_prob(grid.double())
    return (torch.logsumexp(log_q, 0) + 2 * math.log(h)).item()


def test_normalize_levels_normalises_q0_and_leaves_the_denoiser_unchanged():
    model = small_cdm().eval()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(4)) * 2
    sigma = torch.logspace(-2, 1.5, 64)
    before_denoised = model.denoiser()(x, sigma)
    with torch.no_grad():
        before_logits = model.model.logits(x).double()
    log_z0_before = log_z0_on_grid(model)
    assert abs(log_z0_before) > 0.5  # the random offsets leave q_0 unnormalised

    log_z, _ = model.normalize_levels(num_chains=256, generator=torch.Generator().manual_seed(5))

    assert abs(log_z[0].item() - log_z0_before) < TOL  # AIS vs quadrature, unnormalised model
    assert abs(log_z0_on_grid(model)) < TOL  # after: q_0 integrates to 1
    with torch.no_grad():
        after_logits = model.model.logits(x).double()
    torch.testing.assert_close(after_logits, before_logits - log_z, rtol=0, atol=1e-4)
    # Per-level constants do not reach the input gradient: the denoiser is bitwise the same.
    assert torch.equal(model.denoiser()(x, sigma), before_denoised)
