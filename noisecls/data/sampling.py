"""The training sampler: batches are a function of (seed, global step, rank) alone.

Lightning restores a run's ``global_step`` from ``--ckpt_path`` but its epoch bookkeeping on
resume does not always put the data loader where the uninterrupted run was (a checkpoint taken
at ``max_steps`` on an epoch boundary resumes one epoch further; one taken mid-epoch restarts the
epoch). Deriving the position in the data from the global step instead makes a resumed run see
exactly the batches the uninterrupted one saw.

With gradient accumulation (``trainer.accumulate_grad_batches`` k) an optimizer step takes k
micro-batches: the position is micro-batch k·(global step), and an epoch holds a whole number
of optimizer steps (a partial last step would never reach the optimizer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

from noisecls.errors import NoiseclsError


class StepIndexedSampler(DistributedSampler):
    """Shuffled training indices for this rank, starting at the current global step.

    Step s of the run belongs to epoch e = s // steps_per_epoch; epoch e's permutation is drawn
    from ``seed + e`` and cut into steps_per_epoch·accumulate global micro-batches of
    batch_size·num_replicas (the remainder dropped), ``accumulate`` per optimizer step; rank r
    takes the r-th slice of each global micro-batch. ``__iter__`` starts at the step
    ``current_step()`` reports, so after a resume the epoch continues where it stopped.
    Subclassing DistributedSampler keeps Lightning from wrapping it under DDP.

    Args:
        dataset: the training set (map-style).
        batch_size: per-rank batch size.
        num_replicas, rank: the DDP world size and this rank.
        seed: base seed of the permutations.
        current_step: returns the trainer's global step (0 when detached).
        accumulate: micro-batches per optimizer step (``trainer.accumulate_grad_batches``).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        num_replicas: int,
        rank: int,
        seed: int,
        current_step: Callable[[], int],
        accumulate: int = 1,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.current_step = current_step
        self.accumulate = accumulate
        self.global_batch = batch_size * num_replicas
        per_step = self.global_batch * accumulate
        self.steps_per_epoch = len(dataset) // per_step  # type: ignore[arg-type]
        if self.steps_per_epoch < 1:
            raise NoiseclsError(
                f"the training split has {len(dataset)} samples, fewer than one optimizer step's "  # type: ignore[arg-type]
                f"({self.global_batch} x {accumulate} accumulated): lower "
                "data.init_args.batch_size or trainer.accumulate_grad_batches"
            )

    def _position(self) -> tuple[int, int]:
        return divmod(int(self.current_step()), self.steps_per_epoch)

    def __iter__(self) -> Iterator[int]:
        epoch, first_step = self._position()
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.dataset), generator=g)  # type: ignore[arg-type]
        micro_batches = self.steps_per_epoch * self.accumulate
        per_batch = order[: micro_batches * self.global_batch].view(micro_batches, -1)
        lo = self.rank * self.batch_size
        mine = per_batch[first_step * self.accumulate :, lo : lo + self.batch_size]
        return iter(mine.reshape(-1).tolist())

    def __len__(self) -> int:
        """A whole epoch's indices (the first epoch after a resume yields fewer and ends early;
        the next ``__iter__`` recomputes its position, so an early end costs nothing)."""
        return self.steps_per_epoch * self.accumulate * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the epoch follows from the global step."""
