"""DG's precomputed feature cache (noisecls.methods.dg_features).

Ground truth: each stored row must be the extractor's features of ITS example diffused on the VP
SDE at the stored time, x = alpha(t)·x_i + sigma(t)·eps. With an analytic extractor (the pixel
mean) the residual (f - alpha·mean(x_i)) / (sigma / sqrt(D)) is then exactly N(0, 1) and the
times follow DG's importance density; a misaligned row or a wrong time breaks both.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from test_data import _write_cifar  # tiny CIFAR-10 in the real format
from torch import Tensor

from noisecls.data import DigitsDataModule
from noisecls.data.fake import RealFakeDataModule
from noisecls.errors import NoiseclsError
from noisecls.methods.ddm import DDM
from noisecls.methods.dg import DG
from noisecls.methods.dg_features import (
    FeatureCache,
    FeatureCacheBuilder,
    FeatureCacheConfig,
)
from noisecls.nets import ScalarHead, UNet
from noisecls.process.schedules import DiscreteSchedule, LogSNRSchedule

VP = LogSNRSchedule(kind="linear", beta_min=0.1, beta_max=20.0)
T_MIN = 1e-5
STEPS = 400


def flipped_digits_fake(root: Path) -> RealFakeDataModule:
    """Real digits vs all 1797 digits flipped upside down (an easy 'imperfect model'); every
    split is balanced (train 1437 / 1437, validation 180 / 180)."""
    real = DigitsDataModule(batch_size=64, use_labels=False)
    real.setup("fit")
    sets = (real.train_set, real.val_set, real.test_set)
    x = torch.cat([torch.stack([d[i][0] for i in range(len(d))]) for d in sets]).flip(-2)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / f"samples_00000000-{len(x) - 1:08d}.npz", samples=x.numpy(),
             seeds=np.arange(len(x), dtype=np.int64))  # fmt: skip
    sizes = {"fake_val_size": len(real.val_set), "fake_test_size": len(real.test_set)}
    return RealFakeDataModule(DigitsDataModule(batch_size=64, use_labels=False), str(root),
                              batch_size=64, **sizes)  # fmt: skip


class PixelMean:
    """Analytic extractor: the mean over pixels of x_vp, [B, 1, 1, 1]; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x_vp: Tensor, tau: Tensor, class_labels: Tensor | None) -> Tensor:
        self.calls += 1
        return x_vp.mean(dim=(1, 2, 3), keepdim=True)


def builder(dataset, extractor, directory: Path, **options) -> FeatureCacheBuilder:
    config = FeatureCacheConfig(**{"draws": 4, "dtype": "float32", "chunk_size": 64,
                                   "directory": str(directory), **options})  # fmt: skip
    state = {"anchor": torch.zeros(1)}
    return FeatureCacheBuilder(extractor, state, dataset, VP, T_MIN, config, seed=3,
                               use_labels=False, device=torch.device("cpu"))  # fmt: skip


def no_barrier(name: str) -> None:
    """Single process: nothing to wait for."""


@pytest.fixture(scope="module")
def real_fake(tmp_path_factory: pytest.TempPathFactory) -> RealFakeDataModule:
    dm = flipped_digits_fake(tmp_path_factory.mktemp("fake"))
    dm.setup("fit")
    return dm


def test_cached_rows_are_forward_marginal_features_of_their_examples(
    real_fake: RealFakeDataModule, tmp_path: Path
) -> None:
    dataset = real_fake.train_set
    extractor = PixelMean()
    cache = builder(dataset, extractor, tmp_path).build(0, 1, no_barrier)
    n = len(dataset)
    assert cache.features.shape == (n, 4, 1, 1, 1) and cache.times.shape == (n, 4)
    means = torch.stack([dataset[i][0].mean() for i in range(n)]).double()
    t = cache.times
    f = torch.from_numpy(np.asarray(cache.features)).reshape(n, 4).double()
    residual = (f - VP.alpha(t) * means[:, None]) / (VP.sigma(t) / math.sqrt(64))
    assert abs(float(residual.mean())) < 0.05 and abs(float(residual.std()) - 1) < 0.05
    # a row shifted by one example is far off (the check above can fail)
    shifted = (f.roll(1, 0) - VP.alpha(t) * means[:, None]) / (VP.sigma(t) / 8)
    assert float(shifted.std()) > 1.5
    # times follow DG's importance density: uniform in log-SNR on [lambda(1), lambda(t_min)]
    lam = VP.lambda_(t.reshape(-1))
    ends = VP.lambda_(torch.tensor([1.0, T_MIN], dtype=torch.float64))
    u = ((lam - ends[0]) / (ends[1] - ends[0])).sort().values
    ks = (u - torch.arange(1, u.numel() + 1, dtype=torch.float64) / u.numel()).abs().max()
    assert float(ks) < 0.03


def test_cache_is_reused_independent_of_ranks_and_built_atomically(
    real_fake: RealFakeDataModule, tmp_path: Path
) -> None:
    dataset = real_fake.train_set
    one = builder(dataset, PixelMean(), tmp_path / "one").build(0, 1, no_barrier)
    # two ranks, stage by stage (what build() does with barriers in between)
    two = builder(dataset, PixelMean(), tmp_path / "two")
    (two.partial / "stale").mkdir(parents=True)  # left by an interrupted build
    two.create()
    two.fill(1, 2)
    two.fill(0, 2)
    two.finalize()
    assert not two.partial.exists() and two.ready()
    np.testing.assert_array_equal(np.asarray(FeatureCache(two.path).features),
                                  np.asarray(one.features))  # fmt: skip
    torch.testing.assert_close(FeatureCache(two.path).times, one.times, rtol=0, atol=0)
    # the same inputs find the entry without running the extractor
    again_extractor = PixelMean()
    again = builder(dataset, again_extractor, tmp_path / "one").build(0, 1, no_barrier)
    assert again_extractor.calls == 0 and again.path == one.path
    # anything the features depend on changes the key
    assert builder(dataset, PixelMean(), tmp_path / "one", draws=2).key != one.path.name
    assert builder(real_fake.val_set, PixelMean(), tmp_path / "one").key != one.path.name


def tiny_unet(channels: int, size: int, head: ScalarHead | None = None) -> UNet:
    return UNet(image_size=size, in_channels=channels, model_channels=8, channel_mult=[1, 2],
                num_res_blocks=1, attention_resolutions=[], dropout=0.0, head=head)  # fmt: skip


def digits_ddm(seed: int) -> DDM:
    torch.manual_seed(seed)
    return DDM(tiny_unet(1, 8), DiscreteSchedule(kind="linear"), data_shape=(1, 8, 8))


class ExtractorCallsInTraining(L.Callback):
    """Counts extractor forward calls made inside training steps."""

    def __init__(self) -> None:
        self.active, self.calls, self.steps = False, 0, 0

    def hook(self, module: torch.nn.Module, args: tuple, out: Tensor) -> None:
        self.calls += int(self.active)

    def on_train_batch_start(self, *args: object) -> None:
        self.active = True
        self.steps += 1

    def on_train_batch_end(self, *args: object) -> None:
        self.active = False


def train_discriminator(
    data: RealFakeDataModule, root: Path, cache: FeatureCacheConfig | None
) -> tuple[DG, dict[str, float], ExtractorCallsInTraining]:
    torch.manual_seed(5)
    dg = DG(tiny_unet(16, 4, ScalarHead()), score_model=digits_ddm(0), feature_model=digits_ddm(1),
            feature_cache=cache, optimizer=lambda p: torch.optim.Adam(p, lr=2e-3),
            val_bins=4)  # fmt: skip
    counter = ExtractorCallsInTraining()
    dg.discriminator.features.register_forward_hook(counter.hook)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=STEPS, val_check_interval=STEPS,
        check_val_every_n_epoch=None, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(root),
        callbacks=[counter],
    )  # fmt: skip
    trainer.fit(dg, datamodule=data)
    return dg, {k: float(v) for k, v in trainer.callback_metrics.items()}, counter


@pytest.mark.slow  # default-suite budget (CI: 15 min on 2 cores)
def test_dg_trains_on_cached_features_without_running_the_extractor(
    real_fake: RealFakeDataModule, tmp_path: Path
) -> None:
    """Real vs flipped digits on the features of a frozen (randomly initialised) extractor:
    trained on cached features (4 draws per example) the discriminator is as good as trained
    with live features and fresh noise, judged on live features at fresh noise (validation)."""
    config = FeatureCacheConfig(draws=4, directory=str(tmp_path / "cache"))
    dg, cached, counter = train_discriminator(real_fake, tmp_path, config)
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    assert dg.cached_features is not None and len(dg.cached_features) == len(real_fake.train_set)
    assert counter.steps == STEPS and counter.calls == 0  # training never ran the extractor
    _, live, live_counter = train_discriminator(real_fake, tmp_path, None)
    assert live_counter.calls == STEPS
    chance = math.log(2)  # BCE of the best constant on the balanced validation split
    small_t = "val/bce_t0.00-0.25"
    assert cached[small_t] < 0.8 * chance and cached[small_t] < live[small_t] + 0.05, (
        cached,
        live,
    )
    assert abs(cached["val/acc_t0.75-1.00"] - 0.5) < 0.1  # pure noise: chance


def test_feature_cache_needs_an_extractor() -> None:
    with pytest.raises(NoiseclsError, match="feature_cache caches"):
        DG(tiny_unet(1, 8, ScalarHead()), score_model=digits_ddm(0),
           feature_cache=FeatureCacheConfig())  # fmt: skip


def test_cache_is_built_from_unaugmented_examples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random flips make the real training items random; the cache is keyed and filled from
    the same split without augmentation (same indices and targets), so every rank and every run
    finds the same entry."""
    import torchvision.datasets.cifar as tv_cifar

    from noisecls.data import CIFAR10DataModule

    _write_cifar(tmp_path)  # torchvision checks the official md5s: existence only here
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())
    fake = tmp_path / "fake"
    fake.mkdir()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    np.savez(fake / "samples_00000000-00000007.npz", samples=x.numpy(), seeds=np.arange(8))
    dm = RealFakeDataModule(CIFAR10DataModule(str(tmp_path), batch_size=4, random_flip=True,
                                              val_split=4, num_workers=0),
                            str(fake), batch_size=4, fake_val_size=2, fake_test_size=0)  # fmt: skip
    dm.setup("fit")
    plain = dm.unaugmented_train_set()
    assert len(plain) == len(dm.train_set) == 16 + 6
    reads = torch.stack([dm.train_set[0][0] for _ in range(16)])
    assert not torch.equal(reads.amin(0), reads.amax(0))  # the training item is flipped at random
    for i in range(len(plain)):
        assert torch.equal(plain[i][0], plain[i][0]) and torch.equal(
            plain[i][1], dm.train_set[i][1]
        )
    assert torch.equal(reads[0], plain[0][0]) or torch.equal(reads[0], plain[0][0].flip(-1))
    keys = {builder(plain, PixelMean(), tmp_path / "c").key for _ in range(2)}
    assert len(keys) == 1
