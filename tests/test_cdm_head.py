"""CDM's logits head at initialisation, against analytic answers.

With ``zero_init`` every logit starts at 0: the noise-level posterior is uniform and eq. (8)
gives eps_hat = sqrt(1 - abar_t)·x_t, i.e. in sigma space D(x, sigma) = x / (1 + sigma²), the
exact MMSE denoiser of standard-normal data. The default (PyTorch) init instead starts the
T + 1 cumulative-sum increments as independent random linear maps, so the logit gaps
f_{T+1} - f_t grow like a random walk over the levels, far from the exact posterior's.
"""

from __future__ import annotations

import torch

from noisecls.denoisers import CDMDenoiser
from noisecls.nets import LogitsHead, ResidualMLP
from noisecls.oracles import GaussianMixture
from noisecls.process.schedules import DiscreteSchedule

T = 1000


def classifier(zero_init: bool) -> CDMDenoiser:
    torch.manual_seed(0)
    head = LogitsHead(T + 2, hidden_channels=32, cumsum=True, zero_init=zero_init)
    net = ResidualMLP(dim=2, hidden=32, num_blocks=2, time_conditioning=False, head=head)
    return CDMDenoiser(net, DiscreteSchedule(num_levels=T))


def test_zero_init_head_starts_at_the_standard_normal_mmse_denoiser():
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1)) * 3
    sigma = torch.logspace(-2, 2, 64)
    standard = GaussianMixture.gaussian(torch.zeros(2), torch.eye(2)).denoiser()
    expected = standard(x.double(), sigma.double()).float()
    torch.testing.assert_close(classifier(True)(x, sigma), expected, rtol=1e-4, atol=1e-5)


def test_default_init_logit_gaps_grow_over_the_levels():
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        f = classifier(False).logits(x)
        zero = classifier(True).logits(x)
    assert torch.count_nonzero(zero) == 0
    gap = (f[:, -1:] - f).std(dim=0)  # spread over x of f_{T+1} - f_t, per level t
    # a random walk of T + 1 - t increments: the spread at t = 0 is several times that at T - 9
    assert gap[0] > 3 * gap[T - 9] > 0


def test_ce_only_cdm_reports_its_gradient_denoiser_mse_in_evaluation():
    """Table 1's CE-only row needs the MSE of a model not trained on it. At zero init
    eps_hat = sqrt(1 - abar_t)·x_t, so for N(0, I) data E(eps_hat - eps)² = abar_t per element,
    and the batch MSE (levels 0 and T + 1 counted as 0) averages sum_{t=1..T} abar_t / (T + 2)
    (~0.28; Monte Carlo sd over 4000 samples ~0.005)."""
    from noisecls.methods import CDM

    schedule = DiscreteSchedule(num_levels=T)
    model = CDM(classifier(True).net, schedule, ce_weight=1.0, mse_weight=0.0, data_shape=(2,))
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.enable_grad():
        _, extras = model.training_loss(x0, None, torch.Generator().manual_seed(4))
    expected = schedule.alpha_bar[1:].sum().item() / (T + 2)
    assert abs(extras["mse"].item() - expected) < 0.02, (extras["mse"].item(), expected)
    model.train()
    _, extras = model.training_loss(x0[:8], None, torch.Generator().manual_seed(4))
    assert "mse" not in extras  # CE-only training builds no input gradient
