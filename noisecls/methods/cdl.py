"""CDL: Contrastive Diffusion Loss (Wu, Luo, Kong, Papalexakis & Ver Steeg, NeurIPS 2024).

A denoiser implies log-densities through the ITD estimate (``noisecls.likelihood.itd``), hence a
noise classifier: clean x (y = +1) against the same x noised at log-SNR zeta (y = -1), with the
Bayes-optimal logit

    logit(u) = log p(u) - log p_zeta(u),       L_CDL = E softplus(-y·logit(u))      (CDL eq. 8)

both densities estimated from the one denoiser with common random numbers (same log-SNRs, same
channel noise), so their Monte Carlo noise cancels in the logit. The training loss is DDM's
denoising loss + ``cdl_weight``·L_CDL on ``cdl_examples`` examples of each batch. It trains from
scratch or fine-tunes a DDM checkpoint (``init_from``), under any schedule: the estimator only
calls the sigma-space denoiser (sigma = exp(-a/2); for EDM D(x) = x - sigma·eps_hat).
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from noisecls.errors import NoiseclsError
from noisecls.likelihood.itd import (
    GaussianReference,
    ITDConfig,
    itd_integration_draws,
    itd_log_density_at,
    itd_log_likelihood,
    itd_log_snr_range,
    truncated_logistic,
)
from noisecls.methods.base import PredictConfig
from noisecls.methods.ddm import DDM
from noisecls.pretrained import is_diffusers_source, load_pretrained
from noisecls.process.schedules import NoiseSchedule, broadcast_like
from noisecls.randomness import StepGenerator, derive_seed
from noisecls.samplers import SamplerConfig


@dataclass
class ZetaConfig:
    """Distribution of the negatives' log-SNR zeta.

    Args:
        distribution: "logistic" (truncated at loc ± clip·scale; the official CIFAR-10 default
            loc 10.5, scale 1.5, clip 3) or "uniform" on [low, high].
    """

    distribution: Literal["logistic", "uniform"] = "logistic"
    loc: float = 10.5
    scale: float = 1.5
    clip: float = 3.0
    low: float = 6.0
    high: float = 15.0

    def __post_init__(self) -> None:
        if self.distribution not in ("logistic", "uniform"):
            raise ValueError(
                f"zeta.distribution must be logistic or uniform, got {self.distribution!r}"
            )
        if self.scale <= 0 or self.clip <= 0 or not self.low < self.high:
            raise ValueError("zeta needs scale > 0, clip > 0 and low < high")

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
        """n log-SNRs, float64 [n]."""
        if self.distribution == "uniform":
            u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
            return self.low + (self.high - self.low) * u
        half = self.clip * self.scale
        zeta, _ = truncated_logistic(
            (n,), self.loc, self.scale, self.loc - half, self.loc + half,
            generator=generator, device=device,
        )  # fmt: skip
        return zeta


class CDL(DDM):
    """DDM + the contrastive diffusion loss; log_likelihood defaults to the ITD estimate.

    Args:
        net, schedule, prediction, class_conditional: as in ``DDM``.
        cdl_weight: weight of L_CDL added to the denoising loss (0: plain DDM), or "official":
            the balance of the official code, w = 2·n / (B·R·D) for n contrastive examples in a
            (per-rank) batch of B, D data dimensions and R the length of the ITD log-SNR range.
            Derivation: the official loss is the ITD denoising loss in nats,
            0.5·(1/B)·sum_b w_b·sum_pixels (eps - eps_hat)², whose importance weights w_b average
            to the range length R, plus (1/B)·sum over the n examples of the cross-entropy:
            ≈ 0.5·R·D·[mean_{b,pixels} (eps - eps_hat)² + 2n/(B·R·D)·mean_n CE]; ours is the
            bracket (a per-element mean denoising loss + w·mean CE). For v / x0 / EDM targets
            the per-element loss has another scale; the formula is kept (state your own weight
            to change it). The official CIFAR-10 run: n = 2, B = 64, R = 24, D = 3072.
        cdl_examples: examples per batch that enter L_CDL (each gives a positive x and a
            negative x_zeta), the first ones of the batch.
        cdl_points: ITD log-SNR points per density estimate inside the loss.
        eval_examples: held-out examples per validation / test batch whose pairs measure the
            noise classifier (``val/cdl_loss``, ``val/cdl_accuracy``).
        zeta: distribution of the negatives' log-SNR.
        itd: ITD estimator options (importance distribution, reference) for the loss and for
            ``log_likelihood``; ``itd.num_points`` is the evaluation default.
        init_from: a DDM or CDL checkpoint whose weights initialise the network when fitting
            starts (fine-tuning; a run resumed with ``--ckpt_path`` then restores its own), or a
            diffusers model directory / cached hub id (then ``net`` is a
            ``noisecls.pretrained.DiffusersModel`` of the same architecture).
        Others: see ``DiffusionModule``.

    The Gaussian reference (data mean and covariance) comes from the DataModule's
    ``train_statistics()`` at setup, or ``set_reference``; it is saved in checkpoints.
    """

    evaluation_hparams: tuple[str, ...] = ("sampler", "predict", "eval_examples")

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        prediction: Literal["eps", "x0", "v", "edm"] = "eps",
        class_conditional: bool = False,
        cdl_weight: float | Literal["official"] = "official",
        cdl_examples: int = 2,
        cdl_points: int = 64,
        eval_examples: int = 64,
        zeta: ZetaConfig | None = None,
        itd: ITDConfig | None = None,
        init_from: str | None = None,
        sampler: SamplerConfig | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        data_shape: Sequence[int] | None = None,
        seed: int = 0,
        predict: PredictConfig | None = None,
    ) -> None:
        super().__init__(
            net, schedule, prediction, class_conditional, sampler, optimizer, lr_scheduler,
            data_shape, seed, predict,
        )  # fmt: skip
        self.save_configuration(["net"])
        weight_ok = cdl_weight == "official" or (
            isinstance(cdl_weight, int | float) and cdl_weight >= 0
        )
        if not weight_ok or min(cdl_examples, cdl_points, eval_examples) < 1:
            raise ValueError(
                "CDL needs cdl_weight >= 0 (or 'official') and cdl_examples, cdl_points, "
                "eval_examples >= 1"
            )
        self.cdl_weight, self.cdl_examples, self.cdl_points = cdl_weight, cdl_examples, cdl_points
        self.eval_examples = eval_examples
        self.zeta = zeta or ZetaConfig()
        self.itd = itd or ITDConfig()
        self.init_from = init_from
        # A plain attribute, not buffers: the EMA callback pairs parameters and buffers of the
        # module with those of its copy made before setup, when the reference is not known yet.
        self._reference: GaussianReference | None = None

    # ---- fine-tuning ----------------------------------------------------------------------
    def load_denoiser_weights(self, path: str) -> None:
        """Initialise from a DDM / CDL checkpoint, or a diffusers model, of the same network and
        prediction."""
        if is_diffusers_source(path):
            self.load_diffusers_weights(path)
            return
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise NoiseclsError(f"cannot read init_from checkpoint {path!r}: {err}") from err
        hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
        writer = str(hparams.get("_class_path", "")).rsplit(".", 1)[-1]
        if writer and writer not in ("DDM", "CDL"):
            raise NoiseclsError(
                f"init_from {path!r} was written by {writer}; CDL fine-tunes DDM or CDL checkpoints"
            )
        if hparams.get("prediction", self.hparams.prediction) != self.hparams.prediction:
            raise NoiseclsError(
                f"init_from {path!r} predicts {hparams['prediction']!r} but this CDL predicts "
                f"{self.hparams.prediction!r}; set model.init_args.prediction to match"
            )
        state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
        if state is None:
            raise NoiseclsError(f"init_from {path!r} is not a Lightning checkpoint (no state_dict)")
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise NoiseclsError(
                f"init_from {path!r} does not fit this network ({first}); use the net "
                "init_args of the run that wrote it"
            ) from err

    def load_diffusers_weights(self, path: str) -> None:
        """Initialise ``net`` (a DiffusersModel) from a diffusers model directory / hub id."""
        pretrained = load_pretrained(path)
        if pretrained.prediction != self.hparams.prediction:
            raise NoiseclsError(
                f"init_from {path!r} predicts {pretrained.prediction!r} but this CDL predicts "
                f"{self.hparams.prediction!r}; set model.init_args.prediction to match"
            )
        try:
            self.net.load_state_dict(pretrained.net.state_dict(), strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise NoiseclsError(
                f"init_from {path!r} does not fit this network ({first}); use net: "
                "noisecls.pretrained.DiffusersModel with the same path"
            ) from err

    # ---- the Gaussian reference -----------------------------------------------------------
    def set_reference(self, mean: Tensor, covariance: Tensor) -> None:
        """Fit the ITD Gaussian reference to a data mean [D] and covariance [D, D]."""
        self._reference = GaussianReference.fit(
            mean, covariance, min_eigenvalue=self.itd.min_eigenvalue,
            diagonal=self.itd.reference == "diagonal",
        )  # fmt: skip

    @property
    def reference(self) -> GaussianReference:
        """The Gaussian reference of the ITD estimator (set at setup or by ``set_reference``),
        on the module's device."""
        if self._reference is None:
            raise NoiseclsError(
                "CDL needs the training data's mean and covariance: train it with a noisecls "
                "DataModule (train_statistics) or call set_reference(mean, covariance)"
            )
        if self._reference.mean.device != self.device:
            self._reference = self._reference.to(self.device)
        return self._reference

    def setup(self, stage: str) -> None:
        """Fine-tuning: load ``init_from`` when fitting starts; the reference from the
        DataModule's training statistics unless set (or restored from a checkpoint)."""
        if stage == "fit" and self.init_from is not None:
            self.load_denoiser_weights(self.init_from)
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if self._reference is None and hasattr(datamodule, "train_statistics"):
            self.set_reference(*datamodule.train_statistics())
        super().setup(stage)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._reference is not None:
            ref = self._reference
            checkpoint["cdl_reference"] = {
                "mean": ref.mean.cpu(),
                "eigenvalues": ref.eigenvalues.cpu(),
                "eigenvectors": None if ref.eigenvectors is None else ref.eigenvectors.cpu(),
            }

    def rank_invariant_state(self) -> dict[str, Tensor]:
        """Parameters and buffers, and the Gaussian reference (fitted on every rank from the
        same training split, outside DDP's broadcast)."""
        state = super().rank_invariant_state()
        ref = self._reference
        if ref is not None:
            state["reference.mean"], state["reference.eigenvalues"] = ref.mean, ref.eigenvalues
            if ref.eigenvectors is not None:
                state["reference.eigenvectors"] = ref.eigenvectors
        return state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("cdl_reference")
        if saved is not None:
            self._reference = GaussianReference(
                saved["mean"], saved["eigenvalues"], saved["eigenvectors"]
            )

    # ---- the estimator, the classifier and the loss -----------------------------------------
    def log_snr_limits(self) -> tuple[float, float]:
        """Log-SNR range the schedule trains on: (-2 log sigma_max, -2 log sigma_min)."""
        sigmas = self.schedule.sampling_sigmas(2)
        return -2 * math.log(float(sigmas[0])), -2 * math.log(float(sigmas[-2]))

    def noise_classifier_logit(
        self,
        u: Tensor,
        zeta: Tensor,
        *,
        num_points: int,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """log p(u) - log p_zeta(u) [N] for points u [N, ...] and zeta [N] (float64), both
        densities smoothed at the schedule's sigma_min (``itd.py``: the network is never called
        above its log-SNR range, and the integral covers every zeta).

        The two ITD estimates share their log-SNR draws and channel noise and run in one
        denoiser call of 2·N·num_points rows.
        """
        ref = self.reference
        limits = self.log_snr_limits()
        loc, scale, low, high = itd_log_snr_range(self.itd, ref, limits)
        a, w, eps = itd_integration_draws(u, num_points, loc, scale, low, high, generator)
        clean = torch.full_like(zeta, math.inf, dtype=torch.float64)
        cond = {"class_labels": class_labels.repeat(2)} if class_labels is not None else None
        both = itd_log_density_at(
            self.denoiser(), torch.cat([u, u]), ref, a.repeat(2, 1), w.repeat(2, 1),
            eps.repeat(2, *[1] * (eps.ndim - 1)),
            data_log_snr=torch.cat([clean, zeta.to(torch.float64)]),
            log_snr_limits=limits, control_variate=self.itd.control_variate, cond=cond,
        )  # fmt: skip
        log_p, log_p_zeta = both.chunk(2)
        return log_p - log_p_zeta

    def contrastive_loss(
        self, x0: Tensor, labels: Tensor | None, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """(L_CDL, classification accuracy) on clean x0 [n, ...] and their zeta-noised copies.

        Computed outside autocast (float32 network calls under ``trainer.precision:
        bf16-mixed``): the logit is a difference of ITD log-densities of thousands of nats, which
        bf16 network outputs moved by several percent (``tests/test_speed.py``)."""
        n = x0.shape[0]
        zeta = self.zeta.sample(n, generator, x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        # VP channel at zeta; sigmoid(-zeta) directly, since 1 - sigmoid(zeta) cancels at zeta ~ 10
        signal = broadcast_like(torch.sigmoid(zeta).sqrt(), x0)
        noise = broadcast_like(torch.sigmoid(-zeta).sqrt(), x0)
        noisy = signal * x0 + noise * eps
        u = torch.cat([x0, noisy])
        sign = torch.cat([x0.new_ones(n), -x0.new_ones(n)]).to(torch.float64)
        with torch.autocast(x0.device.type, enabled=False):
            logit = self.noise_classifier_logit(
                u, zeta.repeat(2), num_points=self.cdl_points, generator=generator,
                class_labels=None if labels is None else labels.repeat(2),
            )  # fmt: skip
        loss = F.softplus(-sign * logit).mean()
        accuracy = (sign * logit > 0).to(torch.float64).mean()
        return loss, accuracy

    def contrastive_weight(self, batch_size: int, num_examples: int) -> float:
        """``cdl_weight``, with "official" resolved to 2·n / (B·R·D) (see the class docstring)."""
        if self.cdl_weight != "official":
            return float(self.cdl_weight)
        _, _, low, high = itd_log_snr_range(self.itd, self.reference, self.log_snr_limits())
        return 2 * num_examples / (batch_size * (high - low) * self.reference.dim)

    def split_losses(
        self, x0: Tensor, labels: Tensor | None, generator: torch.Generator
    ) -> tuple[Tensor, Tensor | None, float, dict[str, Tensor]]:
        """(denoising loss, L_CDL or None when the weight is 0, its weight, extras) of a batch."""
        denoise, extras = super().training_loss(x0, labels, generator)
        n = min(self.cdl_examples, x0.shape[0])
        weight = self.contrastive_weight(x0.shape[0], n)
        if weight == 0:
            return denoise, None, weight, extras
        # The contrastive examples are the first n of each rank's batch: their noise is per rank.
        local = generator.rank_local(1) if isinstance(generator, StepGenerator) else generator
        cdl, accuracy = self.contrastive_loss(x0[:n], None if labels is None else labels[:n], local)
        extras = {**extras, "denoise_loss": denoise.detach(), "cdl_loss": cdl.detach(),
                  "cdl_accuracy": accuracy}  # fmt: skip
        return denoise, cdl.to(denoise.dtype), weight, extras

    def training_loss(
        self, x0: Tensor, labels: Tensor | None, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        denoise, cdl, weight, extras = self.split_losses(x0, labels, generator)
        return (denoise if cdl is None else denoise + weight * cdl), extras

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The step, and at logging steps the ratio of the weighted CDL gradient's norm to the
        denoising gradient's (``train/cdl_grad_ratio``: how much the contrastive term steers)."""
        loss = super().training_step(batch, batch_idx)
        interval = self.trainer.log_every_n_steps if self._trainer is not None else 0
        if interval and (self.global_step + 1) % interval == 0:  # the steps Lightning logs
            self.log("train/cdl_grad_ratio", self.gradient_ratio(batch))
        return loss

    def gradient_ratio(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """||grad(w·L_CDL)|| / ||grad L_denoise|| over the trainable parameters on this rank's
        batch (its own noise draws; 0 when the weight is 0)."""
        x0, labels = batch
        params = [p for p in self.parameters() if p.requires_grad]
        with torch.enable_grad():
            denoise, cdl, weight, _ = self.split_losses(
                x0, self.class_labels(labels), self.step_generator(11)
            )
            if cdl is None:
                return torch.zeros((), device=self.device)
            norms = [
                torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None))
                for grads in (
                    torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                    for term in (weight * cdl, denoise)
                )
            ]
        return (norms[0] / norms[1].clamp_min(1e-30)).detach()

    def evaluation_loss(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> None:
        """The denoising loss as ``{stage}/loss`` (comparable with the DDM's), and the noise
        classifier on held-out pairs: ``{stage}/cdl_loss`` and ``{stage}/cdl_accuracy`` (chance
        0.5) on up to ``eval_examples`` examples of the batch, fixed noise per batch."""
        x0, labels = batch
        labels = self.class_labels(labels)
        g = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, batch_idx))
        with torch.enable_grad():
            denoise, _ = super().training_loss(x0, labels, g)
        n = min(self.eval_examples, x0.shape[0])
        with torch.no_grad():
            cdl, accuracy = self.contrastive_loss(x0[:n], None if labels is None else labels[:n], g)
        for name, value in (("loss", denoise), ("cdl_loss", cdl), ("cdl_accuracy", accuracy)):
            self.log(f"{stage}/{name}", value.detach().float(), sync_dist=True, batch_size=n)

    @torch.no_grad()
    def log_likelihood(
        self,
        x: Tensor,
        *,
        estimator: Literal["itd", "ode", "elbo"] = "itd",
        num_points: int | None = None,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
        **options: Any,
    ) -> Tensor:
        """log p(x) in nats [B]; "itd" (default): the ITD estimate with ``num_points`` log-SNR
        points (default ``itd.num_points``) within the schedule's log-SNR range; "ode" / "elbo"
        with their ``options`` (trace, num_steps, solver, rtol, atol, num_probes, num_levels) as
        in ``DiffusionModule``."""
        if estimator != "itd":
            with torch.enable_grad():
                return super().log_likelihood(
                    x, estimator=estimator, generator=generator, class_labels=class_labels,
                    **options,
                )  # fmt: skip
        config = self.itd
        if num_points is not None:
            config = ITDConfig(**{**vars(self.itd), "num_points": num_points})
        cond = {"class_labels": class_labels} if class_labels is not None else None
        return itd_log_likelihood(
            self.denoiser(), x, self.reference, config, log_snr_limits=self.log_snr_limits(),
            generator=generator, cond=cond,
        )  # fmt: skip
