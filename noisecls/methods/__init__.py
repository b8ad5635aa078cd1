"""LightningModules, one per method, over the shared DiffusionModule."""

from noisecls.methods.base import DiffusionModule
from noisecls.methods.ddm import DDM

__all__ = ["DDM", "DiffusionModule"]
