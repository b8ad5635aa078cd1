"""Samples: a grid to the logger at each validation, and the writer behind ``noisecls predict``.

* :class:`SampleGridCallback`: ``num_samples`` samples from fixed seeds (the same every time, so
  grids are comparable across epochs) as a ``torchvision.utils.make_grid`` image (W&B image,
  TensorBoard image, else a PNG in ``<log dir>/samples/``); 2-D data as a scatter plot instead.
* :class:`SampleWriter`: a ``BasePredictionWriter`` writing each predict batch to
  ``output_dir/samples_{first_seed:08d}-{last_seed:08d}.npz`` (keys ``samples`` float32 in data
  scale [B, *data_shape], ``seeds`` int64 [B], and for images ``images`` uint8 [B, H, W, C]),
  atomically (temporary name + ``os.replace``), with a ``manifest.json`` identifying the run and a
  PNG grid of the first samples at the end.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

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
from noisecls.methods.base import derive_seed
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
    """Logs ``num_samples`` samples from fixed seeds at each (every n-th) validation.

    Images ([C, H, W] data): a grid (W&B image with a WandbLogger, TensorBoard image with a
    TensorBoardLogger, otherwise ``<log dir>/samples/<stage>_epoch..._step....png``). Vector data
    with D >= 2 (toys): a scatter plot of the first two coordinates, logged the same way. Rank 0
    samples; other ranks only join the log-dir broadcast.

    Args:
        num_samples: samples per grid.
        every_n_epochs: during fit, after epochs e with (e + 1) % n == 0; always in validate.
        seed: seed of the samples (same grid seeds every time).
        sampler: sampler; default the module's own.
        nrow: images per grid row (default ceil(sqrt(num_samples))).

    Attributes:
        last_path: the PNG written last (None when a logger took the image).
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

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sample on rank 0 and hand the picture to the loggers (or write a PNG)."""
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
        title = f"{prefix} samples, epoch {trainer.current_epoch}, step {step}"
        taken = False
        self.last_path = None
        if is_image_shape(samples.shape[1:]):
            grid = image_grid(samples, self.nrow)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=key, images=[grid.permute(1, 2, 0).numpy()], step=step)
                    taken = True
                elif isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(key, grid, global_step=step)
                    taken = True
            if not taken:
                path = out_dir / f"{prefix}_epoch{trainer.current_epoch:04d}_step{step:08d}.png"
                save_png(grid, path)
                self.last_path = path
        elif samples[0].numel() >= 2:
            fig = scatter_figure(samples, title)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_figure(key, fig, global_step=step)
                    taken = True
            path = out_dir / f"{prefix}_epoch{trainer.current_epoch:04d}_step{step:08d}.png"
            if not taken or any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
                save_figure(fig, path)
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


class SampleWriter(BasePredictionWriter):
    """Writes ``noisecls predict`` samples, one ``.npz`` per predict batch, resumably.

    Each batch of seeds (``DiffusionModule.predict_step`` returns ``{"seeds", "samples", "nfe"}``)
    becomes ``output_dir/samples_{first_seed:08d}-{last_seed:08d}.npz`` with ``samples`` (float32,
    data scale, [B, *data_shape]), ``seeds`` (int64 [B]), for class-conditional models ``labels``
    (int64 [B]) and, for image data, ``images`` (uint8 [B, H, W, C]). Files are written under a
    temporary name and renamed (``os.replace``), so a file that exists is complete. Under DDP
    Lightning shards the seeds without repeats (UnrepeatedDistributedSampler) and the seed-range
    names keep ranks from colliding.

    ``manifest.json`` identifies the run: model class, sampler config, data shape, schedule and the
    SHA-256 of the model's weights (plus, for information, the checkpoint path). Writing into a
    directory whose manifest describes another run (or that holds sample files but no manifest)
    is refused with a one-line :class:`NoiseclsError`. For the same run, seeds that already lie in
    a sample file are skipped: the predict dataloader is filtered before any sampling (resume
    after an interruption), and an existing file is never overwritten.

    At the end rank 0 writes ``grid.png``: the ``grid_size`` samples with the smallest seeds (a
    scatter plot for 2-D data).

    Args:
        output_dir: where to write.
        grid_size: samples in the final grid (0: no grid).
    """

    MANIFEST = "manifest.json"
    IDENTITY_FIELDS = ("model_class", "sampler", "data_shape", "schedule", "weights_sha256")

    def __init__(self, output_dir: str, grid_size: int = 64) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir).expanduser()
        self.grid_size = grid_size
        self.skipped_seeds: set[int] = set()
        self.written: list[Path] = []
        self._prepared = False
        self._wrapped: list[tuple[Any, str]] = []

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

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> set[int]:
        """Check / write the manifest; return the seeds already written (for this run)."""
        manifest = self.manifest_for(trainer, pl_module)
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
                done.update(int(s) for s in data["seeds"])
        self._prepared = True
        return done

    # ---- resume: filter the seeds before sampling ----------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._prepared = False
        self.skipped_seeds = set()
        self.written = []
        # the predict loop asks the DataModule when one is attached, else the module
        owner = trainer.datamodule if trainer.datamodule is not None else pl_module
        original = owner.predict_dataloader

        def filtered() -> Any:
            done = self._prepare(trainer, trainer.lightning_module)
            return self._without(original(), done)

        owner.predict_dataloader = filtered  # instance attribute; removed in teardown
        self._wrapped.append((owner, "predict_dataloader"))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for owner, name in self._wrapped:
            owner.__dict__.pop(name, None)
        self._wrapped = []
        grid_missing = not (self.output_dir / "grid.png").exists()
        if stage == "predict" and trainer.is_global_zero and grid_missing:
            self._write_grid(pl_module)  # also when every seed was already written

    def _without(self, loader: Any, done: set[int]) -> Any:
        """The loader minus the seeds in ``done`` (a loader over integer seeds only)."""
        if not done or not isinstance(loader, DataLoader):
            return loader
        dataset: Dataset = loader.dataset
        keep = []
        for i in range(len(dataset)):  # type: ignore[arg-type]
            seed = int(dataset[i])
            if seed in done:
                self.skipped_seeds.add(seed)
            else:
                keep.append(i)
        return DataLoader(Subset(dataset, keep), batch_size=loader.batch_size, shuffle=False,
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn)  # fmt: skip

    # ---- writing -------------------------------------------------------------------------
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._prepared:  # dataloaders given directly to trainer.predict
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
        arrays = {"samples": samples.numpy().astype(np.float32), "seeds": seeds.numpy()}
        if prediction.get("labels") is not None:  # class-conditional models
            arrays["labels"] = torch.as_tensor(prediction["labels"]).cpu().to(torch.int64).numpy()
        if is_image_shape(samples.shape[1:]):
            arrays["images"] = to_uint8_images(samples).permute(0, 2, 3, 1).contiguous().numpy()
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

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("noisecls-sample-writer")  # every rank's files are complete
        if trainer.is_global_zero:
            self._write_grid(pl_module)

    def _write_grid(self, pl_module: L.LightningModule) -> None:
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
