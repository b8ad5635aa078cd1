"""DG: Discriminator Guidance on any trained score model (Kim et al., ICML 2023).

Pipeline: (1) ``noisecls predict`` with a trained model writes fake samples (SampleWriter);
(2) :class:`~noisecls.data.fake.RealFakeDataModule` pairs them with the real data (real = 1,
fake = 0); (3) ``noisecls fit`` with :class:`DG` trains a time-dependent discriminator
d(x_t, t) on the linear VP SDE with BCE; (4) sampling (``noisecls test`` / ``predict``) runs the
frozen score model through :class:`~noisecls.denoisers.DiscriminatorGuidedDenoiser`.
"""

from __future__ import annotations

import dataclasses
import importlib
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from noisecls.callbacks.features import state_dict_sha256
from noisecls.data.fake import (
    RealFakeDataModule,
    fake_set_manifest,
    split_targets,
    target_indices,
)
from noisecls.denoisers import (
    ClampedDenoiser,
    CountingDenoiser,
    DiscriminatorGuidedDenoiser,
    TrainableDenoiser,
)
from noisecls.errors import NoiseclsError
from noisecls.methods.base import DiffusionModule, PredictConfig
from noisecls.methods.ddm import DDM
from noisecls.methods.dg_features import FeatureCache, FeatureCacheBuilder, FeatureCacheConfig
from noisecls.pretrained import is_diffusers_source, load_pretrained
from noisecls.process.schedules import LogSNRSchedule, broadcast_like
from noisecls.randomness import derive_seed, per_example, randn_per_example
from noisecls.samplers import SamplerConfig, run_sampler, sample_heun


# ------------------------------------------------------------------------------------ checkpoints
def load_module_checkpoint(path: str) -> DiffusionModule:
    """A trained module of this framework from its Lightning checkpoint (the class and init
    arguments that ``noisecls fit`` saved; EMA weights where EMAWeightAveraging wrote them), or
    a DDM over a diffusers model directory / cached hub id (``noisecls.pretrained``)."""
    if is_diffusers_source(path):
        pretrained = load_pretrained(path)
        net = pretrained.net
        return DDM(net, pretrained.schedule, pretrained.prediction,
                   class_conditional=net.num_classes is not None,
                   data_shape=pretrained.data_shape)  # fmt: skip
    file = Path(path).expanduser()
    if not file.is_file():
        raise NoiseclsError(f"checkpoint {file} does not exist; train the model first")
    ckpt = torch.load(file, map_location="cpu", weights_only=True)
    class_path = (ckpt.get("hyper_parameters") or {}).get("_class_path")
    if class_path is None:
        raise NoiseclsError(
            f"{file} does not name its model class (not written by `noisecls fit`); give the "
            "model in the config as well (score_model / feature_model) and the path"
        )
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise NoiseclsError(f"the checkpoint {file} names an unknown class {class_path}") from err
    try:
        return cls.load_from_checkpoint(file, map_location="cpu")
    except (TypeError, ValueError, ArgumentError) as err:
        raise NoiseclsError(
            f"{file} does not hold the whole model configuration (networks are configured, not "
            "saved): give the model's config as score_model / feature_model next to the path"
        ) from err


def load_weights(module: nn.Module, path: str) -> None:
    """Load a Lightning checkpoint's ``state_dict`` into ``module`` (strict)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise NoiseclsError(f"checkpoint {file} does not exist; train the model first")
    state = torch.load(file, map_location="cpu", weights_only=True)["state_dict"]
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise NoiseclsError(f"{file} does not fit the configured model: {first}") from err


def score_run_checkpoint(run: str) -> tuple[str, str]:
    """(checkpoint, manifest weights hash) of the model that wrote ``<run>/samples`` (the fake
    set ``noisecls predict`` writes under the score model's ``default_root_dir``), from the
    predict manifest. A checkpoint path recorded relative to another working directory is looked
    up under ``run``."""
    samples = Path(run).expanduser() / "samples"
    manifest = fake_set_manifest(samples)
    if manifest is None or not manifest.get("checkpoint"):
        raise NoiseclsError(
            f"{samples} holds no fake set written by `noisecls predict` from a checkpoint: run "
            "`noisecls predict --config <score config> --ckpt_path <its checkpoint> "
            "--model.init_args.predict.num_samples train` first"
        )
    recorded = Path(manifest["checkpoint"]).expanduser()
    candidates = [recorded] + [
        Path(run).expanduser().joinpath(*recorded.parts[i:]) for i in range(len(recorded.parts))
    ]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise NoiseclsError(
            f"the checkpoint that wrote {samples} ({recorded}) is gone; give "
            "model.init_args.score_checkpoint"
        )
    return str(found), manifest.get("weights_sha256", "")


def frozen_module(
    module: DiffusionModule | None, checkpoint: str | None, role: str
) -> DiffusionModule:
    """The module configured for ``role`` (weights from ``checkpoint`` if given), or the one the
    checkpoint describes; frozen (no gradients, eval mode)."""
    if module is None and checkpoint is None:
        raise NoiseclsError(f"DG needs a {role}: set {role} (a model config) or {role}_checkpoint")
    if module is None:
        module = load_module_checkpoint(checkpoint)  # type: ignore[arg-type]
    elif checkpoint is not None:
        load_weights(module, checkpoint)
    module.requires_grad_(False)
    return module.eval()


# ------------------------------------------------------------------------------------ discriminator
class NoisyFeatures(nn.Module):
    """Frozen noise-conditional feature extractor: the encoder (bottleneck) of a pretrained
    backbone of this framework, fed exactly as its own denoiser feeds it.

    ``forward(x_vp [B, ...], tau float64 [B], class_labels) -> features [B, C, h, w]`` for VP
    inputs of the discriminator's schedule: x = x_vp / alpha(tau) is the sigma-space input at
    sigma = ve_sigma(tau), which the pretrained denoiser maps to its own scaling and noise input.

    Args:
        denoiser: the pretrained module's TrainableDenoiser (PredictionDenoiser / EDMDenoiser)
            whose ``net`` has ``encode`` (UNet, ResidualMLP).
        schedule: the discriminator's VP schedule.
    """

    def __init__(self, denoiser: TrainableDenoiser, schedule: LogSNRSchedule) -> None:
        super().__init__()
        if not isinstance(denoiser, TrainableDenoiser) or not hasattr(denoiser.net, "encode"):
            raise NoiseclsError(
                "the DG feature extractor must be a network-backed model (DDM-style denoiser) "
                "whose backbone has an encoder (UNet / ResidualMLP)"
            )
        self.denoiser = denoiser.requires_grad_(False).eval()
        self.schedule = schedule

    def train(self, mode: bool = True) -> NoisyFeatures:
        return super().train(False)  # frozen: always in eval mode

    def forward(self, x_vp: Tensor, tau: Tensor, class_labels: Tensor | None = None) -> Tensor:
        alpha = self.schedule.alpha(tau).to(x_vp.device)
        sigma = self.schedule.ve_sigma(tau).to(x_vp.device)
        x_in, noise_in = self.denoiser.network_input(x_vp / broadcast_like(alpha, x_vp), sigma)
        return self.denoiser.net.encode(x_in, noise_in, class_labels)


class Discriminator(nn.Module):
    """Time-dependent discriminator logit log(d/(1 - d)) on the linear VP SDE.

    ``forward(x_vp [B, ...], tau float64 [B], class_labels [B] | None) -> logit [B]``: the net
    (a U-Net encoder or residual MLP with a :class:`~noisecls.nets.ScalarHead`) sees the VP input
    (or, with ``features``, the frozen extractor's features of it), ``schedule.noise_input(tau)``
    and the labels when ``class_conditional``.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: LogSNRSchedule,
        features: NoisyFeatures | None = None,
        class_conditional: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.features = features
        self.class_conditional = class_conditional

    def forward(self, x_vp: Tensor, tau: Tensor, class_labels: Tensor | None = None) -> Tensor:
        labels = class_labels if self.class_conditional else None
        h = x_vp if self.features is None else self.features(x_vp, tau, labels)
        return self.classify(h, tau, labels)

    def classify(self, h: Tensor, tau: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Logits [B] of the net on its input h (x_vp, or the extractor's features of it)."""
        labels = class_labels if self.class_conditional else None
        noise_in = self.schedule.noise_input(tau).to(device=h.device, dtype=h.dtype)
        logit = self.net(h, noise_in, labels)
        if logit.shape != (h.shape[0],):
            raise NoiseclsError(
                f"the discriminator net returned shape {list(logit.shape)}, expected "
                f"[{h.shape[0]}]: give it a ScalarHead (head: noisecls.nets.ScalarHead)"
            )
        return logit


# ------------------------------------------------------------------------------------ guidance
@dataclass
class GuidanceConfig:
    """How DG corrects sampling (the official EDM-G++ options).

    Args:
        weight: w of the first-order stage (every stage of samplers other than Heun); 2.0.
        second_order_weight: w of Heun's second-order (corrector) stage; 0.
        time_min, time_max: diffusion-time window [0.01, 1.0] where the correction applies.
        prob_clip: discriminator output clipped to [c, 1 - c] (1e-5).
        boost_factor, boost_period: adaptive boosting of the guidance weight (the paper's
            appendix): every ``boost_period``-th step the correction of samples the
            discriminator judges fake (logit < 0) is multiplied by ``boost_factor`` (1: off; the
            official values are 2 and 2). Counted per first-order evaluation, so not with
            dpm_solver_2 (two evaluations per step).
        boost_churn, boost_churn_period: adaptive boosting of stochasticity (Heun only): every
            ``boost_churn_period``-th step, samples judged fake at the previous step get EDM
            churn s_churn = ``boost_churn`` (0: off; the official values are 4 and 5).
    """

    weight: float = 2.0
    second_order_weight: float = 0.0
    time_min: float = 0.01
    time_max: float = 1.0
    prob_clip: float = 1e-5
    boost_factor: float = 1.0
    boost_period: int = 2
    boost_churn: float = 0.0
    boost_churn_period: int = 5

    def __post_init__(self) -> None:
        if not 0.0 <= self.time_min <= self.time_max <= 1.0:
            raise ValueError("guidance needs 0 <= time_min <= time_max <= 1")
        if self.boost_churn < 0 or self.boost_churn_period < 1:
            raise ValueError("guidance needs boost_churn >= 0 and boost_churn_period >= 1")

    def boosts_weight(self) -> bool:
        return self.boost_factor != 1.0

    def boosts_churn(self) -> bool:
        return self.boost_churn > 0


def boosted_churn(
    predictor: DiscriminatorGuidedDenoiser, churn: float, period: int
) -> Callable[[int], Tensor | None]:
    """Heun's ``churn_override`` for DG's stochastic boosting: at steps i with i % period == 0,
    s_churn [B] = ``churn`` for samples whose last first-order log(d/(1 - d)) was negative (judged
    fake), 0 for the others; None (the configured churn) at other steps or before any verdict."""

    def override(i: int) -> Tensor | None:
        verdict = predictor.last_log_ratio
        if i % period != 0 or verdict is None:
            return None
        return torch.where(verdict < 0, churn, 0.0).to(torch.float64)

    return override


# ------------------------------------------------------------------------------------ module
def class_balanced_mean(values: Tensor, is_real: Tensor) -> Tensor:
    """The mean of ``values`` [B] over the real examples (``is_real`` [B] = 1) and over the fake
    ones, averaged over the classes present in the batch."""
    means = [values[mask].mean() for mask in (is_real > 0.5, is_real <= 0.5) if mask.any()]
    return torch.stack(means).mean()


class DG(DiffusionModule):
    """Discriminator Guidance: trains the discriminator; samples the frozen score model with it.

    Training batches are ``(x, y)`` from :class:`~noisecls.data.fake.RealFakeDataModule` with
    y [B, 2] = (real 1 / fake 0, class label). Each step draws t by importance sampling on
    [t_min, 1], diffuses x with fresh noise, x_t = alpha(t)·x + sigma(t)·eps, and minimises the
    BCE of sigmoid(logit) clipped to [1e-5, 1 - 1e-5] (the paper's eq. 6 with the forward-marginal
    design of its A.4), each class weighted 1/2 (see :meth:`classification`). Validation / test
    log the BCE and accuracy overall and per diffusion-time bin (``{stage}/acc_t0.00-0.20``,
    ...; near 0.5 at large t is expected) and return the probabilities that
    :class:`~noisecls.callbacks.calibration.DiscriminatorCalibration` turns into a reliability
    diagram.

    Args:
        discriminator_net: the discriminator backbone with a ScalarHead (a UNet encoder; its
            in_channels are the feature channels when ``feature_model`` is used).
        score_run: the score model's output directory (its ``trainer.default_root_dir``) after
            ``noisecls fit`` and ``noisecls predict``: the fake set is ``<score_run>/samples``
            (the data's default ``fake_dirs``) and the model is rebuilt from the checkpoint its
            manifest names (checked against the manifest's weights hash).
        score_model / score_checkpoint: instead of ``score_run``, the trained model to guide:
            its config (weights loaded from the checkpoint when both are given) or only its
            ``noisecls fit`` checkpoint (which holds its configuration), or a diffusers model
            directory (or hub id in the local cache) as ``score_checkpoint`` alone.
        feature_model / feature_checkpoint: optional frozen pretrained noise-conditional
            feature extractor (any network-backed model of this framework; its encoder).
        features_from_score: use the frozen score model's own encoder as the feature
            extractor (instead of feature_model / feature_checkpoint).
        feature_cache: precompute the extractor's features of the training split once (K noise
            draws per example, on disk) and train on them (see
            :mod:`noisecls.methods.dg_features`); validation still runs the extractor live. The
            cached examples are un-augmented (no random flips of the real images).
        guidance: how sampling is corrected (see :class:`GuidanceConfig`).
        vp_schedule: the discriminator's VP SDE (default linear, beta 0.1 -> 20).
        t_min: smallest training time (1e-5).
        class_conditional: the discriminator sees the class labels.
        val_bins: number of diffusion-time bins of the validation metrics.
        sampler: the sampler to guide. Default: the one that wrote the fake set (recorded in
            the ``noisecls predict`` manifest of ``fake_dirs``; the discriminator learned that
            sampler's errors and the paper's Theorem 1 holds for it), else the score model's.
        allow_sampler_mismatch: accept a ``sampler`` other than the fake set's (refused in one
            line otherwise).
        optimizer: default Adam(3e-4). Others: see ``DiffusionModule``.
    """

    evaluation_hparams: tuple[str, ...] = (
        "sampler", "predict", "guidance", "allow_sampler_mismatch"
    )  # fmt: skip

    def __init__(
        self,
        discriminator_net: nn.Module,
        score_run: str | None = None,
        score_model: DiffusionModule | None = None,
        score_checkpoint: str | None = None,
        feature_model: DiffusionModule | None = None,
        feature_checkpoint: str | None = None,
        features_from_score: bool = False,
        feature_cache: FeatureCacheConfig | None = None,
        guidance: GuidanceConfig | None = None,
        vp_schedule: LogSNRSchedule | None = None,
        t_min: float = 1e-5,
        class_conditional: bool = False,
        val_bins: int = 5,
        sampler: SamplerConfig | None = None,
        allow_sampler_mismatch: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        data_shape: Sequence[int] | None = None,
        seed: int = 0,
        predict: PredictConfig | None = None,
    ) -> None:
        run_hash = None
        if score_run is not None:
            if score_model is not None or score_checkpoint is not None:
                raise NoiseclsError(
                    "give the score model once: model.init_args.score_run, or score_model / "
                    "score_checkpoint"
                )
            score_checkpoint, run_hash = score_run_checkpoint(score_run)
        score = frozen_module(score_model, score_checkpoint, "score_model")
        if run_hash and state_dict_sha256(score.state_dict()) != run_hash:
            raise NoiseclsError(
                f"{score_checkpoint} no longer holds the weights that wrote {score_run}/samples "
                "(trained further?): rerun `noisecls predict` with it, or give score_checkpoint"
            )
        super().__init__(
            score.schedule,
            sampler or score.sampler,
            optimizer,
            lr_scheduler,
            data_shape if data_shape is not None else score.data_shape,
            seed,
            predict,
        )
        self.save_configuration(["discriminator_net", "score_model", "feature_model"])
        vp = vp_schedule or LogSNRSchedule(kind="linear", beta_min=0.1, beta_max=20.0)
        if not isinstance(vp, LogSNRSchedule) or vp.kind != "linear":
            raise NoiseclsError("vp_schedule must be LogSNRSchedule(kind='linear')")
        if not 0 < t_min < 1 or val_bins < 1:
            raise NoiseclsError("DG needs 0 < t_min < 1 and val_bins >= 1")
        features = None
        extractor_given = feature_model is not None or feature_checkpoint is not None
        if features_from_score and extractor_given:
            raise NoiseclsError(
                "give the feature extractor once: features_from_score: true, or feature_model / "
                "feature_checkpoint"
            )
        if features_from_score or extractor_given:
            extractor = score if features_from_score else frozen_module(
                feature_model, feature_checkpoint, "feature_model"
            )  # fmt: skip
            features = NoisyFeatures(extractor.denoiser(), vp)  # type: ignore[arg-type]
        if feature_cache is not None and features is None:
            raise NoiseclsError(
                "feature_cache caches the features of a frozen extractor: set features_from_score "
                "or feature_model / feature_checkpoint too, or remove feature_cache"
            )
        self.feature_cache = feature_cache
        self.cached_features: FeatureCache | None = None
        self.score_model = score
        self.discriminator = Discriminator(discriminator_net, vp, features, class_conditional)
        self.vp_schedule = vp
        self.guidance = guidance or GuidanceConfig()
        self.t_min = t_min
        self.class_conditional = class_conditional
        self.val_bins = val_bins
        self.score_run = score_run
        self.sampler_given = sampler is not None
        self.allow_sampler_mismatch = allow_sampler_mismatch

    def fake_set_dirs(self) -> list[str] | None:
        """The score run's fake set (RealFakeDataModule's default ``fake_dirs``)."""
        return None if self.score_run is None else [str(Path(self.score_run) / "samples")]

    def train(self, mode: bool = True) -> DG:
        super().train(mode)
        self.score_model.eval()  # frozen: no dropout, fixed normalisation
        return self

    # ---- labels / denoisers -------------------------------------------------------------
    def class_labels(self, labels: Tensor | None) -> Tensor | None:
        """Generation labels: the score model's convention, or the raw labels when only the
        discriminator is conditional."""
        score_labels = self.score_model.class_labels(labels)
        if score_labels is not None or not self.class_conditional:
            return score_labels
        return labels

    def guided_denoiser(self, weight: float, boost: bool = True) -> DiscriminatorGuidedDenoiser:
        """The score model's denoiser corrected by the discriminator with weight w (with the
        configured weight boosting unless ``boost`` is False)."""
        g = self.guidance
        return DiscriminatorGuidedDenoiser(
            self.score_model.denoiser(), self.discriminator, self.vp_schedule, weight=weight,
            time_min=g.time_min, time_max=g.time_max, prob_clip=g.prob_clip,
            boost_factor=g.boost_factor if boost else 1.0, boost_period=g.boost_period,
        )  # fmt: skip

    def denoiser(self) -> DiscriminatorGuidedDenoiser:
        """The first-order-weighted DG denoiser (what every stage of a non-Heun sampler uses)."""
        return self.guided_denoiser(self.guidance.weight)

    def run_sampler(
        self,
        config: SamplerConfig,
        x: Tensor,
        sigmas: Tensor,
        *,
        generator: torch.Generator | None = None,
        cond: dict | None = None,
    ) -> tuple[Tensor, int]:
        """Heun (not parallel) runs its corrector stage with ``second_order_weight`` and no
        boosting, and applies churn boosting; every other sampler uses the first-order weight
        throughout. NFE counts score-network calls."""
        g = self.guidance
        heun = config.name == "heun" and not config.parallel
        if g.boosts_churn() and not heun:
            raise NoiseclsError(
                "guidance.boost_churn needs the (sequential) heun sampler; set sampler.name: "
                "heun or guidance.boost_churn: 0"
            )
        if g.boosts_weight() and config.parallel:
            raise NoiseclsError(
                "guidance.boost_factor changes the denoiser from one step's evaluation to the "
                "next, which the parallel (Picard) sampler's sweeps cannot follow; set "
                "sampler.parallel: false or guidance.boost_factor: 1"
            )
        if g.boosts_weight() and config.name in ("dpm_solver_2", "dpm_2_ancestral"):
            raise NoiseclsError(
                f"guidance.boost_factor counts one evaluation per step, {config.name} makes two; "
                "use heun or a one-evaluation sampler (euler, ddim, ddpm, dpmpp_2m, ...) or "
                "guidance.boost_factor: 1"
            )
        first = self.denoiser()
        if not heun:
            return run_sampler(config, first, x, sigmas, generator=generator, cond=cond)
        second = self.guided_denoiser(g.second_order_weight, boost=False)
        clip = config.clip_x0
        predictor = CountingDenoiser(first if clip is None else ClampedDenoiser(first, clip))
        corrector = CountingDenoiser(second if clip is None else ClampedDenoiser(second, clip))
        churn = (
            boosted_churn(first, g.boost_churn, g.boost_churn_period) if g.boosts_churn() else None
        )
        out = sample_heun(
            predictor, x, sigmas, s_churn=config.s_churn, s_tmin=config.s_tmin,
            s_tmax=config.s_tmax, s_noise=config.s_noise, corrector=corrector,
            churn_override=churn, generator=generator, cond=cond,
        )  # fmt: skip
        return out, predictor.nfe + corrector.nfe

    def setup(self, stage: str) -> None:
        """Guide with the sampler that wrote the fake set (see ``sampler``), then the base
        checks."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        recorded = datamodule.fake_sampler() if isinstance(datamodule, RealFakeDataModule) else None
        if recorded is not None:
            fake = SamplerConfig.from_record(recorded)
            if not self.sampler_given:
                self.sampler = fake
            elif self.sampler != fake and not self.allow_sampler_mismatch:
                mine, theirs = dataclasses.asdict(self.sampler), dataclasses.asdict(fake)
                differ = [k for k in theirs if theirs[k] != mine[k]]
                raise NoiseclsError(
                    "DG's sampler differs from the one that wrote the fake set ("
                    + ", ".join(f"{k}: {mine[k]} vs {theirs[k]}" for k in differ)
                    + "): the discriminator learned that sampler's errors; remove "
                    "model.init_args.sampler to guide it, or set "
                    "model.init_args.allow_sampler_mismatch: true"
                )
        super().setup(stage)

    # ---- training ----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Find or build the feature cache of the training split (collective under DDP)."""
        if self.feature_cache is None:
            return
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, RealFakeDataModule):
            raise NoiseclsError(
                "feature_cache needs the training data from a RealFakeDataModule (data: "
                "noisecls.data.fake.RealFakeDataModule)"
            )
        dataset = datamodule.unaugmented_train_set()  # deterministic items for the cache
        features = self.discriminator.features
        assert features is not None  # checked in __init__
        builder = FeatureCacheBuilder(
            features, features.state_dict(), dataset, self.vp_schedule, self.t_min,
            self.feature_cache, self.seed, self.class_conditional, self.device,
        )  # fmt: skip
        self.cached_features = builder.build(
            self.global_rank, self.trainer.world_size, self.trainer.strategy.barrier
        )

    def cached_logits(
        self, index: Tensor, labels: Tensor | None, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Logits [B] and times [B] of one stored draw per example (``index`` [B] into the
        training split), the draw chosen uniformly with ``generator``."""
        cache = self.cached_features
        assert cache is not None
        draw = per_example(
            generator,
            index.shape[0],
            lambda m: torch.randint(cache.draws, (m,), generator=generator, device=self.device),
        )
        h, t = cache.lookup(index, draw, self.device)
        return self.discriminator.classify(h, t, labels), t

    def discriminator_logits(
        self, x0: Tensor, t: Tensor, class_labels: Tensor | None, generator: torch.Generator
    ) -> Tensor:
        """Logits [B] at x_t = alpha(t)·x0 + sigma(t)·eps (fresh eps from ``generator``)."""
        eps = randn_per_example(x0, generator)
        x_t = self.vp_schedule.add_noise(x0, t.to(x0.device), eps)
        return self.discriminator(x_t, t, class_labels)

    def classification(self, logits: Tensor, is_real: Tensor) -> tuple[Tensor, Tensor]:
        """Class-balanced BCE of sigmoid(logits [B]) clipped to [1e-5, 1 - 1e-5] against
        ``is_real`` [B], and the balanced accuracy of the decision logit > 0.

        Each class's mean counts 1/2 (the mean of the present classes), so the optimal logit is
        log p_t / q_t whatever the real / fake counts: with plain BCE it would carry the log prior
        ratio log(N_real / N_fake) as an offset, leaving the guidance gradient unchanged but
        shifting the boosting verdict (logit < 0) and the calibration."""
        d = torch.sigmoid(logits.float()).clamp(1e-5, 1 - 1e-5)
        target = is_real.to(d)
        bce = F.binary_cross_entropy(d, target, reduction="none")
        correct = ((logits > 0).to(d) == target).to(d)
        return class_balanced_mean(bce, target), class_balanced_mean(correct, target)

    def training_loss(
        self,
        x0: Tensor,
        labels: Tensor | None,
        generator: torch.Generator,
        is_real: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean BCE of a batch x0 [B, ...] with targets ``is_real`` [B] (default all real) at
        importance-sampled times, and the accuracy."""
        if is_real is None:
            is_real = torch.ones(x0.shape[0], device=x0.device)
        t = per_example(
            generator,
            x0.shape[0],
            lambda m: self.vp_schedule.sample_t_uniform_log_snr(
                m, self.t_min, generator=generator, device=x0.device
            ),
        )
        logits = self.discriminator_logits(x0, t, labels, generator)
        loss, accuracy = self.classification(logits, is_real)
        return loss, {"acc": accuracy}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        is_real, labels = split_targets(y)
        labels = self.discriminator_labels(labels)
        generator = self.step_generator(*self.micro_batch_salt(batch_idx))
        if self.cached_features is not None:
            logits, _ = self.cached_logits(target_indices(y), labels, generator)
            loss, accuracy = self.classification(logits, is_real)
        else:
            loss, extras = self.training_loss(x, labels, generator, is_real)
            accuracy = extras["acc"]
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log("train/acc", accuracy, batch_size=x.shape[0])
        return loss

    def discriminator_labels(self, labels: Tensor) -> Tensor | None:
        return labels if self.class_conditional else None

    def evaluation_loss(
        self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str
    ) -> dict[str, Tensor]:
        """BCE / accuracy at importance-sampled times and in ``val_bins`` equal time bins, with
        noise fixed per batch. Returns what calibration needs (see
        :class:`~noisecls.callbacks.calibration.DiscriminatorCalibration`): ``prob`` [B·bins]
        (the discriminator's d = sigmoid(logit) in the time bins), ``is_real`` [B·bins] and
        ``time_bin`` [B·bins] (int64 index of the bin)."""
        x, y = batch
        is_real, labels = split_targets(y)
        labels = self.discriminator_labels(labels)
        g = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, batch_idx))
        n = x.shape[0]
        loss, extras = self.training_loss(x, labels, g, is_real)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=n)
        self.log(f"{stage}/acc", extras["acc"], sync_dist=True, batch_size=n)
        probs = []
        for lo, hi in zip(*self.time_bin_edges(), strict=True):
            u = torch.rand(n, generator=g, device=self.device, dtype=torch.float64)
            logits = self.discriminator_logits(x, lo + (hi - lo) * u, labels, g)
            bce, accuracy = self.classification(logits, is_real)
            name = f"t{lo:.2f}-{hi:.2f}"
            self.log(f"{stage}/bce_{name}", bce, sync_dist=True, batch_size=n)
            self.log(f"{stage}/acc_{name}", accuracy, sync_dist=True, batch_size=n)
            probs.append(torch.sigmoid(logits.detach().float()))
        bins = torch.arange(self.val_bins, device=self.device).repeat_interleave(n)
        return {"prob": torch.cat(probs), "is_real": is_real.repeat(self.val_bins),
                "time_bin": bins}  # fmt: skip

    def time_bin_edges(self) -> tuple[list[float], list[float]]:
        """(lower, upper) edges of the ``val_bins`` equal diffusion-time bins on [t_min, 1]."""
        edges = torch.linspace(self.t_min, 1.0, self.val_bins + 1, dtype=torch.float64).tolist()
        return edges[:-1], edges[1:]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self.evaluation_loss(batch, batch_idx, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self.evaluation_loss(batch, batch_idx, "test")

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            params = [p for p in self.discriminator.parameters() if p.requires_grad]
            return torch.optim.Adam(params, lr=3e-4)
        return super().configure_optimizers()
