"""FID and KID as functions: over two feature arrays, over feature statistics, or over two sample
sets on disk (image folders, ``.npz`` shards) through a chosen feature extractor.

- :class:`FeatureStatistics`: float64 feature sum [d], outer-product sum [d, d] and count,
  accumulated batch by batch (and cached by the FID callback).
- :func:`frechet_distance` (FID from two statistics; Heusel et al. 2017, eq. 6),
  :func:`fid_from_features`, :func:`kid_from_features` (KID: unbiased MMD^2 with the cubic
  polynomial kernel over random subsets; Binkowski et al. 2018).
- :func:`load_batches` reads a sample set: a folder of images (png / jpg / ...), a folder of
  ``.npz`` shards (``noisecls predict``'s ``samples_*.npz``, or ADM-style ``arr_0``), or one
  ``.npz``; images come out as float [B, C, H, W] in [-1, 1].
- :func:`fid_between` compares two such sets; :func:`fid_command` is the ``noisecls fid`` command.

The arithmetic is torchmetrics' (and pytorch-fid's, clean-fid's): sample covariance with n - 1,
tr sqrt(S1 S2) as the sum of the square roots of the eigenvalues of S1 S2, KID's std over subsets
without Bessel's correction. Feature extractors live in :mod:`noisecls.callbacks.features`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from noisecls.errors import NoiseclsError

if TYPE_CHECKING:  # the callbacks package imports this module (FIDCallback)
    from noisecls.callbacks.features import FeatureExtractor

__all__ = [
    "FeatureStatistics",
    "extract_features",
    "fid_between",
    "fid_command",
    "fid_from_features",
    "frechet_distance",
    "kid_from_features",
    "load_batches",
    "make_extractor",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
EXTRACTORS = ("inception", "digits", "flatten")


# ------------------------------------------------------------------------------ statistics
@dataclass
class FeatureStatistics:
    """Sufficient statistics of a feature set: ``total`` [d] and ``outer`` [d, d] float64 sums
    over ``count`` feature vectors."""

    total: Tensor
    outer: Tensor
    count: int

    @classmethod
    def empty(cls, num_features: int, device: torch.device | None = None) -> FeatureStatistics:
        zeros = torch.zeros(num_features, dtype=torch.float64, device=device)
        return cls(zeros, torch.zeros(num_features, num_features, dtype=torch.float64,
                                      device=device), 0)  # fmt: skip

    @classmethod
    def of(cls, features: Tensor) -> FeatureStatistics:
        """Statistics of features [n, d]."""
        stats = cls.empty(features.shape[1], features.device)
        stats.update(features)
        return stats

    @property
    def num_features(self) -> int:
        return self.total.shape[0]

    def update(self, features: Tensor) -> None:
        """Add features [n, d] (accumulated in float64)."""
        f = features.double()
        self.total += f.sum(0)
        self.outer += f.T @ f
        self.count += f.shape[0]

    def mean(self) -> Tensor:
        """Feature mean, float64 [d]."""
        return self.total / self.count

    def covariance(self) -> Tensor:
        """Sample covariance (n - 1 normalisation), float64 [d, d]."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean = self.mean()
        return (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)

    def to(self, device: torch.device | str) -> FeatureStatistics:
        return FeatureStatistics(self.total.to(device), self.outer.to(device), self.count)


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets (FID when the features
    are Inception pool3): ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}) (Heusel et al.
    2017, eq. 6), the trace of the root as the sum of the roots of the eigenvalues of S_a S_b."""
    if a.num_features != b.num_features:
        raise ValueError(f"feature widths differ: {a.num_features} vs {b.num_features}")
    b = b.to(a.total.device)
    cov_a, cov_b = a.covariance(), b.covariance()
    root_trace = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    distance = (a.mean() - b.mean()).square().sum() + cov_a.trace() + cov_b.trace()
    return float(distance - 2 * root_trace)


def fid_from_features(a: Tensor, b: Tensor) -> float:
    """FID between two feature arrays [n_a, d] and [n_b, d]."""
    return frechet_distance(FeatureStatistics.of(a), FeatureStatistics.of(b))


def _polynomial_mmd2(a: Tensor, b: Tensor) -> Tensor:
    """Unbiased MMD^2 of equal-size feature sets [m, d] with the kernel k(x, y) = (x·y/d + 1)^3
    (Binkowski et al. 2018, eq. 4)."""
    m, d = a.shape
    k_aa, k_bb, k_ab = ((u @ v.T / d + 1) ** 3 for u, v in ((a, a), (b, b), (a, b)))
    within = k_aa.sum() - k_aa.diagonal().sum() + k_bb.sum() - k_bb.diagonal().sum()
    return within / (m * (m - 1)) - 2 * k_ab.sum() / m**2


def kid_from_features(
    a: Tensor,
    b: Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """KID (mean, std over subsets) between feature arrays [n_a, d] and [n_b, d]: each subset
    draws min(subset_size, n_a, n_b) rows of each without replacement (from ``generator``)."""
    if subsets < 1:
        raise ValueError(f"KID needs subsets >= 1, got {subsets}")
    size = min(subset_size, a.shape[0], b.shape[0])
    if size < 2:
        raise ValueError("KID needs at least 2 feature vectors in each set")
    a, b = a.double(), b.double().to(a.device)
    scores = []
    for _ in range(subsets):
        pick_a = torch.randperm(a.shape[0], generator=generator)[:size].to(a.device)
        pick_b = torch.randperm(b.shape[0], generator=generator)[:size].to(a.device)
        scores.append(_polynomial_mmd2(a[pick_a], b[pick_b]))
    values = torch.stack(scores)
    return float(values.mean()), float(values.std(unbiased=False))


# ------------------------------------------------------------------------------ sample sets
def _image_to_tensor(path: Path) -> Tensor:
    """One image file as uint8 [C, H, W] (grayscale stays 1 channel, alpha is dropped)."""
    from PIL import Image

    with Image.open(path) as image:
        mode = "L" if image.mode in ("L", "I;16", "1") else "RGB"
        array = np.asarray(image.convert(mode))
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _npz_samples(path: Path) -> Tensor:
    """The samples of one ``.npz``: ``samples`` (noisecls predict: float in data scale, channels
    first) or ``arr_0`` (ADM / guided-diffusion: uint8 [N, H, W, C]) -> float [N, ...]."""
    with np.load(path) as data:
        if "samples" in data:
            return torch.from_numpy(np.asarray(data["samples"], dtype=np.float32))
        if "arr_0" in data:
            images = torch.from_numpy(np.asarray(data["arr_0"]))
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise NoiseclsError(f"{path}: arr_0 must be uint8 [N, H, W, C] images")
            return images.permute(0, 3, 1, 2).float() / 127.5 - 1
    raise NoiseclsError(f"{path} has neither 'samples' (noisecls predict) nor 'arr_0' (ADM)")


def _sources(path: Path) -> tuple[str, list[Path]]:
    """("npz" | "images", files) of a sample set: one .npz, a folder of .npz shards, or a folder
    of images (sorted by name; shards take precedence when a folder has both)."""
    if path.is_file() and path.suffix == ".npz":
        return "npz", [path]
    if not path.is_dir():
        raise NoiseclsError(f"{path} is neither a folder nor an .npz file")
    shards = sorted(path.glob("*.npz"))
    if shards:
        return "npz", shards
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise NoiseclsError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}) or .npz files")
    return "images", images


def load_batches(
    path: str | Path, batch_size: int = 250, limit: int | None = None
) -> Iterator[Tensor]:
    """The samples of a set on disk, in batches of float [B, ...] (images in [-1, 1], as the
    feature extractors expect; .npz ``samples`` as stored), at most ``limit`` in all."""
    kind, files = _sources(Path(path).expanduser())
    remaining = limit if limit is not None else float("inf")
    if kind == "npz":
        for file in files:
            for batch in _npz_samples(file).split(batch_size):
                if remaining <= 0:
                    return
                batch = batch[: int(min(remaining, batch.shape[0]))]
                remaining -= batch.shape[0]
                yield batch
        return
    files = files[: int(min(remaining, len(files)))]
    for start in range(0, len(files), batch_size):
        images = [_image_to_tensor(p) for p in files[start : start + batch_size]]
        if len({tuple(t.shape) for t in images}) != 1:
            raise NoiseclsError(f"images in {path} differ in size or channels; resize them first")
        yield torch.stack(images).float() / 127.5 - 1


@torch.no_grad()
def extract_features(
    path: str | Path,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 250,
    limit: int | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Features [n, d] float32 (on the CPU) of the sample set at ``path``."""
    extractor.prepare()
    extractor.to(device)
    chunks = [extractor(batch.to(device)).float().cpu()
              for batch in load_batches(path, batch_size, limit)]  # fmt: skip
    return torch.cat(chunks)


def make_extractor(name: str, weights_path: str | None = None) -> FeatureExtractor:
    """A feature extractor by name: inception (torch-fidelity's; ``weights_path`` or torch
    hub's cache, never downloaded), digits (the 8x8-digits CNN; its weights file) or flatten
    (the raw values)."""
    from noisecls.callbacks.features import DigitsFeatures, FlattenFeatures, InceptionFeatures

    if name == "inception":
        return InceptionFeatures(weights_path=weights_path)
    if name == "digits":
        return DigitsFeatures(weights_path=weights_path)
    if name == "flatten":
        return FlattenFeatures()
    raise NoiseclsError(f"unknown feature extractor {name!r}; use {', '.join(EXTRACTORS)}")


def fid_between(
    path_a: str | Path,
    path_b: str | Path,
    extractor: FeatureExtractor,
    *,
    kid: bool = False,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    batch_size: int = 250,
    limit: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, float | int | str | None]:
    """FID (and KID) between two sample sets on disk: fid, kid, kid_std, num_a, num_b and the
    extractor's identity. KID subsets are drawn from ``seed``."""
    options = {"batch_size": batch_size, "limit": limit, "device": device}
    a = extract_features(path_a, extractor, **options)
    b = extract_features(path_b, extractor, **options)
    result: dict[str, float | int | str | None] = {
        "fid": fid_from_features(a, b), "kid": None, "kid_std": None,
        "num_a": a.shape[0], "num_b": b.shape[0], "extractor": extractor.identity(),
    }  # fmt: skip
    if kid:
        g = torch.Generator().manual_seed(seed)
        result["kid"], result["kid_std"] = kid_from_features(
            a, b, subsets=kid_subsets, subset_size=kid_subset_size, generator=g
        )
    return result


# ------------------------------------------------------------------------------ command
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="noisecls fid",
        description="FID (and KID) between two sample sets: image folders, folders of .npz "
        "shards (noisecls predict output) or .npz files.",
    )
    p.add_argument("set_a", help="first sample set (folder or .npz)")
    p.add_argument("set_b", help="second sample set (folder or .npz)")
    p.add_argument(
        "--extractor",
        choices=EXTRACTORS,
        default="inception",
        help="feature network (default: inception, published-comparable)",
    )
    p.add_argument(
        "--weights-path",
        help="the extractor's weights file (inception: "
        "torch-fidelity's weights-inception-2015-12-05-6726825d.pth)",
    )
    p.add_argument("--kid", action="store_true", help="also compute KID")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--limit", type=int, help="use at most this many samples of each set")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of KID's subsets")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p  # fmt: skip


def fid_command(argv: list[str] | None = None) -> int:
    """``noisecls fid SET_A SET_B [--extractor ...] [--kid]``: print FID (and KID); returns the
    exit status (0, or 1 with a one-line error)."""
    args = _parser().parse_args(argv)
    try:
        result = fid_between(
            args.set_a, args.set_b, make_extractor(args.extractor, args.weights_path),
            kid=args.kid, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
            batch_size=args.batch_size, limit=args.limit, device=args.device, seed=args.seed,
        )  # fmt: skip
    except (NoiseclsError, ValueError, OSError) as err:
        print(f"noisecls fid: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"FID {result['fid']:.6g}  ({result['num_a']} vs {result['num_b']} samples, "
          f"{result['extractor']})")  # fmt: skip
    if result["kid"] is not None:
        print(f"KID {result['kid']:.6g} +- {result['kid_std']:.3g}")
    return 0
