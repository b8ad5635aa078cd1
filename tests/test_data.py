"""DataModules: toys, sklearn digits, CIFAR-10 (tiny copy in the real pickle format), image
folders and EDM-style zips (tiny PNGs), missing-data errors, world-size batch division."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import PIL.Image
import pytest
import torch

from noisecls.data import (
    AFHQ64DataModule,
    BatchSizeError,
    CelebA64DataModule,
    CIFAR10DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    FFHQ64DataModule,
    ImageFolderDataModule,
    ImageResolutionError,
    ToyDataModule,
    per_device_batch_size,
)
from noisecls.data.base import NoiseclsDataModule
from noisecls.errors import NoiseclsError
from noisecls.oracles import GaussianMixture

LEVELS_17 = torch.arange(17, dtype=torch.float32) / 16 * 2 - 1


def _all(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def _attach(dm: L.LightningDataModule, world_size: int) -> None:
    """Stand-in for a trainer: DataModules read its world size, rank and global step."""
    dm.trainer = SimpleNamespace(world_size=world_size, global_rank=0, global_step=0)  # type: ignore[assignment]


def _assert_one_line_error(err: BaseException, *needles: str) -> None:
    msg = str(err)
    assert "\n" not in msg, msg
    assert isinstance(err, FileNotFoundError) and isinstance(err, NoiseclsError)
    for needle in needles:
        assert needle in msg, (needle, msg)


# ============================================================================ batch division
def test_per_device_batch_size() -> None:
    assert per_device_batch_size(128, 1) == 128
    assert per_device_batch_size(128, 4) == 32
    with pytest.raises(BatchSizeError, match="divisible by the world size"):
        per_device_batch_size(128, 3)


# ============================================================================ toys
@pytest.mark.parametrize("name", ["gmm", "moons", "checkerboard", "spirals"])
def test_toy_shapes_and_determinism(name: str) -> None:
    dm = ToyDataModule(name, n_train=3000, n_val=500, n_test=400, batch_size=64)
    assert dm.data_shape == (2,) and dm.num_bins is None
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 2) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    xv, yv = _all(dm.val_dataloader())
    xt, _ = _all(dm.test_dataloader())
    assert xv.shape == (500, 2) and xt.shape == (400, 2) and yv.shape == (500,)
    assert len(dm.train_dataloader()) == 3000 // 64  # last partial batch dropped
    assert torch.isfinite(dm.train_set.x).all()
    if dm.num_classes is None:
        assert (dm.train_set.y == 0).all()
    else:
        assert set(dm.train_set.y.unique().tolist()) == set(range(dm.num_classes))

    same = ToyDataModule(name, n_train=3000, n_val=500, n_test=400)
    same.setup()
    assert torch.equal(same.train_set.x, dm.train_set.x)
    assert torch.equal(same.val_set.x, dm.val_set.x)
    other = ToyDataModule(name, n_train=3000, n_val=500, n_test=400, seed=1)
    other.setup()
    assert not torch.equal(other.train_set.x, dm.train_set.x)
    assert not torch.equal(dm.val_set.x[:400], dm.test_set.x)  # independent splits

    # the shuffle is seeded by the DataModule's seed: same order on a fresh instance
    assert torch.equal(next(iter(same.train_dataloader()))[0][:64], x)


@pytest.mark.parametrize("name", ["moons", "checkerboard", "spirals"])
def test_toy_standardised(name: str) -> None:
    dm = ToyDataModule(name, n_train=20000)
    dm.setup()
    x = dm.train_set.x.double()
    assert x.mean(0).abs().max() < 0.05
    assert ((x.std(0) - 1).abs() < 0.05).all(), x.std(0)
    assert dm.oracle is None


def test_gmm_matches_oracle() -> None:
    dm = ToyDataModule("gmm", n_train=20000)
    oracle = dm.oracle
    assert isinstance(oracle, GaussianMixture)
    assert oracle.num_components == 8 and dm.num_classes == 8
    radius = oracle.means.norm(dim=1)
    assert torch.allclose(radius, torch.full_like(radius, 4.0))
    assert torch.allclose(oracle.covariances, 0.25 * torch.eye(2, dtype=torch.float64))
    dm.setup()
    x, comp = dm.train_set.x.double(), dm.train_set.y
    assert (x.mean(0) - oracle.mean()).abs().max() < 0.1
    cov = torch.cov(x.T)
    assert ((cov - oracle.covariance()).abs() / oracle.covariance().diagonal().max()).max() < 0.05
    # y is the mixture component: points lie within a few std of their component's mean
    dist = (x - oracle.means[comp]).norm(dim=1)
    assert dist.max() < 0.5 * 6
    # the base class's covariance is the (unbiased) covariance of the training split
    assert torch.allclose(dm.train_covariance(), cov, atol=1e-8)
    eig = dm.train_covariance_eigenvalues()
    assert eig.shape == (2,) and torch.allclose(eig.sum(), cov.trace())


def test_gmm_custom_parameters() -> None:
    covs = [
        [[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.2]],
        [[0.3, 0, 0], [0, 0.3, 0], [0, 0, 2]],
    ]
    dm = ToyDataModule(
        "gmm",
        n_train=20000,
        gmm_means=[[-2.0, 0.0, 1.0], [2.0, 1.0, -1.0]],
        gmm_covariances=covs,
        gmm_weights=[0.3, 0.7],
    )
    assert dm.data_shape == (3,) and dm.num_classes == 2
    assert torch.allclose(dm.oracle.weights, torch.tensor([0.3, 0.7], dtype=torch.float64))
    dm.setup()
    x = dm.train_set.x.double()
    assert (x.mean(0) - dm.oracle.mean()).abs().max() < 0.08
    assert (torch.cov(x.T) - dm.oracle.covariance()).abs().max() < 0.15
    assert abs(float((dm.train_set.y == 1).double().mean()) - 0.7) < 0.02
    with pytest.raises(ValueError, match="noise"):
        ToyDataModule("gmm", noise=0.1)


# ============================================================================ digits
def test_digits_split_values_labels() -> None:
    from sklearn.datasets import load_digits

    dm = DigitsDataModule(batch_size=128)
    assert dm.data_shape == (1, 8, 8) and dm.num_bins == 17 and dm.num_classes == 10
    dm.setup("fit")
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sizes == [1437, 180, 180]
    idx = dm.split_indices
    every = torch.cat([idx["train"], idx["val"], idx["test"]])
    assert torch.equal(every.sort().values, torch.arange(1797))  # disjoint and complete

    ref = load_digits()
    for split in ("train", "val", "test"):
        ds = getattr(dm, f"{split}_set")
        raw = torch.as_tensor(ref.images[idx[split].numpy()], dtype=torch.float32)
        assert torch.allclose(ds.x[:, 0], raw / 16 * 2 - 1)
        assert torch.equal(ds.y, torch.as_tensor(ref.target[idx[split].numpy()]))
    x, y = _all(dm.val_dataloader())
    assert torch.equal(x, dm.val_set.x) and torch.equal(y, dm.val_set.y)  # no shuffle
    values = dm.train_set.x.unique()
    assert torch.equal(values, LEVELS_17)  # exactly the 17 levels, every one used
    assert x.min() == -1 and x.max() == 1

    same = DigitsDataModule(seed=0)
    same.setup()
    assert torch.equal(same.split_indices["val"], idx["val"])
    other = DigitsDataModule(seed=3)
    other.setup()
    assert not torch.equal(other.split_indices["val"], idx["val"])


def test_digits_world_size_and_options() -> None:
    dm = DigitsDataModule(batch_size=128, eval_batch_size=100, use_labels=False)
    assert dm.num_classes is None
    _attach(dm, 2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and (y == 0).all()
    assert next(iter(dm.val_dataloader()))[0].shape[0] == 50
    _attach(dm, 3)
    with pytest.raises(BatchSizeError, match="batch_size=128"):
        dm.train_dataloader()

    for size, mode in ((16, "nearest"), (32, "pad")):
        big = DigitsDataModule(image_size=size, upsample=mode)
        assert big.data_shape == (1, size, size)
        big.setup()
        xb = big.train_set.x
        assert xb.shape[1:] == (1, size, size)
        assert torch.isin(xb.unique(), LEVELS_17).all()
        if mode == "nearest":
            small = torch.nn.functional.avg_pool2d(xb, size // 8)
            assert torch.allclose(torch.nn.functional.interpolate(small, scale_factor=2), xb)
        else:
            pad = (size - 8) // 2
            assert (xb[..., :pad, :] == -1).all() and (xb[..., :, -pad:] == -1).all()
    with pytest.raises(ValueError, match="image_size"):
        DigitsDataModule(image_size=12)


def test_digits_in_a_real_trainer() -> None:
    """A short fit + validate through Lightning: batches reach the module as (x, y)."""

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(64, 1)
            self.shapes: list[tuple[tuple[int, ...], torch.dtype]] = []

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            self.shapes.append((tuple(x.shape), y.dtype))
            return self.lin(x.flatten(1)).pow(2).mean()

        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            self.shapes.append((tuple(batch[0].shape), batch[1].dtype))

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.01)

    probe = Probe()
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        val_check_interval=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(probe, datamodule=DigitsDataModule(batch_size=32))
    assert probe.shapes[:2] == [((32, 1, 8, 8), torch.int64)] * 2
    assert probe.shapes[-1] == ((32, 1, 8, 8), torch.int64)


class _BatchRecorder(L.LightningModule):
    """Records every training / validation x it is given (a linear model, so fits are fast)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 1)
        self.train_x: list[torch.Tensor] = []
        self.val_x: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.train_x.append(batch[0].clone())
        return self.lin(batch[0].flatten(1)).pow(2).mean()

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.val_x.append(batch[0].clone())

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit_recording(dequantize_train: bool) -> _BatchRecorder:
    recorder = _BatchRecorder()
    trainer = L.Trainer(
        max_steps=3, accumulate_grad_batches=2, limit_val_batches=1, num_sanity_val_steps=0,
        val_check_interval=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    dm = DigitsDataModule(batch_size=32, dequantize_train=dequantize_train)
    trainer.fit(recorder, datamodule=dm)
    return recorder


def test_digits_dequantized_training_batches() -> None:
    """dequantize_train: training batches are the lattice batches plus uniform noise inside each
    pixel's bin (bins of width 2/17 tiling [-1, 1]), fresh per micro-batch, reproducible;
    validation batches stay on the lattice."""
    plain, deq = _fit_recording(False), _fit_recording(True)
    assert len(deq.train_x) == len(plain.train_x) == 6  # 3 optimizer steps x 2 micro-batches
    for lattice, x in zip(plain.train_x, deq.train_x, strict=True):
        assert torch.isin(lattice, LEVELS_17).all() and not torch.isin(x, LEVELS_17).any()
        position = (x + 1) / 2 * 17  # = k + u with k the lattice level, u ~ U[0, 1)
        k = torch.floor(position)
        assert torch.equal(k / 16 * 2 - 1, lattice)
    u = torch.cat([(x + 1) / 2 * 17 - torch.floor((x + 1) / 2 * 17) for x in deq.train_x])
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    u_first, u_second = ((x + 1) / 2 * 17 % 1 for x in deq.train_x[:2])  # one optimizer step
    assert not torch.allclose(u_first, u_second)
    assert all(torch.isin(v, LEVELS_17).all() for v in deq.val_x) and deq.val_x
    again = _fit_recording(True)
    assert all(torch.equal(a, b) for a, b in zip(deq.train_x, again.train_x, strict=True))


def test_dequantization_noise_does_not_depend_on_world_size() -> None:
    """Rank r of 2 gets rows r·n .. (r+1)·n - 1 of the noise a 1-rank run draws."""
    x = LEVELS_17[torch.randint(0, 17, (8, 1, 8, 8), generator=torch.Generator().manual_seed(0))]
    y = torch.zeros(8, dtype=torch.long)

    def hook(world_size: int, rank: int, rows: slice) -> torch.Tensor:
        dm = DigitsDataModule(batch_size=8, dequantize_train=True)
        dm.trainer = SimpleNamespace(  # type: ignore[assignment]
            training=True, global_step=5, global_rank=rank, world_size=world_size
        )
        return dm.on_after_batch_transfer((x[rows], y[rows]), 0)[0]

    whole = hook(1, 0, slice(0, 8))
    halves = torch.cat([hook(2, 0, slice(0, 4)), hook(2, 1, slice(4, 8))])
    assert torch.equal(whole, halves) and not torch.equal(whole, x)

    class Continuous(NoiseclsDataModule):
        data_shape = (2,)

    with pytest.raises(ValueError, match="dequantize_train needs quantized data"):
        Continuous(batch_size=4, dequantize_train=True)


# ============================================================================ CIFAR-10
CIFAR_PER_BATCH = 4


def _cifar_image(i: int) -> np.ndarray:
    """A left-right asymmetric 32x32x3 image unique to index i (HWC uint8)."""
    rng = np.random.default_rng(i)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    img[:, 0, 0] = i  # column 0 marks the index
    img[:, 31, 0] = 255 - i
    return img


def _write_cifar(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A tiny cifar-10-batches-py in the real format (python pickle dicts, data [N, 3072] CHW)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        ids = range(b * CIFAR_PER_BATCH, (b + 1) * CIFAR_PER_BATCH)
        imgs = np.stack([_cifar_image(i) for i in ids])
        labels = [i % 10 for i in ids]
        entry = {
            "batch_label": f"batch {b}",
            "labels": labels,
            "data": imgs.transpose(0, 3, 1, 2).reshape(len(ids), -1),
            "filenames": [f"img_{i}.png" for i in ids],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[name] = (imgs, labels)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"], "num_cases_per_batch": CIFAR_PER_BATCH,
            "num_vis": 3072}  # fmt: skip
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return written


@pytest.fixture
def tiny_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tiny CIFAR-10 loaded by the real torchvision CIFAR10 class.

    torchvision verifies each file against the md5 of the OFFICIAL files
    (``CIFAR10._check_integrity`` and ``_load_meta`` both call the module-level
    ``torchvision.datasets.cifar.check_integrity(path, md5)``), which no synthetic file can pass.
    The only override: that one function is replaced by an existence check for this test. The
    DataModule, the CIFAR10 class and its pickle loading run unchanged.
    """
    import torchvision.datasets.cifar as tv_cifar

    _write_cifar(tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    return tmp_path


def _expected(img_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img_hwc).permute(2, 0, 1).float() / 255 * 2 - 1


def test_cifar_values_labels_splits(tiny_cifar: Path) -> None:
    dm = CIFAR10DataModule(str(tiny_cifar), batch_size=4, use_labels=True, num_workers=0)
    assert dm.data_shape == (3, 32, 32) and dm.num_bins == 256 and dm.num_classes == 10
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 5 * CIFAR_PER_BATCH and len(dm.test_set) == CIFAR_PER_BATCH
    assert dm.val_set is dm.test_set  # val_split=0: validation = the test set
    xt, yt = _all(dm.test_dataloader())
    expected = torch.stack([_expected(_cifar_image(20 + i)) for i in range(CIFAR_PER_BATCH)])
    assert xt.dtype == torch.float32 and torch.allclose(xt, expected, atol=1e-6)
    assert yt.tolist() == [(20 + i) % 10 for i in range(CIFAR_PER_BATCH)]

    held = CIFAR10DataModule(str(tiny_cifar), batch_size=4, val_split=4, num_workers=0)
    assert held.num_classes is None
    held.setup()
    assert len(held.train_set) == 16 and len(held.val_set) == 4 and len(held.test_set) == 4
    xv, yv = _all(held.val_dataloader())
    xr, _ = _all(torch.utils.data.DataLoader(held.reference_dataset(), batch_size=16))
    marks = lambda x: set(((x[:, 0, 0, 0] + 1) / 2 * 255).round().int().tolist())  # noqa: E731
    assert marks(xv).isdisjoint(marks(xr)) and marks(xv) | marks(xr) == set(range(20))
    assert (yv == 0).all()  # use_labels=False

    # train statistics come from the un-flipped training split
    flat = xr.reshape(16, -1).double()
    assert torch.allclose(held.train_covariance(), torch.cov(flat.T), atol=1e-9)


def test_cifar_random_flip_train_only(tiny_cifar: Path) -> None:
    dm = CIFAR10DataModule(str(tiny_cifar), batch_size=20, random_flip=True, num_workers=0)
    dm.setup()
    originals = torch.stack([_expected(_cifar_image(i)) for i in range(20)])
    torch.manual_seed(0)
    flipped_any = unflipped_any = False
    for _ in range(3):
        x, _ = next(iter(dm.train_dataloader()))
        idx = ((x[:, 0, 0, 0] + 1) / 2 * 255).round().long()  # unflipped: column 0 marks i
        idx_f = 255 - ((x[:, 0, 0, 0] + 1) / 2 * 255).round().long()  # flipped: 255 - i there
        for k in range(x.shape[0]):
            if 0 <= idx[k] < 20 and torch.allclose(x[k], originals[idx[k]], atol=1e-6):
                unflipped_any = True
            else:
                assert torch.allclose(x[k], originals[idx_f[k]].flip(-1), atol=1e-6)
                flipped_any = True
    assert flipped_any and unflipped_any
    xt, _ = _all(dm.test_dataloader())  # test images never flipped
    assert torch.allclose(
        xt, torch.stack([_expected(_cifar_image(20 + i)) for i in range(4)]), atol=1e-6
    )

    plain = CIFAR10DataModule(str(tiny_cifar), batch_size=20, random_flip=False, num_workers=0)
    x, _ = _all(plain.train_dataloader())
    order = ((x[:, 0, 0, 0] + 1) / 2 * 255).round().long()
    assert torch.allclose(x, originals[order], atol=1e-6)


def test_cifar_integrity_check_is_real(tmp_path: Path) -> None:
    """Without the test override, torchvision's md5 check rejects the synthetic files."""
    _write_cifar(tmp_path)
    dm = CIFAR10DataModule(str(tmp_path), num_workers=0)
    with pytest.raises(DatasetNotFoundError, match="md5") as info:
        dm.setup()
    assert "\n" not in str(info.value)


def test_cifar_missing(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    dm = CIFAR10DataModule(str(root))  # constructing touches no files
    assert dm.data_shape == (3, 32, 32)
    for call in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError) as info:
            call()
        _assert_one_line_error(
            info.value, str(root), "cifar-10-batches-py", "data.init_args.download=true",
            "data.init_args.root",
        )  # fmt: skip
    (root / "cifar-10-batches-py").mkdir(parents=True)
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="missing data_batch_2"):
        dm.setup()


# ============================================================================ image folders
def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _solid(i: int, size: int = 8) -> np.ndarray:
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[..., 0] = i * 10
    img[..., 1] = 255 - i
    img[:, 0, 2] = 200  # asymmetric: left column marked
    return img


def _coordinate_image(w: int = 178, h: int = 218) -> np.ndarray:
    """R = column index, G = row index: every crop offset can be read back from the pixels."""
    cols, rows = np.meshgrid(np.arange(w), np.arange(h))
    return np.stack([cols, rows, np.full_like(cols, 7)], axis=-1).astype(np.uint8)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2 * 255).round().long()


def test_image_folder_recursive(tmp_path: Path) -> None:
    root = tmp_path / "faces"
    for i in range(10):
        sub = root / f"{i % 3:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{i:08d}.png").write_bytes(_png(_solid(i)))
    (root / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(
        str(root), resolution=8, batch_size=2, val_split=2, random_flip=False, num_workers=0
    )
    assert dm.data_shape == (3, 8, 8) and dm.num_bins == 256 and dm.num_classes is None
    dm.setup()
    names = dm.image_names()
    assert len(names) == 10 and names == sorted(names) and names[0] == "00000/img00000000.png"
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2 and dm.test_set is dm.val_set
    x, y = _all(dm.train_dataloader())
    assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32 and (y == 0).all()
    px = _pixels(x)
    ids = (px[:, 0, 0, 1] // 10).tolist()
    for k, i in enumerate(ids):
        assert torch.equal(px[k].permute(1, 2, 0), torch.from_numpy(_solid(i)).long())
    xv, _ = _all(dm.val_dataloader())
    assert set(ids).isdisjoint((_pixels(xv)[:, 0, 0, 1] // 10).tolist())

    # random flip (train only) mirrors the marked column
    flip = ImageFolderDataModule(str(root), resolution=8, batch_size=8, val_split=2, num_workers=0)
    torch.manual_seed(0)
    xf, _ = _all(flip.train_dataloader())
    left = _pixels(xf)[:, 2, :, 0] == 200
    right = _pixels(xf)[:, 2, :, -1] == 200
    assert left.all(1).any() and right.all(1).any() and (left.all(1) ^ right.all(1)).all()
    assert (_pixels(_all(flip.val_dataloader())[0])[:, 2, :, 0] == 200).all()

    resized = ImageFolderDataModule(str(root), resolution=4, val_split=0, num_workers=0)
    resized.setup()
    assert resized.train_set[0][0].shape == (3, 4, 4)
    assert len(resized.val_set) == 0


def _write_edm_zip(path: Path, n: int = 6, labels: bool = True) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        entries = []
        for i in range(n):
            name = f"{i // 4:05d}/img{i:08d}.png"
            zf.writestr(name, _png(_solid(i)))
            entries.append([name, i % 3])
        if labels:
            zf.writestr("dataset.json", json.dumps({"labels": entries}))


def test_image_zip_edm_layout_with_labels(tmp_path: Path) -> None:
    path = tmp_path / "ffhq-8x8.zip"
    _write_edm_zip(path)
    dm = FFHQ64DataModule(
        str(path), resolution=8, batch_size=2, use_labels=True, val_split=0, random_flip=False,
        num_workers=0,
    )  # fmt: skip
    assert dm.num_classes == 3
    dm.setup()
    ref = torch.utils.data.DataLoader(dm.reference_dataset(), batch_size=6)
    x, y = _all(ref)
    ids = (_pixels(x)[:, 0, 0, 1] // 10).tolist()
    assert ids == list(range(6)) and y.tolist() == [i % 3 for i in range(6)]
    assert torch.equal(_pixels(x[5]).permute(1, 2, 0), torch.from_numpy(_solid(5)).long())
    assert dm.hparams["use_labels"] is True and dm.hparams["preprocessing"] == "none"

    # the zip-backed dataset survives worker processes (handle reopened per process)
    workers = AFHQ64DataModule(str(path), resolution=8, batch_size=2, val_split=0, num_workers=1)
    xw, yw = _all(workers.train_dataloader())
    assert xw.shape == (6, 3, 8, 8) and (yw == 0).all()

    bare = tmp_path / "bare.zip"
    _write_edm_zip(bare, labels=False)
    with pytest.raises(DatasetNotFoundError, match=r"dataset\.json") as info:
        ImageFolderDataModule(str(bare), resolution=8, use_labels=True, num_workers=0).setup()
    assert "use_labels=false" in str(info.value) and "\n" not in str(info.value)


def test_preprocessing_crops(tmp_path: Path) -> None:
    folder = tmp_path / "celeba"
    folder.mkdir()
    (folder / "000001.png").write_bytes(_png(_coordinate_image()))

    def first(preprocessing: str, resolution: int) -> torch.Tensor:
        dm = CelebA64DataModule(
            str(folder), resolution=resolution, preprocessing=preprocessing, val_split=0,
            random_flip=False, num_workers=0,
        )  # fmt: skip
        dm.setup()
        return _pixels(dm.train_set[0][0])

    rows, cols = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    cdm = first("celeba_cdm", 128)  # box centred at (x=89, y=121): rows 57.., columns 25..
    assert torch.equal(cdm[0], cols + 25) and torch.equal(cdm[1], rows + 57)
    assert cdm[0].float().mean() == 89 - 0.5 and cdm[1].float().mean() == 121 - 0.5
    small = first("celeba_cdm", 64)  # then a bilinear antialiased resize
    assert small.shape == (3, 64, 64)
    assert abs(small[0].float().mean() - 88.5) < 0.6 and abs(small[1].float().mean() - 120.5) < 0.6

    rows, cols = torch.meshgrid(torch.arange(140), torch.arange(140), indexing="ij")
    ddpm = first("celeba_ddpm", 140)  # centre crop 140 of 178x218: rows 39.., columns 19..
    assert torch.equal(ddpm[0], cols + 19) and torch.equal(ddpm[1], rows + 39)
    assert first("celeba_ddpm", 64).shape == (3, 64, 64)

    rows, cols = torch.meshgrid(torch.arange(178), torch.arange(178), indexing="ij")
    centre = first("center_crop", 178)  # largest centred square: rows 20..198
    assert torch.equal(centre[0], cols) and torch.equal(centre[1], rows + 20)
    assert first("center_crop", 32).shape == (3, 32, 32)

    with pytest.raises(ImageResolutionError, match="not square"):
        first("none", 64)
    with pytest.raises(ImageResolutionError, match="never upsampled"):
        first("celeba_cdm", 256)


def test_image_folder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "celeba64"
    dm = ImageFolderDataModule(str(missing), num_workers=0)
    assert dm.data_shape == (3, 64, 64)
    with pytest.raises(DatasetNotFoundError) as info:
        dm.prepare_data()
    _assert_one_line_error(info.value, str(missing), ".zip", "data.init_args.path")

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetNotFoundError, match="no images found") as info:
        ImageFolderDataModule(str(empty), num_workers=0).setup()
    _assert_one_line_error(info.value, str(empty))

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "a.png").write_bytes(_png(_solid(1, size=16)))
    with pytest.raises(ImageResolutionError, match="16x16") as info:
        ImageFolderDataModule(str(tiny), resolution=32, num_workers=0).setup()
    assert isinstance(info.value, NoiseclsError) and "\n" not in str(info.value)
    with pytest.raises(ImageResolutionError, match="celeba_cdm"):
        ImageFolderDataModule(str(tiny), preprocessing="celeba_cdm", num_workers=0).setup()


# ============================================================================ DDP (slow)
class _RankProbe(L.LightningModule):
    """Writes each rank's first training batch to ``out/rank{r}.pt`` (module level: picklable)."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.lin = torch.nn.Linear(64, 1)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        if batch_idx == 0:
            sampler = self.trainer.train_dataloader.sampler
            distributed = isinstance(sampler, torch.utils.data.DistributedSampler)
            torch.save(
                {"x": x, "y": y, "distributed": distributed},
                f"{self.out}/rank{self.global_rank}.pt",
            )
        return self.lin(x.flatten(1)).pow(2).mean()

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.slow
def test_digits_ddp_two_ranks(tmp_path: Path) -> None:
    """Two CPU ranks (ddp_fork: spawned workers would import lightning before noisecls, see
    noisecls._compat): each loads batch_size / 2 distinct samples."""
    trainer = L.Trainer(
        max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=2,
        strategy="ddp_fork",
    )  # fmt: skip
    trainer.fit(_RankProbe(str(tmp_path)), datamodule=DigitsDataModule(batch_size=128))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["x"].shape == r1["x"].shape == (64, 1, 8, 8)
    assert r0["distributed"] and r1["distributed"]  # each rank samples its own shard
    assert not torch.equal(r0["x"], r1["x"])
