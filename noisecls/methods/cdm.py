"""CDM: Classification Diffusion Models (Yadin, Elata, Michaeli, NeurIPS 2024).

A classifier over the T + 2 noise levels {0 (clean), 1..T, T + 1 (pure noise)} with no time
input; its input gradient is an MMSE denoiser (Theorem 3.1, ``CDMDenoiser``) usable by every
sampler, and two of its logits give the exact log-likelihood in one forward pass (Theorem 3.2,
``noisecls.likelihood.cdm``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from noisecls.denoisers import CDMDenoiser, Denoiser, GuidedDenoiser
from noisecls.errors import NoiseclsError
from noisecls.likelihood import cdm_log_likelihood, dequantize, nll_to_bits_per_dim
from noisecls.likelihood.cdm_normalization import LevelNormalizers, cdm_log_normalizers
from noisecls.methods.base import DiffusionModule, PredictConfig
from noisecls.process.schedules import DiscreteSchedule
from noisecls.randomness import derive_seed, per_example, randn_per_example
from noisecls.samplers import SamplerConfig


def _check_classifier(net: nn.Module, num_logits: int, needs_double_backward: bool) -> None:
    """One-line errors for a backbone that cannot serve as CDM's noise-level classifier."""
    if getattr(net, "time_conditioning", False):
        raise NoiseclsError(
            "CDM's classifier takes no time input: set the net's time_conditioning: false"
        )
    head_logits = getattr(getattr(net, "head", None), "num_logits", None)
    if head_logits is not None and head_logits != num_logits:
        raise NoiseclsError(
            f"the net's LogitsHead has num_logits={head_logits} but the schedule's levels "
            f"0..T+1 need {num_logits}: set head num_logits: {num_logits}"
        )
    if needs_double_backward and any(
        getattr(type(m), "uses_attention", False) and m.attention_backend != "math"
        for m in net.modules()
    ):
        raise NoiseclsError(
            "CDM training differentiates the input gradient (double backward), which fused "
            "attention kernels lack: set the net's attention_backend: math"
        )


class CDM(DiffusionModule):
    """Classification diffusion model: noise-level classifier, gradient denoiser, one-pass NLL.

    Training (Algorithm 1): t ~ U{0..T+1}, x_t = sqrt(abar_t)·x0 + sqrt(1 - abar_t)·eps,
    loss = ce_weight·CE(f(x_t), t) + mse_weight·MSE, eps_hat from eq. (8) with a double
    backward. Levels 0 and T + 1 get CE only by construction: there eps_hat is 0 resp.
    exactly x_t = eps, so their squared errors carry no gradient and are left out of the MSE,
    MSE = sum over the batch's samples at levels 1..T of mean_elements (eps_hat - eps)², / B.
    (The official code averages over all B samples, adding a constant ~1 per level-0 sample:
    the same gradient.) ce_weight = 0 or mse_weight = 0 give the paper's ablation rows.

    Args:
        net: the classifier backbone, called as net(x, None, class_labels) -> [B, T + 2]
            (a UNet / ResidualMLP with time_conditioning: false and a LogitsHead with
            num_logits T + 2 and cumsum: true; attention_backend: math for training).
        schedule: a DiscreteSchedule (linear betas as in the paper, or "dre_uniform" for
            CDM(unif.), section 4.3).
        ce_weight, mse_weight: loss weights (paper: 0.001 and 1).
        class_conditional: feed labels to the net (it needs num_classes; index num_classes is
            the null label), with label dropout during training and classifier-free guidance.
        label_dropout: probability of replacing a training label by the null label.
        guidance_weight: w of eps = (1 + w)·eps_c - w·eps_u when sampling a conditional model.
        num_bins: quantization levels of the data for bits/dim (default: the DataModule's).
        Others: see ``DiffusionModule``.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: DiscreteSchedule,
        ce_weight: float = 0.001,
        mse_weight: float = 1.0,
        class_conditional: bool = False,
        label_dropout: float = 0.1,
        guidance_weight: float = 0.0,
        num_bins: int | None = None,
        sampler: SamplerConfig | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        data_shape: Sequence[int] | None = None,
        seed: int = 0,
        predict: PredictConfig | None = None,
    ) -> None:
        super().__init__(schedule, sampler, optimizer, lr_scheduler, data_shape, seed, predict)
        self.save_configuration(["net"])
        if not isinstance(schedule, DiscreteSchedule):
            raise NoiseclsError(
                "CDM classifies discrete noise levels: use noisecls.process.schedules."
                "DiscreteSchedule (kind linear or dre_uniform)"
            )
        if ce_weight < 0 or mse_weight < 0 or ce_weight + mse_weight == 0:
            raise NoiseclsError(
                f"CDM needs ce_weight, mse_weight >= 0, not both 0; got {ce_weight}, {mse_weight}"
            )
        if not 0 <= label_dropout < 1:
            raise NoiseclsError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        if num_bins is not None and num_bins < 2:
            raise NoiseclsError(f"num_bins must be >= 2 (or null), got {num_bins}")
        _check_classifier(net, schedule.num_levels + 2, needs_double_backward=mse_weight > 0)
        num_classes = getattr(net, "num_classes", None)
        if class_conditional and num_classes is None:
            raise NoiseclsError(
                "class_conditional CDM needs a net with num_classes (set the net's num_classes)"
            )
        self.net = net
        self.ce_weight, self.mse_weight = ce_weight, mse_weight
        self.class_conditional = class_conditional
        self.num_classes = num_classes
        self.label_dropout = label_dropout
        self.guidance_weight = guidance_weight
        self.num_bins = num_bins
        self.model = CDMDenoiser(net, schedule, null_label=num_classes)

    # ---- the method -----------------------------------------------------------------------
    def class_labels(self, labels: Tensor | None) -> Tensor | None:
        return labels if self.class_conditional else None

    def denoiser(self) -> Denoiser:
        """The gradient denoiser; with classifier-free guidance (``guidance_weight`` w != 0,
        which needs class_labels) when class-conditional. Without labels the conditional
        model's denoiser is the unconditional one (the null label)."""
        if self.class_conditional and self.guidance_weight != 0:
            return GuidedDenoiser(self.model, self.guidance_weight, null_label=self.num_classes)
        return self.model

    def mmse_denoiser(self) -> Denoiser:
        """The unguided gradient denoiser (classifier-free guidance is for sampling only)."""
        return self.model

    def drop_labels(self, labels: Tensor | None, generator: torch.Generator) -> Tensor | None:
        """Labels with each replaced by the null label w.p. label_dropout (training only), so
        the unconditional branch that guidance subtracts is trained."""
        if labels is None or not self.training or self.label_dropout == 0:
            return labels
        drop = per_example(
            generator,
            labels.shape[0],
            lambda m: torch.rand(m, generator=generator, device=labels.device),
        )
        return torch.where(drop < self.label_dropout, self.num_classes, labels)

    def training_loss(
        self, x0: Tensor, labels: Tensor | None, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        n, num_levels = x0.shape[0], self.model.num_levels
        level = per_example(
            generator,
            n,
            lambda m: torch.randint(0, num_levels + 2, (m,), generator=generator, device=x0.device),
        )
        eps = randn_per_example(x0, generator)
        x_t = self.model.add_noise(x0, level, eps)
        labels = self.drop_labels(labels, generator)
        extras: dict[str, Tensor] = {}
        train_mse = self.mse_weight > 0 and self.training and torch.is_grad_enabled()
        if self.mse_weight > 0 or not self.training:
            # Evaluation reports the MSE of every model (Table 1's CE-only row too); the graph
            # through the input gradient is built only to train on it.
            eps_hat, logits = self.model.predict_eps(x_t, level, labels, create_graph=train_mse)
            per_sample = (eps_hat - eps).pow(2).reshape(n, -1).mean(dim=1)
            noisy = (level >= 1) & (level <= num_levels)
            extras["mse"] = torch.where(noisy, per_sample, 0.0).sum() / n
        else:
            logits = self.model.logits(x_t, labels)
        extras["ce"] = F.cross_entropy(logits.float(), level)
        extras["level_accuracy"] = (logits.argmax(dim=1) == level).float().mean()
        # A zero-weighted term stays in the graph, so every parameter (e.g. the last bias, which
        # the input gradient never sees) reaches the loss and DDP's all-reduce.
        loss = self.ce_weight * extras["ce"]
        if self.mse_weight > 0:
            loss = loss + self.mse_weight * extras["mse"]
        return loss, {name: value.detach() for name, value in extras.items()}

    # ---- likelihood -----------------------------------------------------------------------
    def log_likelihood(
        self,
        x: Tensor,
        *,
        estimator: Literal["cdm", "ode", "elbo"] = "cdm",
        level: int = 0,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
        **options: Any,
    ) -> Tensor:
        """log p(x) in nats [B] of x [B, ...]; "cdm" (default): exact, one forward pass
        (Theorem 3.2), of the level-``level`` density (0: data); "ode" / "elbo" with their
        ``options`` (trace, num_steps, solver, rtol, atol, num_probes, num_levels): see
        ``DiffusionModule.log_likelihood``. Class labels give log p(x | y) (default: p(x))."""
        if estimator != "cdm":
            return super().log_likelihood(
                x, estimator=estimator, generator=generator, class_labels=class_labels, **options
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            return cdm_log_likelihood(self.model, x, level=level, class_labels=class_labels)

    def normalize_levels(
        self,
        num_chains: int = 256,
        mala_steps: int = 1,
        generator: torch.Generator | None = None,
    ) -> LevelNormalizers:
        """Make every level density q_t(x) = exp(f_t - f_{T+1}) N(x; 0, I) (eq. 10) integrate
        to 1: estimate log Z_t by annealed importance sampling down the levels
        (``noisecls.likelihood.cdm_normalization``) and subtract it from the logit f_t by
        shifting the head's last biases (with cumsum: bias_t -= log Z_t - log Z_{t-1}).

        Only per-level constants change, so the gradient denoiser (eq. 8) is exactly the same;
        the one-pass likelihood at every level is then that of a normalised density. The
        cross-entropy leaves these constants nearly free (README, "Why does CDM trail the DDM
        at equal steps?"). Needs the net's ``LogitsHead`` (``net.head.linear``) and
        ``data_shape``. Returns the :class:`LevelNormalizers` removed (log Z_t [T + 2], float64
        nats, and the AIS weights' effective sample size per level).
        """
        head = getattr(self.net, "head", None)
        linear = getattr(head, "linear", None)
        if linear is None or linear.bias is None or self.data_shape is None:
            raise NoiseclsError(
                "normalize_levels needs a net with a LogitsHead (net.head.linear with a bias) "
                "and the model's data_shape"
            )
        normalizers = cdm_log_normalizers(
            self.model,
            self.data_shape,
            num_chains=num_chains,
            mala_steps=mala_steps,
            generator=generator,
            device=linear.bias.device,
        )
        log_z = normalizers.log_z
        shift = torch.diff(log_z, prepend=log_z.new_zeros(1)) if head.cumsum else log_z
        with torch.no_grad():
            linear.bias.sub_(shift.to(linear.bias))
        return normalizers

    def bits_per_dim(
        self,
        x: Tensor,
        convention: Literal["dequantized", "paper"] = "dequantized",
        num_bins: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Negative log-likelihood in bits/dim [B] of quantized data x [B, ...] in [-1, 1].

        "dequantized" (the standard): -log2 p(x + u) / D + log2(num_bins / 2) with uniform
        dequantization u, an upper bound on the discrete NLL. "paper": the same conversion
        applied to the density at the pixel values themselves (the official code's +7 bits for
        8-bit data), the convention of the paper's CIFAR-10 3.38 bits/dim.
        """
        num_bins = num_bins or self.data_num_bins()
        if num_bins is None:
            raise NoiseclsError(
                "bits/dim of quantized data needs num_bins: set model.init_args.num_bins"
            )
        if convention == "dequantized":
            x = dequantize(x, num_bins, generator)
        elif convention != "paper":
            raise NoiseclsError(f"convention must be dequantized or paper, got {convention!r}")
        nll = -self.log_likelihood(x)
        return nll_to_bits_per_dim(nll, x[0].numel(), num_bins)

    def data_num_bins(self) -> int | None:
        """num_bins given to the model, else the attached DataModule's (None: continuous)."""
        if self.num_bins is not None:
            return self.num_bins
        trainer = self._trainer
        return getattr(trainer.datamodule, "num_bins", None) if trainer is not None else None

    def log_one_pass_nll(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> None:
        """Log the one-pass NLL of a held-out batch: ``{stage}/cdm_nll_bpd`` (dequantized, or
        continuous data's bits/dim) and ``{stage}/cdm_nll_bpd_paper`` (the paper's convention)."""
        x0 = batch[0]
        num_bins = self.data_num_bins()
        kwargs = {"sync_dist": True, "batch_size": x0.shape[0]}
        if num_bins is None:
            bpd = nll_to_bits_per_dim(-self.log_likelihood(x0), x0[0].numel())
            self.log(f"{stage}/cdm_nll_bpd", bpd.mean(), **kwargs)
            return
        g = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, batch_idx, 1))
        deq = self.bits_per_dim(x0, "dequantized", num_bins, g)
        self.log(f"{stage}/cdm_nll_bpd", deq.mean(), **kwargs)
        self.log(f"{stage}/cdm_nll_bpd_paper", self.bits_per_dim(x0, "paper").mean(), **kwargs)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.log_one_pass_nll(batch, batch_idx, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self.log_one_pass_nll(batch, batch_idx, "test")

    # ---- sampling -------------------------------------------------------------------------
    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        sampler: SamplerConfig | None = None,
        class_labels: Tensor | None = None,
    ) -> tuple[Tensor, int]:
        """As ``DiffusionModule.sample``; a class-conditional model without labels draws them
        uniformly (from ``generator``) and samples with guidance."""
        if self.class_conditional and class_labels is None:
            class_labels = torch.randint(
                self.num_classes, (n,), generator=generator, device=self.device
            )
        return super().sample(n, generator=generator, sampler=sampler, class_labels=class_labels)
