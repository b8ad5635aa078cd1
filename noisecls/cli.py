"""The ``noisecls`` command: a LightningCLI over every method and DataModule.

``noisecls fit --config experiments/ddm_toy.yaml`` trains, ``noisecls test --config ... --ckpt_path
...`` evaluates, ``noisecls predict`` writes samples; ``noisecls compare RUN_DIR...`` tabulates
and plots the ``results.json`` of many runs (:mod:`noisecls.compare`); ``noisecls fid A B`` is
the FID / KID of two sample sets (:func:`noisecls.metrics.fid_command`). Model and data are given in
subclass mode (``class_path`` / ``init_args``). Problems the user can fix are printed as one line.

Defaults a run gets without asking: CSV + offline W&B logging (:mod:`noisecls.run_loggers`;
``--trainer.logger`` replaces it, ``--wandb false`` drops W&B), a progress bar that suits the
output (:mod:`noisecls.progress`: Rich on a terminal, plain lines in a log file), a line per
computed metric, and the warnings that need no action filtered (:mod:`noisecls.quiet`).
"""

from __future__ import annotations

import importlib
import logging
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from noisecls.callbacks.samples import SampleWriter
from noisecls.errors import NoiseclsError
from noisecls.methods.base import DiffusionModule
from noisecls.progress import progress_bar_for
from noisecls.quiet import silence_needless_messages
from noisecls.run_loggers import default_loggers, run_identity

EXIT_USAGE = 2


def _one_line(message: str, limit: int = 400) -> str:
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_STRUCTURE = ("Parser key", "Does not validate", "Subtypes:", "Errors:", "Given value",
              "Problem with given class_path")  # fmt: skip


def _innermost_type_error(message: str) -> str | None:
    """A nested jsonargparse validation message condensed to its innermost failure, e.g.
    ``model.predict.num_samples: expected <class 'int'> or typing.Literal['train'], got all``
    (None when the message has no nested ``Parser key`` structure)."""
    lines = [(len(line) - len(line.lstrip()), line.strip()) for line in str(message).splitlines()]
    reasons = [
        (d, t)
        for d, t in lines
        if t and "NoneType" not in t and not t.lstrip("- ").startswith(_STRUCTURE)
    ]
    if not reasons or not any(t.startswith("Parser key") for _, t in lines):
        return None
    depth = max(d for d, _ in reasons)
    deepest = [t.lstrip("- ") for d, t in reasons if d == depth]
    first = next(i for i, (d, t) in enumerate(lines) if d == depth and t.lstrip("- ") in deepest)
    keys = [re.sub(r'^Parser key "([^"]+)".*', r"\1", t) for d, t in lines[:first]
            if d < depth and t.startswith("Parser key")]  # fmt: skip
    if all(t.startswith("Expected a ") for t in deepest) and len(deepest) > 1:
        given = next((t for d, t in lines[first:] if t.startswith("Given value:")), "")
        reason = "expected " + " or ".join(t[len("Expected a ") :] for t in deepest)
        reason += f", got {given[len('Given value:') :].strip()}" if given else ""
    else:
        reason = "; ".join(deepest)
    return f"{'.'.join(keys)}: {reason}"


class OneLineErrorParser(LightningArgumentParser):
    """Argument parser whose errors are one line (no usage dump): ``noisecls: error: ...``."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)  # raises ArgumentError for jsonargparse to handle
        hint = " (run `noisecls <subcommand> --help` or `--print_config` to list valid keys)"
        text = _innermost_type_error(message) or message
        sys.stderr.write(f"noisecls: error: {_one_line(text)}{hint}\n")
        sys.exit(EXIT_USAGE)


def _root_cause(err: BaseException) -> str:
    """The user's problem inside a jsonargparse instantiation error: the innermost exception
    raised outside jsonargparse (e.g. a network's configuration check), else the error's own
    "- reason" lines (Union alternatives that merely failed to be None are skipped)."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for exc in reversed(chain):
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None and "jsonargparse" not in tb.tb_frame.f_code.co_filename:
            return _one_line(str(exc))
    reasons = [
        line.strip()[2:]
        for line in str(err).splitlines()
        if line.strip().startswith("- ") and "NoneType" not in line
    ]
    return _one_line("; ".join(reasons) if reasons else str(err))


def _import_class(class_path: str) -> type:
    """The class a dotted path names (one-line error when it cannot be imported)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise NoiseclsError(f"the checkpoint names an unknown class {class_path}") from err


#: what torch.load raises for a truncated, corrupt or non-checkpoint file
_UNREADABLE = (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError,
               zipfile.BadZipFile)  # fmt: skip
#: values of --ckpt_path that Lightning resolves itself (not file paths)
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def _first_sentence(text: str, limit: int = 120) -> str:
    """The first sentence of an error message, at most ``limit`` characters."""
    sentence = _one_line(text).split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def _unreadable(path: Path, err: BaseException) -> str:
    return (
        f"cannot read checkpoint {path}: the file is truncated or corrupt ({type(err).__name__}: "
        f"{_first_sentence(str(err))}); use a complete .ckpt (e.g. the run's last.ckpt) or write "
        "it again"
    )


def read_checkpoint(path: str | Path, option: str = "--ckpt_path") -> dict[str, Any]:
    """A Lightning checkpoint's contents (tensors on the CPU), or a one-line NoiseclsError for a
    missing, truncated, corrupt or non-Lightning file (``option``: where the path came from)."""
    path = Path(path)
    if not path.is_file():
        raise NoiseclsError(f"checkpoint {path} does not exist; check the path given to {option}")
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise NoiseclsError(_unreadable(path, err)) from err
        raise NoiseclsError(
            f"checkpoint {path} holds an object that torch.load(weights_only=True) refuses "
            f"({_first_sentence(str(err).partition('Unsupported global:')[2])}); load only "
            "checkpoints you trust and re-save their state_dict"
        ) from err
    except _UNREADABLE as err:
        raise NoiseclsError(_unreadable(path, err)) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise NoiseclsError(
            f"{path} is not a Lightning checkpoint (no state_dict); pass a .ckpt written by "
            "`noisecls fit`"
        )
    return ckpt


def _method(class_path: str) -> str:
    return class_path.rpartition(".")[2]


def check_same_method(ckpt_class_path: str, config_class_path: str, ckpt_path: str,
                      config_files: list[Path]) -> None:  # fmt: skip
    """Refuse (one line, naming both methods and the fix) a checkpoint written by another method
    than the configuration's model."""
    if _import_class(ckpt_class_path) is _import_class(config_class_path):
        return
    theirs, ours = _method(ckpt_class_path), _method(config_class_path)
    fix = f"use the config it was trained with (a {theirs} config)"
    if config_files:
        stem = config_files[0].stem
        sibling = config_files[0].with_name(f"{theirs.lower()}_{stem.partition('_')[2]}.yaml")
        if "_" in stem and sibling.is_file():
            fix = f"use the config it was trained with, e.g. --config {sibling}"
    raise NoiseclsError(
        f"{ckpt_path} is a checkpoint of another method: {theirs} ({ckpt_class_path}), but the "
        f"config's model is {ours} ({config_class_path}); {fix}, or pass a {ours} checkpoint"
    )


def _state_dict_mismatch(err: RuntimeError, ckpt_path: str | None) -> str:
    """A one-line account of a ``load_state_dict`` failure (first mismatch and how many)."""
    details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    first = details[0].rstrip(".") if details else _first_sentence(str(err))
    first = re.sub(r"copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
                   r"the shape in current model is torch\.Size\((\[[^\]]*\])\)",
                   r"checkpoint \1 vs model \2", first)  # fmt: skip
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return (
        f"checkpoint {ckpt_path} does not fit the configured network ({first}{more}); use the "
        "network settings it was trained with"
    )


#: model hyperparameters naming a checkpoint the model loads weights from
_LOADED_CHECKPOINTS = ("init_from", "score_checkpoint", "feature_checkpoint")

log = logging.getLogger("noisecls.cli")


class NoiseclsCLI(LightningCLI):
    """LightningCLI with the project's defaults.

    Defaults: inference mode off (CDM's denoiser, DG guidance and ODE likelihoods need input
    gradients in validate / test / predict); CSV + W&B loggers unless ``trainer.logger`` is
    configured (:func:`noisecls.run_loggers.default_loggers`; ``--wandb false``: CSV only); a
    progress bar for the output stream (:func:`noisecls.progress.progress_bar_for`) unless
    ``trainer.enable_progress_bar: false`` or another bar is configured; config.yaml overwritten
    on re-runs. ``data.data_shape`` is linked into ``model.init_args.data_shape``.
    """

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            raise NoiseclsError(f"invalid configuration: {_root_cause(err)}") from err

    def _subcommand_config(self) -> Any:
        return self.config.get(str(self.subcommand), self.config)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Add the default loggers when none is configured; a progress bar (first in the list,
        so it announces evaluations before the metric callbacks run) unless progress bars are
        off or one is configured; for ``predict``, a SampleWriter into
        ``{default_root_dir}/samples`` unless one is configured."""
        configured = [*(config.get("callbacks") or []), *callbacks]
        root = Path(config.get("default_root_dir") or ".")
        if config.get("logger") in (None, True):
            parsed = self._subcommand_config()
            resolved = yaml.safe_load(self._parser(self.subcommand).dump(parsed, skip_none=False))
            identity = run_identity(parsed, str(self.subcommand))
            config["logger"] = default_loggers(identity, root, resolved, bool(parsed.get("wandb")))
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            config["callbacks"] = [progress_bar_for(sys.stdout), *(config.get("callbacks") or [])]
        if self.subcommand == "predict" and not any(
            isinstance(c, BasePredictionWriter) for c in configured
        ):
            callbacks = [*callbacks, SampleWriter(str(root / "samples"))]
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """Take the model's hyperparameters from ``--ckpt_path`` (Lightning's behaviour), except
        the evaluation-time ones the module lists in ``evaluation_hparams`` (sampler, predict,
        ...): those keep the values of the config and command line, so ``noisecls predict
        --ckpt_path ... --model.init_args.predict.num_samples N`` does what it says. A missing,
        unreadable or other method's checkpoint is refused in one line."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or str(ckpt_path).partition(":")[0] in _SPECIAL_CKPT_PATHS:
            return
        ckpt = read_checkpoint(ckpt_path)
        hparams = dict(ckpt.get("hyper_parameters", {}) or {})
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None)
        if not hparams or class_path is None:
            return
        configured = (self.config[subcommand].get("model") or {}).get("class_path")
        if configured:
            files = [Path(str(f)) for f in self.config[subcommand].get("config") or []]
            check_same_method(class_path, configured, str(ckpt_path), files)
        module = _import_class(class_path)
        for key in getattr(module, "evaluation_hparams", ()):
            hparams.pop(key, None)
        model = {"class_path": class_path, "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def before_fit(self) -> None:
        """One line per checkpoint the model loads weights from (``init_from``, DG's score and
        feature checkpoints): what it is, before fitting starts loading it."""
        hparams = getattr(self.model, "hparams", {}) or {}
        for key in _LOADED_CHECKPOINTS:
            path = hparams.get(key)
            if not path or not Path(str(path)).is_file():
                continue
            ckpt = read_checkpoint(path, option=f"model.init_args.{key}")
            writer = (ckpt.get("hyper_parameters") or {}).get("_class_path", "an unknown model")
            log.info(
                "%s: loading %s (a %s checkpoint at step %s, %d tensors) into %s",
                key, path, _method(str(writer)), ckpt.get("global_step", "?"),
                len(ckpt["state_dict"]), type(self.model).__name__,
            )  # fmt: skip

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as err:
            if "Error(s) in loading state_dict" not in str(err):
                raise
            ckpt_path = self._subcommand_config().get("ckpt_path")
            raise NoiseclsError(_state_dict_mismatch(err, ckpt_path)) from err

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--wandb",
            type=bool,
            default=True,
            help="with no trainer.logger configured, also log to Weights & Biases (offline "
            "unless WANDB_MODE says otherwise); false: CSV only",
        )
        parser.link_arguments(
            "data.data_shape", "model.init_args.data_shape", apply_on="instantiate"
        )


def _configure_output() -> None:
    """Progress and metric lines of the ``noisecls`` loggers to stdout; needless warnings off."""
    logger = logging.getLogger("noisecls")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    silence_needless_messages()


#: subcommands that are not Trainer functions: name -> "module:function(argv) -> exit code"
EXTRA_SUBCOMMANDS = {"compare": "noisecls.compare:main", "fid": "noisecls.metrics:fid_command"}


def build_cli(args: list[str] | None = None, run: bool = True) -> NoiseclsCLI:
    """The project's LightningCLI (``run=False``: parse and instantiate only, no subcommand)."""
    return NoiseclsCLI(
        DiffusionModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"inference_mode": False},
        save_config_kwargs={"overwrite": True},
        parser_class=OneLineErrorParser,
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``noisecls`` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] in EXTRA_SUBCOMMANDS:
            module, _, function = EXTRA_SUBCOMMANDS[argv[0]].partition(":")
            sys.exit(getattr(importlib.import_module(module), function)(argv[1:]))
        _configure_output()
        build_cli(args)
    except NoiseclsError as err:
        sys.stderr.write(f"noisecls: error: {_one_line(str(err))}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
