"""Backbones (U-Net, residual MLP) and the heads they share.

Backbones take ``(x, noise_level, class_labels)``; ``noise_level`` is any float per sample that
the caller's preconditioning chooses, embedded with :func:`sinusoidal_embedding`.
"""

from noisecls.nets.heads import Head, ImageHead, LogitsHead, ScalarHead
from noisecls.nets.layers import SinusoidalEmbedding, sinusoidal_embedding
from noisecls.nets.mlp import ResidualMLP
from noisecls.nets.unet import UNet

__all__ = [
    "Head",
    "ImageHead",
    "LogitsHead",
    "ResidualMLP",
    "ScalarHead",
    "SinusoidalEmbedding",
    "UNet",
    "sinusoidal_embedding",
]
