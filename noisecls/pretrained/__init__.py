"""Pretrained models from elsewhere as noisecls Denoisers and backbones.

- :mod:`~noisecls.pretrained.generic`: any network called as net(x, sigma) or net(x, t) with a
  declared parameterisation (``wrap_network``).
- :mod:`~noisecls.pretrained.diffusers`: a diffusers model and its scheduler as a backbone
  (``DiffusersModel``) and a noise schedule (``DiffusersSchedule``), for any method's ``net`` and
  ``schedule``; :mod:`~noisecls.pretrained.loading`: ``load_pretrained`` / ``save_diffusers``.

diffusers is an optional extra (``pip install -e ".[diffusers]"``), imported only when a
diffusers model is built; importing this package does not need it.
"""

from noisecls.pretrained.diffusers import DiffusersModel, DiffusersSchedule, is_diffusers_source
from noisecls.pretrained.extra import MissingExtraError
from noisecls.pretrained.generic import ExternalNetwork, wrap_network
from noisecls.pretrained.loading import Pretrained, load_pretrained, save_diffusers

__all__ = [
    "DiffusersModel",
    "DiffusersSchedule",
    "ExternalNetwork",
    "MissingExtraError",
    "Pretrained",
    "is_diffusers_source",
    "load_pretrained",
    "save_diffusers",
    "wrap_network",
]
