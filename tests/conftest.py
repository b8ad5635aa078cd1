"""Shared test setup: noisecls is imported first so torchvision (pulled in by lightning through
torchmetrics) imports beside the CPU build of torch (see ``noisecls._compat``)."""

import os

import noisecls  # noqa: F401  (must precede lightning / torchvision imports)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
