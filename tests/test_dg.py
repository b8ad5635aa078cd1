"""Discriminator Guidance against the Gaussian-mixture oracles, and trained on 2-D data.

Ground truth: for data p and a deliberately wrong model q (both mixtures), the Bayes-optimal
discriminator's logit is log p_t - log q_t, and DG with w = 1 turns q's denoiser into p's
exactly (Kim et al. 2023, Theorem 1).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor

from noisecls.callbacks.calibration import DiscriminatorCalibration, reliability
from noisecls.callbacks.samples import SampleWriter
from noisecls.data.fake import (
    RealFakeDataModule,
    load_fake_samples,
    split_targets,
    target_indices,
)
from noisecls.data.toy import ToyDataModule
from noisecls.denoisers import DiscriminatorGuidedDenoiser
from noisecls.errors import NoiseclsError
from noisecls.methods.base import DiffusionModule
from noisecls.methods.dg import DG, GuidanceConfig
from noisecls.nets import ResidualMLP, ScalarHead
from noisecls.oracles import GaussianMixture, mmd_rbf
from noisecls.process.schedules import EDMSchedule, LogSNRSchedule, karras_sigmas
from noisecls.samplers import SamplerConfig, sample_euler, sample_heun

VP = LogSNRSchedule(kind="linear", beta_min=0.1, beta_max=20.0)
MEANS = [[-2.0, 0.0], [2.0, 0.0]]
DATA = GaussianMixture.isotropic(torch.tensor([0.5, 0.5]), torch.tensor(MEANS), torch.tensor(0.5))
WRONG = GaussianMixture.isotropic(
    torch.tensor([0.8, 0.2]), torch.tensor([[-1.5, 0.5], [2.5, 0.0]]), torch.tensor(0.8)
)


class OptimalDiscriminator:
    """The Bayes-optimal real (data) vs fake (model) logit on the VP SDE: log p_t - log q_t of
    the noised mixtures at x_vp, alpha(tau), sigma(tau)."""

    def __init__(self, data: GaussianMixture, model: GaussianMixture) -> None:
        self.data, self.model = data, model

    def __call__(self, x_vp: Tensor, tau: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return self.data.log_density_ratio(self.model, x_vp, VP.alpha(tau), VP.sigma(tau))


def oracle_dg(weight: float = 1.0, **kwargs: float) -> DiscriminatorGuidedDenoiser:
    kwargs = {"time_min": 0.0, "prob_clip": 0.0, **kwargs}
    return DiscriminatorGuidedDenoiser(
        WRONG.denoiser(), OptimalDiscriminator(DATA, WRONG), VP, weight=weight, **kwargs
    )


def reference(n: int, seed: int) -> Tensor:
    return DATA.sample(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)[0]


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("sigma", [0.02, 0.3, 1.0, 4.0, 40.0])
def test_optimal_discriminator_turns_wrong_score_into_data_score(sigma: float) -> None:
    x = 3 * torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = torch.full((256,), sigma, dtype=torch.float64)
    corrected = oracle_dg()(x, s)
    truth = DATA.denoiser()(x, s)
    assert (WRONG.denoiser()(x, s) - truth).abs().max() > 1e-3  # the model really is wrong
    torch.testing.assert_close(corrected, truth, rtol=0, atol=1e-9)
    # equivalently in score form: s_q + grad log(d*/(1-d*)) = s_p
    score = (corrected - x) / sigma**2
    torch.testing.assert_close(score, DATA.noisy_score(x, 1.0, sigma), rtol=1e-6, atol=1e-6)


def test_guidance_respects_time_window_and_weight() -> None:
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sig = torch.tensor([0.05] * 32 + [2.0] * 32, dtype=torch.float64)
    tau = VP.t_from_ve_sigma(sig)
    window = (float(tau[-1]) - 0.01, 1.0)  # only the large sigmas are inside
    out = oracle_dg(time_min=window[0], time_max=window[1])(x, sig)
    plain = WRONG.denoiser()(x, sig)
    torch.testing.assert_close(out[:32], plain[:32], rtol=0, atol=0)
    torch.testing.assert_close(out[32:], DATA.denoiser()(x[32:], sig[32:]), rtol=0, atol=1e-9)
    # w scales the correction linearly
    half = oracle_dg(0.5)(x, sig) - plain
    torch.testing.assert_close(2 * half, oracle_dg(1.0)(x, sig) - plain, rtol=1e-10, atol=1e-12)


def test_probability_clipping_zeroes_saturated_gradients() -> None:
    far = torch.tensor([[40.0, 0.0], [-1.0, 0.2]], dtype=torch.float64)  # far: huge log ratio
    sig = torch.full((2,), 0.1, dtype=torch.float64)
    logit = OptimalDiscriminator(DATA, WRONG)(far * VP.alpha(VP.t_from_ve_sigma(sig))[:, None],
                                              VP.t_from_ve_sigma(sig))  # fmt: skip
    assert abs(float(logit[0])) > math.log(1e5)
    out = oracle_dg(prob_clip=1e-5)(far, sig)
    plain = WRONG.denoiser()(far, sig)
    torch.testing.assert_close(out[0], plain[0], rtol=0, atol=0)
    assert (out[1] - plain[1]).abs().max() > 1e-6


def test_boosting_multiplies_correction_of_fake_judged_samples() -> None:
    x = 3 * torch.randn(200, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sig = torch.full((200,), 1.0, dtype=torch.float64)
    plain = WRONG.denoiser()(x, sig)
    base = oracle_dg()(x, sig) - plain
    boosted_dg = oracle_dg(boost_factor=2.0, boost_period=2)
    first = boosted_dg(x, sig) - plain  # call 1: boosted
    second = boosted_dg(x, sig) - plain  # call 2: not boosted
    fake = boosted_dg.last_log_ratio < 0
    assert 0 < int(fake.sum()) < 200
    torch.testing.assert_close(first[fake], 2 * base[fake], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(first[~fake], base[~fake], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second, base, rtol=1e-10, atol=1e-12)


def test_needs_gradients_outside_inference_mode() -> None:
    x = torch.randn(4, 2, dtype=torch.float64)
    with torch.inference_mode(), pytest.raises(NoiseclsError, match="inference_mode"):
        oracle_dg()(x, torch.ones(4, dtype=torch.float64))


# ---------------------------------------------------------------------------------- sampling
def test_corrected_sampling_produces_data_mixture_uncorrected_does_not() -> None:
    """The paper's 2-D toy figure: EDM Heun (18 steps) from the wrong model, with and without
    the optimal discriminator's correction; also with a non-zero second-order weight."""
    sigmas = karras_sigmas(18, 0.002, 80.0)
    x_t = 80 * torch.randn(1000, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = reference(1000, 4)
    noise_floor = float(mmd_rbf(reference(1000, 5), ref))  # two data samples of this size
    corrected = sample_heun(oracle_dg(), x_t.clone(), sigmas)  # both stages, w = 1
    first_only = sample_heun(oracle_dg(), x_t.clone(), sigmas, corrector=WRONG.denoiser())
    uncorrected = sample_heun(WRONG.denoiser(), x_t.clone(), sigmas)
    assert float(mmd_rbf(corrected, ref)) < max(3 * abs(noise_floor), 5e-3)
    assert float(mmd_rbf(uncorrected, ref)) > 0.1
    # the first-order-only correction (the paper's default) already removes most of the error
    assert float(mmd_rbf(first_only, ref)) < 0.5 * float(mmd_rbf(uncorrected, ref))


def test_importance_sampled_times_follow_the_density() -> None:
    """t ~ beta(t)/(1 - exp(-B(t))) on [t_min, 1]: the CDF is
    (log expm1 B(t) - log expm1 B(t_min)) / Z; Kolmogorov-Smirnov distance is small."""
    t_min = 1e-5
    t = VP.sample_t_uniform_log_snr(20000, t_min, generator=torch.Generator().manual_seed(5))
    assert float(t.min()) >= t_min and float(t.max()) <= 1.0
    a = lambda s: torch.log(torch.expm1(VP.integrated_beta(s)))  # noqa: E731
    lo, hi = a(torch.tensor(t_min, dtype=torch.float64)), a(torch.tensor(1.0, dtype=torch.float64))
    ts = t.sort().values
    cdf = (a(ts) - lo) / (hi - lo)
    empirical = torch.arange(1, ts.numel() + 1, dtype=torch.float64) / ts.numel()
    assert float((cdf - empirical).abs().max()) < 0.015
    # the density is heavily weighted to small t (1/t-like near 0): the median is small
    assert float(ts[ts.numel() // 2]) < 0.2


# ---------------------------------------------------------------------------------- pipeline
class OracleModule(DiffusionModule):
    """A 'trained model' whose denoiser is a mixture's exact one (test helper: the imperfect
    model is the wrong mixture). It is not trainable."""

    def __init__(self, mixture: GaussianMixture, sampler: SamplerConfig | None = None) -> None:
        super().__init__(EDMSchedule(sigma_data=2.0), sampler or SamplerConfig("heun", 18),
                         data_shape=(2,))  # fmt: skip
        self.mixture = mixture
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a weight for the manifest's hash

    def denoiser(self):
        mixture = self.mixture

        def denoise(x: Tensor, sigma: Tensor, **cond: Tensor | None) -> Tensor:
            return mixture.denoiser()(x.double(), sigma).to(x.dtype)

        return denoise

    def setup(self, stage: str) -> None:
        """No network to check."""

    def training_loss(self, x0, labels, generator):
        raise NoiseclsError("the oracle module is not trainable")


def toy_data(**kwargs) -> ToyDataModule:
    return ToyDataModule(
        "gmm", n_train=4000, n_val=1000, n_test=1000, gmm_means=MEANS, gmm_std=0.5,
        batch_size=256, **kwargs,
    )  # fmt: skip


def trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", default_root_dir=str(root), logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, inference_mode=False, **kwargs,
    )  # fmt: skip


def test_sample_writer_writes_exact_count_resumes_and_guards(tmp_path: Path) -> None:
    module = OracleModule(WRONG)
    module.predict_config.num_samples, module.predict_config.batch_size = 300, 128
    out = tmp_path / "fake"
    trainer(tmp_path, callbacks=[SampleWriter(str(out), grid_size=0)]).predict(
        module, return_predictions=False
    )
    x, labels = load_fake_samples([str(out)])
    assert x.shape == (300, 2) and (labels == 0).all()
    names = sorted(p.name for p in out.glob("samples_*.npz"))
    assert names == ["samples_00000000-00000127.npz", "samples_00000128-00000255.npz",
                     "samples_00000256-00000299.npz"]  # fmt: skip
    # the samples are those of the wrong model (not the data)
    assert float(mmd_rbf(x.double(), reference(300, 6))) > 0.1
    # resume: more samples, nothing rewritten
    stamp = (out / names[0]).stat().st_mtime_ns
    module.predict_config.num_samples = 400
    writer = SampleWriter(str(out), grid_size=0)
    trainer(tmp_path, callbacks=[writer]).predict(module, return_predictions=False)
    assert (out / names[0]).stat().st_mtime_ns == stamp and len(writer.skipped_seeds) == 300
    assert load_fake_samples([str(out)])[0].shape == (400, 2)
    # another run's directory is refused
    other = OracleModule(DATA)
    with torch.no_grad():
        other.anchor.fill_(1.0)
    with pytest.raises(NoiseclsError, match="different run"):
        trainer(tmp_path, callbacks=[SampleWriter(str(out), grid_size=0)]).predict(
            other, return_predictions=False
        )


def test_predict_writes_generation_labels_of_conditional_models(tmp_path: Path) -> None:
    class Conditional(OracleModule):
        def class_labels(self, labels):
            return labels

        def denoiser(self):
            mixture = self.mixture

            def denoise(x, sigma, class_labels=None):
                return mixture.denoiser()(x.double(), sigma, class_labels=class_labels).to(x.dtype)

            return denoise

    module = Conditional(DATA, SamplerConfig("heun", 18))
    module.predict_config.num_samples = 200
    out = tmp_path / "cond"
    dm = toy_data()
    trainer(tmp_path, callbacks=[SampleWriter(str(out), grid_size=0)]).predict(
        module, datamodule=dm, return_predictions=False
    )
    x, labels = load_fake_samples([str(out)])
    assert set(labels.tolist()) == {0, 1}
    # each sample lies near its label's component mean
    means = torch.tensor(MEANS)[labels]
    assert float((x - means).norm(dim=1).median()) < 1.0


def test_real_fake_datamodule_pairs_real_and_fake(tmp_path: Path) -> None:
    module = OracleModule(WRONG)
    module.predict_config.num_samples = 500
    out = tmp_path / "fake"
    trainer(tmp_path, callbacks=[SampleWriter(str(out), grid_size=0)]).predict(
        module, return_predictions=False
    )
    dm = RealFakeDataModule(toy_data(), str(out), batch_size=100, fake_val_size=50,
                            fake_test_size=50)  # fmt: skip
    dm.setup("fit")
    assert dm.data_shape == (2,) and dm.num_classes == 2
    assert len(dm.train_set) == 4000 + 400 and len(dm.val_set) == 1000 + 50
    x, y = next(iter(dm.val_dataloader()))
    is_real, _ = split_targets(y)
    assert x.shape == (100, 2) and y.shape == (100, 3) and bool((is_real == 1).all())
    reals = torch.cat([split_targets(b[1])[0] for b in dm.test_dataloader()])
    assert int((reals == 0).sum()) == 50 and int((reals == 1).sum()) == 1000
    # column 2 indexes the split: real examples first, then fake, each index once
    ys = torch.cat([b[1] for b in dm.val_dataloader()])
    assert sorted(target_indices(ys).tolist()) == list(range(1050))
    assert bool((target_indices(ys)[ys[:, 0] == 0] >= 1000).all())
    with pytest.raises(NoiseclsError, match="no samples"):
        RealFakeDataModule(toy_data(), str(tmp_path / "none"), batch_size=100).setup("fit")


def write_exact_fake_set(directory: Path, mixture: GaussianMixture, n: int, seed: int) -> None:
    """n exact samples of ``mixture`` as one SampleWriter-format shard (no sampler error)."""
    directory.mkdir(parents=True)
    x = mixture.sample(n, generator=torch.Generator().manual_seed(seed))[0].float().numpy()
    np.savez(directory / "samples_00000000-00003999.npz", samples=x, seeds=np.arange(n),
             labels=np.zeros(n, dtype=np.int64))  # fmt: skip


def exact_pair_log_loss(dg: DG, n: int, edges: list[float]) -> list[tuple[float, float]]:
    """(trained, optimal) mean BCE per diffusion-time bin on n fresh exact draws of each of
    DATA (real) and WRONG (fake), the same noisy inputs for both discriminators."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.cat([DATA.sample(n, generator=g)[0], WRONG.sample(n, generator=g)[0]])
    is_real = torch.cat([torch.ones(n), torch.zeros(n)]).double()
    optimal = OptimalDiscriminator(DATA, WRONG)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    out = []
    with torch.no_grad():
        for lo, hi in itertools.pairwise(edges):
            t = lo + (hi - lo) * torch.rand(2 * n, generator=g, dtype=torch.float64)
            x_t = VP.add_noise(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
            trained = dg.discriminator(x_t.float(), t).double()
            out.append((float(bce(trained, is_real)), float(bce(optimal(x_t, t), is_real))))
    return out


def test_trained_discriminator_approaches_exact_log_ratio_and_guides_toward_data(
    tmp_path: Path,
) -> None:
    """An exactly known pair: real = DATA, fake = exact samples of WRONG. The discriminator
    trained on CPU comes within 0.06 nats of the Bayes-optimal log-loss in every time bin
    (measured 0.02-0.04 at 1200 steps), is calibrated (ECE < 0.05) and, guiding WRONG's exact
    denoiser (the fake set's own), cuts the MMD to the data at least fourfold (measured ~14x)."""
    torch.manual_seed(0)
    write_exact_fake_set(tmp_path / "fake", WRONG, 4000, seed=1)
    dm = RealFakeDataModule(
        toy_data(),
        str(tmp_path / "fake"),
        batch_size=256,
        fake_val_size=1000,
        fake_test_size=0,
    )  # fmt: skip  (balanced validation: 1000 / 1000)
    net = ResidualMLP(dim=2, hidden=64, num_blocks=2, head=ScalarHead())
    dg = DG(net, score_model=OracleModule(WRONG),
            guidance=GuidanceConfig(weight=1.0, second_order_weight=1.0),
            optimizer=lambda p: torch.optim.Adam(p, lr=2e-3), val_bins=4)  # fmt: skip
    fit = trainer(tmp_path, max_steps=1200, val_check_interval=1200,
                  check_val_every_n_epoch=None,
                  callbacks=[DiscriminatorCalibration()])  # fmt: skip
    fit.fit(dg, datamodule=dm)
    metrics = {k: float(v) for k, v in fit.callback_metrics.items()}
    assert metrics["val/acc_t0.00-0.25"] > 0.6  # clearly separates at small t
    assert abs(metrics["val/acc_t0.75-1.00"] - 0.5) < 0.15  # chance at large t (pure noise)
    assert metrics["val/ece"] < 0.05, metrics["val/ece"]
    assert (tmp_path / "calibration" / "val_step0001200.png").is_file()

    for trained, optimal in exact_pair_log_loss(dg, 5000, [1e-5, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0]):
        assert 0 <= trained - optimal < 0.06, (trained, optimal)  # optimal: the lowest possible

    ref = reference(2000, 7)
    guided, nfe = dg.sample(2000, generator=torch.Generator().manual_seed(8))
    assert nfe == 35  # Heun 18 steps: no extra score evaluations
    dg.guidance = GuidanceConfig(weight=0.0)
    plain, _ = dg.sample(2000, generator=torch.Generator().manual_seed(8))
    mmd_plain, mmd_guided = float(mmd_rbf(plain, ref)), float(mmd_rbf(guided, ref))
    assert mmd_guided < 0.25 * mmd_plain, (mmd_guided, mmd_plain)


def test_reliability_of_calibrated_and_overconfident_predictions() -> None:
    """Targets drawn as Bernoulli(p) make p calibrated (ECE ~ sampling noise); reporting
    p' = 0.5 + 1.6 (p - 0.5) clipped to [0, 1] (overconfident) gives ECE = E|p' - p| (p' - p
    keeps one sign within each bin): 0.1047 for p uniform on [0.1, 0.9], clipping included."""
    g = torch.Generator().manual_seed(0)
    p = 0.1 + 0.8 * torch.rand(200_000, generator=g, dtype=torch.float64)
    target = (torch.rand(p.shape, generator=g, dtype=torch.float64) < p).double()
    calibrated = reliability(p, target, num_bins=10)
    assert calibrated.ece < 0.01
    torch.testing.assert_close(calibrated.frequency[1:9], calibrated.mean_prob[1:9], atol=0.01,
                               rtol=0)  # fmt: skip
    assert int(calibrated.count.sum()) == p.numel() and int(calibrated.count[0]) == 0
    overconfident = reliability((0.5 + 1.6 * (p - 0.5)).clamp(0, 1), target, num_bins=10)
    assert abs(overconfident.ece - 0.1047) < 0.005, overconfident.ece


class SignVerdict(torch.nn.Module):
    """A discriminator net judging samples with a negative first coordinate fake (logit -1) and
    the others real (+1), with zero input gradient: it drives boosting, never the correction."""

    def forward(self, x: Tensor, noise_in: Tensor, labels: Tensor | None = None) -> Tensor:
        return torch.where(x[:, 0] < 0, -1.0, 1.0).to(x) + 0 * x.sum(dim=1)


def test_heun_per_sample_churn_equals_scalar_churn() -> None:
    x = 80 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = karras_sigmas(10, 0.002, 80.0)
    window = {"s_tmin": 0.05, "s_tmax": 10.0}
    scalar = sample_heun(WRONG.denoiser(), x.clone(), sig, s_churn=4.0,
                         generator=torch.Generator().manual_seed(1), **window)  # fmt: skip
    vector = sample_heun(
        WRONG.denoiser(), x.clone(), sig, generator=torch.Generator().manual_seed(1),
        churn_override=lambda i: torch.full((64,), 4.0, dtype=torch.float64), **window,
    )  # fmt: skip
    torch.testing.assert_close(vector, scalar, rtol=0, atol=1e-12)
    assert (scalar - sample_heun(WRONG.denoiser(), x.clone(), sig)).abs().max() > 1e-3


def test_churn_boosting_renoises_only_samples_judged_fake() -> None:
    """Official EDM-G++ boosting: at every 5th Heun step, samples judged fake at the previous
    step get churn 4; the others follow exactly the unboosted trajectory."""
    dg = DG(SignVerdict(), score_model=OracleModule(WRONG),
            guidance=GuidanceConfig(weight=1.0, boost_churn=4.0, boost_churn_period=5))  # fmt: skip
    x = 80 * torch.randn(200, 2, generator=torch.Generator().manual_seed(2))
    sig = karras_sigmas(18, 0.002, 80.0)
    config = SamplerConfig("heun", 18)
    boosted, nfe = dg.run_sampler(
        config, x.clone(), sig, generator=torch.Generator().manual_seed(3)
    )
    # the unboosted trajectory and the verdicts that boosting sees (x entering steps 4, 9, 14)
    states: dict[int, Tensor] = {}
    plain = sample_heun(dg.guided_denoiser(1.0), x.clone(), sig,
                        corrector=dg.guided_denoiser(0.0, boost=False),
                        callback=lambda info: states.__setitem__(info["i"], info["x"]))  # fmt: skip
    judged_fake = torch.stack([states[i][:, 0] < 0 for i in (3, 8, 13)]).any(dim=0)
    assert nfe == 35 and 0 < int(judged_fake.sum()) < 200
    torch.testing.assert_close(boosted[~judged_fake], plain[~judged_fake], rtol=0, atol=0)
    assert bool(((boosted - plain).abs().amax(dim=1)[judged_fake] > 1e-4).all())
    dg.guidance = GuidanceConfig(boost_churn=4.0)
    with pytest.raises(NoiseclsError, match="boost_churn needs"):
        dg.run_sampler(SamplerConfig("euler", 5), x.clone(), sig)


def test_dg_module_loads_score_model_checkpoint_and_uses_heun_weights(tmp_path: Path) -> None:
    """score_checkpoint loads weights into the configured model; Heun's corrector stage uses
    second_order_weight (a non-zero value works), other samplers the first-order weight."""
    from noisecls.methods.ddm import DDM

    ddm = DDM(ResidualMLP(dim=2, hidden=16, num_blocks=1), VP, data_shape=(2,))
    with torch.no_grad():
        for p in ddm.parameters():
            p.normal_(0, 0.1)
    path = tmp_path / "ddm.ckpt"
    torch.save({"state_dict": ddm.state_dict()}, path)
    fresh = DDM(ResidualMLP(dim=2, hidden=16, num_blocks=1), VP, data_shape=(2,))
    net = ResidualMLP(dim=2, hidden=16, num_blocks=1, head=ScalarHead())
    dg = DG(net, score_model=fresh, score_checkpoint=str(path),
            guidance=GuidanceConfig(weight=2.0, second_order_weight=0.5))  # fmt: skip
    for a, b in zip(dg.score_model.parameters(), ddm.parameters(), strict=True):
        assert torch.equal(a, b) and not a.requires_grad
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    sig = VP.sampling_sigmas(5)
    out, nfe = dg.run_sampler(SamplerConfig("heun", 5), x.clone(), sig)
    expected = sample_heun(dg.guided_denoiser(2.0), x.clone(), sig,
                           corrector=dg.guided_denoiser(0.5))  # fmt: skip
    torch.testing.assert_close(out, expected) and None
    assert nfe == 9
    euler, _ = dg.run_sampler(SamplerConfig("euler", 5), x.clone(), sig)
    torch.testing.assert_close(euler, sample_euler(dg.guided_denoiser(2.0), x.clone(), sig))
    assert not torch.allclose(out, sample_heun(dg.guided_denoiser(2.0), x.clone(), sig))
    with pytest.raises(NoiseclsError, match="does not exist"):
        DG(net, score_checkpoint=str(tmp_path / "missing.ckpt"))


def test_npz_shards_hold_float_samples(tmp_path: Path) -> None:
    module = OracleModule(WRONG)
    module.predict_config.num_samples = 10
    out = tmp_path / "s"
    trainer(tmp_path, callbacks=[SampleWriter(str(out), grid_size=0)]).predict(
        module, return_predictions=False
    )
    with np.load(next(out.glob("samples_*.npz"))) as data:
        assert data["samples"].dtype == np.float32 and data["seeds"].tolist() == list(range(10))


# ---------------------------------------------------------------------------------- configs
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize("name", ["dg_cifar10", "dg_cifar10_cond", "dg_ffhq64", "dg_toy",
                                  "dg_digits"])  # fmt: skip
def test_dg_configs_parse_with_the_paper_guidance(name: str, capsys) -> None:
    import yaml

    from noisecls.cli import NoiseclsCLI

    path = str(Path(__file__).resolve().parents[1] / "experiments" / f"{name}.yaml")
    args = ["fit", "--config", path, "--model.init_args.feature_cache.draws", "8",
            "--print_config"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        NoiseclsCLI(DiffusionModule, L.LightningDataModule, subclass_mode_model=True,
                    subclass_mode_data=True, args=args)  # fmt: skip
    assert exit_info.value.code in (0, None)
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["class_path"] == "noisecls.methods.dg.DG"
    guidance = model["init_args"]["guidance"]
    # the official window [0.01, 1]; dg_toy's ends at 0.2, picked by the validation sweep (README)
    window = (0.01, 0.2) if name == "dg_toy" else (0.01, 1.0)
    assert (guidance["time_min"], guidance["time_max"]) == window
    assert model["init_args"]["feature_cache"]["draws"] == 8
    # the official code's settings: EDM Heun on the rho = 7 ladder (35 NFE on CIFAR-10, the
    # paper's 71 on FFHQ); w 2 / 0 unconditional, w 1 / 0 with boosting (churn 4 every 5th step,
    # weight x2 every 2nd) conditional; discriminator epochs 60 / 250
    paper = {"dg_cifar10": (18, 2.0, 1.0, 0.0, 60), "dg_cifar10_cond": (18, 1.0, 2.0, 4.0, 250),
             "dg_ffhq64": (36, 2.0, 1.0, 0.0, 60)}  # fmt: skip
    if name in paper:
        steps, weight, boost, churn, epochs = paper[name]
        assert (guidance["weight"], guidance["second_order_weight"]) == (weight, 0.0)
        assert (guidance["boost_factor"], guidance["boost_churn"]) == (boost, churn)
        sampler = model["init_args"]["sampler"]
        assert (sampler["name"], sampler["num_steps"]) == ("heun", steps)
        assert (sampler["ladder"], sampler["rho"]) == ("karras", 7.0)
        assert model["init_args"]["features_from_score"]
        assert yaml.safe_load(Path(path).read_text())["trainer"]["max_epochs"] == epochs


def test_predict_writes_as_many_samples_as_the_training_split(tmp_path: Path) -> None:
    """``predict.num_samples: train`` (the paper's fake-set size) resolves to the attached
    DataModule's training split; without data it is a one-line error."""
    from noisecls.methods.base import PredictConfig

    module = OracleModule(WRONG)
    module.predict_config = PredictConfig(num_samples="train", batch_size=1000)
    out = tmp_path / "fake"
    trainer(tmp_path, callbacks=[SampleWriter(str(out), grid_size=0)]).predict(
        module, datamodule=toy_data(), return_predictions=False
    )
    assert load_fake_samples([str(out)])[0].shape == (4000, 2)  # toy_data's n_train
    with pytest.raises(NoiseclsError, match="num_samples: train needs the data"):
        trainer(tmp_path).predict(module, return_predictions=False)
    with pytest.raises(ValueError, match="num_samples >= 1"):
        PredictConfig(num_samples="all")  # type: ignore[arg-type]


def test_class_conditional_discriminator_sees_what_the_marginal_hides(tmp_path: Path) -> None:
    """Fake samples from the data mixture but with swapped labels (x from component 1 labelled
    0 and vice versa): the marginal of x is the data's, so an unconditional discriminator is at
    chance, while a class-conditional one separates real from fake."""
    x, component = DATA.sample(5000, generator=torch.Generator().manual_seed(11))
    fake = tmp_path / "swapped"
    fake.mkdir()
    np.savez(fake / "samples_00000000-00004999.npz", samples=x.numpy(),
             seeds=np.arange(5000), labels=(1 - component).numpy())  # fmt: skip
    accuracy = {}
    for conditional in (False, True):
        dm = RealFakeDataModule(
            toy_data(), str(fake), batch_size=256, fake_val_size=1000, fake_test_size=0
        )  # fmt: skip  (balanced validation)
        torch.manual_seed(0)
        net = ResidualMLP(dim=2, hidden=64, num_blocks=2, num_classes=2, head=ScalarHead())
        dg = DG(net, score_model=OracleModule(WRONG), class_conditional=conditional,
                optimizer=lambda p: torch.optim.Adam(p, lr=2e-3), val_bins=4)  # fmt: skip
        fit = trainer(tmp_path, max_steps=500, val_check_interval=500,
                      check_val_every_n_epoch=None)  # fmt: skip
        fit.fit(dg, datamodule=dm)
        accuracy[conditional] = float(fit.callback_metrics["val/acc_t0.00-0.25"])
    assert accuracy[True] > 0.9 and abs(accuracy[False] - 0.5) < 0.1, accuracy


def test_dg_guides_with_the_sampler_that_wrote_the_fake_set(tmp_path: Path) -> None:
    """The predict manifest records the fake set's sampler: DG takes it by default, refuses
    another in one line unless allowed, and refuses weight boosting with the parallel sampler
    (its denoiser would change between Picard sweeps)."""
    from noisecls.methods.ddm import DDM

    writer_sampler = SamplerConfig("ddim", 7)
    module = OracleModule(WRONG, sampler=writer_sampler)
    module.predict_config.num_samples = 600
    trainer(tmp_path, callbacks=[SampleWriter(str(tmp_path / "fake"), grid_size=0)]).predict(
        module, return_predictions=False
    )
    data = RealFakeDataModule(toy_data(), str(tmp_path / "fake"), batch_size=256)
    assert SamplerConfig.from_record(data.fake_sampler()) == writer_sampler

    def dg(**kwargs) -> DG:
        score = DDM(ResidualMLP(dim=2, hidden=16, num_blocks=1), VP, data_shape=(2,),
                    sampler=SamplerConfig("heun", 18))  # fmt: skip
        net = ResidualMLP(dim=2, hidden=16, num_blocks=1, head=ScalarHead())
        return DG(net, score_model=score, **kwargs)

    validate = {"limit_val_batches": 1}
    default = dg()
    trainer(tmp_path, **validate).validate(default, datamodule=data, verbose=False)
    assert default.sampler == writer_sampler  # not the score model's heun-18
    with pytest.raises(NoiseclsError, match=r"differs from the one that wrote the fake set.*"
                                            r"name: heun vs ddim"):  # fmt: skip
        trainer(tmp_path, **validate).validate(
            dg(sampler=SamplerConfig("heun", 7)), datamodule=data, verbose=False
        )
    allowed = dg(sampler=SamplerConfig("heun", 7), allow_sampler_mismatch=True)
    trainer(tmp_path, **validate).validate(allowed, datamodule=data, verbose=False)
    assert allowed.sampler == SamplerConfig("heun", 7)
    boosted = dg(guidance=GuidanceConfig(boost_factor=2.0))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NoiseclsError, match="parallel"):
        boosted.run_sampler(SamplerConfig("ddim", 5, parallel=True), x, VP.sampling_sigmas(5))


def test_accumulated_micro_batches_of_one_step_draw_their_own_noise(tmp_path: Path) -> None:
    """With accumulate_grad_batches 2 the two micro-batches of one optimizer step share
    global_step; DG's time and noise draws must still differ between them (salted by the
    micro-batch's index, as every method's are)."""
    write_exact_fake_set(tmp_path / "fake", WRONG, 400, seed=1)
    dm = RealFakeDataModule(toy_data(), str(tmp_path / "fake"), batch_size=64,
                            fake_val_size=50, fake_test_size=0)  # fmt: skip
    dg = DG(ResidualMLP(dim=2, hidden=16, num_blocks=1, head=ScalarHead()),
            score_model=OracleModule(WRONG))  # fmt: skip
    salts: list[tuple[int, ...]] = []
    step_generator = dg.step_generator
    dg.step_generator = lambda *salt: (salts.append(salt), step_generator(*salt))[1]
    trainer(tmp_path, max_steps=1, accumulate_grad_batches=2, limit_val_batches=0).fit(
        dg, datamodule=dm
    )
    assert len(salts) == 2 and salts[0] != salts[1]
