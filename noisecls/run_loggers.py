"""The loggers of a ``noisecls`` run when the configuration names none.

Every run logs to CSV in its log directory (``{default_root_dir}/lightning_logs/version_N``, as
Lightning's own default: checkpoints, ``results.json`` and sample grids stay where they were) and
to Weights & Biases, offline unless the user set ``WANDB_MODE`` (no network call, no login
prompt; ``wandb sync <dir>`` uploads later). The W&B run is filed so that runs of different
methods line up in W&B's comparison views:

* project ``noisecls``; group = the data set (``digits``, ``toy-gmm``, ``cifar10``, ...);
* name = the experiment config's name (``ddm_digits``); job type = the subcommand (fit / test /
  predict / validate); tags = the method (``DDM``, ``CDM``, ``CDL``, ``DG``, ``Soft``);
* config = the resolved configuration (what ``--print_config`` prints).

A ``trainer.logger`` in the YAML or on the command line replaces these; ``--trainer.logger
false`` turns logging off and ``--wandb false`` keeps only the CSV logger.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

__all__ = ["WANDB_PROJECT", "OfflineWandbLogger", "RunIdentity", "default_loggers", "run_identity"]

WANDB_PROJECT = "noisecls"


class OfflineWandbLogger(WandbLogger):
    """Lightning's WandbLogger, offline unless ``WANDB_MODE`` is set, writing under ``save_dir``
    made absolute and created first (wandb warned "git root ... does not exist" otherwise), and
    without the ``anonymous=None`` that Lightning 2.6 passes to ``wandb.init`` (wandb >= 0.19
    warns that the setting has no effect)."""

    def __init__(self, save_dir: str | os.PathLike, **kwargs: Any) -> None:
        if not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = "offline"
        directory = Path(save_dir).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(save_dir=str(directory), **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


@dataclass(frozen=True)
class RunIdentity:
    """How a run is filed in W&B: name (config name), group (data set), tags (method),
    job_type (subcommand)."""

    name: str
    group: str
    tags: tuple[str, ...]
    job_type: str


def _class_name(section: Mapping[str, Any] | None) -> str:
    """The class name of a ``{class_path, init_args}`` section ('' when absent)."""
    if not section:
        return ""
    return str(section.get("class_path") or "").rpartition(".")[2]


def dataset_name(data: Mapping[str, Any] | None) -> str:
    """A short data set name from the data section: the DataModule's class without
    ``DataModule``, lower case (``DigitsDataModule`` -> ``digits``); a toy adds its set
    (``toy-moons``); ``RealFakeDataModule`` (DG's discriminator) names its real data."""
    if not data:
        return "unknown"
    init_args = data.get("init_args") or {}
    name = _class_name(data).removesuffix("DataModule").lower() or "unknown"
    if name == "realfake" and init_args.get("real"):
        return dataset_name(init_args["real"])
    if name == "toy":
        return f"toy-{init_args.get('name') or 'gmm'}"
    return name


def run_identity(config: Mapping[str, Any], subcommand: str) -> RunIdentity:
    """The W&B identity of a run from its parsed configuration (``config`` of one subcommand:
    keys ``config`` (the ``--config`` files), ``model``, ``data``, ``trainer``)."""
    files = [Path(str(f)) for f in (config.get("config") or [])]
    method = _class_name(config.get("model")) or "unknown"
    if files:
        name = files[0].stem
    else:
        root = (config.get("trainer") or {}).get("default_root_dir")
        name = Path(str(root)).name if root else method.lower()
    return RunIdentity(name=name, group=dataset_name(config.get("data")), tags=(method,),
                       job_type=subcommand)  # fmt: skip


def default_loggers(
    identity: RunIdentity, root_dir: str | os.PathLike, resolved_config: dict[str, Any], wandb: bool
) -> list[Logger]:
    """[CSVLogger] or [CSVLogger, WandbLogger] for a run whose trainer has no logger configured.

    The CSV logger comes first, so ``trainer.log_dir`` (results, grids, checkpoints) is the one
    Lightning's default logger had; the W&B run is written under ``{root_dir}/wandb``.
    ``WANDB_MODE`` defaults to ``offline`` here (a user's own setting wins).
    """
    loggers: list[Logger] = [CSVLogger(save_dir=str(root_dir))]
    if wandb:
        loggers.append(
            OfflineWandbLogger(
                save_dir=root_dir,
                project=WANDB_PROJECT,
                name=identity.name,
                group=identity.group,
                tags=list(identity.tags),
                job_type=identity.job_type,
                config=resolved_config,
            )
        )
    return loggers
