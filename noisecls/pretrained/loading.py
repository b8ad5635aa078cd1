"""Load a pretrained model as (backbone, schedule, prediction); write one back for diffusers.

``load_pretrained`` reads a diffusers directory (or a hub id already in the local cache), or a
noisecls checkpoint of a method whose ``net`` is a :class:`~noisecls.pretrained.diffusers.
DiffusersModel` and whose ``schedule`` a ``DiffusersSchedule`` (e.g. after CDL fine-tuning): the
weights come from the checkpoint (``net.*``; EMA ones where the EMA callback wrote them), the
architecture from the diffusers directory the saved schedule names (methods do not save their
``net`` config, so that directory must still exist). ``save_diffusers`` writes the backbone (and its
scheduler) as a diffusers pipeline directory.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from noisecls.errors import NoiseclsError
from noisecls.pretrained.diffusers import (
    PREDICTIONS,
    DiffusersModel,
    DiffusersSchedule,
    is_diffusers_source,
)
from noisecls.pretrained.extra import import_diffusers


def _names(config: object, cls: type) -> bool:
    """Whether a ``{class_path, init_args}`` config builds ``cls`` (or a subclass)."""
    path = config.get("class_path", "") if isinstance(config, dict) else ""
    module_name, _, name = str(path).rpartition(".")
    try:
        named = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(named, type) and issubclass(named, cls)


class Pretrained(NamedTuple):
    """A backbone with what its Denoiser needs: ``PredictionDenoiser(net, schedule,
    prediction)``; ``data_shape`` is one sample's shape (C, H, W)."""

    net: DiffusersModel
    schedule: DiffusersSchedule
    prediction: Literal["eps", "v", "x0"]
    data_shape: tuple[int, ...]


def load_pretrained(source: str) -> Pretrained:
    """The model in ``source``: a diffusers pipeline / model directory, a hub id in the local
    cache, or a noisecls Lightning checkpoint (``.ckpt``) whose ``net`` is a DiffusersModel."""
    if is_diffusers_source(source):
        net, schedule = DiffusersModel(source), DiffusersSchedule(source)
        return Pretrained(net, schedule, schedule.prediction, net.data_shape)
    return _load_checkpoint(Path(source).expanduser())


def _load_checkpoint(file: Path) -> Pretrained:
    if not file.is_file():
        raise NoiseclsError(f"{file} is neither a diffusers model directory nor a checkpoint")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise NoiseclsError(f"cannot read checkpoint {file}: {err}") from err
    hparams = ckpt.get("hyper_parameters") or {}
    schedule_cfg = hparams.get("schedule") or {}
    if not _names(schedule_cfg, DiffusersSchedule):
        raise NoiseclsError(
            f"{file} was not trained on a diffusers model (its schedule is not a DiffusersSchedule)"
        )
    schedule = DiffusersSchedule(**schedule_cfg.get("init_args", {}))
    net = DiffusersModel(schedule_cfg["init_args"]["path"], weights="config")
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise NoiseclsError(f"{file} does not fit the model its schedule names: {first}") from err
    prediction = hparams.get("prediction", schedule.prediction)
    return Pretrained(net, schedule, prediction, net.data_shape)


def save_diffusers(
    net: DiffusersModel,
    path: str | Path,
    schedule: DiffusersSchedule | None = None,
    prediction: Literal["eps", "v", "x0"] | None = None,
) -> Path:
    """Write ``net``'s diffusers model to ``path``: a pipeline directory (``model_index.json``,
    ``unet/``, ``scheduler/``; loadable by diffusers' ``DDPMPipeline.from_pretrained`` and by
    :func:`load_pretrained`) when ``schedule`` is given, else the model folder alone.
    ``prediction`` (default: the schedule's) is written as the scheduler's prediction_type."""
    path = Path(path)
    if schedule is None:
        net.model.save_pretrained(path)
        return path
    prediction_type = {v: k for k, v in PREDICTIONS.items()}[prediction or schedule.prediction]
    scheduler = type(schedule.scheduler).from_config(
        schedule.scheduler.config, prediction_type=prediction_type
    )
    import_diffusers().DDPMPipeline(unet=net.model, scheduler=scheduler).save_pretrained(path)
    return path
