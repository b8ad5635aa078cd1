"""LightningDataModules: toys, scikit-learn digits, CIFAR-10, image folders / zips.

Every batch is ``(x, y)``: x float32 ([B, C, H, W] in [-1, 1] for images, [B, D] for toys), y int64
labels [B]. ``batch_size`` is global (divided by the world size). Each DataModule exposes
``data_shape``, ``num_classes``, ``num_bins`` and ``train_covariance()``; see
:mod:`noisecls.data.base`.
"""

from noisecls.data.base import (
    BatchSizeError,
    DatasetNotFoundError,
    NoiseclsDataModule,
    per_device_batch_size,
)
from noisecls.data.digits import DigitsDataModule
from noisecls.data.fake import RealFakeDataModule
from noisecls.data.images import (
    AFHQ64DataModule,
    CelebA64DataModule,
    CIFAR10DataModule,
    FFHQ64DataModule,
    ImageFolderDataModule,
    ImageResolutionError,
    preprocess_image,
)
from noisecls.data.toy import ToyDataModule

__all__ = [
    "AFHQ64DataModule",
    "BatchSizeError",
    "CIFAR10DataModule",
    "CelebA64DataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "FFHQ64DataModule",
    "ImageFolderDataModule",
    "ImageResolutionError",
    "NoiseclsDataModule",
    "RealFakeDataModule",
    "ToyDataModule",
    "per_device_batch_size",
    "preprocess_image",
]
