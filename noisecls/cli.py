"""The ``noisecls`` command: a LightningCLI over every method and DataModule.

``noisecls fit --config experiments/ddm_toy.yaml`` trains, ``noisecls test --config ... --ckpt_path
...`` evaluates, ``noisecls predict`` writes samples. Model and data are given in subclass mode
(``class_path`` / ``init_args``). Problems the user can fix are printed as one line.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from noisecls.callbacks.samples import SampleWriter
from noisecls.errors import NoiseclsError
from noisecls.methods.base import DiffusionModule

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


class NoiseclsCLI(LightningCLI):
    """LightningCLI with the project's defaults.

    Defaults: inference mode off (CDM's denoiser, DG guidance and ODE likelihoods need input
    gradients in validate / test / predict), a Rich progress bar (unless
    ``trainer.enable_progress_bar: false`` or another bar is configured), config.yaml overwritten on
    re-runs. ``data.data_shape`` is linked into ``model.init_args.data_shape``.
    """

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            raise NoiseclsError(f"invalid configuration: {_root_cause(err)}") from err

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Add a Rich progress bar unless progress bars are off or one is configured; for
        ``predict``, a SampleWriter into ``{default_root_dir}/samples`` unless one is configured."""
        configured = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            callbacks = [*callbacks, RichProgressBar()]
        if self.subcommand == "predict" and not any(
            isinstance(c, BasePredictionWriter) for c in configured
        ):
            root = Path(config.get("default_root_dir") or ".")
            callbacks = [*callbacks, SampleWriter(str(root / "samples"))]
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """Take the model's hyperparameters from ``--ckpt_path`` (Lightning's behaviour), except
        the evaluation-time ones the module lists in ``evaluation_hparams`` (sampler, predict,
        ...): those keep the values of the config and command line, so ``noisecls predict
        --ckpt_path ... --model.init_args.predict.num_samples N`` does what it says."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        try:
            ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        except (OSError, RuntimeError) as err:
            reason = _one_line(str(err))
            raise NoiseclsError(f"cannot read checkpoint {ckpt_path}: {reason}") from err
        hparams = dict(ckpt.get("hyper_parameters", {}) or {})
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None)
        if not hparams or class_path is None:
            return
        module = _import_class(class_path)
        for key in getattr(module, "evaluation_hparams", ()):
            hparams.pop(key, None)
        model = {"class_path": class_path, "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "data.data_shape", "model.init_args.data_shape", apply_on="instantiate"
        )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``noisecls`` console script."""
    try:
        NoiseclsCLI(
            DiffusionModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults={"inference_mode": False},
            save_config_kwargs={"overwrite": True},
            parser_class=OneLineErrorParser,
            args=args,
        )
    except NoiseclsError as err:
        sys.stderr.write(f"noisecls: error: {_one_line(str(err))}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
