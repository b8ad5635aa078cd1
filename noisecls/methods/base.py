"""DiffusionModule: what every method shares (schedule, optimizer, sampling, seeding).

A method subclasses it with two things only: ``training_loss`` and ``denoiser``. Callbacks use
the method-agnostic surface ``denoiser()``, ``sample()`` and ``log_likelihood()``.
"""

from __future__ import annotations

import inspect
import math
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities.parsing import AttributeDict
from torch import Tensor

from noisecls.denoisers import Denoiser
from noisecls.errors import NoiseclsError
from noisecls.likelihood import ddpm_elbo_nll, ode_log_likelihood
from noisecls.process.schedules import DiscreteSchedule, NoiseSchedule
from noisecls.randomness import StepGenerator, derive_seed
from noisecls.samplers import SamplerConfig, run_sampler


@dataclass
class PredictConfig:
    """What ``noisecls predict`` generates: samples for seeds first_seed .. first_seed+num-1.

    Args:
        num_samples: exactly how many samples to write (sharded across DDP ranks, no repeats);
            ``train``: as many as the attached DataModule's training split (DG's fake set).
        first_seed: seed of the first sample; image i uses seed first_seed + i.
        batch_size: samples per sampler call (per rank).
    """

    num_samples: int | Literal["train"] = 64
    first_seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        count_ok = self.num_samples == "train" or (
            isinstance(self.num_samples, int) and self.num_samples >= 1
        )
        if not count_ok or self.batch_size < 1 or self.first_seed < 0:
            raise ValueError(
                "predict needs num_samples >= 1 (or 'train'), batch_size >= 1, first_seed >= 0"
            )


class SeedDataset(torch.utils.data.Dataset):
    """Integer seeds first_seed .. first_seed + num_samples - 1 (one per sample to generate)."""

    def __init__(self, num_samples: int, first_seed: int = 0) -> None:
        self.num_samples, self.first_seed = num_samples, first_seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Tensor:
        return torch.tensor(self.first_seed + index, dtype=torch.int64)


class NonFiniteLossError(NoiseclsError):
    """Training produced a NaN or infinite loss."""


class SharedFactory:
    """An optimizer / LR-scheduler factory from the config, shared (not copied) by deep copies.

    LightningCLI hands the module a jsonargparse partial whose instantiator refers back to the
    CLI, and so to the trainer and, under DDP, to the launcher's process handles (a lock):
    ``EMAWeightAveraging`` deep-copies the module into its ``AveragedModel`` and would copy (or,
    under DDP, fail to copy) all of that. A factory is configuration, not state, so the copy
    shares it.
    """

    def __init__(self, factory: Callable) -> None:
        self.factory = factory

    def __call__(self, *args, **kwargs):
        return self.factory(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> SharedFactory:
        return self


class RankDisagreementError(NoiseclsError):
    """DDP ranks hold different model state at the start of training."""


def tensor_fingerprint(t: Tensor) -> Tensor:
    """[3] float64: sum, sum of squares and a position-weighted sum of t's entries (equal tensors
    give equal fingerprints; a changed entry almost surely changes one of them)."""
    flat = t.detach().reshape(-1).to(torch.float64)
    weights = torch.linspace(-1.0, 1.0, flat.numel(), dtype=torch.float64, device=flat.device)
    return torch.stack([flat.sum(), flat.square().sum(), (weights * flat).sum()])


def check_ranks_agree(named: dict[str, Tensor], all_gather: Callable[[Tensor], Tensor]) -> None:
    """Raise :class:`RankDisagreementError` naming the tensors on which a rank differs from rank
    0. ``all_gather`` maps this rank's [k, 3] fingerprints to every rank's [W, k, 3]."""
    if not named:
        return
    mine = torch.stack([tensor_fingerprint(t).cpu() for t in named.values()])
    every = all_gather(mine).cpu()
    differs = (every != every[:1]).any(dim=2)  # [W, k]
    if differs.any():
        names = [name for name, bad in zip(named, differs.any(dim=0).tolist(), strict=True) if bad]
        ranks = differs.any(dim=1).nonzero().flatten().tolist()
        raise RankDisagreementError(
            f"DDP ranks {ranks} start training with different {', '.join(names[:5])} than rank 0: "
            "state built at setup must not depend on the rank (seed it, or build it on rank 0 "
            "and broadcast it)"
        )


class DiffusionModule(L.LightningModule):
    """Base LightningModule of every method.

    Args:
        schedule: the noise schedule training draws from and sampling walks down.
        sampler: default sampler for ``sample()`` (and so for FID / sample-grid callbacks).
        optimizer: optimizer factory (LightningCLI injects it from YAML); default Adam(2e-4).
        lr_scheduler: optional LR-scheduler factory, stepped every optimizer step.
        data_shape: shape of one sample, e.g. (3, 32, 32) or (2,); LightningCLI links it from
            the DataModule's ``data_shape``.
        seed: base seed of the per-step training noise (mixed with global step and rank, so a
            run resumed from a checkpoint draws the same noise as an uninterrupted one).
        predict: what ``noisecls predict`` generates (seeds and count).

    ``evaluation_hparams`` names the init arguments that only steer evaluation: the CLI takes
    them from the config / command line rather than from a ``--ckpt_path`` checkpoint.
    """

    evaluation_hparams: tuple[str, ...] = ("sampler", "predict")
    #: why this method's training loss must not run under mixed-precision autocast (None: it
    #: may); :mod:`noisecls.speed` refuses ``trainer.precision: bf16-mixed`` / ``16-mixed`` with it
    mixed_precision_refusal: str | None = None

    def __init__(
        self,
        schedule: NoiseSchedule,
        sampler: SamplerConfig | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        data_shape: Sequence[int] | None = None,
        seed: int = 0,
        predict: PredictConfig | None = None,
    ) -> None:
        super().__init__()
        self.schedule = schedule
        self.sampler = sampler or SamplerConfig()
        self.optimizer_factory = SharedFactory(optimizer) if optimizer is not None else None
        self.lr_scheduler_factory = (
            SharedFactory(lr_scheduler) if lr_scheduler is not None else None
        )
        self.data_shape = tuple(data_shape) if data_shape is not None else None
        self.seed = seed
        self.predict_config = predict or PredictConfig()

    def save_configuration(self, networks: Sequence[str]) -> None:
        """Save the caller's ``__init__`` arguments as hyperparameters. Under ``noisecls``
        (LightningCLI) they are the run's configuration, ``networks`` included as their
        class_path / init_args, so a checkpoint alone rebuilds its model (``load_from_checkpoint``:
        DG's score model, ``init_from``); built in Python, the ``networks`` arguments are module
        instances and are left out (their weights are in the state dict)."""
        # Lightning's CLI instantiator publishes the config through this context variable.
        from_cli = _given_hyperparameters.get() is not None
        frame = inspect.currentframe().f_back  # type: ignore[union-attr]
        self.save_hyperparameters(ignore=[] if from_cli else list(networks), frame=frame)

    @property
    def hparams_initial(self) -> AttributeDict:
        """The hyperparameters loggers record, with the training-noise ``seed`` as
        ``noise_seed``: Lightning merges them with the DataModule's, whose ``seed`` (the splits)
        may differ, and refuses to log clashing keys (which stopped ``fit --model.init_args.seed
        1`` with any logger)."""
        hparams = super().hparams_initial
        if "seed" in hparams:
            hparams["noise_seed"] = hparams.pop("seed")
        return hparams

    # ---- what a method defines -----------------------------------------------------------
    @abstractmethod
    def training_loss(
        self, x0: Tensor, labels: Tensor | None, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss of a clean batch x0 [B, ...] and extra values to log by name."""

    @abstractmethod
    def denoiser(self) -> Denoiser:
        """The method's Denoiser D(x, sigma, **cond) in sigma space."""

    def mmse_denoiser(self) -> Denoiser:
        """The method's estimate of E[x0 | x] (what denoising-MSE metrics measure): ``denoiser()``
        unless sampling adds guidance that is not part of that estimate (CDM's classifier-free
        guidance)."""
        return self.denoiser()

    def log_likelihood(
        self,
        x: Tensor,
        *,
        estimator: Literal["ode", "elbo"] = "ode",
        trace: Literal["exact", "hutchinson"] = "hutchinson",
        num_steps: int = 64,
        solver: Literal["rk4", "dopri5"] = "rk4",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        num_probes: int = 1,
        num_levels: int | None = None,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """log p(x) in nats per sample [B] for continuous x [B, ...] (data scale).

        "ode": the probability-flow ODE of ``denoiser()`` between the schedule's smallest and
        largest sigma (trace exact or Hutchinson with ``num_probes`` probes; ``num_steps`` RK4
        steps, or adaptive dopri5 with ``rtol`` / ``atol``). "elbo": the DDPM
        variational bound (a lower bound on log p; discrete schedules only; ``num_levels``
        levels drawn at random, or all). Methods with their own estimator override this.
        """
        cond = {"class_labels": class_labels} if class_labels is not None else None
        if estimator == "elbo":
            if not isinstance(self.schedule, DiscreteSchedule):
                raise NoiseclsError("the ELBO estimator needs a DiscreteSchedule; use 'ode'")
            return -ddpm_elbo_nll(
                self.denoiser(),
                x,
                self.schedule,
                num_levels=num_levels,
                generator=generator,
                cond=cond,
            )
        sigmas = self.schedule.sampling_sigmas(2)
        sigma_max, sigma_min = float(sigmas[0]), float(sigmas[-2])
        return ode_log_likelihood(
            self.denoiser(),
            x,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            prior_std=self.schedule.terminal_std(sigma_max),
            num_steps=num_steps,
            trace=trace,
            solver=solver,
            rtol=rtol,
            atol=atol,
            num_probes=num_probes,
            generator=generator,
            cond=cond,
        )

    # ---- checks at start ------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Fail fast, in one line, when the network cannot take the data's shape: one training
        loss on a zero batch of two (shape errors surface here, not deep inside a step)."""
        if self.data_shape is None:
            return
        x = torch.zeros(2, *self.data_shape, device=self.device)
        labels = torch.zeros(2, dtype=torch.long, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(0)
        try:
            with torch.enable_grad():
                self.training_loss(x, self.class_labels(labels), generator)
        except (ValueError, RuntimeError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise NoiseclsError(
                f"the model cannot take data of shape {self.data_shape}: {first_line}"
            ) from err

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, in one line, a checkpoint written by another method."""
        saved = checkpoint.get("hyper_parameters", {}).get("_class_path")
        mine = f"{type(self).__module__}.{type(self).__qualname__}"
        if saved is not None and saved.rsplit(".", 1)[-1] != type(self).__qualname__:
            raise NoiseclsError(
                f"the checkpoint was written by {saved} but the config builds {mine}; "
                "pass the config of the method that wrote it"
            )

    def rank_invariant_state(self) -> dict[str, Tensor]:
        """Tensors every DDP rank must hold identically to train as one: the parameters and
        buffers (DDP broadcasts them from rank 0 at wrap time; checked here so that a rank that
        rebuilds them later is caught) and state kept outside them (e.g. CDL's reference)."""
        return dict(self.state_dict())

    def on_train_start(self) -> None:
        """Under DDP, check that every rank starts from the same state (one-line error)."""
        if self.trainer.world_size > 1:
            check_ranks_agree(self.rank_invariant_state(), self.all_gather)

    # ---- training ------------------------------------------------------------------------
    def step_generator(self, *salt: int) -> StepGenerator:
        """This step's generator, seeded by (seed, global step, salt) and the same on every rank:
        per-example draws go through :func:`noisecls.randomness.per_example`, so the noise does
        not depend on the number of ranks (reproducible, resumable)."""
        world_size = self.trainer.world_size if self._trainer is not None else 1
        return StepGenerator(
            self.device, derive_seed(self.seed, self.global_step, *salt),
            rank=self.global_rank, world_size=world_size,
        )  # fmt: skip

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        """Reseed the global RNG (dropout, any unseeded draw) from (seed, step, rank), so a
        resumed run reproduces the uninterrupted one (dropout masks do depend on the rank
        count: a 2-process run matches a 1-process one only for nets without dropout)."""
        salt = self.micro_batch_salt(batch_idx)
        torch.manual_seed(derive_seed(self.seed, self.global_step, self.global_rank, 7, *salt))

    def micro_batch_salt(self, batch_idx: int) -> tuple[int, ...]:
        """Extra seed salt of a training batch: none without gradient accumulation (runs
        reproduce as before); with ``trainer.accumulate_grad_batches`` k > 1 the micro-batch's
        index within its optimizer step, since the k micro-batches share ``global_step`` and
        would otherwise draw the same noise levels, noise and dropout masks."""
        k = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return () if k == 1 else (23, batch_idx % k)

    def class_labels(self, labels: Tensor | None) -> Tensor | None:
        """Labels the network should see (None for unconditional methods)."""
        return None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        generator = self.step_generator(*self.micro_batch_salt(batch_idx))
        loss, extras = self.training_loss(x0, self.class_labels(labels), generator)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}; "
                "lower the learning rate or enable gradient clipping "
                "(trainer.gradient_clip_val); the last saved checkpoint is intact"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        for name, value in extras.items():
            self.log(f"train/{name}", value, batch_size=x0.shape[0])
        return loss

    def evaluation_loss(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> None:
        """The training loss on held-out data with fixed noise per batch, logged as
        ``{stage}/loss`` with the loss's parts (``{stage}/<name>``, e.g. CDM's ce, mse and
        level_accuracy) (gradients enabled: some methods' losses need input gradients)."""
        x0, labels = batch
        g = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, batch_idx))
        with torch.enable_grad():
            loss, extras = self.training_loss(x0, self.class_labels(labels), g)
        for name, value in {"loss": loss, **extras}.items():
            self.log(f"{stage}/{name}", value.detach(), sync_dist=True, batch_size=x0.shape[0])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.evaluation_loss(batch, batch_idx, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.evaluation_loss(batch, batch_idx, "test")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.Adam(params, lr=2e-4)
        else:
            optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ---- sampling ------------------------------------------------------------------------
    def initial_noise(self, n: int, sigma_max: float, generator: torch.Generator | None) -> Tensor:
        """x_T ~ N(0, terminal_std^2 I) in sigma space, [n, *data_shape]."""
        if self.data_shape is None:
            raise NoiseclsError(
                "the model does not know the data shape; set model.init_args.data_shape "
                "or train it with a DataModule (the CLI links data.data_shape)"
            )
        std = self.schedule.terminal_std(sigma_max)
        shape = (n, *self.data_shape)
        return std * torch.randn(shape, generator=generator, device=self.device)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        sampler: SamplerConfig | None = None,
        class_labels: Tensor | None = None,
    ) -> tuple[Tensor, int]:
        """Draw n samples [n, *data_shape] with ``sampler`` (default: the module's); returns
        (samples, NFE). Gradients are enabled inside the denoiser where it needs them."""
        config = sampler or self.sampler
        sigmas = config.sigmas(self.schedule)
        x = self.initial_noise(n, float(sigmas[0]), generator)
        cond = {"class_labels": class_labels} if class_labels is not None else None
        return self.run_sampler(config, x, sigmas, generator=generator, cond=cond)

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        """Seeds to generate (under DDP, SampleWriter shares out whole batches: batch j to rank
        j % world size)."""
        cfg = self.predict_config
        dataset = SeedDataset(self.predict_sample_count(), cfg.first_seed)
        return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False)

    def predict_sample_count(self) -> int:
        """``predict.num_samples``, with ``train`` resolved to the size of the attached
        DataModule's training split."""
        count = self.predict_config.num_samples
        if count != "train":
            return int(count)
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None:
            raise NoiseclsError(
                "predict.num_samples: train needs the data set (give --data / a config with data)"
            )
        datamodule.setup("fit")
        return len(datamodule.train_set)

    def run_sampler(
        self,
        config: SamplerConfig,
        x: Tensor,
        sigmas: Tensor,
        *,
        generator: torch.Generator | None = None,
        cond: dict | None = None,
    ) -> tuple[Tensor, int]:
        """Run ``config`` on ``denoiser()`` from x at sigmas[0]: (samples, NFE). Methods whose
        denoiser differs between sampler stages (DG's Heun weights) override this."""
        return run_sampler(config, self.denoiser(), x, sigmas, generator=generator, cond=cond)

    def predict_num_classes(self) -> int | None:
        """Number of classes to draw generation labels from: the attached DataModule's, else the
        network's ``num_classes``; None when unknown."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        num_classes = getattr(datamodule, "num_classes", None)
        if num_classes is None:
            num_classes = getattr(getattr(self, "net", None), "num_classes", None)
        return num_classes

    def predict_labels(self, seeds: Tensor) -> Tensor | None:
        """Class labels [B] for the samples of integer seeds [B] of a class-conditional model
        (uniform over ``predict_num_classes()``, drawn from each sample's seed, so a label does
        not depend on the batch it lands in); None for unconditional models."""
        num_classes = self.predict_num_classes()
        probe = torch.zeros(1, dtype=torch.long, device=self.device)
        if num_classes is None or self.class_labels(probe) is None:
            return None
        labels = [
            torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(
                derive_seed(int(s), 2)))
            for s in seeds.tolist()
        ]  # fmt: skip
        return self.class_labels(torch.cat(labels).to(self.device))

    def predict_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        """Samples for a batch of integer seeds [B] (see ``SeedDataset``): x_T of image i is
        drawn from seed i (and, for class-conditional models, its label, returned as
        ``labels``), so a sample does not depend on the batch it lands in; stochastic sampler
        noise comes from the batch's first seed."""
        seeds = batch
        noises = []
        sigmas = self.sampler.sigmas(self.schedule)
        for s in seeds.tolist():
            g = torch.Generator(device=self.device).manual_seed(int(s))
            noises.append(self.initial_noise(1, float(sigmas[0]), g))
        x = torch.cat(noises)
        labels = self.predict_labels(seeds)
        cond = {"class_labels": labels} if labels is not None else None
        g = torch.Generator(device=self.device).manual_seed(derive_seed(int(seeds[0]), 1))
        samples, nfe = self.run_sampler(self.sampler, x, sigmas, generator=g, cond=cond)
        out = {"seeds": seeds, "samples": samples, "nfe": torch.tensor(nfe)}
        if labels is not None:
            out["labels"] = labels
        return out


def bits_per_dim(nll_nats: Tensor, num_dims: int) -> Tensor:
    """Convert a negative log-likelihood in nats per sample to bits per dimension."""
    return nll_nats / (num_dims * math.log(2))
