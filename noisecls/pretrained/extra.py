"""The optional ``diffusers`` extra, imported only when a diffusers model is used."""

from __future__ import annotations

import importlib
from types import ModuleType

from noisecls.errors import NoiseclsError

INSTALL_HINT = 'pip install -e ".[diffusers]"'


class MissingExtraError(NoiseclsError):
    """An optional dependency of the feature in use is not installed."""


def import_diffusers() -> ModuleType:
    """The ``diffusers`` module; a one-line :class:`MissingExtraError` naming the extra when it
    (or one of its own imports) is missing."""
    try:
        return importlib.import_module("diffusers")
    except ImportError as err:
        raise MissingExtraError(
            f"diffusers models need the diffusers extra ({err}): {INSTALL_HINT}"
        ) from err
