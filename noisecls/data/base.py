"""Shared DataModule plumbing: batch division by world size, loaders, splits, data statistics.

Conventions of every DataModule in :mod:`noisecls.data`:

* a batch is a tuple ``(x, y)``: x float32, in [-1, 1] for images ([B, C, H, W]) or raw
  coordinates for toys ([B, D]); y int64 labels [B] (class, mixture component, or zeros when
  the data set has no labels or labels are switched off). Methods use y only when
  class-conditional.
* ``batch_size`` (and ``eval_batch_size``) are GLOBAL batch sizes; each rank loads
  ``batch_size // world_size`` samples and a non-divisible size is a :class:`BatchSizeError`.
* ``data_shape`` (shape of one x), ``num_classes`` (None when unlabelled) and ``num_bins``
  (quantisation levels for dequantized bits/dim, None for continuous data) are known at
  construction, before any data is read, so the CLI can link ``data.data_shape`` into the model.
* splits are fixed by a seed; the training loader shuffles (batches a function of seed, global
  step and rank, so resumed runs see the same batches) and
  drops the last incomplete batch, validation / test loaders keep the order and every sample.
* ``dequantize_train`` (quantized data only) feeds training steps uniformly dequantized batches,
  the density that dequantized bits/dim measure; the noise is a function of (seed, global step,
  micro-batch, position in the global batch), like the methods' training noise.
* :meth:`NoiseclsDataModule.train_covariance` gives the covariance of the flattened training
  data (CDL's estimator needs its spectrum), computed lazily and cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from noisecls.data.sampling import StepIndexedSampler
from noisecls.errors import NoiseclsError
from noisecls.likelihood.dequantize import dequantize
from noisecls.randomness import StepGenerator, derive_seed, per_example

__all__ = [
    "BatchSizeError",
    "DatasetNotFoundError",
    "NoiseclsDataModule",
    "TensorPairDataset",
    "collate_pairs",
    "per_device_batch_size",
    "resolve_split_size",
    "split_indices",
]


class DatasetNotFoundError(NoiseclsError, FileNotFoundError):
    """A data set is not where the configuration says (or holds no images).

    The message is one line naming the path, the expected layout and the fix.
    """


class BatchSizeError(NoiseclsError, ValueError):
    """A global batch size that the number of devices does not divide."""


def per_device_batch_size(batch_size: int, world_size: int, name: str = "batch_size") -> int:
    """The per-rank share of a GLOBAL batch size; raises :class:`BatchSizeError` if it is uneven.

    >>> per_device_batch_size(128, 4)
    32
    """
    if batch_size < 1:
        raise BatchSizeError(f"data.init_args.{name} must be >= 1, got {batch_size}")
    if world_size < 1:
        raise BatchSizeError(f"world size must be >= 1, got {world_size}")
    if batch_size % world_size != 0:
        raise BatchSizeError(
            f"data.init_args.{name}={batch_size} is the global batch size and must be divisible "
            f"by the world size ({world_size} devices x nodes); use a multiple of {world_size}"
        )
    return batch_size // world_size


def split_indices(n: int, sizes: Sequence[int], seed: int) -> list[Tensor]:
    """Disjoint index sets of the given sizes from a seeded permutation of range(n).

    The remainder (n - sum(sizes)) comes first as the returned list's first element; every set is
    sorted, so the result depends only on (n, sizes, seed).
    """
    total = sum(sizes)
    if any(s < 0 for s in sizes) or total > n:
        raise ValueError(f"cannot take held-out splits of sizes {list(sizes)} from {n} samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out: list[Tensor] = []
    start = 0
    for s in sizes:
        out.append(perm[start : start + s].sort().values)
        start += s
    return [perm[start:].sort().values, *out]


def resolve_split_size(split: int | float, n: int, name: str) -> int:
    """A held-out split size: an int is a count in [0, n), a float a fraction in [0, 1) of n."""
    if isinstance(split, bool) or not isinstance(split, int | float):
        raise ValueError(f"data.init_args.{name} must be a count or a fraction, got {split!r}")
    if isinstance(split, float):
        if not 0.0 <= split < 1.0:
            raise ValueError(f"data.init_args.{name} as a fraction must be in [0, 1), got {split}")
        return round(split * n)
    if not 0 <= split < n:
        raise ValueError(
            f"data.init_args.{name}={split} must be a count in [0, {n}) or a fraction in [0, 1)"
        )
    return split


class TensorPairDataset(Dataset):
    """In-memory (x [N, ...], y [N]) pairs that a DataLoader fetches a whole batch at a time.

    ``__getitems__`` returns the batch as one indexed tensor pair (no per-sample Python work);
    :func:`collate_pairs` passes it through. Indexing one item gives ``(x[i], y[i])``.
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y disagree in length: {x.shape[0]} vs {y.shape[0]}")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]


def collate_pairs(batch: Any) -> Any:
    """Collate function: a ready (x, y) tensor pair passes through, a list of samples is stacked."""
    if isinstance(batch, tuple) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        return batch
    return default_collate(batch)


class NoiseclsDataModule(L.LightningDataModule):
    """Base class of the project's DataModules (see the module docstring for the conventions).

    Subclasses set ``data_shape``, ``num_classes``, ``num_bins`` in ``__init__`` and implement
    :meth:`_build` (create ``self.train_set``, ``self.val_set``, ``self.test_set``; called once by
    :meth:`setup`) and optionally :meth:`reference_dataset` (training split without augmentation)
    and :meth:`_check_available` (raise :class:`DatasetNotFoundError`; called by
    :meth:`prepare_data` and :meth:`setup`).

    Args:
        batch_size: GLOBAL training batch size (divided by the world size on each rank).
        eval_batch_size: GLOBAL validation / test batch size; default ``batch_size``.
        seed: seed of the splits (and of toy data generation) and of the training shuffle.
        num_workers: DataLoader worker processes (``persistent_workers`` is on when > 0).
        pin_memory: pin host memory; default: when CUDA is available.
        dequantize_train: train on uniformly dequantized batches x + u (``num_bins`` levels,
            see :func:`noisecls.likelihood.dequantize`) instead of the lattice values. Likelihood
            callbacks always score dequantized held-out data; a model trained on the lattice
            learns that, at small sigma, the noise is identifiable from the lattice, which is
            wrong off it, and the ITD bound charges for it (digits at 4000 steps: ITD - ODE
            0.41 bits/dim on the lattice, 0.04 dequantized). Training a continuous density on
            uniformly dequantized data is the standard recipe for likelihoods of discrete data
            (Uria et al. 2013; Theis et al. 2016); its discrete samples are
            :func:`noisecls.likelihood.quantize` of its samples. Validation / test batches are
            never changed.
    """

    data_shape: tuple[int, ...]
    num_bins: int | None = None
    #: number of training samples :meth:`train_covariance` uses by default (None: all of them).
    covariance_max_samples: int | None = None

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        dequantize_train: bool = False,
    ) -> None:
        super().__init__()
        if dequantize_train and self.num_bins is None:
            raise ValueError(
                f"data.init_args.dequantize_train needs quantized data, but {type(self).__name__} "
                "is continuous (num_bins is None); leave dequantize_train false"
            )
        if batch_size < 1:
            raise BatchSizeError(f"data.init_args.batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise BatchSizeError(
                f"data.init_args.eval_batch_size must be >= 1, got {eval_batch_size}"
            )
        if num_workers < 0:
            raise ValueError(f"data.init_args.num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._num_classes: int | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._built = False
        self._stats_cache: dict[int | None, tuple[Tensor, Tensor]] = {}
        self.dequantize_train = dequantize_train
        self._micro_batch = (-1, 0)  # (global step, micro-batches of it seen)

    # ------------------------------------------------------------------ metadata
    @property
    def num_classes(self) -> int | None:
        """Number of classes of y when labels are used, else None."""
        return self._num_classes

    @property
    def world_size(self) -> int:
        """Number of ranks: the attached trainer's ``world_size``, 1 when detached."""
        trainer = getattr(self, "trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    def per_device_batch_size(self, split: str = "train") -> int:
        """This rank's batch size for ``split`` ("train", "val", "test")."""
        if split == "train":
            return per_device_batch_size(self.batch_size, self.world_size, "batch_size")
        return per_device_batch_size(self.eval_batch_size, self.world_size, "eval_batch_size")

    # ------------------------------------------------------------------ lifecycle
    def _check_available(self) -> None:
        """Raise :class:`DatasetNotFoundError` when the data are not on disk (default: no-op)."""

    def _build(self) -> None:
        """Create ``train_set``, ``val_set``, ``test_set`` (each yields (x, y) pairs)."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Download (where supported) and check that the data are there (rank 0 only)."""
        self._check_available()

    def setup(self, stage: str | None = None) -> None:
        """Build every split once (idempotent; the same splits serve fit / validate / test)."""
        if self._built:
            return
        self._check_available()
        self._build()
        self._built = True

    def _require(self, split: str) -> Dataset:
        self.setup()
        dataset = getattr(self, f"{split}_set")
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no {split} split")
        return dataset

    # ------------------------------------------------------------------ batches
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Dequantize training batches when ``dequantize_train`` (others pass through)."""
        trainer = getattr(self, "trainer", None)
        if not self.dequantize_train or trainer is None or not trainer.training:
            return batch
        x, y = batch
        step = int(trainer.global_step)
        last_step, seen = self._micro_batch
        micro = seen if step == last_step else 0  # k > 1 micro-batches share a global step
        self._micro_batch = (step, micro + 1)
        g = StepGenerator(
            x.device, derive_seed(self.seed, step, 0xDE9, micro),
            rank=int(trainer.global_rank), world_size=int(trainer.world_size),
        )  # fmt: skip

        def draw(m: int) -> Tensor:
            return torch.rand((m, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype)

        u = per_example(g, x.shape[0], draw)
        return dequantize(x, self.num_bins, uniform=u), y  # type: ignore[arg-type]

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        workers = self.num_workers
        sampler = None
        if train:
            # Batches are a function of (seed, global step, rank): a run resumed from a
            # checkpoint sees the same batches as an uninterrupted one (see data.sampling).
            trainer = getattr(self, "trainer", None)
            rank = int(trainer.global_rank) if trainer is not None else 0
            sampler = StepIndexedSampler(
                dataset, batch_size, num_replicas=self.world_size, rank=rank, seed=self.seed,
                current_step=lambda: trainer.global_step if trainer is not None else 0,
                accumulate=int(getattr(trainer, "accumulate_grad_batches", 1)),
            )  # fmt: skip
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=train and len(dataset) >= batch_size,  # type: ignore[arg-type]
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=collate_pairs,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of ``batch_size / world_size`` (last partial batch dropped)."""
        return self._loader(self._require("train"), self.per_device_batch_size("train"), True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self._require("val"), self.per_device_batch_size("val"), False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader(self._require("test"), self.per_device_batch_size("test"), False)

    def predict_dataloader(self) -> DataLoader:
        """What ``noisecls predict`` generates comes from the model (its seeds to sample), not
        from the data: Lightning asks an attached DataModule, so this hands the question on."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None:
            raise NoiseclsError("predict needs a model attached to the trainer")
        return module.predict_dataloader()

    # ------------------------------------------------------------------ statistics
    def reference_dataset(self) -> Dataset:
        """The training split without random augmentation (data statistics, FID references)."""
        return self._require("train")

    def train_statistics(self, max_samples: int | None = -1) -> tuple[Tensor, Tensor]:
        """Mean [D] and covariance [D, D] (float64) of the flattened training data.

        Computed lazily from :meth:`reference_dataset` (no augmentation) and cached. When the
        split is larger than ``max_samples``, a fixed seeded subset of that many samples is used;
        None uses every sample and -1 (the default) the class's ``covariance_max_samples``: None
        (all) for toys and digits, 10,000 images for the image DataModules (a 3072 x 3072 CIFAR
        covariance from 10k images takes tens of seconds on a CPU). The covariance is the
        unbiased (N - 1) estimate.
        """
        if max_samples == -1:
            max_samples = self.covariance_max_samples
        if max_samples in self._stats_cache:
            return self._stats_cache[max_samples]
        dataset = self.reference_dataset()
        n = len(dataset)  # type: ignore[arg-type]
        if max_samples is not None and n > max_samples:
            if max_samples < 2:
                raise ValueError(f"max_samples must be >= 2, got {max_samples}")
            index = split_indices(n, [max_samples], seed=self.seed + 7919)[1]
            dataset = torch.utils.data.Subset(dataset, index.tolist())
            n = max_samples
        if n < 2:
            raise ValueError("the training split needs at least 2 samples for a covariance")
        loader = DataLoader(
            dataset, batch_size=256, shuffle=False, num_workers=self.num_workers,
            collate_fn=collate_pairs,
        )  # fmt: skip
        total: Tensor | None = None
        outer: Tensor | None = None
        shift: Tensor | None = None  # first sample, subtracted for numerical stability
        for x, _ in loader:
            flat = x.reshape(x.shape[0], -1).to(torch.float64)
            if shift is None:
                shift = flat[0].clone()
                total = torch.zeros_like(shift)
                outer = torch.zeros(shift.numel(), shift.numel(), dtype=torch.float64)
            flat = flat - shift
            total += flat.sum(dim=0)
            outer += flat.T @ flat
        assert total is not None and outer is not None and shift is not None
        mean_shifted = total / n
        cov = (outer - n * torch.outer(mean_shifted, mean_shifted)) / (n - 1)
        cov = 0.5 * (cov + cov.T)
        result = (mean_shifted + shift, cov)
        self._stats_cache[max_samples] = result
        return result

    def train_covariance(self, max_samples: int | None = -1) -> Tensor:
        """Covariance [D, D] (float64) of the flattened training data; see
        :meth:`train_statistics` for the subset used on large image sets."""
        return self.train_statistics(max_samples)[1]

    def train_covariance_eigenvalues(self, max_samples: int | None = -1) -> Tensor:
        """Eigenvalues [D] (float64, ascending, clamped at 0) of :meth:`train_covariance`."""
        return torch.linalg.eigvalsh(self.train_covariance(max_samples)).clamp_min(0.0)
