"""Real vs fake data for Discriminator Guidance: any noisecls DataModule paired with generated
samples: the ``.npz`` shards that ``noisecls predict`` (SampleWriter) wrote, or a plain folder of
PNG images (SampleWriter's ``images/`` or another tool's output), see :func:`load_fake_samples`.

Batches are ``(x, y)`` with x as in the real DataModule and y int64 [B, 3]: column 0 is the
target (real = 1, fake = 0), column 1 the class label (the real data's label, the fake sample's
generation label, or 0 when there is none), column 2 the example's index in its split (what a
per-example cache, e.g. DG's precomputed features, is keyed by); :func:`split_targets` and
:func:`target_indices` separate them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from noisecls.data.base import (
    DatasetNotFoundError,
    NoiseclsDataModule,
    TensorPairDataset,
    resolve_split_size,
    split_indices,
)
from noisecls.errors import NoiseclsError

__all__ = [
    "RealFakeDataModule",
    "TargetDataset",
    "fake_set_manifest",
    "load_fake_samples",
    "split_targets",
    "target_indices",
]


def _check_targets(y: Tensor) -> None:
    if y.ndim != 2 or y.shape[1] != 3:
        raise NoiseclsError(
            f"DG batches need targets y of shape [B, 3] (real/fake, class, index), got "
            f"{list(y.shape)}: use noisecls.data.fake.RealFakeDataModule as the data"
        )


def split_targets(y: Tensor) -> tuple[Tensor, Tensor]:
    """(is_real [B] float32 in {0, 1}, class labels [B] int64) from y [B, 3]."""
    _check_targets(y)
    return y[:, 0].float(), y[:, 1].long()


def target_indices(y: Tensor) -> Tensor:
    """The examples' indices [B] int64 in their split (real first, then fake) from y [B, 3]."""
    _check_targets(y)
    return y[:, 2].long()


def _load_shards(path: Path, files: list[Path]) -> tuple[Tensor, Tensor, Tensor]:
    """SampleWriter shards: (x float32 [N, ...], labels int64 [N], seeds int64 [N])."""
    xs, labels, seeds = [], [], []
    for file in files:
        with np.load(file) as data:
            n = data["seeds"].shape[0]
            xs.append(torch.from_numpy(data["samples"].astype(np.float32)))
            seeds.append(torch.from_numpy(data["seeds"].astype(np.int64)))
            lab = data["labels"] if "labels" in data else np.zeros(n, dtype=np.int64)
            labels.append(torch.from_numpy(lab.astype(np.int64)))
    s = torch.cat(seeds)
    if s.unique().numel() != s.numel():
        raise NoiseclsError(f"{path} holds repeated seeds; remove the stray shards")
    return torch.cat(xs), torch.cat(labels), s


def _read_png(file: Path) -> np.ndarray:
    """One PNG as uint8 [H, W, C] keeping its channels (L: 1, LA: 2, RGB: 3, RGBA: 4; palette
    and 1-bit images are expanded to RGB / L)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            if image.mode == "1":
                image = image.convert("L")
            elif image.mode in ("P", "PA"):
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            if image.mode not in ("L", "LA", "RGB", "RGBA"):
                raise NoiseclsError(
                    f"{file} is a {image.mode} PNG; fake samples must be 8-bit images "
                    "(grayscale, RGB or RGBA)"
                )
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as err:
        raise NoiseclsError(f"cannot read {file} ({err}); remove or replace it") from err
    return array[..., None] if array.ndim == 2 else array


def _load_pngs(path: Path, files: list[Path]) -> tuple[Tensor, Tensor, Tensor]:
    """A plain folder of PNG images, sorted by file name: (x float32 [N, C, H, W] in [-1, 1]
    (pixel k -> k / 127.5 - 1), labels int64 [N] (all 0), positions int64 [N])."""
    arrays = []
    for file in files:
        array = _read_png(file)
        if arrays and array.shape != arrays[0].shape:
            raise NoiseclsError(
                f"{file} is {array.shape[1]}x{array.shape[0]} with {array.shape[2]} channel(s) but "
                f"{files[0].name} {arrays[0].shape[1]}x{arrays[0].shape[0]} with "
                f"{arrays[0].shape[2]}; all fake images in {path} must have one size and mode"
            )
        arrays.append(array)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [N, C, H, W] uint8
    x = pixels.to(torch.float32) / 127.5 - 1.0
    n = x.shape[0]
    return x.contiguous(), torch.zeros(n, dtype=torch.int64), torch.arange(n, dtype=torch.int64)


def _fake_files(path: Path) -> tuple[list[Path], list[Path]]:
    """(``samples_*.npz`` shards, ``*.png`` images) directly in ``path``, sorted by name."""
    shards = sorted(path.glob("samples_*.npz"))
    pngs = sorted(p for p in path.glob("*.png") if not p.name.startswith("."))
    return shards, pngs


def _missing_message(path: Path) -> str:
    return (
        f"no samples_*.npz shards and no *.png images in {path}; write fake samples first with "
        "`noisecls predict --config <model config> --ckpt_path <checkpoint>` or point fake_dirs "
        "at a folder of generated PNG images"
    )


def fake_set_manifest(directory: str | Path) -> dict | None:
    """The ``manifest.json`` that ``noisecls predict`` wrote into ``directory`` (model class,
    sampler, weights hash, checkpoint path); None for a folder without one (e.g. PNGs from
    another tool)."""
    path = Path(directory).expanduser() / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise NoiseclsError(f"{path} is not valid JSON ({err}); remove it") from err


def fake_set_sampler(directory: str) -> dict | None:
    """The sampler (SamplerConfig fields) recorded in ``directory``'s predict manifest."""
    manifest = fake_set_manifest(directory)
    return None if manifest is None else manifest.get("sampler")


def load_fake_samples(directories: Sequence[str]) -> tuple[Tensor, Tensor]:
    """The generated samples in ``directories``: (x float32 [N, ...] in data scale, labels int64
    [N]; 0 where there are no labels).

    A directory holding ``samples_*.npz`` shards (what ``noisecls predict`` / SampleWriter
    writes) is read from them: the float samples and generation labels, ordered by seed; repeated
    seeds within a directory are an error. A directory without shards but with ``*.png`` files
    (e.g. SampleWriter's ``images/`` folder, or the output of another tool such as NVlabs/edm's
    ``generate.py``; not searched recursively) is read as 8-bit images [N, C, H, W] scaled to
    [-1, 1] (pixel k -> k / 127.5 - 1, ordered by file name, label 0). Samples of several
    directories are merged in seed order (the file position for PNG folders)."""
    xs, labels, keys = [], [], []
    for directory in directories:
        path = Path(directory).expanduser()
        shards, pngs = _fake_files(path)
        if shards:
            x, y, k = _load_shards(path, shards)
        elif pngs:
            x, y, k = _load_pngs(path, pngs)
        else:
            raise DatasetNotFoundError(_missing_message(path))
        if xs and x.shape[1:] != xs[0].shape[1:]:
            raise NoiseclsError(
                f"the samples in {path} have shape {list(x.shape[1:])} but those in "
                f"{directories[0]} {list(xs[0].shape[1:])}; list directories of one data set"
            )
        xs.append(x)
        labels.append(y)
        keys.append(k)
    x, y, k = torch.cat(xs), torch.cat(labels), torch.cat(keys)
    order = torch.argsort(k, stable=True)
    return x[order].contiguous(), y[order]


class TargetDataset(Dataset):
    """Wraps an (x, label) dataset as (x, [is_real, label, offset + index]) with a fixed
    ``is_real``; ``offset`` places it in a concatenation of several such datasets."""

    def __init__(self, dataset: Dataset, is_real: int, offset: int = 0) -> None:
        self.dataset = dataset
        self.is_real = is_real
        self.offset = offset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, label = self.dataset[index]
        targets = [self.is_real, int(label), self.offset + index]
        return x, torch.tensor(targets, dtype=torch.int64)


class RealFakeDataModule(NoiseclsDataModule):
    """Real data (label 1) from any noisecls DataModule and generated samples (label 0).

    Splits: train = real train + fake train; val / test = the real DataModule's val / test splits
    + held-out fake samples (``fake_val_size`` / ``fake_test_size``: counts or fractions of the
    fake set, drawn by a seeded permutation). The real and fake counts need not match: DG's loss
    weights each class 1/2 (``DG.classification``), so the optimal logit is the density ratio.
    ``data_shape``, ``num_classes``, ``num_bins`` and ``reference_dataset()`` (the FID reference)
    are the real DataModule's.

    Args:
        real: the real data's DataModule.
        fake_dirs: directories of SampleWriter ``.npz`` shards or of PNG images (one or several
            runs; see :func:`load_fake_samples`). Default: the fake set of the model's score run
            (DG's ``score_run``: ``<score_run>/samples``).
        batch_size, eval_batch_size: GLOBAL batch sizes of the mixed data.
        fake_val_size, fake_test_size: held-out fake samples per split.
        seed, num_workers, pin_memory: see :class:`NoiseclsDataModule`.
    """

    def __init__(
        self,
        real: NoiseclsDataModule,
        fake_dirs: str | list[str] | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        fake_val_size: int | float = 0.1,
        fake_test_size: int | float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, seed, num_workers, pin_memory)
        self.real = real
        self.given_fake_dirs = [fake_dirs] if isinstance(fake_dirs, str) else fake_dirs
        if self.given_fake_dirs is not None and not self.given_fake_dirs:
            raise ValueError("data.init_args.fake_dirs must name at least one directory")
        self.fake_val_size, self.fake_test_size = fake_val_size, fake_test_size
        self.data_shape = tuple(real.data_shape)
        self.num_bins = real.num_bins
        self._num_classes = real.num_classes

    @property
    def fake_dirs(self) -> list[str]:
        """``fake_dirs`` as given, else the attached model's fake set (``fake_set_dirs()``)."""
        if self.given_fake_dirs is not None:
            return list(self.given_fake_dirs)
        model = self.trainer.lightning_module if self.trainer is not None else None
        dirs = model.fake_set_dirs() if hasattr(model, "fake_set_dirs") else None
        if not dirs:
            raise NoiseclsError(
                "no fake set: set data.init_args.fake_dirs (the `noisecls predict` output "
                "directory) or the model's score run (DG: model.init_args.score_run)"
            )
        return dirs

    def fake_sampler(self) -> dict | None:
        """The sampler that wrote the fake set (from the predict manifests; None when no
        directory has one); a one-line error when the directories were written by different
        samplers."""
        recorded = {json.dumps(s, sort_keys=True): s for d in self.fake_dirs
                    if (s := fake_set_sampler(d)) is not None}  # fmt: skip
        if len(recorded) > 1:
            raise NoiseclsError(
                f"the fake_dirs {self.fake_dirs} were written by different samplers "
                f"({', '.join(recorded)}); a discriminator learns one sampler's errors: list "
                "directories of one sampler"
            )
        return next(iter(recorded.values()), None)

    def _check_available(self) -> None:
        for directory in self.fake_dirs:
            path = Path(directory).expanduser()
            shards, pngs = _fake_files(path)
            if not shards and not pngs:
                raise DatasetNotFoundError(_missing_message(path))

    def _build(self) -> None:
        x, labels = load_fake_samples(self.fake_dirs)
        if tuple(x.shape[1:]) != self.data_shape:
            raise NoiseclsError(
                f"the fake samples have shape {list(x.shape[1:])} but the real data "
                f"{list(self.data_shape)}; generate them with a model of this data set"
            )
        n = x.shape[0]
        n_val = resolve_split_size(self.fake_val_size, n, "fake_val_size")
        n_test = resolve_split_size(self.fake_test_size, n, "fake_test_size")
        train, val, test = split_indices(n, [n_val, n_test], seed=self.seed)
        self.real.setup("fit")
        self.fake_sets = {
            name: TensorPairDataset(x[idx], labels[idx])
            for name, idx in (("train", train), ("val", val), ("test", test))
        }
        for split in ("train", "val", "test"):
            real_part = getattr(self.real, f"{split}_set", None)
            setattr(self, f"{split}_set", self._pair(real_part, self.fake_sets[split]))

    @staticmethod
    def _pair(real: Dataset | None, fake: Dataset) -> ConcatDataset:
        """Real examples (target 1) then fake ones (target 0), indexed in that order."""
        parts: list[Dataset] = [] if real is None else [TargetDataset(real, 1)]
        offset = len(real) if real is not None else 0  # type: ignore[arg-type]
        parts.append(TargetDataset(fake, 0, offset))
        return ConcatDataset(parts)

    def unaugmented_train_set(self) -> ConcatDataset:
        """The training split with the real part un-augmented (no random flip), same indices as
        ``train_set``: deterministic items, what a per-example cache is built from."""
        self.setup()
        real = self.real.reference_dataset()
        if len(real) != len(self.real.train_set):  # type: ignore[arg-type]
            raise NoiseclsError(
                f"{type(self.real).__name__}.reference_dataset() is not its training split "
                "without augmentation (lengths differ); a per-example cache cannot use it"
            )
        return self._pair(real, self.fake_sets["train"])

    def reference_dataset(self) -> Dataset:
        """The real training split without augmentation (FID reference)."""
        return self.real.reference_dataset()
