"""Output heads shared by every backbone.

A head maps trunk features to the network's output. The trunk (:class:`~noisecls.nets.UNet` or
:class:`~noisecls.nets.ResidualMLP`) tells the head its channel count by calling
:meth:`Head.build`, so a config never repeats it::

    head:
      class_path: noisecls.nets.LogitsHead
      init_args: {num_logits: 1002, hidden_channels: 512, cumsum: true}

A head can also be built on its own by passing ``in_channels=`` (and ``spatial=False`` for
vector features). The same class serves feature maps [B, C, H, W] (``spatial=True``:
GroupNorm, 3x3 convolutions, spatial mean) and feature vectors [B, C] (``spatial=False``:
LayerNorm, Linear, no spatial reduction).

Heads with ``encoder = True`` (:class:`ScalarHead` by default) are applied by the U-Net to its
bottleneck features (``UNet.encode``), and the U-Net then builds no decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from noisecls.nets.layers import (
    AttentionBackend,
    attention,
    check_attention_backend,
    norm_layer,
    projection,
    zero_init,
)

__all__ = ["Head", "ImageHead", "LogitsHead", "ScalarHead"]


class Head(nn.Module):
    """Base class of the heads: two-phase construction, built by the trunk.

    Subclasses store their own options in ``__init__`` and create their layers in
    :meth:`_build`, which runs once the channel count of the trunk's features is known.

    Attributes:
        encoder: whether the U-Net applies this head to its bottleneck (and skips the decoder).
        in_channels: channel count of the features, None until built.
        spatial: True for [B, C, H, W] features, False for [B, C]; None until built.
    """

    encoder: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.in_channels: int | None = None
        self.spatial: bool | None = None

    @property
    def built(self) -> bool:
        """Whether the layers exist (after :meth:`build`)."""
        return self.in_channels is not None

    def build(
        self, in_channels: int, *, spatial: bool = True, data_channels: int | None = None
    ) -> Head:
        """Create the layers for features with ``in_channels`` channels; idempotent.

        Args:
            in_channels: channel count C of the features the head receives.
            spatial: True for [B, C, H, W] features, False for [B, C].
            data_channels: channel count (U-Net) or dimension (MLP) of the network's input;
                the default output width of :class:`ImageHead`.

        Returns:
            self. Raises ValueError if already built for other features.
        """
        if self.built:
            if (self.in_channels, self.spatial) != (in_channels, spatial):
                raise ValueError(
                    f"{type(self).__name__} was already built for in_channels="
                    f"{self.in_channels}, spatial={self.spatial} but is now given "
                    f"in_channels={in_channels}, spatial={spatial}; use a fresh head per network"
                )
            return self
        self._build(in_channels, spatial, data_channels)
        self.in_channels, self.spatial = in_channels, spatial
        return self

    def _build(self, in_channels: int, spatial: bool, data_channels: int | None) -> None:
        raise NotImplementedError

    def _check(self, features: Tensor) -> None:
        if not self.built:
            raise RuntimeError(
                f"{type(self).__name__} is not built: pass in_channels=... or give it to a "
                "UNet / ResidualMLP as head="
            )
        ndim = 4 if self.spatial else 2
        if features.ndim != ndim or features.shape[1] != self.in_channels:
            c = self.in_channels
            layout = f"[B, {c}, H, W]" if self.spatial else f"[B, {c}]"
            raise ValueError(
                f"{type(self).__name__} expects features of shape {layout}, "
                f"got {list(features.shape)}"
            )

    def _maybe_build(self, in_channels: int | None, spatial: bool) -> None:
        if in_channels is not None:
            self.build(in_channels, spatial=spatial)


class ImageHead(Head):
    """Dense output (denoiser / eps / score): GroupNorm, SiLU, 3x3 conv (zero-init).

    Shapes: [B, C, H, W] -> [B, out_channels, H, W]; on vectors [B, C] -> [B, out_channels]
    (LayerNorm, SiLU, Linear).

    Args:
        out_channels: output channels; None = the network's input channels (or MLP dimension).
        in_channels: build now for features with this many channels (otherwise the trunk
            builds the head).
        spatial: feature layout when ``in_channels`` is given.
    """

    def __init__(
        self,
        out_channels: int | None = None,
        *,
        in_channels: int | None = None,
        spatial: bool = True,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self._maybe_build(in_channels, spatial)

    def _build(self, in_channels: int, spatial: bool, data_channels: int | None) -> None:
        out = self.out_channels if self.out_channels is not None else data_channels
        if out is None:
            raise ValueError("ImageHead needs out_channels when built outside a UNet/ResidualMLP")
        self.out_channels = out
        self.norm = norm_layer(in_channels, spatial)
        self.proj = zero_init(projection(in_channels, out, spatial))

    def forward(self, features: Tensor) -> Tensor:
        self._check(features)
        return self.proj(F.silu(self.norm(features)))


class LogitsHead(Head):
    """Global logits (CDM noise-level classifier, class logits).

    GroupNorm, SiLU, 3x3 conv to ``hidden_channels``, spatial mean, Linear to ``num_logits``
    (on vectors: LayerNorm, SiLU, Linear, Linear). With ``cumsum=True`` a fixed cumulative sum
    along the logit axis follows (CDM: ``f = cumsum`` of the linear outputs over noise levels).

    Shapes: [B, C, H, W] or [B, C] -> [B, num_logits].

    Args:
        num_logits: number of outputs K.
        hidden_channels: width of the conv before the spatial mean.
        cumsum: apply the cumulative-sum layer.
        encoder: apply the head to the U-Net bottleneck instead of the decoder output.
        zero_init: start the final Linear at zero, so every logit starts at 0 (CDM: a uniform
            noise-level posterior, the gradient denoiser starting at eps_hat = sigma_t·x_t).
        in_channels: build now for features with this many channels.
        spatial: feature layout when ``in_channels`` is given.
    """

    def __init__(
        self,
        num_logits: int,
        hidden_channels: int = 512,
        cumsum: bool = False,
        encoder: bool = False,
        zero_init: bool = False,
        *,
        in_channels: int | None = None,
        spatial: bool = True,
    ) -> None:
        super().__init__()
        if num_logits < 1 or hidden_channels < 1:
            raise ValueError(
                f"LogitsHead needs num_logits >= 1 and hidden_channels >= 1, "
                f"got {num_logits} and {hidden_channels}"
            )
        self.num_logits = num_logits
        self.hidden_channels = hidden_channels
        self.cumsum = cumsum
        self.encoder = encoder
        self.zero_init = zero_init
        self._maybe_build(in_channels, spatial)

    def _build(self, in_channels: int, spatial: bool, data_channels: int | None) -> None:
        self.norm = norm_layer(in_channels, spatial)
        self.conv = projection(in_channels, self.hidden_channels, spatial)
        linear = nn.Linear(self.hidden_channels, self.num_logits)
        self.linear = zero_init(linear) if self.zero_init else linear

    def increments(self, features: Tensor) -> Tensor:
        """The linear outputs before the cumulative sum: [B, num_logits]."""
        self._check(features)
        h = self.conv(F.silu(self.norm(features)))
        if self.spatial:
            h = h.mean(dim=(-2, -1))
        return self.linear(h)

    def forward(self, features: Tensor) -> Tensor:
        logits = self.increments(features)
        return logits.cumsum(dim=-1) if self.cumsum else logits


class ScalarHead(Head):
    """One logit per sample (DG discriminator) by attention pooling; an encoder head.

    GroupNorm, SiLU, then ADM-style attention pooling without positional embedding: the tokens
    are the mean feature followed by the H*W positions; one query, the mean token's query plus a
    learned query vector, attends over all tokens (multi-head), and a Linear maps the pooled
    vector to a logit. Vector features [B, C] are pooled as a single position.

    Shapes: [B, C, H, W] or [B, C] -> [B].

    Args:
        num_heads: attention heads of the pooling (must divide C).
        encoder: apply the head to the U-Net bottleneck (default) and build no decoder.
        in_channels: build now for features with this many channels.
        spatial: feature layout when ``in_channels`` is given.
    """

    uses_attention = True

    def __init__(
        self,
        num_heads: int = 1,
        encoder: bool = True,
        *,
        in_channels: int | None = None,
        spatial: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.encoder = encoder
        self.attention_backend: AttentionBackend = "sdpa"
        self._maybe_build(in_channels, spatial)

    def _build(self, in_channels: int, spatial: bool, data_channels: int | None) -> None:
        if in_channels % self.num_heads != 0:
            raise ValueError(
                f"ScalarHead: feature channels ({in_channels}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        self.norm = norm_layer(in_channels, spatial)
        self.qkv = nn.Linear(in_channels, 3 * in_channels)
        self.query = nn.Parameter(torch.zeros(in_channels))  # learned offset of the query
        self.out = nn.Linear(in_channels, 1)

    def forward(self, features: Tensor) -> Tensor:
        self._check(features)
        check_attention_backend(self.attention_backend)
        h = F.silu(self.norm(features))
        tokens = rearrange(h, "b c h w -> b (h w) c") if self.spatial else h[:, None, :]
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # [B, 1 + N, C]
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        q = q[:, :1] + self.query
        q, k, v = (rearrange(t, "b n (m d) -> b m n d", m=self.num_heads) for t in (q, k, v))
        pooled = rearrange(attention(q, k, v, self.attention_backend), "b m 1 d -> b (m d)")
        return self.out(pooled).squeeze(-1)
