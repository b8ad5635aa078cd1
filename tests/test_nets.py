"""Tests of the shared backbones (U-Net, residual MLP) and their heads."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from noisecls.nets import (
    ImageHead,
    LogitsHead,
    ResidualMLP,
    ScalarHead,
    SinusoidalEmbedding,
    UNet,
    sinusoidal_embedding,
)
from noisecls.nets.layers import Upsample

B = 3
TINY = dict(
    image_size=8,
    in_channels=2,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    dropout=0.0,
)


def tiny_unet(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**TINY, **overrides})


def perturb(net: nn.Module, scale: float = 0.1, seed: int = 1) -> nn.Module:
    """Add noise to every parameter so that zero-initialised layers do not hide anything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return net.eval()


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def make_head(kind: str):
    return {
        "image": lambda: ImageHead(),
        "image5": lambda: ImageHead(out_channels=5),
        "logits": lambda: LogitsHead(num_logits=7, hidden_channels=16),
        "cumsum": lambda: LogitsHead(num_logits=7, hidden_channels=16, cumsum=True),
        "scalar": lambda: ScalarHead(num_heads=2),
    }[kind]()


CONDITIONINGS = {
    "time": dict(time_conditioning=True, num_classes=None),
    "time+class": dict(time_conditioning=True, num_classes=4),
    "class": dict(time_conditioning=False, num_classes=4),
    "none": dict(time_conditioning=False, num_classes=None),
}


def cond_inputs(cond: dict) -> dict:
    out = {}
    if cond["time_conditioning"]:
        out["noise_level"] = torch.tensor([0.0, 10.0, 999.0])
    if cond["num_classes"] is not None:
        out["class_labels"] = torch.tensor([0, 3, cond["num_classes"]])
    return out


# ---------------------------------------------------------------------------------------------
# embedding
# ---------------------------------------------------------------------------------------------


def test_sinusoidal_embedding():
    t = torch.tensor([0.0, 1.0, 500.0])
    emb = sinusoidal_embedding(t, 16)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(8), torch.ones(8)]))
    # lowest frequency is 1: sin(t), highest 1/max_period
    torch.testing.assert_close(emb[:, 0], torch.sin(t))
    torch.testing.assert_close(emb[:, 7], torch.sin(t / 10000.0))
    assert sinusoidal_embedding(t, 7).shape == (3, 7)
    torch.testing.assert_close(SinusoidalEmbedding(16)(t), emb)


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cond", list(CONDITIONINGS))
@pytest.mark.parametrize("kind", ["image", "image5", "logits", "cumsum", "scalar"])
def test_unet_output_shapes(kind, cond):
    net = tiny_unet(head=make_head(kind), **CONDITIONINGS[cond])
    x = torch.randn(B, 2, 8, 8)
    out = net(x, **cond_inputs(CONDITIONINGS[cond]))
    expected = {
        "image": (B, 2, 8, 8),
        "image5": (B, 5, 8, 8),
        "logits": (B, 7),
        "cumsum": (B, 7),
        "scalar": (B,),
    }[kind]
    assert out.shape == expected
    assert torch.isfinite(out).all()
    assert net.encode(x, **cond_inputs(CONDITIONINGS[cond])).shape == (B, 64, 4, 4)


@pytest.mark.parametrize("cond", list(CONDITIONINGS))
@pytest.mark.parametrize("kind", ["image", "image5", "logits", "cumsum", "scalar"])
def test_mlp_output_shapes(kind, cond):
    torch.manual_seed(0)
    net = ResidualMLP(dim=6, hidden=32, num_blocks=2, head=make_head(kind), **CONDITIONINGS[cond])
    out = net(torch.randn(B, 6), **cond_inputs(CONDITIONINGS[cond]))
    expected = {
        "image": (B, 6),
        "image5": (B, 5),
        "logits": (B, 7),
        "cumsum": (B, 7),
        "scalar": (B,),
    }[kind]
    assert out.shape == expected
    assert torch.isfinite(out).all()


def test_mlp_flattens_images_and_reshapes_image_output():
    net = perturb(ResidualMLP(dim=64, hidden=32, num_blocks=1))
    x = torch.randn(B, 1, 8, 8)
    t = torch.full((B,), 5.0)
    out = net(x, t)
    assert out.shape == (B, 1, 8, 8)
    torch.testing.assert_close(out.flatten(1), net(x.flatten(1), t))
    logits = ResidualMLP(dim=64, hidden=32, head=LogitsHead(3, hidden_channels=8))(x, t)
    assert logits.shape == (B, 3)


def test_ddpm_cifar10_parameter_count():
    net = UNet(image_size=32, in_channels=3)  # Ho et al.'s CIFAR-10 configuration
    count = n_params(net)
    assert abs(count - 35_746_307) / 35_746_307 < 0.005, count


def test_zero_init_image_head_gives_zero_output():
    net = tiny_unet().eval()
    out = net(torch.randn(B, 2, 8, 8), torch.ones(B))
    assert torch.count_nonzero(out) == 0


# ---------------------------------------------------------------------------------------------
# attention backends and double backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["image", "scalar"])
def test_math_and_sdpa_backends_agree(kind):
    net = perturb(tiny_unet(head=make_head(kind), num_heads=2, attention_backend="sdpa"))
    x, t = torch.randn(B, 2, 8, 8), torch.tensor([1.0, 2.0, 3.0])
    with torch.no_grad():
        fused = net(x, t)
        net.attention_backend = "math"
        assert all(
            m.attention_backend == "math" for m in net.modules() if hasattr(m, "uses_attention")
        )
        explicit = net(x, t)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)


def test_double_backward_with_math_attention():
    """CDM trains through an input gradient: grad(create_graph=True) then backward."""
    net = tiny_unet(
        time_conditioning=False,
        attention_backend="math",
        head=LogitsHead(num_logits=5, hidden_channels=16, cumsum=True),
    )
    perturb(net).train()
    x = torch.randn(B, 2, 8, 8, requires_grad=True)
    logits = net(x)
    (grad_x,) = torch.autograd.grad(logits[:, -1].sum(), x, create_graph=True)
    loss = grad_x.square().mean() + logits.logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    # the attention weights get second-order gradient
    attn_qkv = net.middle_block[1].qkv.weight.grad
    assert attn_qkv.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# conditioning
# ---------------------------------------------------------------------------------------------


def test_noise_level_and_class_label_change_the_output():
    net = perturb(tiny_unet(num_classes=4))
    x = torch.randn(B, 2, 8, 8)
    t = torch.full((B,), 10.0)
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        base = net(x, t, labels)
        assert not torch.allclose(base, net(x, t + 100.0, labels))
        assert not torch.allclose(base, net(x, t, labels + 1))
        # no labels = the null label, index num_classes
        torch.testing.assert_close(net(x, t), net(x, t, torch.full((B,), 4)))


def test_mlp_noise_level_and_class_label_change_the_output():
    net = perturb(ResidualMLP(dim=2, hidden=32, num_blocks=2, num_classes=3))
    x = torch.randn(B, 2)
    t = torch.full((B,), 0.5)
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        base = net(x, t, labels)
        assert not torch.allclose(base, net(x, t + 1.0, labels))
        assert not torch.allclose(base, net(x, t, torch.tensor([1, 2, 0])))


def test_class_only_conditioning_changes_output():
    net = perturb(tiny_unet(time_conditioning=False, num_classes=4))
    assert net.embed.time_embed is None
    x = torch.randn(B, 2, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(
            net(x, class_labels=torch.tensor([0, 0, 0])),
            net(x, class_labels=torch.tensor([1, 1, 1])),
        )


def test_time_free_unet_has_no_time_mlp_and_rejects_noise_level():
    net = tiny_unet(time_conditioning=False)
    assert not any("time_embed" in name for name, _ in net.named_parameters())
    assert all(m.emb_proj is None for m in net.modules() if hasattr(m, "emb_proj"))
    x = torch.randn(B, 2, 8, 8)
    assert net(x).shape == x.shape
    with pytest.raises(ValueError, match="time_conditioning=False") as err:
        net(x, torch.ones(B))
    assert "\n" not in str(err.value)


def test_scalar_noise_level_is_broadcast():
    net = perturb(tiny_unet())
    x = torch.randn(B, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor(7.0)), net(x, torch.full((B,), 7.0)))


# ---------------------------------------------------------------------------------------------
# encoder-only build
# ---------------------------------------------------------------------------------------------


def test_scalar_head_builds_encoder_only():
    full = tiny_unet()
    disc = tiny_unet(head=ScalarHead())
    assert disc.encoder_only and not full.encoder_only
    assert n_params(disc) < n_params(full)
    assert len(disc.output_blocks) == 0
    assert not any(isinstance(m, Upsample) for m in disc.modules())
    assert not any(name.startswith("output_blocks") for name, _ in disc.named_parameters())
    x = torch.randn(B, 2, 8, 8)
    assert disc.head.in_channels == 64  # bottleneck channels, passed by the trunk
    assert disc.encode(x, torch.ones(B)).shape == (B, 64, 4, 4)
    assert disc(x, torch.ones(B)).shape == (B,)
    # a logits head can also sit on the bottleneck
    enc_logits = tiny_unet(head=LogitsHead(3, hidden_channels=8, encoder=True))
    assert len(enc_logits.output_blocks) == 0
    assert enc_logits(x, torch.ones(B)).shape == (B, 3)


# ---------------------------------------------------------------------------------------------
# heads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [True, False])
def test_cumsum_head_is_cumsum_of_increments(spatial):
    torch.manual_seed(0)
    head = LogitsHead(num_logits=6, hidden_channels=8, cumsum=True, in_channels=32, spatial=spatial)
    feats = torch.randn(B, 32, 4, 4) if spatial else torch.randn(B, 32)
    out = head(feats)
    torch.testing.assert_close(out, head.increments(feats).cumsum(-1))
    head.cumsum = False
    torch.testing.assert_close(out, head(feats).cumsum(-1))


def test_cumsum_head_through_unet():
    net = perturb(tiny_unet(time_conditioning=False, head=LogitsHead(5, 16, cumsum=True)))
    x = torch.randn(B, 2, 8, 8)
    with torch.no_grad():
        summed = net(x)
        net.head.cumsum = False
        torch.testing.assert_close(summed, net(x).cumsum(-1))


def test_standalone_heads_on_vectors_and_maps():
    vec, maps = torch.randn(B, 32), torch.randn(B, 32, 4, 4)
    assert ImageHead(4, in_channels=32, spatial=False)(vec).shape == (B, 4)
    assert ImageHead(4, in_channels=32)(maps).shape == (B, 4, 4, 4)
    assert ScalarHead(num_heads=4, in_channels=32, spatial=False)(vec).shape == (B,)
    assert ScalarHead(in_channels=32)(maps).shape == (B,)
    with pytest.raises(ValueError, match=re.escape("expects features of shape [B, 32, H, W]")):
        ScalarHead(in_channels=32)(vec)
    with pytest.raises(RuntimeError, match="not built"):
        LogitsHead(3)(vec)


def test_head_reused_for_other_channels_is_rejected():
    head = LogitsHead(3, hidden_channels=8)
    tiny_unet(head=head)
    with pytest.raises(ValueError, match="already built"):
        tiny_unet(model_channels=64, head=head)


def test_head_from_jsonargparse_config():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_subclass_arguments(nn.Module, "net")
    cfg = parser.parse_object(
        {
            "net": {
                "class_path": "noisecls.nets.UNet",
                "init_args": {
                    **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
                    "time_conditioning": False,
                    "head": {
                        "class_path": "noisecls.nets.LogitsHead",
                        "init_args": {"num_logits": 9, "hidden_channels": 16, "cumsum": True},
                    },
                },
            }
        }
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    net = instantiate(cfg).net
    assert isinstance(net, UNet) and isinstance(net.head, LogitsHead) and net.head.cumsum
    assert net(torch.randn(B, 2, 8, 8)).shape == (B, 9)


# ---------------------------------------------------------------------------------------------
# configuration errors: one clear line each
# ---------------------------------------------------------------------------------------------

BUILD_ERRORS = [
    (
        dict(image_size=30, in_channels=3),
        "image size 30 cannot be halved 3 times by channel_mult=(1,2,2,2); "
        "use a multiple of 8 or fewer levels",
    ),
    (
        {**TINY, "attention_resolutions": (12,)},
        "attention resolution 12 is not among the U-Net resolutions (8,4)",
    ),
    ({**TINY, "num_heads": 3}, "num_heads=3 does not divide the 64 channels"),
    ({**TINY, "attention_backend": "flash"}, "attention_backend must be one of"),
    ({**TINY, "num_classes": 0}, "num_classes must be a positive integer"),
    ({**TINY, "head": nn.Linear(3, 3)}, "head must be a noisecls.nets Head"),
]


@pytest.mark.parametrize(("kwargs", "message"), BUILD_ERRORS)
def test_configuration_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        UNet(**kwargs)
    assert "\n" not in str(err.value)


def _forward_errors():
    plain = tiny_unet()
    timefree = tiny_unet(time_conditioning=False)
    classy = tiny_unet(num_classes=4)
    x, t = torch.randn(B, 2, 8, 8), torch.ones(B)
    mlp = ResidualMLP(dim=2, hidden=32, num_blocks=1)
    return [
        (
            lambda: plain(torch.randn(B, 3, 8, 8), t),
            "UNet expects input of shape [B, 2, 8, 8], got [3, 3, 8, 8]",
        ),
        (
            lambda: plain(torch.randn(B, 2, 16, 16), t),
            "UNet expects input of shape [B, 2, 8, 8], got [3, 2, 16, 16]",
        ),
        (lambda: plain(x), "is time-conditioned (time_conditioning=True): pass noise_level"),
        (lambda: plain(x, torch.ones(B + 1)), "noise_level must have shape [B]=[3]"),
        (lambda: timefree(x, t), "was built with time_conditioning=False"),
        (lambda: plain(x, t, torch.zeros(B, dtype=torch.long)), "built with num_classes=None"),
        (
            lambda: classy(x, t, torch.tensor([0, 5, 1])),
            "class labels must lie in [0, 4] (4 = null label for classifier-free guidance), "
            "got min 0, max 5",
        ),
        (lambda: classy(x, t, torch.tensor([-1, 0, 1])), "got min -1, max 1"),
        (lambda: classy(x, t, torch.zeros(B)), "class_labels must be an integer tensor"),
        (
            lambda: mlp(torch.randn(B, 3), t),
            "ResidualMLP expects input of shape [B, 2] (or [B, *shape] with prod(shape) = 2)",
        ),
    ]


def test_forward_errors():
    for call, message in _forward_errors():
        with pytest.raises(ValueError, match=re.escape(message)) as err:
            call()
        assert "\n" not in str(err.value), str(err.value)
