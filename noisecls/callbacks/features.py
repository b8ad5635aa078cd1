"""Pluggable feature extractors for FID / KID.

Every extractor is an ``nn.Module`` with one contract:

* ``forward(x)``: x [B, *data_shape] float in *data scale* (images in [-1, 1], toys raw
  coordinates) -> features [B, num_features] float32. Extractors clamp / quantise as they need.
* ``identity()``: a string that changes whenever the features would (network, weights, options);
  the FID callback keys its cached real statistics by it.
* ``check()``: fail now, in one line, if ``prepare()`` could not succeed (a missing weights
  file); cheap. The FID callback calls it when fit / validate / test starts.
* ``prepare()``: make the weights available (load or build them); idempotent, cheap once done.
  The FID callback calls it at its first evaluation, on rank 0 first, then (after a barrier) on
  every rank, so an extractor that trains or writes weights does so once.

Extractors:

* :class:`InceptionFeatures`: torch-fidelity's Inception-v3 (the TF-ported FID network, with its
  original TF1-compatible bilinear resize, i.e. no antialiasing), pool3 2048-d features by default.
  Numbers match published FIDs (given the same reference set and sample count). The weights are
  read from a local file and never downloaded unless asked.
* :class:`DigitsFeatures`: a small CNN classifier trained on the train split of
  :class:`noisecls.data.DigitsDataModule` (8x8 digits); features are its 64-d penultimate layer.
  For CPU-scale experiments: FID(data, data) ~ 0, FID(digits, noise) large, but its numbers are
  NOT comparable with Inception FIDs (or across seeds / versions of this network).
* :class:`FlattenFeatures`: the raw data flattened (optionally through a fixed random Gaussian
  projection): the Fréchet distance between Gaussian fits of the data themselves, e.g. for 2-D toys.
"""

from __future__ import annotations

import hashlib
import math
import os
from abc import abstractmethod
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisecls.errors import NoiseclsError

__all__ = [
    "INCEPTION_URL",
    "DigitsFeatures",
    "FeatureExtractor",
    "FlattenFeatures",
    "InceptionFeatures",
    "default_cache_dir",
    "file_sha256",
    "state_dict_sha256",
]

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)


def default_cache_dir() -> Path:
    """Where noisecls caches derived files (extractor weights, FID reference statistics):
    ``$NOISECLS_CACHE_DIR`` if set, else ``~/.cache/noisecls``."""
    env = os.environ.get("NOISECLS_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "noisecls"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(state: dict[str, Tensor]) -> str:
    """Hex SHA-256 of a state dict's names, dtypes, shapes and values (independent of how or
    where it was serialised: ``torch.save`` files differ byte-wise between saves)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def to_uint8_images(x: Tensor) -> Tensor:
    """Images [B, C, H, W] in [-1, 1] -> uint8 [B, C, H, W] in 0..255 (round to nearest, so an
    8-bit image stored as k/255·2 - 1 maps back to exactly k)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FeatureExtractor(nn.Module):
    """Base class: ``forward(x [B, *data_shape], data scale) -> [B, num_features] float32``.

    Subclasses implement ``forward`` and ``identity``; ``prepare`` defaults to a no-op.
    Extractors are frozen (``requires_grad_(False)``) and always in eval mode.
    """

    @abstractmethod
    def identity(self) -> str:
        """A string that changes whenever the features would (used in cache keys)."""

    def check(self) -> None:
        """Raise a one-line :class:`NoiseclsError` now if :meth:`prepare` could not succeed
        (e.g. a weights file that is not there); cheap, reads no weights."""

    def prepare(self) -> None:
        """Make the weights available (idempotent)."""

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)


class InceptionFeatures(FeatureExtractor):
    """torch-fidelity's Inception-v3 FID network over images in [-1, 1].

    Input [B, C, H, W] with C = 1 (repeated to RGB) or 3, in [-1, 1]; it is quantised to uint8
    (as a saved PNG would be) and resized to 299x299 with torch-fidelity's TF1-compatible bilinear
    interpolation (the original FID resize; torchmetrics' default ``antialias=True`` resize gives
    different numbers). Output [B, feature_dim] float32.

    Constructing it reads nothing (a config with it instantiates anywhere); :meth:`check` finds
    the weights file (the FID callback calls it when fit / validate / test starts, so a missing
    file fails before training, not at the first evaluation) and :meth:`prepare` builds
    torch-fidelity's ``FeatureExtractorInceptionV3`` from it.

    Args:
        weights_path: the torch-fidelity weights file
            ``weights-inception-2015-12-05-6726825d.pth`` (from ``INCEPTION_URL``), i.e. a
            ``torch.save``-d state dict of ``FeatureExtractorInceptionV3``. None looks for it in
            torch hub's checkpoint directory. A missing file is a one-line
            :class:`NoiseclsError` naming this option; nothing is downloaded unless
            ``allow_download``.
        feature_dim: 64, 192, 768 or 2048 (pool3, the standard FID features).
        allow_download: with weights_path None and no cached copy, let torch-fidelity download
            ``INCEPTION_URL`` into torch hub's directory.
    """

    def __init__(
        self, weights_path: str | None = None, feature_dim: int = 2048, allow_download: bool = False
    ) -> None:
        super().__init__()
        if feature_dim not in (64, 192, 768, 2048):
            raise ValueError(f"feature_dim must be 64, 192, 768 or 2048, got {feature_dim}")
        self.feature_dim = feature_dim
        self.num_features = feature_dim
        self.requested_path = weights_path
        self.allow_download = allow_download
        self.weights_path: Path | None = None
        self.net: nn.Module | None = None
        self._sha: str | None = None

    @staticmethod
    def hub_path() -> Path:
        """Where torch hub (and torch-fidelity's download) keeps the weights file."""
        return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]

    def check(self) -> None:
        """Find the weights file; one-line :class:`NoiseclsError` naming the option if absent."""
        name = INCEPTION_URL.rsplit("/", 1)[1]
        if self.requested_path is not None:
            path = Path(self.requested_path).expanduser()
            if not path.is_file():
                raise NoiseclsError(
                    f"Inception weights not found at {path}: set the FID callback's "
                    "feature_extractor.init_args.weights_path (InceptionFeatures) to a local copy "
                    f"of {name} ({INCEPTION_URL})"
                )
            self.weights_path = path
        elif self.hub_path().is_file():
            self.weights_path = self.hub_path()
        elif not self.allow_download:
            raise NoiseclsError(
                f"Inception weights {name} are not in {self.hub_path().parent} and downloading is "
                "off: set the FID callback's feature_extractor.init_args.weights_path "
                f"(InceptionFeatures) to a local copy (from {INCEPTION_URL}) or allow_download: "
                "true"
            )

    def prepare(self) -> None:
        """Build the network from the weights file (downloading it first if allowed)."""
        if self.net is not None:
            return
        self.check()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = str(self.weights_path) if self.weights_path is not None else None
        try:
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", [str(self.feature_dim)], feature_extractor_weights_path=path
            )
        except (RuntimeError, OSError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise NoiseclsError(
                f"cannot load Inception weights from {path or INCEPTION_URL} ({first}); it must "
                f"be torch-fidelity's {INCEPTION_URL.rsplit('/', 1)[1]}"
            ) from err
        if self.weights_path is None:  # downloaded by torch-fidelity into torch hub's directory
            self.weights_path = self.hub_path()
        self.net = net.requires_grad_(False).eval()

    def identity(self) -> str:
        if self._sha is None:
            self.check()
            path = self.weights_path or self.hub_path()
            if not path.is_file():  # allow_download and not fetched yet
                self.prepare()
                path = self.hub_path()
            self._sha = file_sha256(path)
        return f"torch-fidelity-inception-v3/{self.feature_dim}/tf1-resize/sha256={self._sha}"

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"InceptionFeatures expects [B, 1|3, H, W], got {tuple(x.shape)}")
        self.prepare()
        assert self.net is not None
        images = to_uint8_images(x)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        out = self.net(images.contiguous())
        features = out[0] if isinstance(out, tuple | list) else out
        return features.reshape(x.shape[0], -1).float()


class _DigitsCNN(nn.Module):
    """conv(1->32) - conv(32->64) - pool - conv(64->64) - pool - linear(256->64) [features]
    - ReLU - linear(64->10) [logits], on [B, 1, 8, 8] in [-1, 1]."""

    def __init__(self, feature_dim: int = 64) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.embed = nn.Linear(64 * 2 * 2, feature_dim)
        self.classify = nn.Linear(feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.embed(self.conv(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(F.relu(self.features(x)))


class DigitsFeatures(FeatureExtractor):
    """A small CNN digit classifier; features = its penultimate layer (pre-activation, 64-d).

    What it is (fixed; change ``VERSION`` when changing it): :class:`_DigitsCNN` trained with
    Adam (lr 2e-3, batch 64, ``train_epochs`` epochs, cross-entropy) on the train split of
    ``DigitsDataModule(seed=split_seed)`` (1437 of sklearn's 1797 8x8 digits), seeded by ``seed``.
    It reaches ~98% accuracy on the held-out digits. Training takes a few seconds on a CPU and
    happens once: the weights are written (atomically) to ``weights_path`` and read from there
    afterwards, so every run and every rank uses the same network; ``identity()`` includes the
    SHA-256 of that file.

    Input [B, 1, 8, 8] in [-1, 1] (clamped), or 16x16 / 32x32 digits (average-pooled to 8x8).
    Output [B, feature_dim] float32. Its FIDs are only comparable with each other (same file),
    never with Inception FIDs.

    Args:
        weights_path: where the trained weights live; default
            ``default_cache_dir()/digits_features_v{VERSION}_seed{seed}_split{split_seed}_d{
            feature_dim}_e{train_epochs}.pt`` (one file per training recipe).
        seed: training seed.
        split_seed: seed of the DigitsDataModule split whose train part it learns from.
        feature_dim: width of the feature layer.
        train_epochs: epochs of training when the weights file does not exist yet.
    """

    VERSION = 1

    def __init__(
        self,
        weights_path: str | None = None,
        seed: int = 0,
        split_seed: int = 0,
        feature_dim: int = 64,
        train_epochs: int = 30,
    ) -> None:
        super().__init__()
        self.seed, self.split_seed, self.train_epochs = seed, split_seed, train_epochs
        self.num_features = feature_dim
        name = (
            f"digits_features_v{self.VERSION}_seed{seed}_split{split_seed}_d{feature_dim}"
            f"_e{train_epochs}.pt"
        )
        default = default_cache_dir() / name
        self.weights_path = Path(weights_path).expanduser() if weights_path else default
        self.net = _DigitsCNN(feature_dim)
        self.requires_grad_(False)
        self.eval()
        self._loaded_sha: str | None = None

    def prepare(self) -> None:
        """Load the weights file, training and writing it first if it does not exist."""
        if self._loaded_sha is not None:
            return
        if not self.weights_path.is_file():
            state = self._train()
            self.weights_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.weights_path.with_name(f".{self.weights_path.name}.{os.getpid()}.tmp")
            try:
                torch.save(state, tmp)
                os.replace(tmp, self.weights_path)
            finally:
                tmp.unlink(missing_ok=True)
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state)  # copies into the parameters, on their device
        self.requires_grad_(False)
        self._loaded_sha = state_dict_sha256(state)

    def _train(self) -> dict[str, Tensor]:
        from noisecls.data.digits import DigitsDataModule

        dm = DigitsDataModule(batch_size=64, seed=self.split_seed, use_labels=True)
        x, y = _stack(dm.reference_dataset())
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), torch.inference_mode(False):
            torch.manual_seed(self.seed)
            net = _DigitsCNN(self.num_features)
            opt = torch.optim.Adam(net.parameters(), lr=2e-3)
            g = torch.Generator().manual_seed(self.seed)
            for _ in range(self.train_epochs):
                perm = torch.randperm(x.shape[0], generator=g)
                for idx in perm.split(64):
                    loss = F.cross_entropy(net(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        return {k: v.detach().clone() for k, v in net.state_dict().items()}

    def identity(self) -> str:
        self.prepare()
        return (
            f"digits-cnn-v{self.VERSION}/{self.num_features}/seed={self.seed}/"
            f"split={self.split_seed}/sha256={self._loaded_sha}"
        )

    def forward(self, x: Tensor) -> Tensor:
        self.prepare()
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-1] not in (8, 16, 32):
            raise ValueError(f"DigitsFeatures expects [B, 1, 8|16|32, same], got {tuple(x.shape)}")
        x = x.float().clamp(-1, 1)
        if x.shape[-1] != 8:
            x = F.avg_pool2d(x, x.shape[-1] // 8)
        return self.net.features(x).float()

    def logits(self, x: Tensor) -> Tensor:
        """Class logits [B, 10] of x [B, 1, 8, 8] (for checking the classifier)."""
        self.prepare()
        return self.net(x.float().clamp(-1, 1))


def _stack(dataset: torch.utils.data.Dataset) -> tuple[Tensor, Tensor]:
    """All (x, y) of a map-style dataset as two stacked tensors."""
    n = len(dataset)  # type: ignore[arg-type]
    getitems = getattr(dataset, "__getitems__", None)
    if getitems is not None:
        x, y = getitems(list(range(n)))
        return x, y
    xs, ys = zip(*(dataset[i] for i in range(n)), strict=True)
    return torch.stack(xs), torch.as_tensor(ys)


class FlattenFeatures(FeatureExtractor):
    """The data themselves as features: x [B, ...] flattened to [B, D] (float32), or projected to
    ``dim`` by a fixed Gaussian matrix [D, dim] / sqrt(D) (seeded by ``seed``) when D > dim.

    FID with it is the Fréchet distance between Gaussian fits of the raw data (meaningful for
    low-dimensional toys; not comparable with Inception FIDs).
    """

    def __init__(self, dim: int | None = None, seed: int = 0) -> None:
        super().__init__()
        if dim is not None and dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim, self.seed = dim, seed
        self._projections: dict[int, Tensor] = {}

    def identity(self) -> str:
        return f"flatten/dim={self.dim}/seed={self.seed}"

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1).float()
        D = flat.shape[1]
        if self.dim is None or self.dim >= D:
            return flat
        if D not in self._projections:
            g = torch.Generator().manual_seed(self.seed)
            self._projections[D] = torch.randn(D, self.dim, generator=g) / math.sqrt(D)
        return flat @ self._projections[D].to(flat.device)
