"""Keep torchvision importable next to a CPU-only torch.

PyPI's Linux torchvision wheels are CUDA builds: their ``_C`` extension links libtorch_cuda, so
beside the CPU build of torch it fails to load, and torchvision's import then dies registering
fake kernels for ``torchvision::nms`` / ``qnms``, ops that only ``_C`` defines. noisecls uses
none of torchvision's compiled ops (only datasets, transforms and image grids), so when ``_C``
cannot load we declare those two schemas, which is all the import needs. When ``_C`` loads
(a matching CUDA build) nothing is touched.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None


def make_torchvision_importable() -> None:
    """Declare torchvision's nms schemas if its ``_C`` extension cannot be loaded."""
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    extensions = sorted(Path(spec.origin).parent.glob("_C*.so"))
    try:
        for path in extensions:
            torch.ops.load_library(str(path))
        return
    except OSError:
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
