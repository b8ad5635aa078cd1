"""Evaluation callbacks against ground truth: FID / KID (a small feature extractor built here,
an independent Fréchet distance and MMD), the reference-statistics cache, Inception weights from a
local file, NLL of the exact Gaussian-mixture denoiser against its analytic density (ODE) and as an
upper bound (ELBO), dequantized bits/dim, denoising MSE against the analytic MMSE, EMA weights in
the metrics, the results file and its W&B table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor, nn

from noisecls.callbacks import (
    DenoisingMSECallback,
    FeatureExtractor,
    FIDCallback,
    InceptionFeatures,
    NLLCallback,
    ResultsWriter,
    metric_records,
)
from noisecls.callbacks.results import shard_rounds
from noisecls.data import DigitsDataModule, ToyDataModule
from noisecls.errors import NoiseclsError
from noisecls.likelihood import dequantize, quantize
from noisecls.likelihood.ode import ode_likelihood
from noisecls.methods import DDM
from noisecls.methods.base import DiffusionModule
from noisecls.nets import ResidualMLP
from noisecls.oracles import GaussianMixture
from noisecls.process.schedules import DiscreteSchedule


# ================================================================================= helpers
class TinyCNN(FeatureExtractor):
    """A small, randomly initialised (seeded) conv net: [B, 1, H, W] -> [B, 16] features."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 16),
            )  # fmt: skip
        self.requires_grad_(False)

    def identity(self) -> str:
        return f"tiny-cnn/seed={self.seed}"

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float())


class _EvalOnly(L.LightningModule):
    """A module that only evaluates: ``test_step`` does nothing (the callbacks do the work)."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        return None

    validation_step = test_step


class Replay(_EvalOnly):
    """'Generates' the rows of ``pool`` in order (a cursor), recording what it returned."""

    def __init__(self, pool: Tensor) -> None:
        super().__init__()
        self.pool, self.cursor, self.generated = pool, 0, []

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        out = self.pool[self.cursor : self.cursor + n]
        self.cursor += n
        self.generated.append(out)
        return out


class Noise(_EvalOnly):
    """Uniform noise in [-1, 1] of the digits' shape, drawn from the callback's generator."""

    def __init__(self) -> None:
        super().__init__()
        self.generated: list[Tensor] = []

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        out = torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1
        self.generated.append(out)
        return out, 1


class OracleModule(DiffusionModule):
    """A DiffusionModule whose denoiser is a Gaussian mixture's exact E[x0 | x] (times
    ``shrink``: 1 is the MMSE denoiser, < 1 a deliberately worse one). Its loss is the
    denoiser's x0 MSE at random noise levels (what DDM's x0 loss would be)."""

    def __init__(self, mixture: GaussianMixture, shrink: float = 1.0) -> None:
        super().__init__(DiscreteSchedule("linear"), data_shape=(mixture.dim,))
        self.mixture, self.shrink = mixture, shrink

    def denoiser(self):  # type: ignore[no-untyped-def]
        exact = self.mixture.denoiser()
        return exact if self.shrink == 1.0 else (lambda x, s, **c: self.shrink * exact(x, s))

    def training_loss(self, x0, labels, generator):  # type: ignore[no-untyped-def]
        sigma = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype) * 2
        x = x0 + sigma[:, None] * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return ((self.denoiser()(x, sigma) - x0) ** 2).mean(), {}


def _trainer(root: Path, callbacks: list, **kwargs: Any) -> L.Trainer:
    options = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
        limit_test_batches=1, default_root_dir=str(root),
    )  # fmt: skip
    return L.Trainer(callbacks=callbacks, **(options | kwargs))


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussian fits (scipy's matrix square root; independent of the
    callback's torchmetrics path)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def _mmd2_unbiased_poly(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² with KID's kernel k(x, y) = (x·y / d + 1)³ (Bińkowski et al. 2018)."""
    d = a.shape[1]
    kxx, kyy, kxy = ((u @ v.T / d + 1) ** 3 for u, v in ((a, a), (b, b), (a, b)))
    m, n = len(a), len(b)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    return dm


# ================================================================================= sharding
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_rounds_cover_every_item_once(world: int) -> None:
    n, batch = 1003, 64
    per_rank = [list(shard_rounds(n, batch, world, r)) for r in range(world)]
    assert len({len(rounds) for rounds in per_rank}) == 1  # same number of collective rounds
    items = [i for rounds in per_rank for _, r in rounds if r is not None for i in r]
    assert sorted(items) == list(range(n))  # every item exactly once
    batches = [b for rounds in per_rank for b, r in rounds if r is not None]
    assert sorted(batches) == list(range(math.ceil(n / batch)))  # distinct batch seeds


# ================================================================================= FID / KID
def test_fid_self_zero_heldout_small_noise_large(digits: DigitsDataModule, tmp_path: Path) -> None:
    train = digits.reference_dataset().x  # 1437 training digits
    held_out = digits.test_set.x  # 180 other digits
    n = train.shape[0]

    def fid_of(module: L.LightningModule, num: int, **options: Any) -> dict:
        cb = FIDCallback(
            num_samples=num, batch_size=500, feature_extractor=TinyCNN(),
            real_stats_cache_dir=str(tmp_path), kid_max_real=n, **options,
        )  # fmt: skip
        _trainer(tmp_path, [cb]).test(module, datamodule=digits, verbose=False)
        return cb.last_result

    itself = fid_of(Replay(train), n, kid_subset_size=100, kid_subsets=20)
    held = fid_of(Replay(held_out), held_out.shape[0], kid_subset_size=100, kid_subsets=20)
    noise_module = Noise()
    noise = fid_of(noise_module, n, kid_subset_size=n, kid_subsets=2)

    assert itself["num_fake"] == n and itself["num_real"] == n and noise["num_fake"] == n
    assert itself["real_stats_source"] == "computed" and noise["real_stats_source"] == "cache"
    assert abs(itself["fid"]) < 1e-9 * noise["fid"]  # the training set against itself
    assert itself["fid"] < held["fid"] < 0.01 * noise["fid"]  # other digits: close; noise: far
    # KID is unbiased: zero within its spread for digits, far from zero for noise
    for same in (itself, held):
        assert abs(same["kid"]) < 3 * same["kid_std"]
        assert noise["kid"] > 100 * (abs(same["kid"]) + same["kid_std"])

    # the same numbers from scratch: features of the generated noise and of the training set
    extractor = TinyCNN()
    real = extractor(train).double().numpy()
    fake = extractor(torch.cat(noise_module.generated)).double().numpy()
    assert noise["fid"] == pytest.approx(_frechet(real, fake), rel=1e-6)
    # KID with one subset of everything (both "subsets" are permutations of all the data)
    assert noise["kid"] == pytest.approx(_mmd2_unbiased_poly(real, fake), rel=1e-4)
    assert noise["kid_std"] == pytest.approx(0.0, abs=1e-9 * noise["kid"])


def test_fid_of_quantized_samples(digits: DigitsDataModule, tmp_path: Path) -> None:
    """quantize_samples maps a dequantized sample back to its digit exactly (quantize inverts
    dequantize), so replaying dequantized training digits scores FID ~0 with it and far more
    without; on continuous data the option is a one-line error."""
    train = digits.reference_dataset().x
    x64 = train.double()
    assert torch.equal(quantize(dequantize(x64, 17, torch.Generator().manual_seed(0)), 17), x64)
    noisy = dequantize(train, 17, torch.Generator().manual_seed(1))

    def fid_of(quantize_samples: bool) -> float:
        cb = FIDCallback(
            num_samples=train.shape[0], batch_size=500, feature_extractor=TinyCNN(),
            real_stats_cache_dir=str(tmp_path), compute_kid=False,
            quantize_samples=quantize_samples,
        )  # fmt: skip
        _trainer(tmp_path, [cb]).test(Replay(noisy), datamodule=digits, verbose=False)
        return cb.last_result["fid"]

    raw, quantized = fid_of(False), fid_of(True)
    assert abs(quantized) < 1e-3 * raw
    cb = FIDCallback(num_samples=4, feature_extractor=TinyCNN(), quantize_samples=True,
                     real_stats_cache_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(NoiseclsError, match=r"quantize_samples=true\) needs quantized data"):
        _trainer(tmp_path, [cb]).test(Replay(torch.zeros(4, 2)), datamodule=ToyDataModule(),
                                      verbose=False)  # fmt: skip


def test_real_statistics_cache(digits: DigitsDataModule, tmp_path: Path) -> None:
    cache = tmp_path / "stats"

    def run(dm: L.LightningDataModule, extractor: FeatureExtractor, cb: FIDCallback | None = None):
        cb = cb or FIDCallback(num_samples=64, batch_size=64, feature_extractor=extractor,
                               real_stats_cache_dir=str(cache), compute_kid=False)  # fmt: skip
        _trainer(tmp_path, [cb]).test(Noise(), datamodule=dm, verbose=False)
        return cb

    first = run(digits, TinyCNN())
    assert first.last_result["real_stats_source"] == "computed"
    assert first.cache_path is not None and first.cache_path.is_file()
    again = run(digits, TinyCNN(), first)
    assert again.last_result["real_stats_source"] == "memory"
    fresh = run(digits, TinyCNN())  # a new callback (a new process) reads the file
    assert fresh.last_result["real_stats_source"] == "cache"
    assert fresh.last_result["fid"] == first.last_result["fid"]
    assert fresh.cache_path == first.cache_path
    # the same data loaded differently, or built by LightningCLI (which adds _class_path /
    # _instantiator to the hyperparameters), share the statistics
    cli_built = DigitsDataModule(batch_size=32, eval_batch_size=16)
    cli_built.hparams.update(_class_path="noisecls.data.DigitsDataModule", _instantiator="x")
    shared = run(cli_built, TinyCNN())
    assert shared.last_result["real_stats_source"] == "cache"
    assert shared.cache_path == first.cache_path

    # keyed by extractor, by data (another split) and by transform (same digits, other resize)
    other_extractor = run(digits, TinyCNN(seed=1))
    other_split = run(DigitsDataModule(batch_size=64, seed=1), TinyCNN())
    nearest = run(DigitsDataModule(batch_size=64, image_size=16, upsample="nearest"), TinyCNN())
    padded = run(DigitsDataModule(batch_size=64, image_size=16, upsample="pad"), TinyCNN())
    runs = [other_extractor, other_split, nearest, padded]
    assert all(r.last_result["real_stats_source"] == "computed" for r in runs)
    assert len({first.cache_path, *(r.cache_path for r in runs)}) == 5
    assert len(list(cache.glob("*.pt"))) == 5 and not list(cache.glob(".*tmp"))

    # an unreadable cache file is recomputed (and rewritten), not trusted
    first.cache_path.write_bytes(b"not a torch file")
    healed = run(digits, TinyCNN())
    assert healed.last_result["real_stats_source"] == "computed"
    assert healed.last_result["fid"] == first.last_result["fid"]
    assert run(digits, TinyCNN()).last_result["real_stats_source"] == "cache"


# ================================================================================= Inception
def _random_inception_weights(path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Tensor]:
    """A file in torch-fidelity's format: the state dict of a randomly initialised
    FeatureExtractorInceptionV3 (the real weights cannot be downloaded here). Building one
    normally loads weights, so only for this construction the load is skipped."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with monkeypatch.context() as patch:
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: None)
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict",
                      lambda self, state, strict=True: None)  # fmt: skip
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(state, path)
    return state


def test_inception_features_from_a_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    weights = tmp_path / "inception.pth"
    saved = _random_inception_weights(weights, monkeypatch)

    features = InceptionFeatures(weights_path=str(weights))
    assert features.net is None  # constructing reads nothing
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = features(x)
    assert out.shape == (2, 2048) and out.dtype == torch.float32 and torch.isfinite(out).all()
    loaded = features.net.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)  # the file's weights, exactly
    gray = x[:, :1]
    assert torch.equal(features(gray), features(gray.expand(-1, 3, -1, -1)))
    assert features.identity().endswith(f"sha256={_sha(weights)}")

    # the torch hub location is used when no path is given
    hub = InceptionFeatures.hub_path()
    hub.parent.mkdir(parents=True)
    hub.write_bytes(weights.read_bytes())
    assert torch.equal(InceptionFeatures()(x), out)

    # missing files: one line naming the option, raised when the callback is set up
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(NoiseclsError) as info:
        InceptionFeatures(weights_path=str(missing)).check()
    message = str(info.value)
    assert "\n" not in message and str(missing) in message and "weights_path" in message
    hub.unlink()
    cb = FIDCallback(num_samples=4, feature_extractor=InceptionFeatures())
    with pytest.raises(NoiseclsError, match="allow_download") as info:
        _trainer(tmp_path, [cb]).test(Noise(), datamodule=DigitsDataModule(), verbose=False)
    assert "\n" not in str(info.value) and "weights_path" in str(info.value)
    # a file that is not torch-fidelity's state dict
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(NoiseclsError, match="cannot load Inception weights") as info:
        InceptionFeatures(weights_path=str(bad)).prepare()
    assert "\n" not in str(info.value)


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ================================================================================= NLL
@pytest.fixture(scope="module")
def mixture_data() -> ToyDataModule:
    dm = ToyDataModule(
        name="gmm", gmm_means=[[-1.5, 0.0], [1.5, 0.5], [0.0, -1.0]],
        gmm_covariances=[[[0.3, 0.0], [0.0, 0.3]], [[0.5, 0.2], [0.2, 0.3]],
                         [[0.2, 0.0], [0.0, 0.2]]],
        gmm_weights=[0.3, 0.3, 0.4], n_train=64, n_val=64, n_test=256, batch_size=64,
    )  # fmt: skip
    dm.setup()
    return dm


def test_nll_of_the_exact_denoiser(mixture_data: ToyDataModule, tmp_path: Path) -> None:
    """The callback's probability-flow ODE NLL (exact trace) of the exact denoiser matches the
    analytic log-density within 0.02 nats/dim, and its DDPM ELBO bounds the NLL from above."""
    oracle = mixture_data.oracle
    module = OracleModule(oracle)
    ode = NLLCallback(estimator="ode", trace="exact", num_steps=64, batch_size=100)
    elbo = NLLCallback(estimator="elbo", batch_size=100)
    _trainer(tmp_path, [ode, elbo]).test(module, datamodule=mixture_data, verbose=False)

    x = mixture_data.test_set.x.double()
    sigma_min = float(module.schedule.sampling_sigmas(2)[-2])  # where the ODE starts
    exact_noisy = -oracle.noisy_log_prob(x, 1.0, sigma_min).mean().item() / 2
    exact_clean = -oracle.log_prob(x).mean().item() / 2
    r = ode.last_result
    assert r["count"] == 256 and r["per_rank_count"] == [256]
    assert abs(r["nats_per_dim"] - exact_noisy) < 0.02, (r["nats_per_dim"], exact_noisy)
    assert r["bpd"] == pytest.approx(r["nats_per_dim"] / math.log(2))  # continuous data
    assert r["nfe"] == 4 * 64  # RK4: four denoiser evaluations per step

    bound = elbo.last_result
    assert bound["nfe"] == 1000  # L_0 and the T - 1 levels 2..T
    assert bound["nats_per_dim"] > exact_clean  # an upper bound ...
    assert bound["nats_per_dim"] < exact_clean + 0.5  # ... and a tight one for the exact model
    assert bound["nats_per_dim"] > r["nats_per_dim"]
    # a worse denoiser: a worse bound
    worse = NLLCallback(estimator="elbo", batch_size=100)
    _trainer(tmp_path, [worse]).test(OracleModule(oracle, 0.9), mixture_data, verbose=False)
    assert worse.last_result["nats_per_dim"] > bound["nats_per_dim"] + 0.1


class AdaptiveOracle(OracleModule):
    """OracleModule whose log_likelihood exposes the ODE's solver options (as a method passes
    them to ``ode_likelihood``) and remembers the NFE the estimator reported."""

    def log_likelihood(self, x, *, estimator="ode", solver="rk4", rtol=1e-5, atol=1e-5,
                       trace="hutchinson", num_probes=1, num_steps=64, generator=None):  # type: ignore[no-untyped-def]  # fmt: skip
        low, high = self.schedule.sigma_range()
        out = ode_likelihood(self.denoiser(), x, sigma_min=low, sigma_max=high,
                             prior_std=self.schedule.terminal_std(high), solver=solver, rtol=rtol,
                             atol=atol, trace=trace, num_probes=num_probes, num_steps=num_steps,
                             generator=generator)  # fmt: skip
        self.reported_nfe = out.nfe
        return out.log_likelihood


def test_nll_with_the_adaptive_solver_names_it_in_the_results(
    mixture_data: ToyDataModule, tmp_path: Path
) -> None:
    module = AdaptiveOracle(mixture_data.oracle)
    cb = NLLCallback(estimator="ode", solver="dopri5", rtol=1e-4, atol=1e-4, num_probes=2,
                     num_samples=64, batch_size=64)  # fmt: skip
    trainer = _trainer(tmp_path, [cb])
    trainer.test(module, datamodule=mixture_data, verbose=False)
    record = next(r for r in metric_records(trainer) if r.metric == "test/nll_bpd")
    assert record.sampler == "ode(dopri5,rtol=0.0001,atol=0.0001,hutchinson,K=2)"
    assert record.nfe == module.reported_nfe > 6  # the callback counted what the solver did
    x = mixture_data.test_set.x[:64].double()
    exact = -mixture_data.oracle.noisy_log_prob(x, 1.0, module.schedule.sigma_range()[0]).mean()
    assert abs(cb.last_result["nats_per_dim"] - float(exact) / 2) < 0.05


class UniformDensity(_EvalOnly):
    """The uniform density on [-1, 1]^D (log p = -D log 2); records what it is asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def log_likelihood(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self.seen.append(x.clone())
        return torch.full((x.shape[0],), -x[0].numel() * math.log(2), dtype=torch.float64)


def test_bits_per_dim_of_dequantized_digits(digits: DigitsDataModule, tmp_path: Path) -> None:
    """17-level digits, uniformly dequantized: a uniform model costs exactly log2(17) bits/dim,
    and what the model sees lies inside each pixel's bin, off the grid."""
    module = UniformDensity()
    cb = NLLCallback(num_samples=100, batch_size=32)
    _trainer(tmp_path, [cb]).test(module, datamodule=digits, verbose=False)
    assert cb.last_result["count"] == 100
    assert cb.last_result["bpd"] == pytest.approx(math.log2(17), abs=1e-9)
    assert cb.last_result["nfe"] is None  # this model has no denoiser to count
    seen = torch.cat(module.seen)
    clean = digits.test_set.x[:100]
    low = torch.round((clean + 1) / 2 * 16) / 17 * 2 - 1  # bin k covers [k/17, (k+1)/17)·2 - 1
    assert seen.shape == clean.shape
    assert (seen >= low - 1e-6).all() and (seen <= low + 2 / 17 + 1e-6).all()
    offset = (seen - low) / (2 / 17)  # uniform in [0, 1) within the bin
    assert 0.45 < offset.mean() < 0.55 and 0.07 < offset.var() < 0.1  # U[0, 1): 1/2, 1/12


# ================================================================================= denoising
def test_denoising_mse_against_the_analytic_mmse(tmp_path: Path) -> None:
    """One Gaussian N(0, diag(2, 0.5)): the MMSE at sigma is mean_i v_i s² / (v_i + s²)."""
    variances = torch.tensor([2.0, 0.5], dtype=torch.float64)
    dm = ToyDataModule(
        name="gmm", gmm_means=[[0.0, 0.0]], gmm_covariances=[[[2.0, 0.0], [0.0, 0.5]]],
        n_train=16, n_val=16, n_test=4000, batch_size=16,
    )  # fmt: skip
    sigmas = [0.1, 0.5, 1.0, 3.0, 10.0]
    exact = DenoisingMSECallback(sigmas=sigmas, num_samples=None, batch_size=1000)
    worse = DenoisingMSECallback(sigmas=sigmas, num_samples=None, batch_size=1000, plot=False)
    _trainer(tmp_path, [exact]).test(OracleModule(dm.oracle), datamodule=dm, verbose=False)
    _trainer(tmp_path / "worse", [worse]).test(OracleModule(dm.oracle, 0.8), dm, verbose=False)

    r = exact.last_result
    assert r["count"] == 4000 and r["mse"] == r["oracle_mse"]  # the model is the oracle
    s2 = torch.tensor(sigmas, dtype=torch.float64)[:, None] ** 2
    mmse = (variances * s2 / (variances + s2)).mean(1)
    # per-example squared errors are ~chi-square: relative standard error ~ sqrt(2 / 4000)
    assert torch.allclose(torch.tensor(r["mse"], dtype=torch.float64), mmse, rtol=0.08), mmse
    assert all(w > e for w, e in zip(worse.last_result["mse"], r["mse"], strict=True))
    assert worse.last_result["oracle_mse"] == r["oracle_mse"]  # same data, same noise

    with open(r["csv"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["sigma", "mse", "oracle_mse"]
    assert [float(v) for v in rows[3]] == pytest.approx([sigmas[2], r["mse"][2], r["mse"][2]])
    assert Path(r["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ================================================================================= EMA
def test_metrics_see_the_ema_weights(tmp_path: Path) -> None:
    """During fit the metric callbacks run while EMAWeightAveraging has the EMA weights in, even
    when listed after it: the last validation's denoising MSE equals that of the EMA weights in
    the checkpoint, not that of the raw ones."""
    dm = ToyDataModule(n_train=512, n_val=128, n_test=128, batch_size=128)
    sigmas = [0.3, 1.0, 3.0]

    def ddm() -> DDM:
        net = ResidualMLP(dim=2, hidden=32, num_blocks=1)
        return DDM(net=net, schedule=DiscreteSchedule("linear"), data_shape=(2,),
                   optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))  # fmt: skip

    ema = EMAWeightAveraging(decay=0.5)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    during = DenoisingMSECallback(sigmas=sigmas, plot=False)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=8, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
        callbacks=[ema, checkpoint, during],
    )  # fmt: skip
    torch.manual_seed(0)
    trainer.fit(ddm(), datamodule=dm)
    assert trainer.callbacks.index(during) < trainer.callbacks.index(ema)
    assert trainer.current_epoch == 2 and during.last_result["count"] == 128

    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    mse = {}
    for name in ("state_dict", "current_model_state"):  # EMA weights, raw weights
        module = ddm()
        module.load_state_dict(state[name])
        cb = DenoisingMSECallback(sigmas=sigmas, plot=False)
        trainer = _trainer(tmp_path, [cb], limit_val_batches=1)
        trainer.validate(module, datamodule=dm, verbose=False)
        mse[name] = cb.last_result["mse"]
    assert during.last_result["mse"] == pytest.approx(mse["state_dict"], rel=1e-6)
    assert during.last_result["mse"] != pytest.approx(mse["current_model_state"], rel=1e-3)


# ================================================================================= results
def test_results_file_and_wandb_table(mixture_data: ToyDataModule, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="noisecls-tests")
    writer = ResultsWriter(path_dir=str(tmp_path / "results"))
    callbacks = [
        NLLCallback(estimator="ode", trace="exact", num_steps=8, num_samples=32),
        DenoisingMSECallback(sigmas=[0.5, 2.0], num_samples=64),
        writer,
    ]
    trainer = _trainer(tmp_path, callbacks, logger=logger)
    trainer.test(OracleModule(mixture_data.oracle), datamodule=mixture_data, verbose=False)
    logger.experiment.finish()

    payload = json.loads((tmp_path / "results" / "results.json").read_text())
    records = {r["metric"]: r for r in payload["records"]}
    assert payload["world_size"] == 1 and payload["model"].endswith("OracleModule")
    nll = records["test/nll_bpd"]
    assert nll["samples"] == 32 and nll["sampler"] == "ode(rk4,8,exact)" and nll["nfe"] == 32
    assert nll["value"] == pytest.approx(callbacks[0].last_result["bpd"])
    assert records["test/denoise_mse/sigma=2"]["samples"] == 64
    assert records["test/denoise_mse_oracle/sigma=0.5"]["per_rank_samples"] == [64]
    assert "test/loss" in records  # other logged test values join with empty columns

    text = (tmp_path / "results" / "results.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]  # the note follows
    assert table[0] == "| metric | value | samples | sampler | NFE | seconds |"
    assert "KID" in text.split(table[-1])[1]  # the note after the table explains the units
    assert len(table) == 2 + len(records)
    nll_row = next(line for line in table if line.startswith("| test/nll_bpd |"))
    assert nll_row.split(" | ")[2:5] == ["32", "ode(rk4,8,exact)", "32"]

    # the same table went to W&B (offline run files)
    tables = list(tmp_path.glob("wandb/offline-run-*/files/media/table/test/results_*.table.json"))
    assert len(tables) == 1
    logged = json.loads(tables[0].read_text())
    assert logged["columns"] == ["metric", "value", "samples", "sampler", "NFE", "seconds"]
    assert [row[0] for row in logged["data"]] == [r["metric"] for r in payload["records"]]


def test_denoising_mse_off_the_distribution_scales_the_input_noise() -> None:
    """noise_scale m: the input is x0 + m·sigma·eps while the denoiser is told sigma; with the
    identity denoiser the MSE is then (m·sigma)² per element, and the curve has its own name."""
    from noisecls.callbacks import DenoisingMSECallback

    x0 = torch.zeros(4096, 2, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    told = []

    def identity(x, sigma):
        told.append(float(sigma[0]))
        return x

    for scale in (1.0, 1.5):
        callback = DenoisingMSECallback(sigmas=[0.5, 2.0], noise_scale=scale)
        mse = callback._errors(identity, x0, eps, callback.sigmas, {}).mean(0)
        expected = torch.tensor([0.5, 2.0], dtype=torch.float64) ** 2 * scale**2
        torch.testing.assert_close(mse, expected * eps.pow(2).mean(), rtol=1e-12, atol=0)
    assert told == [0.5, 2.0, 0.5, 2.0]
    with pytest.raises(ValueError, match="noise_scale"):
        DenoisingMSECallback(noise_scale=0.0)
