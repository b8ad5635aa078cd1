"""Checkpoints: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is the state training ended in.

Lightning's ``on_train_end`` writes ``last.ckpt`` only when no last checkpoint was written during
the run; a run whose last validation (and so its last save) came before ``max_steps`` — e.g.
ddm_digits.yaml validates every 10 epochs of 11 steps, so a 200-step run saved at step 110 —
ended with a ``last.ckpt`` of that earlier step, silently (measured: ``global_step`` 110 in the
last.ckpt of a 200-step run). This subclass writes it whenever the final step was not saved.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(LightningModelCheckpoint):
    """``lightning.pytorch.callbacks.ModelCheckpoint`` (same arguments) whose ``last.ckpt`` at the
    end of ``fit`` holds the final step."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)
