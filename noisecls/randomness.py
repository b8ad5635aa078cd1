"""Training randomness that does not depend on the number of DDP ranks.

A training step's noise comes from a :class:`StepGenerator` seeded by (seed, global step), the
same on every rank. Each draw that has one value per example (noise level, Gaussian noise, label
dropout) is made for the whole global batch and a rank keeps its own rows
(:func:`per_example`): rank r of W holds examples r·n .. (r+1)·n - 1 of the global batch (the
rows :class:`noisecls.data.sampling.StepIndexedSampler` gives it), so an example's noise is a
function of (seed, step, its position in the global batch) — a 2-process run at per-rank batch
B/2 draws exactly the noise a 1-process run at batch B draws. Draws made once per step (not per
example) are simply the same on every rank. Randomness that is per rank by design (CDL's
contrastive examples are the first ``cdl_examples`` of each rank's batch) uses
:meth:`StepGenerator.rank_local`.

The price: each rank draws W times the per-example noise it keeps (a few MB at paper scale).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["StepGenerator", "derive_seed", "per_example", "randn_per_example"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (base seed, step, rank, ...), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0x7FFFFFFFFFFFFFFF
    return h


class StepGenerator(torch.Generator):
    """A ``torch.Generator`` shared by all ranks of one training step, which knows the rank's
    place in the global batch.

    Args:
        device: where draws are made.
        seed: the step's seed (the same on every rank).
        rank, world_size: this rank and the number of ranks.
    """

    def __new__(cls, device: torch.device | str, seed: int, rank: int = 0, world_size: int = 1):
        return super().__new__(cls, device)

    def __init__(
        self, device: torch.device | str, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.rank, self.world_size, self.step_seed = rank, world_size, seed
        self.manual_seed(seed)

    def rank_local(self, *salt: int) -> torch.Generator:
        """An independent generator for this rank's own draws (seeded by step seed, rank, salt)."""
        g = torch.Generator(device=self.device)
        return g.manual_seed(derive_seed(self.step_seed, self.rank, *salt))


def per_example(generator: torch.Generator | None, n: int, draw: Callable[[int], Tensor]) -> Tensor:
    """This rank's n rows of ``draw(N)``, a draw for all N = n·world_size examples of the global
    batch (a plain generator, or none, is a world of one: ``draw(n)``)."""
    if not isinstance(generator, StepGenerator) or generator.world_size == 1:
        return draw(n)
    values = draw(n * generator.world_size)
    return values[generator.rank * n : (generator.rank + 1) * n]


def randn_per_example(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like this rank's batch x [n, ...] (same dtype and device),
    drawn as :func:`per_example` does."""

    def draw(m: int) -> Tensor:
        return torch.randn((m, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)

    return per_example(generator, x.shape[0], draw)
