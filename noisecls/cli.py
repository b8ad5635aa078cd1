"""The ``noisecls`` command: a LightningCLI over every method and DataModule.

``noisecls fit --config experiments/ddm_toy.yaml`` trains, ``noisecls test --config ... --ckpt_path
...`` evaluates, ``noisecls predict`` writes samples. Model and data are given in subclass mode
(``class_path`` / ``init_args``). Problems the user can fix are printed as one line.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from noisecls.errors import NoiseclsError
from noisecls.methods.base import DiffusionModule

EXIT_USAGE = 2


def _one_line(message: str, limit: int = 400) -> str:
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class OneLineErrorParser(LightningArgumentParser):
    """Argument parser whose errors are one line (no usage dump): ``noisecls: error: ...``."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not getattr(self, "exit_on_error", True):
            raise ex if ex is not None else ValueError(message)  # nested parsers re-raise
        hint = " (run `noisecls <subcommand> --help` or `--print_config` to list valid keys)"
        sys.stderr.write(f"noisecls: error: {_one_line(message)}{hint}\n")
        sys.exit(EXIT_USAGE)


class NoiseclsCLI(LightningCLI):
    """LightningCLI with the project's defaults.

    Defaults: inference mode off (CDM's denoiser, DG guidance and ODE likelihoods need input
    gradients in validate / test / predict), a Rich progress bar, config.yaml overwritten on
    re-runs. ``data.data_shape`` is linked into ``model.init_args.data_shape``.
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        return OneLineErrorParser(**kwargs)

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
            trainer_defaults={"inference_mode": False, "callbacks": [RichProgressBar()]},
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except NoiseclsError as err:
        sys.stderr.write(f"noisecls: error: {_one_line(str(err))}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
