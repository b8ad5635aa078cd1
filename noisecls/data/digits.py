"""scikit-learn's bundled 8x8 handwritten digits: real images that need no download (CPU scale).

1797 grayscale images with integer intensities 0..16 (``sklearn.datasets.load_digits``), mapped
to [-1, 1] as x / 16 * 2 - 1, so the data take exactly 17 levels (``num_bins = 17`` for
dequantized bits/dim). A seeded permutation splits them into fixed, disjoint train / val / test
sets (1437 / 180 / 180 by default).

``image_size`` 16 or 32 enlarges the images for U-Nets that need more halvings:

* ``upsample="nearest"`` (default) repeats every pixel 2x2 or 4x4;
* ``upsample="pad"`` centres the 8x8 digit on a background (-1) canvas.

Both keep the values on the 17 levels, so ``num_bins`` stays 17.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from noisecls.data.base import NoiseclsDataModule, TensorPairDataset, split_indices

__all__ = ["DigitsDataModule", "load_digits_tensor"]

DIGITS_LEVELS = 17


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: (x [1797, 1, 8, 8] float32 in [-1, 1], y [1797] int64 in 0..9)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = torch.as_tensor(bunch.images, dtype=torch.float64)  # integer values 0..16
    x = (raw / (DIGITS_LEVELS - 1) * 2 - 1).to(torch.float32).unsqueeze(1)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return x.contiguous(), y


class DigitsDataModule(NoiseclsDataModule):
    """The 8x8 digits as a DataModule.

    Args:
        batch_size: GLOBAL training batch size.
        eval_batch_size: GLOBAL validation / test batch size (default ``batch_size``).
        seed: seed of the split permutation and of the training shuffle.
        val_fraction: share of the 1797 images held out for validation (0.1 -> 180).
        test_fraction: share held out for testing (0.1 -> 180).
        use_labels: y = the digit class (``num_classes = 10``); False gives y = 0 and
            ``num_classes = None``.
        image_size: 8 (native), 16 or 32 (see ``upsample``).
        upsample: how to reach ``image_size`` > 8: "nearest" (pixel repetition) or "pad".
        num_workers: DataLoader workers (0 is right for in-memory data).
        pin_memory: pin host memory (default: when CUDA is available).
        dequantize_train: train on uniformly dequantized digits (see
            :class:`noisecls.data.base.NoiseclsDataModule`).

    Attributes:
        data_shape: (1, image_size, image_size).
        num_bins: 17.
    """

    num_bins = DIGITS_LEVELS

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        use_labels: bool = True,
        image_size: int = 8,
        upsample: Literal["nearest", "pad"] = "nearest",
        num_workers: int = 0,
        pin_memory: bool | None = None,
        dequantize_train: bool = False,
    ) -> None:
        super().__init__(
            batch_size, eval_batch_size, seed, num_workers, pin_memory, dequantize_train
        )
        self.save_hyperparameters()
        if image_size not in (8, 16, 32):
            raise ValueError(f"data.init_args.image_size must be 8, 16 or 32, got {image_size}")
        if upsample not in ("nearest", "pad"):
            raise ValueError(f"data.init_args.upsample must be nearest or pad, got {upsample!r}")
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < frac < 1.0:
                raise ValueError(f"data.init_args.{name} must be in (0, 1), got {frac}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave some training images")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.use_labels = use_labels
        self.image_size = image_size
        self.upsample = upsample
        self.data_shape = (1, image_size, image_size)
        self._num_classes = 10 if use_labels else None

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.image_size == 8:
            return x
        if self.upsample == "nearest":
            return F.interpolate(x, scale_factor=self.image_size // 8, mode="nearest")
        pad = (self.image_size - 8) // 2
        return F.pad(x, (pad, pad, pad, pad), value=-1.0)

    def _build(self) -> None:
        x, y = load_digits_tensor()
        x = self._resize(x).contiguous()
        if not self.use_labels:
            y = torch.zeros_like(y)
        n = x.shape[0]
        n_val = round(self.val_fraction * n)
        n_test = round(self.test_fraction * n)
        train, val, test = split_indices(n, [n_val, n_test], seed=self.seed)
        self.train_set = TensorPairDataset(x[train], y[train])
        self.val_set = TensorPairDataset(x[val], y[val])
        self.test_set = TensorPairDataset(x[test], y[test])
        self.split_indices = {"train": train, "val": val, "test": test}
