"""LightningModules, one per method, over the shared DiffusionModule."""

from noisecls.methods.base import DiffusionModule
from noisecls.methods.cdl import CDL, ZetaConfig
from noisecls.methods.cdm import CDM
from noisecls.methods.ddm import DDM

__all__ = ["CDL", "CDM", "DDM", "DiffusionModule", "ZetaConfig"]
