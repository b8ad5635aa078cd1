"""Learning-rate schedules shared by the methods' training recipes."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupStepDecayLR(LRScheduler):
    """Linear warmup, then step decay, stepped once per optimizer step:

        lr(step) = base_lr · min((step + 1) / warmup_steps, 1) · gamma ** (step // step_size).

    CDM's recipe (Yadin et al. 2024, App. C.2) is warmup_steps = 5000, step_size = 200000,
    gamma = 0.1. In YAML::

        lr_scheduler:
          class_path: noisecls.optim.WarmupStepDecayLR
          init_args: {warmup_steps: 5000, step_size: 200000, gamma: 0.1}

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: steps of the linear ramp from base_lr / warmup_steps to base_lr (>= 1;
            1 means no warmup).
        step_size: the learning rate is multiplied by ``gamma`` every ``step_size`` steps.
        gamma: decay factor in (0, 1].
        last_epoch: index of the last step taken (-1: start fresh; a resumed run restores the
            scheduler state instead).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 5000,
        step_size: int = 200000,
        gamma: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 1 or step_size < 1:
            raise ValueError(
                f"warmup_steps and step_size must be >= 1, got {warmup_steps} and {step_size}"
            )
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
        self.warmup_steps = warmup_steps
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate after ``step`` optimizer steps (0-based)."""
        return min((step + 1) / self.warmup_steps, 1.0) * self.gamma ** (step // self.step_size)

    def get_lr(self) -> list[float]:
        scale = self.factor(self.last_epoch)
        return [base * scale for base in self.base_lrs]
