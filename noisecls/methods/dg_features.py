"""Precomputed features of DG's frozen extractor (the official code's answer to running out of
memory: the pretrained feature network is never run during discriminator training).

Each training example i is diffused ``draws`` times at importance-sampled times t_ik with fresh
noise, x_ik = alpha(t_ik)·x_i + sigma(t_ik)·eps_ik, and the frozen extractor's features
phi(x_ik, t_ik) are stored once, on disk, as a memory-mapped array; a training step then picks one
stored draw per example instead of running the extractor. This replaces "fresh noise every
step" by a finite set of noise draws per example (K draws of the forward marginal), the price of
the speed / memory gain.

Layout of a cache entry ``<directory>/<key>/``: ``features.npy`` [N, K, C, h, w] (float16 or
float32), ``times.npy`` float64 [N, K] (the t_ik), ``meta.json``. The key hashes everything the
features depend on (extractor weights, the data, K, seed, t_min, VP schedule, dtype, labels), so
a changed input builds a new entry and an unchanged one is reused. An entry is built under
``<key>.partial`` and renamed when complete: a directory named by its key is always whole.

Under DDP the ranks fill disjoint chunks of the same memory map (the cache directory must be on a
file system all ranks see); chunks draw their noise from generators seeded by (seed, chunk), so
the content does not depend on the number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from einops import repeat
from numpy.lib.format import open_memmap
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from noisecls.callbacks.features import default_cache_dir, state_dict_sha256
from noisecls.data.base import collate_pairs
from noisecls.data.fake import split_targets
from noisecls.errors import NoiseclsError
from noisecls.process.schedules import LogSNRSchedule
from noisecls.randomness import derive_seed

__all__ = ["FeatureCache", "FeatureCacheBuilder", "FeatureCacheConfig"]

CHUNK_SALT = 0x46454154  # "FEAT": keeps the chunks' noise apart from other seeded streams


@dataclass
class FeatureCacheConfig:
    """Precompute the frozen extractor's features of the training split (``DG.feature_cache``).

    Args:
        draws: noise draws (t, eps) stored per example (K).
        dtype: storage precision, float16 (half the disk / page cache) or float32.
        chunk_size: examples per extractor call (each call sees chunk_size·draws inputs); part of
            the key, as it decides how the noise is drawn.
        directory: where entries live; default ``$NOISECLS_CACHE_DIR/dg_features``.
    """

    draws: int = 8
    dtype: Literal["float16", "float32"] = "float16"
    chunk_size: int = 32
    directory: str | None = None

    def __post_init__(self) -> None:
        if self.draws < 1 or self.chunk_size < 1:
            raise ValueError("feature_cache needs draws >= 1 and chunk_size >= 1")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"feature_cache dtype must be float16 or float32, not {self.dtype!r}")

    def root(self) -> Path:
        """The directory holding the cache entries."""
        if self.directory:
            return Path(self.directory).expanduser()
        return default_cache_dir() / "dg_features"


class FeatureCache:
    """Read-only stored features: ``features`` [N, K, C, h, w] (a numpy memory map) and ``times``
    float64 [N, K]. Shared, never copied (deepcopy returns the same object, so EMA copies of
    the module do not duplicate gigabytes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.features = np.load(path / "features.npy", mmap_mode="r")
        self.times = torch.from_numpy(np.load(path / "times.npy"))
        self.draws = self.times.shape[1]

    def __len__(self) -> int:
        return self.times.shape[0]

    def __deepcopy__(self, memo: dict) -> FeatureCache:
        return self

    def lookup(self, index: Tensor, draw: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """Features float32 [B, C, h, w] and times float64 [B] of examples ``index`` [B] at their
        draws ``draw`` [B] (both int64)."""
        if int(index.max()) >= len(self) or int(index.min()) < 0:
            raise NoiseclsError(
                f"feature cache {self.path} holds {len(self)} examples but the batch asks for "
                f"index {int(index.max())}: the training data changed; delete the entry"
            )
        i, k = index.cpu().numpy(), draw.cpu().numpy()
        feats = torch.from_numpy(np.ascontiguousarray(self.features[i, k])).to(device).float()
        return feats, self.times[index.cpu(), draw.cpu()].to(device)


Extractor = Callable[[Tensor, Tensor, Tensor | None], Tensor]


class FeatureCacheBuilder:
    """Builds (or finds) the cache entry of one training split in three collective stages:
    :meth:`create` (rank 0), :meth:`fill` (every rank, its chunks), :meth:`finalize` (rank 0);
    :meth:`build` runs them with barriers between.

    Args:
        extractor: ``extractor(x_vp [B, ...], tau float64 [B], class_labels) -> [B, C, h, w]``
            (DG's frozen ``NoisyFeatures``); run under ``torch.no_grad``.
        extractor_state: its state dict (part of the key).
        dataset: the training split, items (x, y) with y = [is_real, label, index]
            (:class:`~noisecls.data.fake.RealFakeDataModule`), in index order.
        schedule: the discriminator's VP schedule; t_min: smallest time.
        config: see :class:`FeatureCacheConfig`; seed: the run's seed.
        use_labels: pass the class labels to the extractor (class-conditional discriminator).
        device: where the extractor runs.
    """

    def __init__(
        self,
        extractor: Extractor,
        extractor_state: dict[str, Tensor],
        dataset: Dataset,
        schedule: LogSNRSchedule,
        t_min: float,
        config: FeatureCacheConfig,
        seed: int,
        use_labels: bool,
        device: torch.device,
    ) -> None:
        self.extractor = extractor
        self.dataset = dataset
        self.schedule, self.t_min = schedule, t_min
        self.config, self.seed, self.use_labels, self.device = config, seed, use_labels, device
        self.num_examples = len(dataset)  # type: ignore[arg-type]
        self.key = self._key(state_dict_sha256(extractor_state))
        self.path = config.root() / self.key
        self.partial = config.root() / f"{self.key}.partial"

    # ---- identity ------------------------------------------------------------------------
    def _batches(self, start: int = 0, stop: int | None = None) -> DataLoader:
        stop = self.num_examples if stop is None else stop
        part = torch.utils.data.Subset(self.dataset, range(start, stop))
        return DataLoader(part, batch_size=self.config.chunk_size, shuffle=False,
                          collate_fn=collate_pairs)  # fmt: skip

    def _key(self, weights_sha: str) -> str:
        """SHA-256 over the extractor weights, every example (x and targets) and the options."""
        h = hashlib.sha256()
        c = self.config
        options = (self.num_examples, c.draws, c.dtype, c.chunk_size, self.seed, self.t_min,
                   self.schedule.beta_min, self.schedule.beta_max, self.use_labels)  # fmt: skip
        h.update(f"{weights_sha}|{options}".encode())
        for x, y in self._batches():
            h.update(x.detach().cpu().float().contiguous().numpy().tobytes())
            h.update(y.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    # ---- stages --------------------------------------------------------------------------
    def ready(self) -> bool:
        return (self.path / "meta.json").is_file()

    def num_chunks(self) -> int:
        return -(-self.num_examples // self.config.chunk_size)

    def create(self) -> None:
        """Rank 0: fresh ``<key>.partial`` with the feature shape probed on the first example."""
        if self.partial.exists():
            shutil.rmtree(self.partial)  # left by an interrupted build
        self.partial.mkdir(parents=True)
        x, y = next(iter(self._batches(0, 1)))
        half = torch.full((1,), 0.5, dtype=torch.float64)
        probe = self._features(x, y, half, torch.zeros_like(x))
        shape = (self.num_examples, self.config.draws, *probe.shape[1:])
        open_memmap(self.partial / "features.npy", mode="w+", dtype=self.config.dtype, shape=shape)
        open_memmap(self.partial / "times.npy", mode="w+", dtype=np.float64,
                    shape=(self.num_examples, self.config.draws))  # fmt: skip

    def fill(self, rank: int, world_size: int) -> None:
        """Every rank: compute chunks c with c % world_size == rank into the partial memmaps."""
        features = open_memmap(self.partial / "features.npy", mode="r+")
        times = open_memmap(self.partial / "times.npy", mode="r+")
        size, k = self.config.chunk_size, self.config.draws
        for chunk in range(rank, self.num_chunks(), world_size):
            start = chunk * size
            stop = min(start + size, self.num_examples)
            x, y = next(iter(self._batches(start, stop)))
            g = torch.Generator(device=self.device).manual_seed(
                derive_seed(self.seed, chunk, CHUNK_SALT)
            )
            x = repeat(x.to(self.device), "b ... -> (b k) ...", k=k)
            t = self._times(x.shape[0], g)
            eps = torch.randn(x.shape, generator=g, device=self.device, dtype=x.dtype)
            feats = self._features(x, repeat(y, "b c -> (b k) c", k=k), t, eps)
            features[start:stop] = feats.reshape(stop - start, k, *feats.shape[1:]).cpu().numpy()
            times[start:stop] = t.reshape(stop - start, k).cpu().numpy()
        features.flush()
        times.flush()
        del features, times

    def finalize(self) -> None:
        """Rank 0: write meta.json and rename the partial entry into place."""
        meta = {"examples": self.num_examples, "config": vars(self.config), "seed": self.seed}
        (self.partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if self.path.exists():  # a concurrent identical build finished first
            shutil.rmtree(self.partial)
        else:
            os.replace(self.partial, self.path)

    def build(self, rank: int, world_size: int, barrier: Callable[[str], None]) -> FeatureCache:
        """Find or build the entry (collective: every rank calls it); returns it opened."""
        if not self.ready():
            barrier("noisecls-feature-cache-check")  # every rank saw "not ready" first
            if rank == 0:
                self.create()
            barrier("noisecls-feature-cache-create")
            self.fill(rank, world_size)
            barrier("noisecls-feature-cache-fill")
            if rank == 0:
                self.finalize()
            barrier("noisecls-feature-cache-final")
        return FeatureCache(self.path)

    # ---- computation ---------------------------------------------------------------------
    def _times(self, n: int, generator: torch.Generator) -> Tensor:
        return self.schedule.sample_t_uniform_log_snr(n, self.t_min, generator=generator,
                                                      device=self.device)  # fmt: skip

    @torch.no_grad()
    def _features(self, x0: Tensor, y: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        x0, eps, t = x0.to(self.device), eps.to(self.device), t.to(self.device)
        labels = split_targets(y)[1].to(self.device) if self.use_labels else None
        return self.extractor(self.schedule.add_noise(x0, t, eps), t, labels).float()
