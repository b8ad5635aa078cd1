"""Samples: a grid to the logger at each validation, and the writer behind ``noisecls predict``.

* :class:`SampleGridCallback`: ``num_samples`` samples from fixed seeds (the same every time, so
  grids are comparable across epochs), at validation and in test, as a
  ``torchvision.utils.make_grid`` image (a PNG in ``<log dir>/samples/``, also to W&B /
  TensorBoard); 2-D data as a scatter plot instead.
* :class:`SampleWriter`: a ``BasePredictionWriter`` writing each predict batch to
  ``output_dir/samples_{first_seed:08d}-{last_seed:08d}.npz`` (keys ``samples`` float32 in data
  scale [B, *data_shape], ``seeds`` int64 [B], ``labels`` int64 [B] for class-conditional models,
  and for images ``images`` uint8 [B, H, W, C]), optionally every image also as
  ``output_dir/images/{seed:08d}.png``; atomically (temporary name + ``os.replace``), resumable,
  sharded across DDP ranks, with a ``manifest.json`` identifying the run and a PNG grid of the
  first samples at the end.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from noisecls.callbacks.denoising import save_figure
from noisecls.callbacks.features import state_dict_sha256, to_uint8_images
from noisecls.callbacks.results import (
    EvaluationCallback,
    atomic_write_text,
    call_supported,
    class_labels_for,
    log_directory,
    metric_prefix,
    should_evaluate,
)
from noisecls.errors import NoiseclsError
from noisecls.randomness import derive_seed
from noisecls.samplers import SamplerConfig

__all__ = ["SampleGridCallback", "SampleWriter", "image_grid", "save_png", "scatter_figure"]


# ---------------------------------------------------------------------------------------- helpers
def is_image_shape(shape: tuple[int, ...] | torch.Size) -> bool:
    """[C, H, W] with C in 1..4."""
    return len(shape) == 3 and 1 <= shape[0] <= 4


def image_grid(samples: Tensor, nrow: int | None = None) -> Tensor:
    """Images [N, C, H, W] in [-1, 1] -> one uint8 grid [3, H', W'] (``make_grid``, 2 px padding,
    ``nrow`` per row, default ceil(sqrt(N)))."""
    from torchvision.utils import make_grid

    nrow = nrow or max(1, math.ceil(math.sqrt(samples.shape[0])))
    grid = make_grid(samples.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=2,
                     pad_value=1.0, normalize=True, value_range=(-1, 1))  # fmt: skip
    return (grid * 255).round().clamp(0, 255).to(torch.uint8)


def save_png(grid: Tensor, path: Path) -> None:
    """Write a uint8 image [C, H, W] as a PNG (temporary name + ``os.replace``)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def scatter_figure(points: Tensor, title: str = "") -> Any:
    """A matplotlib Figure scattering the first two coordinates of points [N, D >= 2]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    p = points.detach().float().cpu().reshape(points.shape[0], -1)
    ax.scatter(p[:, 0].numpy(), p[:, 1].numpy(), s=4, alpha=0.6)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- grid
class SampleGridCallback(EvaluationCallback):
    """Draws ``num_samples`` samples from fixed seeds at each (every n-th) validation and in test.

    Images ([C, H, W] data): a grid; vector data with D >= 2 (toys): a scatter plot of the first
    two coordinates. The picture is always written as
    ``<log dir>/samples/<stage>_epoch..._step....png`` (``stage``: val / test) and handed to the
    loggers that take images (W&B image, TensorBoard image / figure) under ``<stage>/samples``.
    Rank 0 samples; other ranks only join the log-dir broadcast.

    Args:
        num_samples: samples per grid.
        every_n_epochs: during fit, after epochs e with (e + 1) % n == 0; always in validate and
            test.
        seed: seed of the samples (same grid seeds every time).
        sampler: sampler; default the module's own.
        nrow: images per grid row (default ceil(sqrt(num_samples))).

    Attributes:
        last_path: the PNG written last.
    """

    def __init__(
        self,
        num_samples: int = 64,
        every_n_epochs: int = 1,
        seed: int = 0,
        sampler: SamplerConfig | None = None,
        nrow: int | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError("SampleGridCallback needs num_samples >= 1")
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.sampler = sampler
        self.nrow = nrow
        self.last_path: Path | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if should_evaluate(trainer, self.every_n_epochs):
            self.log_samples(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_samples(trainer, pl_module)

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sample on rank 0, write the picture and hand it to the loggers."""
        out_dir = log_directory(trainer) / "samples"  # collective: every rank
        if not trainer.is_global_zero:
            return
        device = pl_module.device
        g = torch.Generator(device=device).manual_seed(derive_seed(self.seed, 0x47524944))
        kwargs: dict[str, Any] = {"generator": g}
        if self.sampler is not None:
            kwargs["sampler"] = self.sampler
        labels = class_labels_for(
            pl_module, self.num_samples, getattr(trainer.datamodule, "num_classes", None), g
        )
        if labels is not None:
            kwargs["class_labels"] = labels
        with torch.inference_mode(False), torch.no_grad():
            out = call_supported(pl_module.sample, self.num_samples, **kwargs)
        samples = (out[0] if isinstance(out, tuple) else out).detach().cpu()
        prefix = metric_prefix(trainer)
        key = f"{prefix}/samples"
        step = trainer.global_step
        path = out_dir / f"{prefix}_epoch{trainer.current_epoch:04d}_step{step:08d}.png"
        if is_image_shape(samples.shape[1:]):
            grid = image_grid(samples, self.nrow)
            save_png(grid, path)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(key, grid, global_step=step)
        elif samples[0].numel() >= 2:
            title = f"{prefix} samples, epoch {trainer.current_epoch}, step {step}"
            fig = scatter_figure(samples, title)
            save_figure(fig, path)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_figure(key, fig, global_step=step)
        else:
            return
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[str(path)], step=step)


# ---------------------------------------------------------------------------------------- writer
def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "inf", "nan": valid JSON
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)


class _RankBatches(DistributedSampler):
    """One rank's share of a dataset read in batches of ``batch_size`` consecutive items: batch j
    goes to rank j % num_replicas, whole (no repeats, no padding; a rank may get nothing).
    A DistributedSampler, so Lightning keeps it instead of sharding item by item."""

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        n = len(dataset)  # type: ignore[arg-type]
        starts = range(rank * batch_size, n, num_replicas * batch_size)
        self.indices = [i for start in starts for i in range(start, min(start + batch_size, n))]
        self.num_samples = len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


class SampleWriter(BasePredictionWriter):
    """Writes ``noisecls predict`` samples, one ``.npz`` per predict batch, resumably.

    Each batch of seeds (``DiffusionModule.predict_step`` returns ``{"seeds", "samples", "nfe"}``
    and ``labels`` for class-conditional models) becomes
    ``output_dir/samples_{first_seed:08d}-{last_seed:08d}.npz`` with ``samples`` (float32, data
    scale, [B, *data_shape]), ``seeds`` (int64 [B]), ``rank`` (int64 [], the global rank that
    wrote it; information), for class-conditional models ``labels`` (int64 [B]) and, for image
    data, ``images`` (uint8 [B, H, W, C], ``round((x + 1) * 127.5)`` of the clamped samples).
    With ``image_folder=True`` every image is also written as ``output_dir/images/{seed:08d}.png``
    (the same uint8 pixels; image data only) BEFORE the batch's ``.npz``: the shard is the
    completion marker, so a PNG whose shard is missing belongs to an interrupted batch and is
    rewritten on resume. Every file is written under a temporary name and renamed
    (``os.replace``), so a file that exists is complete.

    ``manifest.json`` (written by rank 0 only) identifies the run: model class, sampler config,
    data shape, schedule and the SHA-256 of the model's weights (plus, for information, the
    checkpoint path). Writing into a directory whose manifest describes another run (or that
    holds sample files but no manifest) is refused with a one-line :class:`NoiseclsError` (on
    every rank: each one makes the same check). For the same run, seeds that already lie in a
    sample file are skipped and an existing file is never overwritten: every rank filters the
    predict dataloader's seeds by the shards present, then all ranks meet at a barrier before
    any sampling (no rank reads the directory while another already writes to it, so all ranks
    share out the same remaining seeds).

    Sharding: the remaining seeds are batched as one process would batch them (``batch_size``
    consecutive remaining seeds per batch) and batch j goes to rank j % world_size, whole. So the
    shard names and every batch's contents do not depend on the number of ranks, and each seed
    is sampled by exactly one rank; a rank may get no batch (it then skips the loop). Seeds are
    sample indices (``PredictConfig``): x_T of sample i comes from seed i, the sampler noise of a
    batch from its first seed, so a run on any number of ranks writes the same files as one
    process (up to floating-point differences), and with a deterministic sampler (heun with
    ``s_churn=0``, ddim with ``eta=0``, euler, dpm_solver_2) a sample does not even depend on
    its batch, so a resumed run gives the samples of an uninterrupted one. Resuming with
    ``image_folder=True`` over shards written without it also writes the missing PNGs (from the
    shards' ``images``). Loaders handed to ``trainer.predict(dataloaders=...)`` directly are
    neither filtered nor re-sharded.

    At the end, after every rank has finished writing, rank 0 writes ``grid.png``: the
    ``grid_size`` samples with the smallest seeds (a scatter plot for 2-D data); only when it is
    missing or this run wrote samples.

    Args:
        output_dir: where to write.
        grid_size: samples in the final grid (0: no grid).
        image_folder: also write every image as ``images/{seed:08d}.png`` (image data only).
    """

    MANIFEST = "manifest.json"
    IMAGES = "images"
    IDENTITY_FIELDS = ("model_class", "sampler", "data_shape", "schedule", "weights_sha256")

    def __init__(self, output_dir: str, grid_size: int = 64, image_folder: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir).expanduser()
        self.grid_size = grid_size
        self.image_folder = image_folder
        self.skipped_seeds: set[int] = set()
        self.written: list[Path] = []
        self._prepared = False
        self._wrapped: list[tuple[Any, str]] = []
        self._zero_length_flag: tuple[L.LightningModule, bool] | None = None

    def image_path(self, seed: int) -> Path:
        """Where ``image_folder`` writes the PNG of ``seed``."""
        return self.output_dir / self.IMAGES / f"{seed:08d}.png"

    # ---- run identity --------------------------------------------------------------------
    def manifest_for(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The manifest this run writes (identity fields + information)."""
        shape = getattr(pl_module, "data_shape", None)
        return {
            "model_class": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "sampler": _jsonable(getattr(pl_module, "sampler", None)),
            "data_shape": list(shape) if shape is not None else None,
            "schedule": _jsonable(_describe(getattr(pl_module, "schedule", None))),
            "weights_sha256": state_dict_sha256(pl_module.state_dict()),
            "checkpoint": trainer.ckpt_path,
            "format": 1,
        }

    def _check_image_shape(self, shape: Any) -> None:
        """``image_folder`` needs image data [C, H, W] (C in 1..4)."""
        if self.image_folder and shape is not None and not is_image_shape(tuple(shape)):
            raise NoiseclsError(
                f"SampleWriter(image_folder=true) writes PNGs of image data [C, H, W], but this "
                f"model's samples have shape {list(shape)}; set image_folder to false (the .npz "
                "shards hold every sample)"
            )

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> set[int]:
        """Check / write the manifest; return the seeds already written (for this run). Every
        rank makes the same checks on the same files, so a refusal happens on all of them."""
        manifest = self.manifest_for(trainer, pl_module)
        self._check_image_shape(manifest["data_shape"])
        path = self.output_dir / self.MANIFEST
        existing_files = sorted(self.output_dir.glob("samples_*.npz"))
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise NoiseclsError(f"{path} is not valid JSON ({err}); remove it") from err
            differ = [k for k in self.IDENTITY_FIELDS if old.get(k) != manifest[k]]
            if differ:
                raise NoiseclsError(
                    f"{self.output_dir} holds samples of a different run (manifest differs in "
                    f"{', '.join(differ)}); choose another output_dir or remove that directory"
                )
        elif existing_files:
            raise NoiseclsError(
                f"{self.output_dir} holds sample files but no {self.MANIFEST}; choose another "
                "output_dir or remove those files"
            )
        elif trainer.is_global_zero:
            atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
        done: set[int] = set()
        for f in existing_files:
            with np.load(f) as data:
                seeds = [int(s) for s in data["seeds"]]
                done.update(seeds)
                if self.image_folder and trainer.is_global_zero and "images" in data:
                    self._backfill_images(seeds, data["images"])
        self._prepared = True
        return done

    def _backfill_images(self, seeds: list[int], images: np.ndarray) -> None:
        """Write the PNGs missing for a complete shard (uint8 images [B, H, W, C])."""
        for seed, image in zip(seeds, images, strict=True):
            if not self.image_path(seed).exists():
                save_png(torch.from_numpy(image).permute(2, 0, 1), self.image_path(seed))

    # ---- resume: filter the seeds before sampling ----------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._prepared = False
        self.skipped_seeds = set()
        self.written = []
        # after filtering a rank may get no seeds (fewer remaining seeds than ranks): it then
        # skips the predict loop instead of failing Lightning's zero-length check
        flag = "allow_zero_length_dataloader_with_multiple_devices"
        self._zero_length_flag = (pl_module, getattr(pl_module, flag))
        setattr(pl_module, flag, True)
        # the predict loop asks the DataModule when one is attached, else the module
        owner = trainer.datamodule if trainer.datamodule is not None else pl_module
        original = owner.predict_dataloader

        def filtered() -> Any:
            done = self._prepare(trainer, trainer.lightning_module)
            # every rank has read the directory before any rank samples or writes: the ranks
            # filter the same done set, so they share out the same remaining seeds
            trainer.strategy.barrier("noisecls-sample-writer-done-set")
            return self._remaining(trainer, original(), done)

        owner.predict_dataloader = filtered  # instance attribute; removed in teardown
        self._wrapped.append((owner, "predict_dataloader"))

    def _restore(self) -> None:
        """Undo what ``setup`` changed on the module / DataModule."""
        for owner, name in self._wrapped:
            owner.__dict__.pop(name, None)
        self._wrapped = []
        if self._zero_length_flag is not None:
            module, value = self._zero_length_flag
            module.allow_zero_length_dataloader_with_multiple_devices = value
            self._zero_length_flag = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()  # Lightning calls no teardown hooks after an exception

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()
        if stage != "predict":
            return
        # collective on every rank (also those whose loop had no seeds): after it, every rank's
        # files are complete
        wrote_any = trainer.strategy.reduce_boolean_decision(bool(self.written), all=False)
        if trainer.is_global_zero and (wrote_any or not (self.output_dir / "grid.png").exists()):
            self._write_grid()

    def _remaining(self, trainer: L.Trainer, loader: Any, done: set[int]) -> Any:
        """The loader over the seeds not in ``done``, batched as one process would batch them and
        holding this rank's share: whole batches, batch j to rank j % world size (so shard names
        and batch contents do not depend on the number of ranks). A loader over integer seeds
        only; anything else is returned as it is (Lightning then shards it)."""
        if not isinstance(loader, DataLoader):
            return loader
        if loader.batch_size is None:
            raise NoiseclsError(
                "SampleWriter needs a predict DataLoader with a batch_size (not a batch_sampler); "
                "set model.init_args.predict.batch_size"
            )
        dataset: Dataset = loader.dataset
        keep = []
        for i in range(len(dataset)):  # type: ignore[arg-type]
            seed = int(dataset[i])
            if seed in done:
                self.skipped_seeds.add(seed)
            else:
                keep.append(i)
        remaining = Subset(dataset, keep)
        kwargs = trainer.distributed_sampler_kwargs or {}
        share = _RankBatches(remaining, loader.batch_size, kwargs.get("num_replicas", 1),
                             kwargs.get("rank", 0))  # fmt: skip
        return DataLoader(remaining, batch_size=loader.batch_size, sampler=share,
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn)  # fmt: skip

    # ---- writing -------------------------------------------------------------------------
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._prepared:  # dataloaders given directly to trainer.predict: no filtering
            self._prepare(trainer, pl_module)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        seeds = torch.as_tensor(prediction["seeds"]).reshape(-1).cpu().to(torch.int64)
        samples = prediction["samples"].detach().float().cpu()
        path = self.output_dir / f"samples_{int(seeds[0]):08d}-{int(seeds[-1]):08d}.npz"
        if path.exists():
            return  # complete (atomic) file of this run: never overwritten
        arrays = {"samples": samples.numpy().astype(np.float32), "seeds": seeds.numpy(),
                  "rank": np.int64(trainer.global_rank)}  # fmt: skip
        if prediction.get("labels") is not None:  # class-conditional models
            arrays["labels"] = torch.as_tensor(prediction["labels"]).cpu().to(torch.int64).numpy()
        self._check_image_shape(samples.shape[1:])
        if is_image_shape(samples.shape[1:]):
            images = to_uint8_images(samples)  # [B, C, H, W]
            if self.image_folder:  # before the shard, which marks the batch complete
                for seed, image in zip(seeds.tolist(), images, strict=True):
                    save_png(image, self.image_path(seed))
            arrays["images"] = images.permute(0, 2, 3, 1).contiguous().numpy()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.written.append(path)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # write_interval="batch": nothing to write per epoch

    def _write_grid(self) -> None:
        if self.grid_size <= 0:
            return
        seeds, samples = [], []
        for f in sorted(self.output_dir.glob("samples_*.npz")):
            with np.load(f) as data:
                seeds.append(data["seeds"])
                samples.append(data["samples"])
        if not seeds:
            return
        all_seeds = np.concatenate(seeds)
        order = np.argsort(all_seeds, kind="stable")[: self.grid_size]
        first = torch.from_numpy(np.concatenate(samples)[order])
        path = self.output_dir / "grid.png"
        if is_image_shape(first.shape[1:]):
            save_png(image_grid(first), path)
        elif first[0].numel() >= 2:
            save_figure(scatter_figure(first, f"first {len(order)} samples"), path)


def _describe(schedule: Any) -> Any:
    """A JSON-able description of a schedule object: class name and public scalar fields."""
    if schedule is None:
        return None
    fields = {k: v for k, v in sorted(vars(schedule).items())
              if not k.startswith("_") and isinstance(v, int | float | str | bool)}  # fmt: skip
    return {"class": f"{type(schedule).__module__}.{type(schedule).__qualname__}", **fields}
