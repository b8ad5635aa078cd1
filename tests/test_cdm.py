"""CDM against analytic ground truth: the optimal noise-level classifier of a Gaussian mixture.

For p0 = sum_k w_k N(mu_k, Sigma_k), logits f_t(x) = log p_t(x) (any per-x constant added) are
the cross-entropy-optimal classifier over the levels 0..T+1. Theorem 3.1 then makes the CDM
gradient denoiser the exact MMSE denoiser E[x0 | x_t], and Theorem 3.2 makes the one-pass
likelihood the exact log p_t(x): both are checked here in float64 at every level.
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch import Tensor, nn

from noisecls.denoisers import CDMDenoiser
from noisecls.errors import NoiseclsError
from noisecls.likelihood import cdm_log_likelihood, dequantize
from noisecls.methods import CDM
from noisecls.nets import LogitsHead, ResidualMLP, UNet
from noisecls.optim import WarmupStepDecayLR
from noisecls.oracles import GaussianMixture, mmd_rbf, standard_normal_log_prob
from noisecls.process.schedules import DiscreteSchedule
from noisecls.samplers import SamplerConfig, sample_ddpm

T = 1000


def mixture() -> GaussianMixture:
    """Three anisotropic, correlated components in 2-D (float64)."""
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    means = torch.tensor([[1.0, -0.5], [-1.0, 0.8], [0.3, 1.2]], dtype=torch.float64)
    covs = torch.tensor(
        [
            [[0.30, 0.10], [0.10, 0.20]],
            [[0.20, -0.05], [-0.05, 0.40]],
            [[0.05, 0.02], [0.02, 0.10]],
        ],
        dtype=torch.float64,
    )
    return GaussianMixture(weights, means, covs)


def level_alpha_bar(schedule: DiscreteSchedule) -> Tensor:
    """alpha_bar of CDM's levels 0..T+1 (1, the schedule's, 0), float64 [T + 2]."""
    return torch.cat([schedule.alpha_bar, torch.zeros(1, dtype=torch.float64)])


class OptimalClassifier(nn.Module):
    """net(x_t, None, labels) -> [B, T + 2]: the Bayes-optimal CDM classifier of a mixture.

    ``normalized=False``: logits log p_t(x) (the optimum up to the per-x constant -log p(x));
    ``normalized=True``: log p(t | x) under ``log_prior`` (rows logsumexp to 0). With
    ``num_classes`` (= K) labels condition on a component, label K being the null label.
    """

    def __init__(
        self,
        mix: GaussianMixture,
        schedule: DiscreteSchedule,
        normalized: bool = False,
        log_prior: Tensor | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        abar = level_alpha_bar(schedule)
        self.mix, self.a, self.s = mix, abar.sqrt(), (1 - abar).sqrt()
        self.normalized, self.log_prior = normalized, log_prior
        self.num_classes = num_classes

    def forward(self, x: Tensor, noise_level: None, class_labels: Tensor | None) -> Tensor:
        assert noise_level is None, "CDM's classifier takes no time input"
        if self.num_classes is not None:
            assert class_labels is not None, "CDMDenoiser passes the null label, never None"
            cols = [
                self.mix.noisy_log_prob(x, a, s, component=class_labels)
                for a, s in zip(self.a, self.s, strict=True)
            ]
            return torch.stack(cols, dim=1)
        if self.normalized:
            return self.mix.noise_level_log_posterior(x, self.a, self.s, self.log_prior)
        return self.mix.noise_level_log_densities(x, self.a, self.s)


def noisy_points(mix: GaussianMixture, schedule: DiscreteSchedule, levels: Tensor, seed: int):
    """(x0, x in sigma space, sigma [B]) with x = x0 + sigma(level)·eps."""
    g = torch.Generator().manual_seed(seed)
    x0, _ = mix.sample(levels.numel(), g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sigma = schedule.ve_sigma(levels.double())
    return x0, x0 + sigma[:, None] * eps, sigma


# ---------------------------------------------------------------- Theorem 3.1: the denoiser
@pytest.mark.parametrize(("kind", "normalized"), [("linear", False), ("dre_uniform", True)])
def test_gradient_of_optimal_classifier_is_the_mmse_denoiser_at_every_level(kind, normalized):
    schedule = DiscreteSchedule(kind, num_levels=T)
    mix = mixture()
    # A non-uniform prior changes log p(t | x) by constants only: the denoiser must not change.
    prior = torch.linspace(0.5, 2.0, T + 2, dtype=torch.float64).log() if normalized else None
    denoiser = CDMDenoiser(OptimalClassifier(mix, schedule, normalized, prior), schedule)
    levels = torch.arange(1, T + 1).repeat_interleave(2)  # every level, two points each
    _, x, sigma = noisy_points(mix, schedule, levels, seed=1)
    with torch.no_grad():
        got = denoiser(x, sigma)
    expected = mix.posterior_mean(x, 1.0, sigma)
    err = (got - expected).abs().amax(dim=1)
    assert err.max() < 1e-9 * (1 + expected.abs().max()), (err.max(), levels[err.argmax()])
    # and the denoising is not trivial: E[x0|x] is far from x at high noise, near it at low
    assert (expected - x)[levels > 500].abs().mean() > 1.0


def test_eps_prediction_at_the_end_levels_and_in_vp_scaling():
    """eps_hat(x_t, t) = -sqrt(1 - abar_t)·grad log p_t(x_t) (VP scaling) for t in 1..T; at t = 0
    it is 0 and at t = T + 1 it is x_t itself, by construction (Algorithm 1's remark)."""
    schedule = DiscreteSchedule(num_levels=T)
    mix = mixture()
    denoiser = CDMDenoiser(OptimalClassifier(mix, schedule), schedule)
    abar = level_alpha_bar(schedule)
    level = torch.tensor([0, 1, 10, 300, 999, 1000, 1001, 1001])
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(level.numel(), 2, generator=g, dtype=torch.float64)
    eps, logits = denoiser.predict_eps(x_t, level)
    assert logits.shape == (level.numel(), T + 2)
    assert torch.equal(eps[0], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(eps[-2:], x_t[-2:], atol=1e-14, rtol=0)
    a, s = abar[level[1:-2]].sqrt(), (1 - abar[level[1:-2]]).sqrt()
    score = mix.noisy_score(x_t[1:-2], a, s)
    assert torch.allclose(eps[1:-2], -s[:, None] * score, atol=1e-10, rtol=1e-9)


# ---------------------------------------------------------------- Theorem 3.2: the likelihood
@pytest.mark.parametrize("normalized", [False, True])
def test_one_pass_likelihood_is_the_analytic_density_at_every_level(normalized):
    schedule = DiscreteSchedule(num_levels=T)
    mix = mixture()
    prior = torch.linspace(2.0, 0.5, T + 2, dtype=torch.float64).log() if normalized else None
    denoiser = CDMDenoiser(OptimalClassifier(mix, schedule, normalized, prior), schedule)
    abar = level_alpha_bar(schedule)
    # 16 points from each level's marginal, for levels 0 (data), 1, 2, ..., T, T + 1 (noise)
    level = torch.tensor([0, 1, 2, 250, 999, 1000, 1001]).repeat_interleave(16)
    a, s = abar[level].sqrt(), (1 - abar[level]).sqrt()  # float64 tensors, not Python floats
    g = torch.Generator().manual_seed(3)
    x0, _ = mix.sample(level.numel(), g, dtype=torch.float64)
    x_t = a[:, None] * x0 + s[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    got = cdm_log_likelihood(denoiser, x_t, level=level, log_prior=prior)
    expected = mix.noisy_log_prob(x_t, a, s)  # level T + 1: a = 0, s = 1, i.e. N(0, I)
    noise = level == T + 1
    assert torch.allclose(expected[noise], standard_normal_log_prob(x_t[noise]), atol=1e-12)
    err = (got - expected).abs()
    assert err.max() < 1e-10, level[err.argmax()]
    if normalized:  # a forgotten prior term is caught: normalized logits need log_prior
        wrong = cdm_log_likelihood(denoiser, x_t, level=level)
        assert (wrong - expected)[level == 0].abs().min() > 1.0


def test_module_likelihood_and_paper_bits_per_dim():
    """CDM.log_likelihood is the one-pass estimate; bits/dim in the paper's convention is the
    density at the pixel values + log2(num_bins / 2) (+7 for 8 bits), and the standard one the
    same at uniformly dequantized values."""
    schedule = DiscreteSchedule(num_levels=T)
    mix = mixture()
    model = CDM(net=OptimalClassifier(mix, schedule), schedule=schedule, data_shape=(2,))
    g = torch.Generator().manual_seed(4)
    x, _ = mix.sample(32, g, dtype=torch.float64)
    x = (x.clamp(-1, 1) * 127.5).round() / 127.5  # 8-bit values in [-1, 1]
    log_p = mix.log_prob(x)
    assert torch.allclose(model.log_likelihood(x), log_p, atol=1e-10, rtol=0)
    paper = model.bits_per_dim(x, "paper", num_bins=256)
    assert torch.allclose(paper, -log_p / (2 * math.log(2)) + 7, atol=1e-9, rtol=0)
    deq = model.bits_per_dim(x, "dequantized", 256, torch.Generator().manual_seed(5))
    y = dequantize(x, 256, torch.Generator().manual_seed(5))
    assert torch.allclose(deq, -mix.log_prob(y) / (2 * math.log(2)) + 7, atol=1e-9, rtol=0)
    assert not torch.allclose(deq, paper, atol=1e-3)
    with pytest.raises(NoiseclsError, match="num_bins"):
        model.bits_per_dim(x)  # no DataModule, no num_bins


# ---------------------------------------------------------------- class conditioning, guidance
def test_classifier_free_guidance_through_the_gradient_denoiser():
    schedule = DiscreteSchedule(num_levels=200)
    mix = mixture()
    K = mix.num_components
    w = 1.5
    net = OptimalClassifier(mix, schedule, num_classes=K)
    model = CDM(
        net=net, schedule=schedule, class_conditional=True, guidance_weight=w, data_shape=(2,)
    )
    levels = torch.arange(1, 201, 10)
    _, x, sigma = noisy_points(mix, schedule, levels, seed=6)
    labels = torch.arange(levels.numel()) % K
    oracle = mix.denoiser()
    with torch.no_grad():
        guided = model.denoiser()(x, sigma, class_labels=labels)
    expected = (1 + w) * oracle(x, sigma, class_labels=labels) - w * oracle(x, sigma)
    assert torch.allclose(guided, expected, atol=1e-9, rtol=0)
    # denoising-MSE metrics measure the unguided MMSE denoiser, E[x0 | x, k]
    with torch.no_grad():
        mmse = model.mmse_denoiser()(x, sigma, class_labels=labels)
    assert torch.allclose(mmse, oracle(x, sigma, class_labels=labels), atol=1e-9, rtol=0)
    # the conditional one-pass likelihood is log p(x | k); without labels it is log p(x)
    x0, comp = mix.sample(16, torch.Generator().manual_seed(7), dtype=torch.float64)
    cond = model.log_likelihood(x0, class_labels=comp)
    assert torch.allclose(cond, mix.noisy_log_prob(x0, 1.0, 0.0, component=comp), atol=1e-10)
    assert torch.allclose(model.log_likelihood(x0), mix.log_prob(x0), atol=1e-10)


def conditional_toy_cdm(label_dropout: float, seen: list[Tensor]) -> CDM:
    """A tiny class-conditional CDM (K = 4 classes) whose net records the labels it gets."""
    torch.manual_seed(0)
    net = ResidualMLP(
        dim=2, hidden=16, num_blocks=1, time_conditioning=False, num_classes=4,
        head=LogitsHead(12, hidden_channels=16, cumsum=True),
    )  # fmt: skip
    net.register_forward_pre_hook(lambda _, args: seen.append(args[2].clone()))
    return CDM(
        net=net, schedule=DiscreteSchedule(num_levels=10), class_conditional=True,
        label_dropout=label_dropout, data_shape=(2,),
    )  # fmt: skip


def null_label_gradient(model: CDM, x0: Tensor, labels: Tensor) -> Tensor:
    """|grad| of the null label's embedding in the second of two training steps (the first
    one makes the zero-initialised residual branches that carry the embedding non-zero)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for step in range(2):
        opt.zero_grad()
        loss, _ = model.training_loss(x0, labels, torch.Generator().manual_seed(step))
        loss.backward()
        opt.step() if step == 0 else None
    return model.net.embed.class_embed.weight.grad[model.num_classes].abs().sum()


def test_label_dropout_happens_in_training_and_trains_the_null_label():
    K, n, p = 4, 20000, 0.1
    seen: list[Tensor] = []
    model = conditional_toy_cdm(p, seen)
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(n) % K
    assert null_label_gradient(model, x0, labels) > 0, "the null label must be trained"
    dropped = seen[-1] == K
    assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(seen[-1][~dropped], labels[~dropped])
    model.eval()
    model.training_loss(x0, labels, torch.Generator().manual_seed(0))
    assert torch.equal(seen[-1], labels), "no label dropout outside training"
    # without dropout (the official code's training) the null label never learns
    assert null_label_gradient(conditional_toy_cdm(0.0, []), x0, labels) == 0


# ---------------------------------------------------------------- schedules and sampling
def test_dre_uniform_levels_have_linear_noise_std():
    """CDM(unif.), section 4.3: sqrt(1 - abar_t) = t / (T + 1) for every level 0..T+1."""
    schedule = DiscreteSchedule("dre_uniform", num_levels=T)
    denoiser = CDMDenoiser(nn.Identity(), schedule)
    std = (1 - denoiser.level_alpha_bar()).sqrt()
    expected = torch.arange(T + 2, dtype=torch.float64) / (T + 1)
    assert torch.allclose(std, expected, atol=1e-15, rtol=1e-9)  # 1 - (1 - u²) cancels
    linear = CDMDenoiser(nn.Identity(), DiscreteSchedule("linear", num_levels=T))
    assert not torch.allclose((1 - linear.level_alpha_bar()).sqrt(), expected, atol=0.05)


def test_strided_ddpm_uses_strided_betas():
    """Every step t -> s of DDPM on a strided grid (10 of 1000 levels) is the posterior
    q(x_s | x_t, x0_hat) with beta = 1 - abar_t / abar_s, not the unstrided beta_t that the
    official code uses."""
    schedule = DiscreteSchedule(num_levels=T)
    mix = mixture()
    denoiser = CDMDenoiser(OptimalClassifier(mix, schedule), schedule)
    sigmas = schedule.sampling_sigmas(10)
    levels = schedule.sampling_levels(10)
    assert len(levels) == 10 and (levels[:-1] - levels[1:]).min() > 100
    n = 16
    g = torch.Generator().manual_seed(8)
    x_start = (1 + sigmas[0] ** 2).sqrt() * torch.randn(n, 2, generator=g, dtype=torch.float64)
    steps: list[dict] = []
    with torch.no_grad():
        sample_ddpm(
            denoiser, x_start, sigmas, generator=torch.Generator().manual_seed(9),
            callback=steps.append,
        )  # fmt: skip
    replay = torch.Generator().manual_seed(9)
    abar = schedule.alpha_bar
    x = x_start
    worst, official_gap = 0.0, 0.0
    for i, (t, s) in enumerate(pairwise(levels.tolist())):
        x0_hat = steps[i]["denoised"]
        x_vp = abar[t].sqrt() * x
        beta = 1 - abar[t] / abar[s]
        mean = (abar[s].sqrt() * beta * x0_hat + (1 - beta).sqrt() * (1 - abar[s]) * x_vp) / (
            1 - abar[t]
        )
        var = (1 - abar[s]) / (1 - abar[t]) * beta
        z = torch.randn(x.shape, generator=replay, dtype=x.dtype)
        expected = (mean + var.sqrt() * z) / abar[s].sqrt()
        worst = max(worst, (steps[i]["x"] - expected).abs().max().item())
        b = schedule.betas[t - 1]  # the unstrided beta of level t
        off_mean = (abar[s].sqrt() * b * x0_hat + (1 - b).sqrt() * (1 - abar[s]) * x_vp) / (
            1 - abar[t]
        )
        off = (off_mean + ((1 - abar[s]) / (1 - abar[t]) * b).sqrt() * z) / abar[s].sqrt()
        official_gap = max(official_gap, (off - expected).abs().max().item())
        x = steps[i]["x"]
    assert worst < 1e-9
    assert official_gap > 0.1


def test_cdm_samplers_run_through_the_module_with_the_oracle():
    """DDPM, DDIM and DPM-Solver-2 (fractional midpoint levels) draw from the mixture when fed
    the optimal classifier (a loose check of wiring; tests/test_cdm_training.py trains one)."""
    schedule = DiscreteSchedule(num_levels=100, beta_start=1e-3, beta_end=0.2)  # cheap oracle
    mix = mixture()
    model = CDM(net=OptimalClassifier(mix, schedule), schedule=schedule, data_shape=(2,))
    ref, _ = mix.sample(400, torch.Generator().manual_seed(10), dtype=torch.float64)
    for name, steps in (("ddim", 20), ("ddpm", 50), ("dpm_solver_2", 10)):
        g = torch.Generator().manual_seed(11)
        x, nfe = model.sample(400, generator=g, sampler=SamplerConfig(name=name, num_steps=steps))
        assert nfe == (steps if name != "dpm_solver_2" else 2 * steps - 1)
        assert mmd_rbf(x.double(), ref) < 0.01, name
    noise = torch.randn(400, 2, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    assert mmd_rbf(noise, ref) > 0.05


# ---------------------------------------------------------------- configuration errors
def tiny_unet(**kwargs) -> UNet:
    options = dict(
        image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2),
        num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, time_conditioning=False,
        attention_backend="math", head=LogitsHead(T + 2, hidden_channels=32, cumsum=True),
    )  # fmt: skip
    options.update(kwargs)
    return UNet(**options)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"time_conditioning": True}, "time_conditioning: false"),
        ({"attention_backend": "sdpa"}, "attention_backend: math"),
        ({"head": LogitsHead(10, hidden_channels=8, cumsum=True)}, "num_logits: 1002"),
    ],
)
def test_unfit_classifiers_are_refused_in_one_line(change, message):
    with pytest.raises(NoiseclsError, match=message):
        CDM(net=tiny_unet(**change), schedule=DiscreteSchedule(num_levels=T))


def test_bad_cdm_options_are_refused():
    schedule = DiscreteSchedule(num_levels=T)
    with pytest.raises(NoiseclsError, match="not both 0"):
        CDM(net=tiny_unet(), schedule=schedule, ce_weight=0, mse_weight=0)
    with pytest.raises(NoiseclsError, match="num_classes"):
        CDM(net=tiny_unet(), schedule=schedule, class_conditional=True)
    with pytest.raises(NoiseclsError, match="label_dropout"):
        CDM(net=tiny_unet(num_classes=3), schedule=schedule, label_dropout=1.0)
    # the CE-only ablation needs no double backward, so fused attention is fine there
    CDM(net=tiny_unet(attention_backend="sdpa"), schedule=schedule, mse_weight=0)


def test_unet_classifier_trains_with_double_backward():
    """One CDM step on a tiny U-Net classifier: every parameter gets a gradient (the last bias
    only through the CE term) and the loss is finite."""
    net = tiny_unet()
    model = CDM(net=net, schedule=DiscreteSchedule(num_levels=T), data_shape=(1, 8, 8))
    model.train()
    loss, extras = model.training_loss(
        torch.rand(6, 1, 8, 8) * 2 - 1, None, torch.Generator().manual_seed(0)
    )
    loss.backward()
    assert torch.isfinite(loss) and set(extras) == {"ce", "mse", "level_accuracy"}
    assert 0 <= extras["level_accuracy"] <= 1
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert not missing


# ---------------------------------------------------------------- the paper's LR schedule
def test_warmup_step_decay_schedule():
    """lr(step) = base · min((step + 1) / warmup, 1) · gamma^(step // step_size), stepped once per
    optimizer step; the paper's recipe is 5k warmup then /10 every 200k (factor values)."""
    param = nn.Parameter(torch.zeros(()))
    opt = torch.optim.Adam([param], lr=2e-4)
    sched = WarmupStepDecayLR(opt, warmup_steps=3, step_size=5, gamma=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2e-4 * f for f in (1 / 3, 2 / 3, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    paper = WarmupStepDecayLR(torch.optim.Adam([param], lr=2e-4), 5000, 200000, 0.1)
    assert paper.factor(0) == 1 / 5000 and paper.factor(4999) == 1.0
    assert paper.factor(199999) == 1.0 and paper.factor(200000) == pytest.approx(0.1)
    assert paper.factor(450000) == pytest.approx(0.01)
    # resuming from a state dict continues the same sequence
    resumed = WarmupStepDecayLR(torch.optim.Adam([param], lr=2e-4), 3, 5, 0.1)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.factor(resumed.last_epoch) == sched.factor(sched.last_epoch)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupStepDecayLR(opt, warmup_steps=0)
    with pytest.raises(ValueError, match="gamma"):
        WarmupStepDecayLR(opt, gamma=0.0)
