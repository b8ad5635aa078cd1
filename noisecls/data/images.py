"""Image DataModules: CIFAR-10 (torchvision's format) and image folders / zips (CelebA, FFHQ, AFHQ).

Images come out as float32 [B, 3, H, W] in [-1, 1] (8-bit k -> k / 255 * 2 - 1, so
``num_bins = 256``), with a random horizontal flip on the training split only (``random_flip``).

Nothing is downloaded implicitly. A data set that is not on disk raises ONE
:class:`~noisecls.data.base.DatasetNotFoundError` (a ``FileNotFoundError`` and a
``NoiseclsError``: the CLI prints it as one line) from ``prepare_data()`` / ``setup()``, naming the
path, the expected layout and the fix.

CIFAR-10 (:class:`CIFAR10DataModule`)
    ``root/cifar-10-batches-py/`` with ``data_batch_1..5``, ``test_batch`` and ``batches.meta``
    (the python pickle version), read by ``torchvision.datasets.CIFAR10`` unchanged — including
    its md5 check of every file. The test split is CIFAR's 10,000 test images. Validation: by
    default (``val_split=0``) the test set too, since the papers train on all 50,000 training
    images and report NLL on the test set (FID reference statistics are the training set's);
    ``val_split > 0`` holds out a fixed seeded part of the training set instead.

Image folders and zips (:class:`ImageFolderDataModule`)
    A directory searched recursively, or a ``.zip`` such as NVlabs/edm's ``dataset_tool.py``
    writes (images in subfolders ``00000/img00000000.png`` ... plus an optional ``dataset.json``
    ``{"labels": [["00000/img00000000.png", 6], ...]}``; labels are read only with
    ``use_labels``). Files are sorted by relative path. A fixed seeded ``val_split`` is held out;
    the test loader reuses it (these sets have no official test split). Images are converted to
    RGB, then ``preprocessing``:

    * ``"none"``: the image must be square; it is resized to ``resolution`` if needed
      (EDM's ready-made 64x64 zips are used as they are).
    * ``"center_crop"``: the largest centred square, then resize.
    * ``"celeba_ddpm"``: ``CenterCrop(140)`` then resize: the crop of NCSN / Score-SDE style
      CelebA-64 pipelines (for 178x218 aligned CelebA: rows 39..179, columns 19..159).
    * ``"celeba_cdm"``: the 128x128 box centred at (x=89, y=121) of the 178x218 aligned CelebA
      images, i.e. ``crop(top=57, left=25, height=128, width=128)`` (rows 57..185, columns
      25..153), then resize: the crop of DDIM's and CDM's CelebA code
      (``Crop(x1=cy-64, x2=cy+64, y1=cx-64, y2=cx+64)`` with cx=89, cy=121).

    Resizing is bilinear with antialiasing (torchvision's ``Resize`` on PIL images, as those
    codebases use). Images are never upsampled: a crop smaller than ``resolution``, or an image
    too small for the crop, raises :class:`ImageResolutionError`.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Literal

import PIL.Image
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from noisecls.data.base import (
    DatasetNotFoundError,
    NoiseclsDataModule,
    resolve_split_size,
    split_indices,
)
from noisecls.errors import NoiseclsError

__all__ = [
    "AFHQ64DataModule",
    "CIFAR10DataModule",
    "CelebA64DataModule",
    "FFHQ64DataModule",
    "ImageFolderDataModule",
    "ImageResolutionError",
    "Preprocessing",
    "preprocess_image",
]

Preprocessing = Literal["none", "center_crop", "celeba_ddpm", "celeba_cdm"]
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff"})
CELEBA_CDM_BOX = (57, 25, 128, 128)  # top, left, height, width: centre (x=89, y=121)
CELEBA_DDPM_CROP = 140
COVARIANCE_MAX_IMAGES = 10_000


class ImageResolutionError(NoiseclsError, ValueError):
    """An image from which the requested crop / resolution cannot be produced."""


# ---------------------------------------------------------------------------- transforms
def _to_model_range() -> v2.Compose:
    """PIL uint8 image -> float32 [C, H, W] in [-1, 1] (k -> k / 255 * 2 - 1)."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ]
    )


def _image_transform(random_flip: bool) -> v2.Compose:
    steps: list[Any] = [v2.RandomHorizontalFlip(p=0.5)] if random_flip else []
    return v2.Compose([*steps, _to_model_range()])


def _resize(img: PIL.Image.Image, size: int, resolution: int, what: str) -> PIL.Image.Image:
    if size < resolution:
        raise ImageResolutionError(
            f"{what} is {size}x{size}, smaller than data.init_args.resolution={resolution} "
            "(images are never upsampled): lower the resolution or use larger images"
        )
    if size == resolution:
        return img
    return TF.resize(
        img, [resolution, resolution], interpolation=InterpolationMode.BILINEAR, antialias=True
    )


def preprocess_image(
    img: PIL.Image.Image, resolution: int, preprocessing: Preprocessing, name: str = "image"
) -> PIL.Image.Image:
    """Crop and resize one PIL image to ``resolution`` x ``resolution`` (see the module docstring).

    Raises :class:`ImageResolutionError` (naming ``name``) when the crop does not fit or would
    have to be upsampled.
    """
    w, h = img.size
    if preprocessing == "none":
        if w != h:
            raise ImageResolutionError(
                f"{name} is {w}x{h}, not square: preprocessing='none' needs square images; "
                "set data.init_args.preprocessing to center_crop (or a celeba_* crop)"
            )
        return _resize(img, w, resolution, name)
    if preprocessing == "center_crop":
        side = min(w, h)
        img = TF.center_crop(img, [side, side])
        return _resize(img, side, resolution, f"the centre crop of {name} ({w}x{h})")
    if preprocessing == "celeba_ddpm":
        if min(w, h) < CELEBA_DDPM_CROP:
            raise ImageResolutionError(
                f"{name} is {w}x{h}, too small for preprocessing='celeba_ddpm' (centre crop "
                f"{CELEBA_DDPM_CROP}x{CELEBA_DDPM_CROP}; aligned CelebA images are 178x218)"
            )
        img = TF.center_crop(img, [CELEBA_DDPM_CROP, CELEBA_DDPM_CROP])
        return _resize(img, CELEBA_DDPM_CROP, resolution, f"the 140x140 crop of {name}")
    if preprocessing == "celeba_cdm":
        top, left, height, width = CELEBA_CDM_BOX
        if w < left + width or h < top + height:
            raise ImageResolutionError(
                f"{name} is {w}x{h}, too small for preprocessing='celeba_cdm' (the 128x128 box "
                f"at rows {top}..{top + height}, columns {left}..{left + width}; aligned CelebA "
                "images are 178x218)"
            )
        img = TF.crop(img, top, left, height, width)
        return _resize(img, width, resolution, f"the 128x128 crop of {name}")
    raise ValueError(
        "data.init_args.preprocessing must be none, center_crop, celeba_ddpm or celeba_cdm, "
        f"got {preprocessing!r}"
    )


class _MappedDataset(Dataset):
    """(image, label) pairs of ``base`` at ``indices``, transformed to (x [C, H, W], y int64)."""

    def __init__(
        self, base: Dataset, indices: Tensor | None, transform: Any, use_labels: bool
    ) -> None:
        self.base = base
        self.indices = indices.tolist() if indices is not None else None
        self.transform = transform
        self.use_labels = use_labels

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        raw = self.indices[index] if self.indices is not None else index
        img, label = self.base[raw]
        y = int(label) if self.use_labels else 0
        return self.transform(img), torch.tensor(y, dtype=torch.int64)


# ---------------------------------------------------------------------------- CIFAR-10
class CIFAR10DataModule(NoiseclsDataModule):
    """CIFAR-10 through ``torchvision.datasets.CIFAR10`` (see the module docstring for splits).

    Args:
        root: directory holding ``cifar-10-batches-py/`` (or where to download it).
        download: download the archive into ``root`` in ``prepare_data`` (needs internet).
        batch_size: GLOBAL training batch size.
        eval_batch_size: GLOBAL validation / test batch size (default ``batch_size``).
        use_labels: y = CIFAR class (``num_classes = 10``); False gives y = 0, ``None``.
        random_flip: random horizontal flip of training images.
        val_split: 0 -> validate on the test set; an int (count) or float (fraction) -> hold out
            that many training images (seeded) for validation.
        seed: seed of the held-out split and of the training shuffle.
        num_workers: DataLoader workers.
        pin_memory: pin host memory (default: when CUDA is available).
        dequantize_train: train on uniformly dequantized images (for ITD / dequantized
            likelihoods; see :class:`noisecls.data.base.NoiseclsDataModule`).

    Attributes:
        data_shape: (3, 32, 32). num_bins: 256.
    """

    base_folder = "cifar-10-batches-py"
    files = (
        *(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
    )
    num_bins = 256
    covariance_max_samples = COVARIANCE_MAX_IMAGES

    def __init__(
        self,
        root: str,
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        use_labels: bool = False,
        random_flip: bool = True,
        val_split: int | float = 0,
        seed: int = 0,
        num_workers: int = 4,
        pin_memory: bool | None = None,
        dequantize_train: bool = False,
    ) -> None:
        super().__init__(
            batch_size, eval_batch_size, seed, num_workers, pin_memory, dequantize_train
        )
        self.save_hyperparameters()
        self.root = os.path.expanduser(str(root))
        self.download = download
        self.use_labels = use_labels
        self.random_flip = random_flip
        self.val_split = val_split
        self.data_shape = (3, 32, 32)
        self._num_classes = 10 if use_labels else None
        self._reference: Dataset | None = None

    def _missing(self) -> list[str]:
        folder = os.path.join(self.root, self.base_folder)
        return [f for f in self.files if not os.path.isfile(os.path.join(folder, f))]

    def _not_found(self, missing: list[str]) -> DatasetNotFoundError:
        folder = os.path.join(self.root, self.base_folder)
        what = "" if len(missing) == len(self.files) else f" (missing {', '.join(missing)})"
        return DatasetNotFoundError(
            f"CIFAR-10 not found under {self.root}: expected {folder}/ with data_batch_1..5, "
            f"test_batch, batches.meta (python pickle version){what}; pass "
            "data.init_args.download=true with internet, or point data.init_args.root at a copy"
        )

    def prepare_data(self) -> None:
        """Download CIFAR-10 when asked and absent; raise if it is still not there."""
        missing = self._missing()
        if missing and self.download:
            from torchvision.datasets import CIFAR10

            try:
                CIFAR10(self.root, train=True, download=True)
            except Exception as err:  # network errors come in many types
                raise DatasetNotFoundError(
                    f"downloading CIFAR-10 into {self.root} failed ({type(err).__name__}: "
                    f"{' '.join(str(err).split())}); without internet, copy cifar-10-batches-py/ "
                    "there by hand and set data.init_args.download=false"
                ) from err
            missing = self._missing()
        if missing:
            raise self._not_found(missing)

    def _check_available(self) -> None:
        missing = self._missing()
        if missing:
            raise self._not_found(missing)

    def _load(self, train: bool) -> Dataset:
        from torchvision.datasets import CIFAR10

        try:
            return CIFAR10(self.root, train=train, download=False)
        except RuntimeError as err:  # torchvision's md5 check failed
            raise DatasetNotFoundError(
                f"CIFAR-10 under {os.path.join(self.root, self.base_folder)} failed torchvision's "
                f"integrity (md5) check ({' '.join(str(err).split())}); replace it with the "
                "official cifar-10-python.tar.gz contents or set data.init_args.download=true"
            ) from err

    def _build(self) -> None:
        train_raw = self._load(train=True)
        test_raw = self._load(train=False)
        n_val = resolve_split_size(self.val_split, len(train_raw), "val_split")
        train_idx, val_idx = split_indices(len(train_raw), [n_val], seed=self.seed)
        eval_tf = _image_transform(False)
        self.train_set = _MappedDataset(
            train_raw, train_idx, _image_transform(self.random_flip), self.use_labels
        )
        self._reference = _MappedDataset(train_raw, train_idx, eval_tf, self.use_labels)
        self.test_set = _MappedDataset(test_raw, None, eval_tf, self.use_labels)
        self.val_set = (
            _MappedDataset(train_raw, val_idx, eval_tf, self.use_labels)
            if n_val > 0
            else self.test_set
        )

    def reference_dataset(self) -> Dataset:
        """The training split without the random flip (statistics, FID references)."""
        self.setup()
        assert self._reference is not None
        return self._reference


# ---------------------------------------------------------------------------- image folders
class _ImageSource:
    """Sorted image files of a directory (recursive) or a zip, opened lazily (fork/pickle-safe)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        if os.path.isdir(path):
            self.kind = "dir"
            names = [
                os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                for root, _dirs, files in os.walk(path)
                for f in files
            ]
        elif os.path.isfile(path) and path.lower().endswith(".zip"):
            self.kind = "zip"
            try:
                names = [n for n in self._zipfile().namelist() if not n.endswith("/")]
            except zipfile.BadZipFile as err:
                raise DatasetNotFoundError(
                    f"{path} is not a readable zip file ({err}); recreate it (e.g. with "
                    "NVlabs/edm's dataset_tool.py) or point data.init_args.path at a folder"
                ) from err
        else:
            raise DatasetNotFoundError(
                f"image data set not found at {path}: expected a folder of .png/.jpg images "
                "(searched recursively) or a .zip of them (NVlabs/edm dataset_tool layout, "
                "optional dataset.json); point data.init_args.path at it"
            )
        self.all_names = set(names)
        self.images = sorted(n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
        if not self.images:
            raise DatasetNotFoundError(
                f"no images found in {path} (searched recursively for "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}); point data.init_args.path at the "
                "folder or .zip that holds the images"
            )

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return self._zip

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _zip=None)

    def read(self, name: str) -> bytes:
        if self.kind == "zip":
            return self._zipfile().read(name)
        with open(os.path.join(self.path, name), "rb") as f:
            return f.read()

    def open_image(self, name: str) -> PIL.Image.Image:
        import io

        with PIL.Image.open(io.BytesIO(self.read(name))) as img:
            return img.convert("RGB")

    def labels(self) -> list[int]:
        """Integer label of every image from ``dataset.json`` (EDM's layout)."""
        where = f"{self.path}{'!' if self.kind == 'zip' else '/'}dataset.json"
        fix = (
            'it must hold {"labels": [["<relative image path>", <class index>], ...]}; '
            "or set data.init_args.use_labels=false"
        )
        if "dataset.json" not in self.all_names:
            raise DatasetNotFoundError(f"use_labels=true but {where} does not exist: {fix}")
        try:
            table = json.loads(self.read("dataset.json"))["labels"]
            mapping = {str(k).replace("\\", "/"): v for k, v in table}
        except (ValueError, KeyError, TypeError) as err:
            raise DatasetNotFoundError(f"cannot read labels from {where} ({err}): {fix}") from err
        out: list[int] = []
        for name in self.images:
            if name not in mapping:
                raise DatasetNotFoundError(f"{where} has no label for {name}: {fix}")
            label = mapping[name]
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                raise DatasetNotFoundError(
                    f"{where} gives {name} the label {label!r}; only class indices >= 0 are "
                    f"supported: {fix}"
                )
            out.append(label)
        return out


class _ImageFileDataset(Dataset):
    """(PIL image cropped and resized, label) for every file of an :class:`_ImageSource`."""

    def __init__(
        self,
        source: _ImageSource,
        labels: list[int] | None,
        resolution: int,
        preprocessing: Preprocessing,
    ) -> None:
        self.source = source
        self.labels = labels
        self.resolution = resolution
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.source.images)

    def __getitem__(self, index: int) -> tuple[PIL.Image.Image, int]:
        name = self.source.images[index]
        where = f"{self.source.path}{'!' if self.source.kind == 'zip' else '/'}{name}"
        img = preprocess_image(
            self.source.open_image(name), self.resolution, self.preprocessing, name=where
        )
        return img, (self.labels[index] if self.labels is not None else 0)


class ImageFolderDataModule(NoiseclsDataModule):
    """Images from a folder (recursive) or a zip, e.g. CelebA, FFHQ, AFHQv2 (module docstring).

    Args:
        path: the folder or ``.zip``.
        resolution: output side length; images come out 3 x resolution x resolution.
        preprocessing: "none", "center_crop", "celeba_ddpm" or "celeba_cdm".
        batch_size: GLOBAL training batch size.
        eval_batch_size: GLOBAL validation / test batch size (default ``batch_size``).
        use_labels: y = class index from ``dataset.json`` (``num_classes`` = largest + 1);
            False gives y = 0 and ``num_classes = None``.
        random_flip: random horizontal flip of training images.
        val_split: held-out images (int count or float fraction, seeded) for validation; the
            test loader reuses them. 0 leaves validation / test empty.
        seed: seed of the held-out split and of the training shuffle.
        num_workers: DataLoader workers.
        pin_memory: pin host memory (default: when CUDA is available).

    Attributes:
        data_shape: (3, resolution, resolution). num_bins: 256.
    """

    num_bins = 256
    covariance_max_samples = COVARIANCE_MAX_IMAGES

    def __init__(
        self,
        path: str,
        resolution: int = 64,
        preprocessing: Preprocessing = "none",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        use_labels: bool = False,
        random_flip: bool = True,
        val_split: int | float = 0.01,
        seed: int = 0,
        num_workers: int = 4,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, seed, num_workers, pin_memory)
        self.save_hyperparameters()
        if resolution < 1:
            raise ValueError(f"data.init_args.resolution must be >= 1, got {resolution}")
        if preprocessing not in ("none", "center_crop", "celeba_ddpm", "celeba_cdm"):
            raise ValueError(
                "data.init_args.preprocessing must be none, center_crop, celeba_ddpm or "
                f"celeba_cdm, got {preprocessing!r}"
            )
        self.path = os.path.expanduser(str(path))
        self.resolution = resolution
        self.preprocessing = preprocessing
        self.use_labels = use_labels
        self.random_flip = random_flip
        self.val_split = val_split
        self.data_shape = (3, resolution, resolution)
        self._source: _ImageSource | None = None
        self._labels: list[int] | None = None
        self._reference: Dataset | None = None

    def _get_source(self) -> _ImageSource:
        if self._source is None:
            self._source = _ImageSource(self.path)
        return self._source

    def _check_available(self) -> None:
        self._get_source()

    @property
    def num_classes(self) -> int | None:
        """Largest label + 1 from ``dataset.json`` when ``use_labels`` (read lazily), else None."""
        if not self.use_labels:
            return None
        if self._labels is None:
            self._labels = self._get_source().labels()
        return max(self._labels) + 1

    def _build(self) -> None:
        source = self._get_source()
        if self.use_labels and self._labels is None:
            self._labels = source.labels()
        files = _ImageFileDataset(source, self._labels, self.resolution, self.preprocessing)
        _ = files[0]  # fail early (with the file's name) if the crop / resolution is impossible
        n_val = resolve_split_size(self.val_split, len(files), "val_split")
        train_idx, val_idx = split_indices(len(files), [n_val], seed=self.seed)
        eval_tf = _image_transform(False)
        self.train_set = _MappedDataset(
            files, train_idx, _image_transform(self.random_flip), self.use_labels
        )
        self._reference = _MappedDataset(files, train_idx, eval_tf, self.use_labels)
        self.val_set = _MappedDataset(files, val_idx, eval_tf, self.use_labels)
        self.test_set = self.val_set
        self.split_indices = {"train": train_idx, "val": val_idx}

    def reference_dataset(self) -> Dataset:
        """The training split without the random flip (statistics, FID references)."""
        self.setup()
        assert self._reference is not None
        return self._reference

    def image_names(self) -> list[str]:
        """Relative paths of every image, in dataset order (sorted)."""
        return list(self._get_source().images)


class CelebA64DataModule(ImageFolderDataModule):
    """CelebA at 64x64 from the aligned 178x218 images (``img_align_celeba/`` or a zip of it).

    Defaults follow CDM / DDIM: the 128x128 crop centred at (89, 121), resized to 64, random
    flip, no labels. ``preprocessing="celeba_ddpm"`` selects the 140 centre crop instead.
    """

    def __init__(
        self,
        path: str,
        resolution: int = 64,
        preprocessing: Preprocessing = "celeba_cdm",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        use_labels: bool = False,
        random_flip: bool = True,
        val_split: int | float = 0.01,
        seed: int = 0,
        num_workers: int = 4,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(
            path=path, resolution=resolution, preprocessing=preprocessing,
            batch_size=batch_size, eval_batch_size=eval_batch_size, use_labels=use_labels,
            random_flip=random_flip, val_split=val_split, seed=seed, num_workers=num_workers,
            pin_memory=pin_memory,
        )  # fmt: skip


class FFHQ64DataModule(ImageFolderDataModule):
    """FFHQ at 64x64: EDM's ``ffhq-64x64.zip`` as is, or the square originals resized (EDM
    defaults: random flip, no labels)."""

    def __init__(
        self,
        path: str,
        resolution: int = 64,
        preprocessing: Preprocessing = "none",
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        use_labels: bool = False,
        random_flip: bool = True,
        val_split: int | float = 0.01,
        seed: int = 0,
        num_workers: int = 4,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(
            path=path, resolution=resolution, preprocessing=preprocessing,
            batch_size=batch_size, eval_batch_size=eval_batch_size, use_labels=use_labels,
            random_flip=random_flip, val_split=val_split, seed=seed, num_workers=num_workers,
            pin_memory=pin_memory,
        )  # fmt: skip


class AFHQ64DataModule(ImageFolderDataModule):
    """AFHQv2 at 64x64: EDM's ``afhqv2-64x64.zip`` as is, or the square originals resized (EDM
    defaults: random flip, unconditional)."""

    def __init__(
        self,
        path: str,
        resolution: int = 64,
        preprocessing: Preprocessing = "none",
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        use_labels: bool = False,
        random_flip: bool = True,
        val_split: int | float = 0.01,
        seed: int = 0,
        num_workers: int = 4,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(
            path=path, resolution=resolution, preprocessing=preprocessing,
            batch_size=batch_size, eval_batch_size=eval_batch_size, use_labels=use_labels,
            random_flip=random_flip, val_split=val_split, seed=seed, num_workers=num_workers,
            pin_memory=pin_memory,
        )  # fmt: skip
