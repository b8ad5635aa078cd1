"""Speed options of a run: TF32 matmuls, channels_last and ``torch.compile`` of the backbone,
checked against the method and the trainer's precision (one place, one callback).

Give them under ``trainer.callbacks``::

    - class_path: noisecls.speed.SpeedOptions
      init_args: {tf32: true, channels_last: true, compile: true}

Mixed precision is Lightning's own (``trainer.precision: bf16-mixed``): autocast around the
step functions (training / validation / test / predict steps). The evaluation callbacks
(likelihoods, FID / KID statistics, denoising MSE) run in epoch-end hooks, outside autocast, and
TF32 is switched on only inside training batches, so likelihoods and FID statistics stay in
float32 / float64. The U-Net returns its input's dtype (float32 under autocast), so every loss
and denoiser adapter computes outside the network in float32.

What is refused, in one line at setup (:class:`SpeedOptionsError`):

* ``compile`` where the method's denoiser differentiates the network w.r.t. its input
  (:func:`noisecls.denoisers.needs_input_grad`): CDM (its training loss is a double backward,
  which compiled graphs do not support) and DG (guidance takes the discriminator's input
  gradient inside the sampler);
* ``compile`` without a convolutional backbone ``module.net``, ``channels_last`` without
  convolution weights;
* mixed precision for a method that names why its loss needs float32
  (``DiffusionModule.mixed_precision_refusal``);
* half-precision weights (``16-true``, ``bf16-true``): an EMA update (1 - 0.9999)·(w - ema) and
  Adam's lr-sized steps are below bf16's resolution (2^-8 relative), so the weights stall;
* ``16-mixed`` (float16) for methods that differentiate through an input gradient: the
  GradScaler scales the outer loss only, the inner (unscaled) float16 gradient underflows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from torch import nn

from noisecls.denoisers import needs_input_grad
from noisecls.errors import NoiseclsError

__all__ = ["SpeedConfig", "SpeedOptions", "SpeedOptionsError", "check_speed", "compile_backbone"]

log = logging.getLogger("noisecls.speed")

#: Lightning precision strings that keep the weights themselves in half precision
_HALF_WEIGHTS = ("16-true", "bf16-true")
#: Lightning precision strings that run the steps under autocast
_MIXED = ("bf16-mixed", "16-mixed")
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class SpeedOptionsError(NoiseclsError):
    """A speed option that cannot work with this method or precision."""


@dataclass(frozen=True)
class SpeedConfig:
    """Which speed options a run uses (all off: plain float32 eager).

    Args:
        tf32: TF32 tensor-core matmuls and convolutions in training steps (Ampere+ GPUs;
            ~10-bit mantissa inputs, float32 accumulation); evaluation stays full float32.
        channels_last: NHWC memory format of the module's 4-D weights (convolutions then
            produce NHWC activations: faster cuDNN kernels with bf16 / TF32).
        compile: ``torch.compile`` the backbone ``module.net`` in place (its state-dict keys
            do not change, so checkpoints load either way).
        compile_mode: ``torch.compile``'s mode.
    """

    tf32: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: CompileMode = "default"

    def describe(self) -> str:
        """``tf32, channels_last, compile`` (the options on), or ``none``."""
        on = [name for name in ("tf32", "channels_last", "compile") if getattr(self, name)]
        if self.compile and self.compile_mode != "default":
            on[-1] = f"compile ({self.compile_mode})"
        return ", ".join(on) or "none"


def backbone(module: nn.Module) -> nn.Module | None:
    """The network a method trains (``module.net``), or None."""
    net = getattr(module, "net", None)
    return net if isinstance(net, nn.Module) else None


def _is_convolutional(net: nn.Module | None) -> bool:
    return net is not None and any(p.dim() == 4 for p in net.parameters())


def check_speed(config: SpeedConfig, module: L.LightningModule, precision: str = "32-true") -> None:
    """Raise :class:`SpeedOptionsError` (one line) when ``config`` or ``precision`` (Lightning's
    precision string, e.g. ``bf16-mixed``) cannot work for ``module`` (see the module docs)."""
    method = type(module).__name__
    input_grad = needs_input_grad(module.denoiser())
    if str(precision) in _HALF_WEIGHTS:
        raise SpeedOptionsError(
            f"trainer.precision {precision} keeps the weights in half precision, where EMA "
            "(1 - 0.9999) and Adam updates fall below the 2^-8 resolution; use bf16-mixed"
        )
    refusal = getattr(module, "mixed_precision_refusal", None)
    if str(precision) in _MIXED and refusal:
        raise SpeedOptionsError(f"trainer.precision {precision} refused for {method}: {refusal}")
    if str(precision) == "16-mixed" and input_grad:
        raise SpeedOptionsError(
            f"trainer.precision 16-mixed: {method} differentiates through an input gradient that "
            "the GradScaler does not scale (float16 underflow); use bf16-mixed"
        )
    net = backbone(module)
    if config.compile and input_grad:
        raise SpeedOptionsError(
            f"compile refused for {method}: its denoiser is an input gradient of the network "
            "(CDM trains through it, a double backward compiled graphs lack; DG's guidance "
            "differentiates the discriminator inside the sampler); set compile: false"
        )
    if config.compile and not _is_convolutional(net):
        raise SpeedOptionsError(
            f"compile needs convolution weights in the backbone {method}.net (found "
            f"{type(net).__name__ if net is not None else 'none'}); set compile: false"
        )
    if config.channels_last and not _is_convolutional(module):
        raise SpeedOptionsError(
            f"channels_last needs convolution weights, {method} has none; set channels_last: false"
        )


def compile_backbone(config: SpeedConfig, module: nn.Module) -> None:
    """Compile ``module.net`` in place when ``config.compile`` (once; later calls do nothing)."""
    net = backbone(module)
    if config.compile and net is not None and net._compiled_call_impl is None:
        net.compile(mode=config.compile_mode)


class SpeedOptions(L.Callback):
    """The :class:`SpeedConfig` options as a callback: checked at setup (one-line errors),
    announced in one line; channels_last at setup (before DDP wraps the module), the backbone
    compiled when fitting / evaluating starts (after the module's own setup check, so the first
    compiled shapes are the real batch's); TF32 on inside training batches only (restored after
    each, so evaluation and likelihoods stay full float32).

    Args: as :class:`SpeedConfig`.
    """

    def __init__(
        self,
        tf32: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: CompileMode = "default",
    ) -> None:
        self.config = SpeedConfig(tf32, channels_last, compile, compile_mode)
        self._saved_tf32: tuple[bool, bool] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_speed(self.config, pl_module, str(trainer.precision))
        log.info(
            "speed options: %s; precision %s (%s; likelihoods and FID statistics in float32)",
            self.config.describe(), trainer.precision, type(pl_module).__name__,
        )  # fmt: skip
        if self.config.channels_last:
            pl_module.to(memory_format=torch.channels_last)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        compile_backbone(self.config, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        compile_backbone(self.config, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        compile_backbone(self.config, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        compile_backbone(self.config, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *_) -> None:
        if self.config.tf32:
            self._saved_tf32 = (
                torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32,
            )
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_) -> None:
        if self._saved_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (
                self._saved_tf32
            )
            self._saved_tf32 = None
