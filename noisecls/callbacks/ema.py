"""EMA of the weights: Lightning's ``EMAWeightAveraging`` with a final checkpoint that resumes.

At the end of ``fit`` Lightning's callback copies the EMA weights into the module (so code that
uses the module afterwards sees them). ``ModelCheckpoint(save_last=True)`` writes its final
``last.ckpt`` after that (its ``on_train_end`` runs last), and the callback's
``on_save_checkpoint`` stores the module's weights — by then the EMA ones — as
``current_model_state``, the weights a resumed run continues from. A run extended from its final
checkpoint (``--ckpt_path last.ckpt --trainer.max_steps`` larger) then restarted from the EMA
weights instead of the raw ones and its Adam moments no longer matched them (measured on
ddm_toy: 0.002 max weight difference from the uninterrupted run after 6 more steps). This
subclass keeps the raw weights of that moment and writes them.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMA
from torch import Tensor

__all__ = ["EMAWeightAveraging"]


class EMAWeightAveraging(LightningEMA):
    """``lightning.pytorch.callbacks.EMAWeightAveraging`` (same arguments: ``decay``,
    ``update_every_n_steps``, ``update_starting_at_step``, ...) whose checkpoints written after
    training ends keep the raw weights in ``current_model_state`` (EMA ones in ``state_dict``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._raw_at_end: dict[str, Tensor] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._raw_at_end = None
        super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raw_at_end = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_at_end is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._raw_at_end
