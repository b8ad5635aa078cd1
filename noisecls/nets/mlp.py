"""Residual MLP for low-dimensional data (2-D toys, flattened 8x8 digits), same heads as the
U-Net."""

from __future__ import annotations

import math

from torch import Tensor, nn

from noisecls.nets.heads import Head, ImageHead
from noisecls.nets.layers import (
    AttentionBackend,
    ConditionEmbedding,
    ResBlock,
    check_attention_backend,
    set_attention_backend,
)

__all__ = ["ResidualMLP"]


class ResidualMLP(nn.Module):
    """Linear input layer, ``num_blocks`` pre-norm residual blocks, then the head.

    The residual blocks are the U-Net's, in vector form (LayerNorm, SiLU, Linear, + embedding,
    LayerNorm, SiLU, dropout, zero-initialised Linear); the noise level and class label are
    embedded exactly as in the U-Net (sinusoid of width ``hidden`` -> MLP; class embedding with
    a null label at index ``num_classes``).

    Args:
        dim: data dimension D.
        hidden: width of the residual stream.
        num_blocks: residual blocks.
        dropout: dropout in the residual blocks.
        time_conditioning: embed a noise level per sample (else ``noise_level`` must be None).
        num_classes: class conditioning (index ``num_classes`` = null label), or None.
        attention_backend: backend for attention heads (:class:`ScalarHead`).
        head: output head, built here with ``hidden`` channels; default ``ImageHead()``, a
            vector output of size ``dim``.

    Shapes:
        ``forward(x [B, D] or [B, *shape] with prod(shape) = D, noise_level [B] | None,
        class_labels [B] | None)``. Inputs are flattened; an :class:`ImageHead` output of size
        D is reshaped back to [B, *shape] (so an MLP can serve 8x8 digits). Other heads give
        [B, K] (:class:`LogitsHead`) or [B] (:class:`ScalarHead`).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        num_blocks: int = 4,
        dropout: float = 0.0,
        time_conditioning: bool = True,
        num_classes: int | None = None,
        attention_backend: AttentionBackend = "sdpa",
        head: Head | None = None,
    ) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or num_blocks < 0:
            raise ValueError(
                f"ResidualMLP needs dim >= 1, hidden >= 1, num_blocks >= 0, "
                f"got {dim}, {hidden}, {num_blocks}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        check_attention_backend(attention_backend)
        if head is None:
            head = ImageHead()
        if not isinstance(head, Head):
            raise ValueError(
                f"head must be a noisecls.nets Head (ImageHead, LogitsHead, ScalarHead), "
                f"got {type(head).__name__}"
            )
        self.dim = dim
        self.hidden = hidden
        self.time_conditioning = time_conditioning
        self.num_classes = num_classes

        self.embed = ConditionEmbedding(
            hidden, hidden, time_conditioning, num_classes, owner="ResidualMLP"
        )
        self.input = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            ResBlock(hidden, hidden, self.embed.out_channels, dropout, spatial=False)
            for _ in range(num_blocks)
        )
        self.head = head.build(hidden, spatial=False, data_channels=dim)
        self.attention_backend = attention_backend

    @property
    def attention_backend(self) -> AttentionBackend:
        """Backend of the head's attention (if any); setting it updates the head."""
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, backend: AttentionBackend) -> None:
        set_attention_backend(self, backend)
        self._attention_backend = backend

    def features(
        self,
        x: Tensor,
        noise_level: Tensor | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """Residual-stream features the head receives: [B, hidden]."""
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(
                f"ResidualMLP expects input of shape [B, {self.dim}] (or [B, *shape] with "
                f"prod(shape) = {self.dim}), got {list(x.shape)}"
            )
        emb = self.embed(noise_level, class_labels, x.shape[0])
        h = self.input(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return h

    encode = features  # parity with UNet.encode: the MLP's "bottleneck" is its last features

    def forward(
        self,
        x: Tensor,
        noise_level: Tensor | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """Run trunk and head; see the class docstring for shapes."""
        out = self.head(self.features(x, noise_level, class_labels))
        if isinstance(self.head, ImageHead) and x.ndim > 2 and out.shape[1:] == (self.dim,):
            out = out.reshape(x.shape)
        return out
