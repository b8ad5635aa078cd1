"""noisecls: diffusion models trained or steered through noise classifiers."""

__version__ = "0.1.0"
