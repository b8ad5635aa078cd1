"""Shared test setup.

noisecls is imported first so torchvision (pulled in by lightning through torchmetrics) imports
beside the CPU build of torch (see ``noisecls._compat``). Tests run torch on one thread: their
tensors are small, and on a 2-core machine a second thread contending with the subprocesses some
tests start made small-tensor work 10-100x slower.
"""

import os

import pytest
import torch

import noisecls  # noqa: F401  (must precede lightning / torchvision imports)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread():
    """One intra-op thread for the whole session (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
