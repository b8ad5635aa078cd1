"""Low-dimensional toy data: a Gaussian mixture with a known density, moons, checkerboard, spirals.

Every split is generated in memory, deterministically from ``seed`` (train, val and test are
independent draws from differently derived generators). Batches are ``(x [B, D] float32,
y [B] int64)``.

* ``gmm``: samples of a :class:`noisecls.oracles.GaussianMixture`, exposed as ``.oracle`` so that
  tests and metrics can use its exact noisy densities, scores and denoisers. Default: 8 isotropic
  components with equal weights, means on a circle of radius 4 (angles 2*pi*k/8, the first at
  (4, 0)), std 0.5 (so about 8.25 variance per dimension: the data are NOT standardised, they are
  exactly the oracle's). ``gmm_means`` / ``gmm_std`` / ``gmm_covariances`` / ``gmm_weights``
  override it (any dimension D). y = mixture component.
* ``moons``: scikit-learn's ``make_moons`` (noise 0.05 by default), standardised with the
  analytic mean (0.5, 0.25) and variances (0.75, 0.625 - 1/pi - 1/16) of the noiseless moons,
  plus noise². y = moon (0 upper, 1 lower).
* ``checkerboard``: FFJORD's construction (x1 ~ U[-2, 2], x2 uniform on the 8 squares of a 4x4
  board that share x1's parity), scaled by sqrt(3)/2 so each coordinate has exactly mean 0 and
  variance 1. No noise; y = 0.
* ``spirals``: FFJORD's two spirals (``2spirals``: radius sqrt(U)*3*pi, 0.5-wide uniform jitter,
  /3, Gaussian noise 0.1 by default), divided by sqrt(2.542 + noise²) so the variance is about 1
  per coordinate (2.542 is the measured mean second moment of the noiseless construction).
  y = arm (0 or 1).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from noisecls.data.base import NoiseclsDataModule, TensorPairDataset
from noisecls.oracles import GaussianMixture

__all__ = ["ToyDataModule", "make_toy"]

ToyName = Literal["gmm", "moons", "checkerboard", "spirals"]
_DEFAULT_NOISE = {"moons": 0.05, "spirals": 0.1}
_SPIRALS_SECOND_MOMENT = 2.542
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _split_seed(seed: int, split: str) -> int:
    """A 32-bit seed for one split, mixed from the base seed (stable across runs / platforms)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _SPLIT_IDS[split]]).generate_state(1)
    return int(state[0])


def _moons(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n, noise=noise, shuffle=True, random_state=seed)
    mean = np.array([0.5, 0.25])
    var = np.array([0.75, 0.625 - 1.0 / math.pi - 0.0625]) + noise**2
    return (x - mean) / np.sqrt(var), y


def _checkerboard(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2 + np.floor(x1) % 2
    x = np.stack([x1, x2], axis=1) * (math.sqrt(3.0) / 2.0)
    return x, np.zeros(n, dtype=np.int64)


def _spirals(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.random(n)) * 3 * math.pi
    x = np.stack([-np.cos(t) * t + rng.random(n) * 0.5, np.sin(t) * t + rng.random(n) * 0.5], 1)
    arm = rng.integers(0, 2, n)
    x = np.where(arm[:, None] == 1, -x, x) / 3 + rng.standard_normal((n, 2)) * noise
    return x / math.sqrt(_SPIRALS_SECOND_MOMENT + noise**2), arm


def make_toy(name: ToyName, n: int, seed: int, noise: float | None = None) -> tuple[Tensor, Tensor]:
    """Draw n points of a 2-D toy ("moons", "checkerboard", "spirals"): (x [n, 2] float32,
    y [n] int64); ``noise`` None means the data set's default (see the module docstring)."""
    if noise is None:
        noise = _DEFAULT_NOISE.get(name, 0.0)
    if name == "moons":
        x, y = _moons(n, noise, seed)
    elif name == "checkerboard":
        x, y = _checkerboard(n, seed)
    elif name == "spirals":
        x, y = _spirals(n, noise, seed)
    else:
        raise ValueError(f"unknown toy data set {name!r} (gmm samples come from the oracle)")
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)


def _circle_mixture(components: int, radius: float) -> Tensor:
    """Means [K, 2] at angles 2*pi*k/K on a circle of the given radius (float64)."""
    angles = 2 * math.pi * torch.arange(components, dtype=torch.float64) / components
    return radius * torch.stack([angles.cos(), angles.sin()], dim=1)


class ToyDataModule(NoiseclsDataModule):
    """Low-dimensional toy data sets in memory (see the module docstring for each construction).

    Args:
        name: "gmm", "moons", "checkerboard" or "spirals".
        n_train, n_val, n_test: number of points per split (independent draws).
        batch_size: GLOBAL training batch size.
        eval_batch_size: GLOBAL validation / test batch size (default ``batch_size``).
        seed: seed of the data and of the training shuffle.
        noise: noise level of moons (default 0.05) and spirals (default 0.1); must stay None for
            gmm and checkerboard.
        gmm_components: number of components of the default circle mixture.
        gmm_radius: radius of the circle the default means lie on.
        gmm_std: isotropic std of every component (a float) or of each one ([K]).
        gmm_means: explicit means [K][D] (replaces the circle).
        gmm_covariances: explicit covariances [K][D][D] (replaces ``gmm_std``).
        gmm_weights: mixture weights [K] (default uniform; normalised to sum 1).
        num_workers: DataLoader workers (0 is right for in-memory data).
        pin_memory: pin host memory (default: when CUDA is available).

    Attributes:
        oracle: the :class:`~noisecls.oracles.GaussianMixture` the gmm data are sampled from
            (None for the other data sets).
        data_shape: (D,).
        num_classes: K for gmm (y = component), 2 for moons and spirals, None for checkerboard.
        num_bins: None (continuous data).
    """

    def __init__(
        self,
        name: ToyName = "gmm",
        n_train: int = 20000,
        n_val: int = 2000,
        n_test: int = 2000,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        seed: int = 0,
        noise: float | None = None,
        gmm_components: int = 8,
        gmm_radius: float = 4.0,
        gmm_std: float | list[float] = 0.5,
        gmm_means: list[list[float]] | None = None,
        gmm_covariances: list[list[list[float]]] | None = None,
        gmm_weights: list[float] | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, seed, num_workers, pin_memory)
        self.save_hyperparameters()
        if name not in ("gmm", "moons", "checkerboard", "spirals"):
            raise ValueError(
                f"data.init_args.name must be gmm, moons, checkerboard or spirals, got {name!r}"
            )
        if min(n_train, n_val, n_test) < 1:
            raise ValueError("n_train, n_val and n_test must all be >= 1")
        if noise is not None and name in ("gmm", "checkerboard"):
            raise ValueError(f"data.init_args.noise does not apply to {name!r}; leave it unset")
        if noise is not None and noise < 0:
            raise ValueError(f"data.init_args.noise must be >= 0, got {noise}")
        self.name = name
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.noise = noise
        self.oracle: GaussianMixture | None = None
        if name == "gmm":
            self.oracle = self._make_oracle(
                gmm_components, gmm_radius, gmm_std, gmm_means, gmm_covariances, gmm_weights
            )
            self.data_shape = (self.oracle.dim,)
            self._num_classes = self.oracle.num_components
        else:
            self.data_shape = (2,)
            self._num_classes = None if name == "checkerboard" else 2

    @staticmethod
    def _make_oracle(
        components: int,
        radius: float,
        std: float | list[float],
        means: list[list[float]] | None,
        covariances: list[list[list[float]]] | None,
        weights: list[float] | None,
    ) -> GaussianMixture:
        if means is not None:
            mu = torch.as_tensor(means, dtype=torch.float64)
            if mu.ndim != 2:
                raise ValueError(f"data.init_args.gmm_means must be [K][D], got {tuple(mu.shape)}")
        else:
            if components < 1:
                raise ValueError(f"data.init_args.gmm_components must be >= 1, got {components}")
            mu = _circle_mixture(components, radius)
        K, D = mu.shape
        if weights is not None:
            w = torch.as_tensor(weights, dtype=torch.float64)
            if w.shape != (K,) or (w < 0).any() or float(w.sum()) <= 0:
                raise ValueError(f"data.init_args.gmm_weights must be [K={K}] nonnegative")
            w = w / w.sum()
        else:
            w = torch.full((K,), 1.0 / K, dtype=torch.float64)
        if covariances is not None:
            cov = torch.as_tensor(covariances, dtype=torch.float64)
            if cov.shape != (K, D, D):
                raise ValueError(
                    f"data.init_args.gmm_covariances must be [K={K}][D={D}][D={D}], "
                    f"got {tuple(cov.shape)}"
                )
            return GaussianMixture(w, mu, cov)
        return GaussianMixture.isotropic(w, mu, torch.as_tensor(std, dtype=torch.float64))

    def _make_split(self, split: str, n: int) -> TensorPairDataset:
        seed = _split_seed(self.seed, split)
        if self.oracle is not None:
            x, y = self.oracle.sample(
                n, generator=torch.Generator().manual_seed(seed), dtype=torch.float32
            )
        else:
            x, y = make_toy(self.name, n, seed, self.noise)  # type: ignore[arg-type]
        return TensorPairDataset(x.contiguous(), y.to(torch.int64))

    def _build(self) -> None:
        self.train_set = self._make_split("train", self.n_train)
        self.val_set = self._make_split("val", self.n_val)
        self.test_set = self._make_split("test", self.n_test)
