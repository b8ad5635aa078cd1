"""Normalise a CDM's level densities before it is evaluated (``CDM.normalize_levels``).

The one-pass likelihood of CDM (Theorem 3.2) is the density of a normalised model only when the
classifier's per-level logit offsets are right; training by cross-entropy leaves them nearly
free (README, "Why does CDM trail the DDM at equal steps?"). :class:`CDMLevelNormalization`
estimates each level's normaliser by annealed importance sampling and removes it from the
logits at the start of ``test`` (and, with ``on_validation``, of every validation epoch), so
the NLL of ``test/cdm_nll_bpd`` and of ``NLLCallback`` is that of a density that integrates to
one. The denoiser, hence sampling and the denoising MSE, is unchanged (only per-level constants
move). It changes the weights it is given: in ``test`` those of the checkpoint; during ``fit``
validation the EMA weights where an EMA callback listed before it has swapped them in (the
final checkpoint then carries the last validation's offsets), else the training weights.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from noisecls.errors import NoiseclsError
from noisecls.randomness import derive_seed

__all__ = ["CDMLevelNormalization"]


class CDMLevelNormalization(L.Callback):
    """Subtract AIS estimates of log Z_t from a CDM's logits before evaluation.

    Args:
        num_chains: AIS chains (see ``noisecls.likelihood.cdm_normalization``).
        mala_steps: Langevin steps per level (cost: (1 + mala_steps) classifier forward and
            backward passes of the chain batch per level, T + 1 levels).
        on_validation: also normalise at the start of every validation epoch (default: test
            only).
        min_ess: warn (one line) when the AIS weights' effective sample size at level 0 is below
            this fraction of the chains.

    Logs ``{stage}/cdm_log_z0``: log Z_0 in nats before the correction (0 for a normalised
    model; the one-pass NLL moves by +log Z_0 nats per sample), ``{stage}/cdm_ais_ess``: the
    weights' effective sample size at level 0 as a fraction of the chains, and the time it took.
    """

    def __init__(
        self,
        num_chains: int = 256,
        mala_steps: int = 1,
        on_validation: bool = False,
        min_ess: float = 0.1,
    ):
        super().__init__()
        if num_chains < 1 or mala_steps < 0 or not 0 <= min_ess <= 1:
            raise NoiseclsError(
                f"CDMLevelNormalization needs num_chains >= 1, mala_steps >= 0 and min_ess in "
                f"[0, 1], got {num_chains}, {mala_steps}, {min_ess}"
            )
        self.num_chains, self.mala_steps, self.on_validation = num_chains, mala_steps, on_validation
        self.min_ess = min_ess

    def normalize(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "normalize_levels"):
            raise NoiseclsError(
                f"CDMLevelNormalization works on CDM models, not {type(pl_module).__name__}"
            )
        seed = derive_seed(getattr(pl_module, "seed", 0), trainer.global_step, 7)
        generator = torch.Generator(device=pl_module.device).manual_seed(seed)
        start = time.perf_counter()
        log_z, ess = pl_module.normalize_levels(self.num_chains, self.mala_steps, generator)
        seconds = time.perf_counter() - start
        rank_zero_info(
            f"CDMLevelNormalization ({stage}): log Z_0 = {log_z[0].item():+.4f} nats removed "
            f"({self.num_chains} AIS chains, {self.mala_steps} MALA step(s)/level, {seconds:.0f}s, "
            f"effective sample size {ess[0].item():.1%} of the chains)"
        )
        if ess[0].item() < self.min_ess:
            rank_zero_warn(
                f"CDMLevelNormalization: the AIS weights' effective sample size is "
                f"{ess[0].item():.1%} of the chains (< {self.min_ess:.0%}): log Z_0 is unreliable "
                "and biased low, so the normalised NLL reads too good; raise num_chains or "
                "mala_steps"
            )
        pl_module.log(f"{stage}/cdm_log_z0", log_z[0].float(), sync_dist=True)
        pl_module.log(f"{stage}/cdm_ais_ess", ess[0].float(), sync_dist=True)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self.normalize(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.normalize(trainer, pl_module, "test")
