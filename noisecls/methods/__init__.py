"""LightningModules, one per method, over the shared DiffusionModule."""

from noisecls.methods.base import DiffusionModule
from noisecls.methods.cdl import CDL, ZetaConfig
from noisecls.methods.cdm import CDM
from noisecls.methods.ddm import DDM
from noisecls.methods.dg import DG, GuidanceConfig
from noisecls.methods.soft import SoftDiffusion

__all__ = [
    "CDL",
    "CDM",
    "DDM",
    "DG",
    "DiffusionModule",
    "GuidanceConfig",
    "SoftDiffusion",
    "ZetaConfig",
]
