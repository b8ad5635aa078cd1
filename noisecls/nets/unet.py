"""DDPM-style U-Net (Ho et al. 2020), configurable, with pluggable heads.

The layout follows the original TF code: a 3x3 input conv; per resolution level
``num_res_blocks`` residual blocks (with self-attention at ``attention_resolutions``) and a
stride-2 downsampling conv except at the last level; a middle block (res, attention, res); a
decoder mirroring the encoder with ``num_res_blocks + 1`` blocks per level, each concatenating
one skip connection, and nearest-neighbour upsampling; then the head (by default GroupNorm,
SiLU, zero-initialised 3x3 conv, i.e. DDPM's output layer). The CIFAR-10 configuration has
35.7M parameters, as in the paper.

The network knows nothing about sigma or schedules: ``noise_level`` is whatever float per
sample the caller's preconditioning passes (DDPM timestep index, ``ln(sigma) / 4``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from noisecls.nets.heads import Head, ImageHead
from noisecls.nets.layers import (
    AttentionBackend,
    AttentionBlock,
    ConditionEmbedding,
    Downsample,
    EmbedSequential,
    ResBlock,
    Upsample,
    check_attention_backend,
    set_attention_backend,
)

__all__ = ["UNet"]


def _fmt(values: Sequence[int]) -> str:
    return "(" + ",".join(str(v) for v in values) + ")"


class UNet(nn.Module):
    """DDPM U-Net with optional noise-level and class conditioning and a pluggable head.

    Args:
        image_size: height = width of the inputs; divisible by 2^(len(channel_mult) - 1).
        in_channels: channels of the inputs.
        model_channels: base width (128 for DDPM CIFAR-10).
        channel_mult: width multiplier per resolution level.
        num_res_blocks: residual blocks per level in the encoder (decoder: one more).
        attention_resolutions: spatial sizes (e.g. 16 for 16x16) with self-attention; the
            middle block always has attention.
        dropout: dropout in the residual blocks.
        num_heads: attention heads.
        time_conditioning: embed a noise level per sample; False (CDM) builds no time MLP and
            then ``noise_level`` must be None.
        num_classes: class conditioning with ``num_classes + 1`` embeddings; index
            ``num_classes`` is the null label (classifier-free guidance), used when no labels
            are passed.
        attention_backend: ``"sdpa"`` (fused kernels) or ``"math"`` (explicit softmax, needed
            for double backward, e.g. CDM training). Settable later via the property.
        head: output head, built here with the trunk's channel count; default
            ``ImageHead()`` (out_channels = in_channels). An encoder head
            (``head.encoder``, e.g. :class:`~noisecls.nets.ScalarHead`) is applied to the
            bottleneck and no decoder is built.

    Shapes:
        ``forward(x [B, in_channels, image_size, image_size], noise_level [B] | None,
        class_labels [B] | None)`` -> the head's output, e.g. [B, out_channels, H, W] for
        :class:`ImageHead`, [B, K] for :class:`LogitsHead`, [B] for :class:`ScalarHead`.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        time_conditioning: bool = True,
        num_classes: int | None = None,
        attention_backend: AttentionBackend = "sdpa",
        head: Head | None = None,
    ) -> None:
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        if image_size < 1 or in_channels < 1 or model_channels < 1:
            raise ValueError(
                f"image_size, in_channels and model_channels must be positive, got "
                f"{image_size}, {in_channels}, {model_channels}"
            )
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(
                f"channel_mult must be a non-empty sequence of positive integers, got "
                f"{_fmt(channel_mult)}"
            )
        halvings = len(channel_mult) - 1
        if image_size % 2**halvings != 0:
            raise ValueError(
                f"image size {image_size} cannot be halved {halvings} times by "
                f"channel_mult={_fmt(channel_mult)}; use a multiple of {2**halvings} "
                "or fewer levels"
            )
        resolutions = tuple(image_size // 2**i for i in range(len(channel_mult)))
        for res in attention_resolutions:
            if res not in resolutions:
                raise ValueError(
                    f"attention resolution {res} is not among the U-Net resolutions "
                    f"{_fmt(resolutions)} of image_size={image_size}, "
                    f"channel_mult={_fmt(channel_mult)}"
                )
        if num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be >= 0, got {num_res_blocks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        for level, mult in enumerate(channel_mult):
            width = model_channels * mult
            attends = resolutions[level] in attention_resolutions or level == halvings
            if attends and width % num_heads != 0:
                raise ValueError(
                    f"num_heads={num_heads} does not divide the {width} channels at "
                    f"resolution {resolutions[level]}"
                )
        check_attention_backend(attention_backend)
        if head is None:
            head = ImageHead()
        if not isinstance(head, Head):
            raise ValueError(
                f"head must be a noisecls.nets Head (ImageHead, LogitsHead, ScalarHead), "
                f"got {type(head).__name__}"
            )

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.time_conditioning = time_conditioning
        self.num_classes = num_classes
        self.encoder_only = bool(head.encoder)

        ch = model_channels
        self.embed = ConditionEmbedding(ch, 4 * ch, time_conditioning, num_classes, owner="UNet")
        emb_ch = self.embed.out_channels

        def res_block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_ch, dropout)

        def attn_block(channels: int) -> AttentionBlock:
            return AttentionBlock(channels, num_heads, attention_backend)

        # Encoder: every entry's output is one skip connection.
        self.input_blocks = nn.ModuleList(
            [EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))]
        )
        skip_channels = [ch]
        cur, res = ch, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(cur, ch * mult)]
                cur = ch * mult
                if res in attention_resolutions:
                    layers.append(attn_block(cur))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(cur)
            if level != halvings:
                self.input_blocks.append(EmbedSequential(Downsample(cur)))
                skip_channels.append(cur)
                res //= 2

        self.middle_block = EmbedSequential(
            res_block(cur, cur), attn_block(cur), res_block(cur, cur)
        )
        self.mid_channels = cur

        # Decoder (skipped for encoder heads).
        self.output_blocks = nn.ModuleList()
        if not self.encoder_only:
            for level, mult in reversed(list(enumerate(channel_mult))):
                for i in range(num_res_blocks + 1):
                    layers = [res_block(cur + skip_channels.pop(), ch * mult)]
                    cur = ch * mult
                    if res in attention_resolutions:
                        layers.append(attn_block(cur))
                    if level != 0 and i == num_res_blocks:
                        layers.append(Upsample(cur))
                        res *= 2
                    self.output_blocks.append(EmbedSequential(*layers))

        self.head = head.build(cur, spatial=True, data_channels=in_channels)
        self.attention_backend = attention_backend

    # ----------------------------------------------------------------------------------------

    @property
    def attention_backend(self) -> AttentionBackend:
        """Backend of every attention layer; setting it updates all of them (and the head)."""
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, backend: AttentionBackend) -> None:
        set_attention_backend(self, backend)
        self._attention_backend = backend

    def _check_input(self, x: Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"UNet expects input of shape [B, {self.in_channels}, {self.image_size}, "
                f"{self.image_size}], got {list(x.shape)}"
            )

    def _encode(
        self, x: Tensor, noise_level: Tensor | None, class_labels: Tensor | None
    ) -> tuple[Tensor, list[Tensor], Tensor | None]:
        self._check_input(x)
        emb = self.embed(noise_level, class_labels, x.shape[0])
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        return h, skips, emb

    def encode(
        self,
        x: Tensor,
        noise_level: Tensor | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """Bottleneck (middle-block) features.

        Args:
            x: [B, in_channels, image_size, image_size].
            noise_level: [B] or None (must match ``time_conditioning``).
            class_labels: [B] integer labels or None.

        Returns:
            [B, mid_channels, image_size / 2^(L-1), image_size / 2^(L-1)],
            ``mid_channels = model_channels * channel_mult[-1]``.
        """
        return self._encode(x, noise_level, class_labels)[0]

    def features(
        self,
        x: Tensor,
        noise_level: Tensor | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """What the head receives: bottleneck features for an encoder head, else the decoder
        output [B, model_channels * channel_mult[0], image_size, image_size]."""
        h, skips, emb = self._encode(x, noise_level, class_labels)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return h

    def forward(
        self,
        x: Tensor,
        noise_level: Tensor | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """Run trunk and head; see the class docstring for shapes. The output has x's dtype
        (under autocast the trunk runs in bf16 and the output returns to x's float32, so losses
        and preconditioning outside the network stay float32, as in EDM)."""
        out = self.head(self.features(x, noise_level, class_labels))
        return out.to(x.dtype) if out.is_floating_point() else out
