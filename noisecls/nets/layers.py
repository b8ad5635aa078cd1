"""Building blocks shared by the U-Net, the residual MLP and the heads.

Every block that exists for both images ([B, C, H, W]) and vectors ([B, C]) takes a ``spatial``
flag and picks its layers through :func:`norm_layer` and :func:`projection`, so one class serves
both: GroupNorm + 3x3 convolution on feature maps, LayerNorm + Linear on feature vectors.

Backbones know nothing about sigma or schedules: the "noise level" they receive is whatever float
the caller's preconditioning passes (a DDPM timestep index, EDM's ``ln(sigma) / 4``, ...) and it
is embedded with :func:`sinusoidal_embedding`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

AttentionBackend = Literal["sdpa", "math"]
ATTENTION_BACKENDS: tuple[str, ...] = ("sdpa", "math")


def check_attention_backend(backend: str) -> str:
    """Return ``backend`` if it names a known attention backend, else raise a ValueError."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    return backend


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def sinusoidal_embedding(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sinusoidal embedding of a float per sample, as in DDPM.

    Frequencies are ``max_period ** (-i / (dim/2 - 1))`` for ``i = 0 .. dim/2 - 1``; the output
    is ``[sin(x f), cos(x f)]`` (zero-padded by one column when ``dim`` is odd).

    Args:
        x: [B] noise-level inputs (any float scale; computed in float32).
        dim: embedding width.
        max_period: longest period of the sinusoids.

    Returns:
        [B, dim] float32 embedding.
    """
    half = dim // 2
    exponent = torch.arange(half, device=x.device, dtype=torch.float32) / max(half - 1, 1)
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = x.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class SinusoidalEmbedding(nn.Module):
    """Module form of :func:`sinusoidal_embedding`: [B] -> [B, dim] (float32)."""

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.max_period = max_period

    def forward(self, x: Tensor) -> Tensor:
        return sinusoidal_embedding(x, self.dim, self.max_period)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_period={self.max_period}"


class ConditionEmbedding(nn.Module):
    """Noise-level and class-label embedding shared by the backbones.

    ``time_conditioning`` builds sinusoid(base_channels) -> Linear -> SiLU -> Linear
    (emb_channels), as in DDPM. ``num_classes`` adds an ``nn.Embedding(num_classes + 1,
    emb_channels)`` whose last index, ``num_classes``, is the null label of classifier-free
    guidance (used when no labels are passed). With neither, no parameters are built and
    :meth:`forward` returns None. With only classes, the class embedding alone conditions.

    Args:
        base_channels: width of the sinusoidal embedding.
        emb_channels: width of the conditioning vector fed to the residual blocks.
        time_conditioning: whether a noise-level input is taken.
        num_classes: number of real classes, or None for no class conditioning.
        owner: network name used in error messages.
    """

    def __init__(
        self,
        base_channels: int,
        emb_channels: int,
        time_conditioning: bool,
        num_classes: int | None,
        owner: str = "network",
    ) -> None:
        super().__init__()
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes}")
        self.time_conditioning = time_conditioning
        self.num_classes = num_classes
        self.owner = owner
        self.time_embed: nn.Module | None = None
        self.class_embed: nn.Embedding | None = None
        if time_conditioning:
            self.time_embed = nn.Sequential(
                SinusoidalEmbedding(base_channels),
                nn.Linear(base_channels, emb_channels),
                nn.SiLU(),
                nn.Linear(emb_channels, emb_channels),
            )
        if num_classes is not None:
            self.class_embed = nn.Embedding(num_classes + 1, emb_channels)
        self.out_channels: int | None = (
            emb_channels if (time_conditioning or num_classes is not None) else None
        )

    def forward(
        self, noise_level: Tensor | None, class_labels: Tensor | None, batch_size: int
    ) -> Tensor | None:
        """Validate the conditioning inputs and embed them.

        Args:
            noise_level: [B] floats (a scalar or any shape with B elements is flattened), or
                None exactly when ``time_conditioning`` is False.
            class_labels: [B] integers in ``[0, num_classes]`` (``num_classes`` = null label),
                or None (all null labels when class-conditioned).
            batch_size: B.

        Returns:
            [B, emb_channels] conditioning vector, or None for an unconditional network.
        """
        emb: Tensor | None = None
        if self.time_embed is not None:
            if noise_level is None:
                raise ValueError(
                    f"this {self.owner} is time-conditioned (time_conditioning=True): pass "
                    f"noise_level, a Tensor of shape [B]=[{batch_size}]"
                )
            noise_level = torch.as_tensor(noise_level)
            if noise_level.numel() not in (1, batch_size):
                raise ValueError(
                    f"noise_level must have shape [B]=[{batch_size}] (or be a scalar), "
                    f"got {list(noise_level.shape)}"
                )
            noise_level = noise_level.reshape(-1).expand(batch_size)
            weight = self.time_embed[1].weight
            sinusoid = self.time_embed[0](noise_level.to(weight.device))
            emb = self.time_embed[1:](sinusoid.to(weight.dtype))
        elif noise_level is not None:
            raise ValueError(
                f"this {self.owner} was built with time_conditioning=False and takes no noise "
                "level; pass noise_level=None"
            )

        if self.class_embed is not None:
            assert self.num_classes is not None
            device = self.class_embed.weight.device
            if class_labels is None:
                class_labels = torch.full((batch_size,), self.num_classes, device=device)
            class_labels = torch.as_tensor(class_labels, device=device)
            if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
                raise ValueError(
                    f"class_labels must be an integer tensor, got dtype {class_labels.dtype}"
                )
            if tuple(class_labels.shape) != (batch_size,):
                raise ValueError(
                    f"class_labels must have shape [B]=[{batch_size}], "
                    f"got {list(class_labels.shape)}"
                )
            if not torch.compiler.is_compiling() and class_labels.numel() > 0:
                lo, hi = int(class_labels.min()), int(class_labels.max())
                if lo < 0 or hi > self.num_classes:
                    raise ValueError(
                        f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} "
                        f"= null label for classifier-free guidance), got min {lo}, max {hi}"
                    )
            class_emb = self.class_embed(class_labels)
            emb = class_emb if emb is None else emb + class_emb
        elif class_labels is not None:
            raise ValueError(
                f"this {self.owner} was built with num_classes=None and takes no class labels; "
                "pass class_labels=None or set num_classes"
            )
        return emb


# --------------------------------------------------------------------------------------------
# Layers that serve both feature maps and feature vectors
# --------------------------------------------------------------------------------------------


def num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= ``max_groups`` dividing ``channels`` (32 for DDPM widths)."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def norm_layer(channels: int, spatial: bool) -> nn.Module:
    """GroupNorm(32, eps 1e-6) on [B, C, H, W] (DDPM), LayerNorm on [B, C]."""
    if spatial:
        return nn.GroupNorm(num_groups(channels), channels, eps=1e-6)
    return nn.LayerNorm(channels, eps=1e-6)


def projection(
    in_channels: int, out_channels: int, spatial: bool, kernel_size: int = 3
) -> nn.Module:
    """A same-padding ``kernel_size`` conv on feature maps, a Linear on feature vectors."""
    if spatial:
        return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    return nn.Linear(in_channels, out_channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it (DDPM's ``init_scale=0``)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """DDPM residual block: norm, SiLU, proj, (+ emb), norm, SiLU, dropout, proj (zero-init).

    Shapes: x [B, C_in, H, W] (``spatial``) or [B, C_in]; emb [B, emb_channels] or None;
    output [B, C_out, ...]. The shortcut is a 1x1 projection when C_in != C_out.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int | None,
        dropout: float = 0.0,
        spatial: bool = True,
    ) -> None:
        super().__init__()
        self.spatial = spatial
        self.norm1 = norm_layer(in_channels, spatial)
        self.conv1 = projection(in_channels, out_channels, spatial)
        self.emb_proj = nn.Linear(emb_channels, out_channels) if emb_channels else None
        self.norm2 = norm_layer(out_channels, spatial)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(projection(out_channels, out_channels, spatial))
        self.skip = (
            projection(in_channels, out_channels, spatial, kernel_size=1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_proj is not None:
            if emb is None:
                raise ValueError("this residual block is conditioned but got no embedding")
            e = self.emb_proj(F.silu(emb))
            h = h + (e[:, :, None, None] if self.spatial else e)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


def attention(q: Tensor, k: Tensor, v: Tensor, backend: AttentionBackend = "sdpa") -> Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, heads, N, d] tensors.

    ``"sdpa"`` uses :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels,
    which have no double backward); ``"math"`` writes the product out (softmax in float32) so it
    can be differentiated twice, as CDM training needs.
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        return torch.matmul(weights, v)
    raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")


class AttentionBlock(nn.Module):
    """DDPM self-attention over spatial positions with a residual connection.

    GroupNorm, 1x1 q/k/v, multi-head attention, 1x1 output projection (zero-init).
    Shapes: [B, C, H, W] -> [B, C, H, W]. ``attention_backend`` may be changed after
    construction (the backbones' ``attention_backend`` setter does so for every block).
    """

    uses_attention = True

    def __init__(
        self, channels: int, num_heads: int = 1, attention_backend: AttentionBackend = "sdpa"
    ) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(
                f"attention channels ({channels}) must be divisible by num_heads ({num_heads})"
            )
        self.num_heads = num_heads
        self.attention_backend = check_attention_backend(attention_backend)
        self.norm = norm_layer(channels, spatial=True)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[-2]
        qkv = self.qkv(self.norm(x))
        q, k, v = rearrange(
            qkv, "b (three n d) h w -> three b n (h w) d", three=3, n=self.num_heads
        )
        out = attention(q, k, v, self.attention_backend)
        out = rearrange(out, "b n (h w) d -> b (n d) h w", h=height)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with DDPM's (TF "SAME") asymmetric padding: [B,C,H,W] -> [B,C,H/2,W/2]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv: [B,C,H,W] -> [B,C,2H,2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """Sequential that hands the conditioning embedding to the residual blocks it holds."""

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def set_attention_backend(module: nn.Module, backend: AttentionBackend) -> None:
    """Set ``attention_backend`` on every attention-using submodule of ``module``."""
    check_attention_backend(backend)
    for m in module.modules():
        if getattr(type(m), "uses_attention", False):
            m.attention_backend = backend
