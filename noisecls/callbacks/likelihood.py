"""Negative log-likelihood on the held-out split, in bits per dimension.

Method-agnostic: it calls ``pl_module.log_likelihood(x, ...)`` (log p(x) in nats per example),
whatever estimator the method provides (the probability-flow ODE or the DDPM ELBO of
:class:`~noisecls.methods.base.DiffusionModule`, CDM's one-pass estimator, ...). Options the
method's ``log_likelihood`` does not accept are left out (with a warning), so a method may
override it with fewer or more options (``estimator_kwargs`` passes extra ones).

Quantised data (the DataModule's ``num_bins`` is set: 256 for 8-bit images, 17 for the digits) are
uniformly dequantized first and reported as discrete bits/dim (Theis et al. 2016; see
:mod:`noisecls.likelihood.dequantize`); continuous data (toys) as continuous bits/dim and also
nats/dim.

Held-out split: validation during fit / validate, test in ``noisecls test``; its first
``num_samples`` examples (all when None). DDP: global batch b of ``batch_size`` examples is
processed by rank b % world_size with randomness (dequantization noise, Hutchinson probes) from
``derive_seed(seed, b)``; per-example log-likelihoods are gathered in global order, so every
example is counted exactly once and the value does not depend on the number of ranks.

Logged: ``val/nll_bpd`` (and ``val/nll_nats_per_dim`` for continuous data); ``test/...`` in test.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from noisecls.callbacks.results import (
    EvaluationCallback,
    Stopwatch,
    gather_round,
    heldout_dataset,
    local_batches,
    metric_prefix,
    rank_counts,
    record_metric,
    should_evaluate,
    split_batch,
    supported_kwargs,
)
from noisecls.denoisers import CountingDenoiser
from noisecls.likelihood import dequantize, nll_to_bits_per_dim
from noisecls.likelihood.ode import ode_likelihood
from noisecls.randomness import derive_seed

__all__ = ["NLLCallback", "describe_estimator"]


def describe_estimator(name: str, options: dict[str, Any]) -> str:
    """A likelihood estimator as a short string for results tables. The ODE names its solver,
    its steps (rk4) or tolerances (dopri5), the trace and the Hutchinson probes, e.g.
    ``ode(rk4,64,hutchinson,K=1)`` or ``ode(dopri5,rtol=1e-05,atol=1e-05,exact)``; missing
    options take ``ode_likelihood``'s defaults. The ELBO names its levels (``elbo(100)``), the ITD
    its log-SNR points when set (``itd(256)``), CDM's one-pass estimate the level whose density it
    is (``cdm(level=0)``)."""
    if name == "ode":
        options = method_defaults(ode_likelihood) | options
        parts = [str(options["solver"])]
        if options["solver"] == "dopri5":
            parts += [f"rtol={options['rtol']:g}", f"atol={options['atol']:g}"]
        else:
            parts.append(str(options["num_steps"]))
        parts.append(str(options["trace"]))
        if options["trace"] == "hutchinson":
            parts.append(f"K={options['num_probes']}")
        return f"ode({','.join(parts)})"
    if name == "cdm":  # Theorem 3.2's one pass; level 0 is the data density, the ODE's is 1
        return f"cdm(level={options.get('level', 0)})"
    if name == "elbo" and options.get("num_levels") is not None:
        return f"elbo({options['num_levels']})"
    if name == "itd" and options.get("num_points") is not None:
        return f"itd({options['num_points']})"
    return name


class NLLCallback(EvaluationCallback):
    """Held-out NLL in bits/dim through ``pl_module.log_likelihood``.

    Args:
        num_samples: held-out examples to evaluate (the first ones of the split); None: all.
        estimator: passed as ``estimator=`` ("ode", "elbo", or a method's own); None: the
            method's default.
        trace: "exact" or "hutchinson" (ODE estimator); None: the method's default.
        num_steps: integration steps (ODE estimator, rk4); None: the method's default.
        solver: "rk4" or "dopri5" (adaptive; ODE estimator); None: the method's default.
        rtol, atol: dopri5's tolerances; None: the method's default.
        num_probes: Hutchinson probes K per evaluation; None: the method's default.
        every_n_epochs: during fit, evaluate after epochs e with (e + 1) % n == 0 (0: only in
            validate / test).
        batch_size: examples per ``log_likelihood`` call, per rank.
        seed: base seed of dequantization noise and estimator randomness.
        dequantize: dequantize when the DataModule has ``num_bins`` (else always continuous).
        estimator_kwargs: further keyword arguments for ``log_likelihood`` (e.g. num_levels).
        name: metric name stem: ``{stage}/{name}_bpd`` (give two callbacks different names to
            log two estimators of one checkpoint, e.g. ``nll_itd`` and ``nll_ode``).

    Attributes:
        last_result: after each evaluation: bpd, nats_per_dim, count (examples, all ranks),
            local_count (this rank), per_rank_count (every rank's), nfe (denoiser evaluations
            per example, None when the estimator does not use ``denoiser()``), seconds.
    """

    def __init__(
        self,
        num_samples: int | None = None,
        estimator: str | None = None,
        trace: str | None = None,
        num_steps: int | None = None,
        solver: str | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        num_probes: int | None = None,
        every_n_epochs: int = 1,
        batch_size: int = 128,
        seed: int = 0,
        dequantize: bool = True,
        estimator_kwargs: dict[str, Any] | None = None,
        name: str = "nll",
    ) -> None:
        if not name.isidentifier():
            raise ValueError(f"NLLCallback name must be an identifier, got {name!r}")
        if batch_size < 1 or (num_samples is not None and num_samples < 1):
            raise ValueError("NLLCallback needs batch_size >= 1 and num_samples >= 1 (or None)")
        self.num_samples = num_samples
        self.estimator = estimator
        self.trace = trace
        self.num_steps = num_steps
        self.ode_options = {"solver": solver, "rtol": rtol, "atol": atol, "num_probes": num_probes}
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.seed = seed
        self.dequantize = dequantize
        self.estimator_kwargs = dict(estimator_kwargs or {})
        self.name = name
        self.last_result: dict[str, Any] = {}
        self._warned = False

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if should_evaluate(trainer, self.every_n_epochs):
            self.evaluate(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    def _options(self, pl_module: L.LightningModule) -> dict[str, Any]:
        wanted = {"estimator": self.estimator, "trace": self.trace, "num_steps": self.num_steps,
                  **self.ode_options}  # fmt: skip
        wanted = {k: v for k, v in wanted.items() if v is not None} | self.estimator_kwargs
        accepted, dropped = supported_kwargs(pl_module.log_likelihood, wanted)
        if dropped and not self._warned:
            rank_zero_warn(
                f"NLLCallback: {type(pl_module).__name__}.log_likelihood takes no "
                f"{', '.join(dropped)}; those options are ignored"
            )
            self._warned = True
        return accepted

    def describe(self, pl_module: L.LightningModule) -> str:
        """The estimator as a short string for results tables (``describe_estimator``, e.g.
        ``ode(rk4,64,hutchinson,K=1)``): the options given here, else the defaults of the
        method's ``log_likelihood``."""
        options = method_defaults(pl_module.log_likelihood) | self._options(pl_module)
        name = str(options.get("estimator", type(pl_module).__name__))
        return describe_estimator(name, options)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Compute and log the held-out NLL; returns ``last_result``."""
        dataset = heldout_dataset(trainer)
        n = len(dataset)  # type: ignore[arg-type]
        if self.num_samples is not None:
            n = min(n, self.num_samples)
        dm = trainer.datamodule
        num_bins = getattr(dm, "num_bins", None) if self.dequantize else None
        options = self._options(pl_module)
        accepts_labels = (
            "class_labels" in supported_kwargs(pl_module.log_likelihood, {"class_labels": None})[0]
        )
        device = pl_module.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = local_count = 0
        num_dims = None
        nfe: int | None = None
        workers = int(getattr(dm, "num_workers", 0) or 0)
        batches = local_batches(dataset, n, self.batch_size, trainer, num_workers=workers)
        with (
            Stopwatch() as watch,
            torch.inference_mode(False),
            torch.no_grad(),
            counted_denoiser(pl_module) as counter,
        ):
            for b, batch in batches:
                nll = None
                if batch is not None:
                    x, y = split_batch(batch)
                    x = x.to(device=device, dtype=torch.float32)
                    num_dims = x[0].numel()
                    g = torch.Generator(device=device).manual_seed(derive_seed(self.seed, b))
                    if num_bins is not None:
                        x = dequantize(x, num_bins, generator=g)
                    kwargs = dict(options, generator=g)
                    if accepts_labels and y is not None:
                        labels = pl_module.class_labels(y.to(device))
                        if labels is not None:
                            kwargs["class_labels"] = labels
                    rows_before = counter.rows if counter is not None else 0
                    nll = -pl_module.log_likelihood(x, **kwargs).detach().to(torch.float64)
                    if counter is not None:
                        per_example = (counter.rows - rows_before) // x.shape[0]
                        nfe = max(nfe or 0, per_example) or None
                    local_count += x.shape[0]
                for rows in gather_round(trainer, nll, self.batch_size, (), torch.float64, device):
                    total += rows.sum()
                    count += rows.shape[0]
        if nfe is None and self.describe(pl_module).startswith("cdm("):
            nfe = 1  # CDM's one-pass estimate: one classifier call, no denoiser() call
        if num_dims is None:  # a rank without examples: the data shape says it
            num_dims = math.prod(getattr(dm, "data_shape", None) or pl_module.data_shape)
        mean_nll = total / count
        bpd = float(nll_to_bits_per_dim(mean_nll, num_dims, num_bins))
        nats = float(mean_nll) / num_dims
        per_rank = rank_counts(trainer, local_count, device)
        self.last_result = {"bpd": bpd, "nats_per_dim": nats, "count": count,
                            "local_count": local_count, "per_rank_count": per_rank, "nfe": nfe,
                            "seconds": watch.seconds}  # fmt: skip
        prefix = metric_prefix(trainer)
        values = {f"{self.name}_bpd": bpd}
        if num_bins is None:
            values[f"{self.name}_nats_per_dim"] = nats
        for name, value in values.items():
            pl_module.log(f"{prefix}/{name}", value, sync_dist=True)
            record_metric(trainer, f"{prefix}/{name}", value, samples=count,
                          sampler=self.describe(pl_module), nfe=nfe, seconds=watch.seconds,
                          per_rank_samples=per_rank)  # fmt: skip
        return self.last_result


def method_defaults(fn: Any) -> dict[str, Any]:
    """The keyword defaults of a method's signature (e.g. ``log_likelihood``'s estimator)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


@contextmanager
def counted_denoiser(pl_module: L.LightningModule) -> Iterator[CountingDenoiser | None]:
    """Count the denoiser evaluations of whatever the module computes inside the block.

    ``pl_module.denoiser()`` is shadowed (an instance attribute, removed on exit) by one that
    returns the same denoiser wrapped in a :class:`~noisecls.denoisers.CountingDenoiser`, so a
    ``log_likelihood`` built on ``denoiser()`` reports its NFE; an estimator that does not go
    through ``denoiser()`` (e.g. CDM's one-pass likelihood) counts 0. Yields None (nothing
    counted) for a module without ``denoiser()``.
    """
    if not callable(getattr(pl_module, "denoiser", None)):
        yield None
        return
    counter = CountingDenoiser(pl_module.denoiser())
    pl_module.__dict__["denoiser"] = lambda: counter
    try:
        yield counter
    finally:
        pl_module.__dict__.pop("denoiser", None)
