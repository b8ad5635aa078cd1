"""noisecls: diffusion models trained or steered through noise classifiers."""

from noisecls._compat import make_torchvision_importable

make_torchvision_importable()

__version__ = "0.1.0"
