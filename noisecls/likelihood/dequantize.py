"""Uniform dequantization of quantized data in [-1, 1] and conversion to bits per dimension.

Data with K levels is stored as x = k/(K-1)·2 - 1, k in 0..K-1. Dequantized, it is the
continuous y = (k + u)/K·2 - 1 with u ~ U[0, 1): bins of width 2/K tile [-1, 1]. The discrete
probability of k is at least E_u[p(y)]·(2/K)^D, so NLL_bits = (-log p(y) - D·log(2/K)) / (D ln 2);
for 8-bit data that is -log2 p(y)/D + 7 (Theis et al. 2016; Ho et al. 2020).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def dequantize(
    x: Tensor,
    num_bins: int,
    generator: torch.Generator | None = None,
    uniform: Tensor | None = None,
) -> Tensor:
    """Map quantized x [B, ...] in [-1, 1] (num_bins levels) to a uniform-dequantized sample;
    ``uniform`` (shaped like x, values in [0, 1)) is the noise u, drawn from ``generator`` when
    not given."""
    k = torch.round((x + 1) / 2 * (num_bins - 1))
    if uniform is None:
        uniform = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (k + uniform) / num_bins * 2 - 1


def quantize(x: Tensor, num_bins: int) -> Tensor:
    """The inverse of :func:`dequantize`: the level k whose bin [k, k + 1)·2/num_bins - 1 holds
    each value of x [B, ...] (clamped to the outer bins), as the lattice value k/(K-1)·2 - 1.

    A model of dequantized data (trained with ``dequantize_train``) describes the discrete
    data through P(k) = ∫_bin(k) p(y) dy, so its discrete samples are its continuous samples
    mapped to their bins. The bins are not centred on the lattice values (level 0's bin is
    [-1, -1 + 2/K), with its lattice value -1 at the edge), so rounding to the nearest lattice
    value is a different map."""
    k = torch.floor((x + 1) / 2 * num_bins).clamp(0, num_bins - 1)
    return k / (num_bins - 1) * 2 - 1


def nll_to_bits_per_dim(nll_nats: Tensor, num_dims: int, num_bins: int | None = None) -> Tensor:
    """Bits/dim of a continuous NLL [B] (nats); with num_bins, of the dequantized discrete data
    (adds -log2(2/num_bins) per dimension, the bin volume)."""
    bits = nll_nats / (num_dims * math.log(2))
    if num_bins is not None:
        bits = bits - math.log2(2 / num_bins)
    return bits
