"""Metric records, the results writer of ``noisecls test``, and the plumbing every metric
callback shares (when to run, which split, DDP sharding and ordered gathering, log directory).

Records: each metric callback appends a :class:`MetricRecord` (metric, value, samples used,
sampler, NFE, seconds) to a per-trainer list (:func:`record_metric`, :func:`metric_records`; a
``WeakKeyDictionary`` keyed by the Trainer, so nothing is attached to the Trainer or the module
and nothing reaches a checkpoint). :class:`ResultsWriter` turns the records of a ``test`` run into
``results.json`` / ``results.md`` (and a W&B table).

DDP scheme shared by FID, NLL and denoising MSE (world-size invariant by construction): the N
items (generated samples or held-out examples) are cut into global batches of ``batch_size``;
global batch b goes to rank b % world_size and draws its randomness from
``derive_seed(seed, b)``. Ranks work in rounds (round i: batch i·W + rank) and after each round
every rank receives every rank's per-item results in global-batch order
(:func:`gather_round`). Every rank therefore accumulates exactly the same numbers in the same
order as a single process would: metrics are identical on every rank and for any world size,
and each item is counted exactly once.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from noisecls.errors import NoiseclsError

__all__ = [
    "MetricRecord",
    "ResultsWriter",
    "metric_records",
    "record_metric",
]


# ---------------------------------------------------------------------------------------- records
@dataclass
class MetricRecord:
    """One computed metric value.

    Attributes:
        metric: the logged key, e.g. ``test/fid``.
        value: the value (float; units in the metric's name / callback docs).
        samples: number of samples / examples it was computed from (all ranks together).
        sampler: how samples or likelihoods were produced, e.g. ``heun(18)`` or ``ode(exact,64)``.
        nfe: denoiser evaluations per generated sample or per evaluated example (None when not
            applicable or not observable).
        seconds: wall-clock seconds the computation took (on this rank).
        per_rank_samples: how many of ``samples`` each rank produced, in rank order (their sum
            is ``samples``: every sample counted once).
        stage: ``fit`` / ``validate`` / ``test``.
        epoch, step: trainer epoch and global step when computed.
    """

    metric: str
    value: float
    samples: int | None = None
    sampler: str | None = None
    nfe: int | None = None
    seconds: float | None = None
    per_rank_samples: list[int] | None = None
    stage: str = ""
    epoch: int = 0
    step: int = 0


_RECORDS: weakref.WeakKeyDictionary[Any, list[MetricRecord]] = weakref.WeakKeyDictionary()
log = logging.getLogger("noisecls.metrics")


def metric_records(trainer: L.Trainer) -> list[MetricRecord]:
    """The (mutable) list of records of this trainer, oldest first."""
    if trainer not in _RECORDS:
        _RECORDS[trainer] = []
    return _RECORDS[trainer]


def record_metric(trainer: L.Trainer, metric: str, value: float, **fields: Any) -> MetricRecord:
    """Append a :class:`MetricRecord` for ``metric`` (stage, epoch and step filled in) and, on
    rank 0, log it as one line to the ``noisecls.metrics`` logger (progress of long evaluations;
    the curves' points, ``.../sigma=...``, at debug level)."""
    record = MetricRecord(
        metric=metric,
        value=float(value),
        stage=stage_name(trainer),
        epoch=int(trainer.current_epoch),
        step=int(trainer.global_step),
        **fields,
    )
    metric_records(trainer).append(record)
    if trainer.is_global_zero:
        level = logging.DEBUG if "=" in metric else logging.INFO
        log.log(level, "%s = %.6g (%s)", metric, record.value, describe_record(record))
    return record


def describe_record(r: MetricRecord) -> str:
    """How a value was computed, e.g. ``1000 samples, ddim(50), NFE 50, 61.2 s``."""
    parts = [f"{r.samples} samples" if r.samples is not None else "",
             r.sampler or "", f"NFE {r.nfe}" if r.nfe is not None else "",
             f"{r.seconds:.1f} s" if r.seconds is not None else ""]  # fmt: skip
    return ", ".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------- plumbing
def stage_name(trainer: L.Trainer) -> str:
    """``fit`` / ``validate`` / ``test`` / ``predict`` (the running Trainer function)."""
    fn = trainer.state.fn
    return str(fn.value) if fn is not None else ""


def metric_prefix(trainer: L.Trainer) -> str:
    """``test`` while testing, else ``val``."""
    return "test" if trainer.testing else "val"


def should_evaluate(trainer: L.Trainer, every_n_epochs: int) -> bool:
    """Whether an epoch-end metric runs now: never in the sanity check; during ``fit`` every
    ``every_n_epochs`` epochs (epochs e with (e + 1) % n == 0); always in validate / test."""
    if trainer.sanity_checking:
        return False
    if stage_name(trainer) == "fit":
        return every_n_epochs > 0 and (trainer.current_epoch + 1) % every_n_epochs == 0
    return True


def place_before_weight_averaging(trainer: L.Trainer) -> None:
    """Move noisecls metric callbacks ahead of any ``WeightAveraging`` callback (e.g.
    ``EMAWeightAveraging``) in ``trainer.callbacks``.

    EMAWeightAveraging swaps the EMA weights in at ``on_validation_epoch_start`` and back out in
    its own ``on_validation_epoch_end``; callbacks run in list order, so a metric listed after it
    would see the raw weights. Called from the metric callbacks' ``setup``; ``trainer.callbacks``
    is replaced by a new list (the loop running ``setup`` keeps iterating the old one).
    """
    from lightning.pytorch.callbacks import WeightAveraging

    callbacks = list(trainer.callbacks)
    averaging = [i for i, cb in enumerate(callbacks) if isinstance(cb, WeightAveraging)]
    if not averaging:
        return
    first = averaging[0]
    late = [cb for cb in callbacks[first:] if isinstance(cb, EvaluationCallback)]
    if not late:
        return
    rest = [cb for cb in callbacks if not any(cb is m for m in late)]
    trainer.callbacks = rest[:first] + late + rest[first:]


class EvaluationCallback(Callback):
    """Marker base class of the metric callbacks (they must see EMA weights, see
    :func:`place_before_weight_averaging`)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        place_before_weight_averaging(trainer)


def log_directory(trainer: L.Trainer) -> Path:
    """The run's log directory (the first logger's, else ``default_root_dir``).

    Collective under DDP (``trainer.log_dir`` broadcasts): call it on every rank.
    """
    path = trainer.log_dir
    if path is None:
        path = trainer.default_root_dir
    return Path(path)


def heldout_dataset(trainer: L.Trainer) -> Dataset:
    """The held-out split of the attached DataModule: test while testing, else validation.

    Returns the (unsharded) dataset of ``datamodule.test_dataloader()`` /
    ``val_dataloader()``: the callbacks shard it themselves, without DistributedSampler padding.
    """
    dm = trainer.datamodule
    split = "test" if trainer.testing else "val"
    if dm is None:
        raise NoiseclsError(
            f"metric callbacks need a DataModule (data: in the config) for the {split} split"
        )
    loader = getattr(dm, f"{split}_dataloader")()
    if isinstance(loader, list | tuple):
        loader = loader[0]
    return loader.dataset


def reference_dataset(trainer: L.Trainer) -> Dataset:
    """The training split without augmentation: ``datamodule.reference_dataset()`` if the
    DataModule has one, else the dataset of ``train_dataloader()`` (set up for fit if needed)."""
    dm = trainer.datamodule
    if dm is None:
        raise NoiseclsError("the FID callback needs a DataModule (data: in the config)")
    if hasattr(dm, "reference_dataset"):
        return dm.reference_dataset()
    try:
        loader = dm.train_dataloader()
    except Exception:  # the train split is not set up outside fit
        dm.setup("fit")
        loader = dm.train_dataloader()
    return loader.dataset


def collate_items(batch: Any) -> Any:
    """Collate function: a ready (x, y) tuple of tensors (datasets with ``__getitems__``) passes
    through, a list of samples is stacked."""
    if isinstance(batch, tuple) and all(isinstance(t, Tensor) for t in batch):
        return batch
    return default_collate(batch)


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """(x, y) of a collated batch; y None when the dataset yields bare tensors."""
    if isinstance(batch, list | tuple):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def shard_rounds(
    num_items: int, batch_size: int, world_size: int, rank: int
) -> Iterator[tuple[int, range | None]]:
    """This rank's work, round by round: (global batch index b, item indices) or (b, None) when
    the rank has no batch in that round. Global batch b = round·world_size + rank covers items
    [b·batch_size, min((b+1)·batch_size, num_items)). Every rank gets the same number of rounds."""
    num_batches = math.ceil(num_items / batch_size)
    num_rounds = math.ceil(num_batches / world_size)
    for r in range(num_rounds):
        b = r * world_size + rank
        if b < num_batches:
            yield b, range(b * batch_size, min((b + 1) * batch_size, num_items))
        else:
            yield b, None


def gather_round(
    trainer: L.Trainer,
    local: Tensor | None,
    max_rows: int,
    row_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> list[Tensor]:
    """Every rank's rows of one round, in rank order (= global-batch order): a list of tensors
    [n_r, *row_shape] (ranks without a batch this round are left out).

    ``local``: this rank's rows [n <= max_rows, *row_shape] or None. Collective under DDP (every
    rank must call it once per round); a no-op copy in a single process.
    """
    world = trainer.world_size
    if world == 1:
        return [local.to(dtype)] if local is not None and local.shape[0] > 0 else []
    buffer = torch.zeros((max_rows, *row_shape), dtype=dtype, device=device)
    n = 0
    if local is not None:
        n = local.shape[0]
        buffer[:n] = local.to(device=device, dtype=dtype)
    count = torch.tensor([n], dtype=torch.int64, device=device)
    rows = trainer.strategy.all_gather(buffer)  # [W, max_rows, *row_shape]
    counts = trainer.strategy.all_gather(count).reshape(world)  # [W]
    return [rows[r, : int(counts[r])] for r in range(world) if int(counts[r]) > 0]


def rank_counts(trainer: L.Trainer, local: int, device: torch.device) -> list[int]:
    """Every rank's ``local`` count, in rank order (collective under DDP)."""
    if trainer.world_size == 1:
        return [int(local)]
    t = torch.tensor([int(local)], dtype=torch.int64, device=device)
    return [int(c) for c in trainer.strategy.all_gather(t).reshape(-1).tolist()]


def batch_loader(dataset: Dataset, batches: list[list[int]], num_workers: int = 0) -> DataLoader:
    """A DataLoader yielding exactly the given index batches of ``dataset``, in order."""
    return DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_items
    )


def local_batches(
    dataset: Dataset, num_items: int, batch_size: int, trainer: L.Trainer, num_workers: int = 0
) -> Iterator[tuple[int, Any]]:
    """For each round (see :func:`shard_rounds`): (global batch index, collated batch or None).

    ``num_workers``: DataLoader worker processes reading this rank's batches."""
    rounds = list(shard_rounds(num_items, batch_size, trainer.world_size, trainer.global_rank))
    mine = [list(r) for _, r in rounds if r is not None]
    iterator = iter(batch_loader(dataset, mine, num_workers)) if mine else iter(())
    for b, r in rounds:
        yield b, (next(iterator) if r is not None else None)


def supported_kwargs(fn: Any, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the kwargs ``fn`` accepts, the names it does not); everything when it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return dict(kwargs), []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(kwargs), []
    names = {p.name for p in params}
    return ({k: v for k, v in kwargs.items() if k in names}, [k for k in kwargs if k not in names])


def call_supported(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with the keyword arguments it accepts (methods may override ``sample`` /
    ``log_likelihood`` with fewer options)."""
    accepted, _ = supported_kwargs(fn, kwargs)
    return fn(*args, **accepted)


def class_labels_for(
    pl_module: L.LightningModule, n: int, num_classes: int | None, generator: torch.Generator
) -> Tensor | None:
    """Labels for n generated samples of a class-conditional method (uniform over
    ``num_classes``, drawn from ``generator``); None for unconditional methods."""
    to_network = getattr(pl_module, "class_labels", None)
    if num_classes is None or to_network is None:
        return None
    device = generator.device
    if to_network(torch.zeros(1, dtype=torch.long, device=device)) is None:
        return None
    labels = torch.randint(num_classes, (n,), generator=generator, device=device)
    return to_network(labels)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary name and ``os.replace`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    """The trainer's W&B loggers."""
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------- writer
RESULT_COLUMNS = ["metric", "value", "samples", "sampler", "NFE", "seconds"]
#: what the table's columns mean, under results.md (KID's scale depends on the feature space)
RESULT_NOTES = (
    "samples: generated samples or held-out examples the value was computed from. NFE: denoiser "
    "evaluations per sample (per example for likelihoods). seconds: wall-clock time of the "
    "metric. KID: unbiased squared MMD of the cubic polynomial kernel (x·y/d + 1)³ in the FID "
    "feature space, in squared feature units: it scales with the features (DigitsFeatures: "
    "1e3..1e6; Inception: 1e-3..1e-1), so compare it only within one feature space."
)


class ResultsWriter(Callback):
    """Writes the test metrics of ``noisecls test`` as ``results.json`` and ``results.md``.

    At ``on_test_end`` it takes the :class:`MetricRecord` s the metric callbacks made during this
    test run, adds any other logged ``test/...`` value (e.g. ``test/loss``) with the unknown
    columns empty, and writes (rank 0, atomically) into ``path_dir`` (default: the log dir):

    * ``results.json``: ``{"checkpoint", "checkpoint_step", "model", "world_size", "records":
      [{metric, value, samples, sampler, nfe, seconds, per_rank_samples, stage, epoch, step},
      ...]}`` (``checkpoint_step``: the step the tested checkpoint was written at);
    * ``results.md``: a Markdown table with columns metric | value | samples | sampler | NFE |
      seconds, and a note saying what the columns and KID's units mean.

    With a WandbLogger the same table is logged as the W&B table ``test/results``. The paths of
    both files are logged (``noisecls.metrics``) at the end.
    """

    def __init__(self, path_dir: str | None = None) -> None:
        self.path_dir = path_dir
        self.written: list[Path] = []

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = metric_records(trainer)
        records[:] = [r for r in records if r.stage != "test"]

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out_dir = Path(self.path_dir) if self.path_dir else log_directory(trainer)
        records = [r for r in metric_records(trainer) if r.stage == "test"]
        seen = {r.metric for r in records}
        for key, value in sorted(trainer.callback_metrics.items()):
            if key.startswith("test/") and key not in seen and torch.as_tensor(value).numel() == 1:
                records.append(
                    MetricRecord(
                        metric=key,
                        value=float(value),
                        stage="test",
                        epoch=trainer.current_epoch,
                        step=trainer.global_step,
                    )
                )
        if not trainer.is_global_zero:
            return
        payload = {
            "checkpoint": trainer.ckpt_path,
            "checkpoint_step": checkpoint_step(trainer.ckpt_path),
            "model": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "world_size": trainer.world_size,
            "records": [_jsonable_record(r) for r in records],
        }
        text = json.dumps(payload, indent=2, allow_nan=False)
        atomic_write_text(out_dir / "results.json", text + "\n")
        rows = [_row(r) for r in records]
        lines = [
            "| " + " | ".join(RESULT_COLUMNS) + " |",
            "|" + "|".join(["---"] * len(RESULT_COLUMNS)) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += ["", RESULT_NOTES]
        atomic_write_text(out_dir / "results.md", "\n".join(lines) + "\n")
        self.written = [out_dir / "results.json", out_dir / "results.md"]
        for logger in wandb_loggers(trainer):
            logger.log_table(key="test/results", columns=RESULT_COLUMNS, data=rows)
        log.info("results: %s and %s", *self.written)


def checkpoint_step(path: str | None) -> int | None:
    """The training step a checkpoint was written at (``test`` does not restore the trainer's
    ``global_step``, so the records' ``step`` is 0 there); None without a readable checkpoint."""
    if not path or not Path(path).is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # the CLI has refused unreadable checkpoints; information only here
        return None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return int(step) if step is not None else None


def _jsonable_record(r: MetricRecord) -> dict[str, Any]:
    """A record as a JSON object (a non-finite value becomes the string "nan" / "inf")."""
    out = asdict(r)
    if not math.isfinite(r.value):
        out["value"] = repr(r.value)
    return out


def _row(r: MetricRecord) -> list[str]:
    def fmt(v: object) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    seconds = f"{r.seconds:.2f}" if r.seconds is not None else ""
    return [r.metric, fmt(r.value), fmt(r.samples), fmt(r.sampler), fmt(r.nfe), seconds]
