"""Warnings and log lines that every ``noisecls`` run printed and that need no action.

Each filter matches one message (a regular expression on its start) and says why it needs no
action in this project; any other warning, of the same category or module included, is shown as
before. :func:`silence_needless_messages` installs them (the CLI does, once per process).
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

__all__ = ["NEEDLESS_LOG_LINES", "NEEDLESS_WARNINGS", "Needless", "silence_needless_messages"]


@dataclass(frozen=True)
class Needless:
    """A message to drop: ``pattern`` matches its start; ``reason`` says why no action is needed."""

    pattern: str
    reason: str


NEEDLESS_WARNINGS = (
    Needless(
        r"The number of training batches \(\d+\) is smaller than the logging interval",
        "the DataModules are step-indexed (max_steps is the budget, epochs are short): Lightning "
        "logs every log_every_n_steps global steps across epochs, so nothing is lost",
    ),
    Needless(
        r"You're using the WeightAveraging callback, but loading a checkpoint outside the 'fit'",
        "the averaged (EMA) weights are the checkpoint's state_dict (EMAWeightAveraging), so "
        "test / predict evaluate them without restoring the averaging state",
    ),
    Needless(
        r"The dirpath has changed from",
        "test / predict / a resumed fit log into a new version directory by design; the "
        "checkpoint being evaluated is the one given by --ckpt_path",
    ),
    Needless(
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "a deprecation inside Lightning's own pytree helper (torch >= 2.6); nothing to change here",
    ),
    Needless(
        r"Metric `Kernel Inception Distance` will save all extracted features in buffer",
        "KID needs all features; the FID callback computes KID of at most a few thousand samples",
    ),
    Needless(
        r"Found \d+ module\(s\) in eval mode at the start of training",
        "frozen parts (DG's score model and feature extractor, the FID feature networks) are "
        "deliberately in eval mode; the trained network is in train mode",
    ),
    Needless(
        r"Starting from v1\.9\.0, `tensorboardX` has been removed",
        "noisecls logs to CSV (and W&B) by default; TensorBoard is not used",
    ),
)

NEEDLESS_LOG_LINES = (
    Needless(
        r"💡 Tip: For seamless cloud logging",
        "an advertisement for Lightning's hosted logger, printed by every run",
    ),
)


class _DropMatching(logging.Filter):
    """A logging filter dropping the records whose message starts with one of ``patterns``."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.regex = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.regex.match(record.getMessage()) is None


def silence_needless_messages() -> None:
    """Install the filters of :data:`NEEDLESS_WARNINGS` (``warnings`` filters, by message) and
    :data:`NEEDLESS_LOG_LINES` (on Lightning's rank-zero info logger). Idempotent."""
    for needless in NEEDLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=needless.pattern)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropMatching) for f in logger.filters):
        logger.addFilter(_DropMatching(tuple(n.pattern for n in NEEDLESS_LOG_LINES)))
