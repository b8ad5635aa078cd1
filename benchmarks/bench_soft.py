"""Soft Diffusion's costs, side by side in one run:

1. the DCT-domain blur vs a spatial separable convolution (symmetric padding, Gaussian kernel
   truncated at 4 sigma; only possible while the kernel fits the image) on the same batch;
2. a Soft Diffusion training step (blur + noise, Soft Score Matching) vs a DDM step on the same
   U-Net and batch: the corruption's overhead (target: <= 10%);
3. the momentum sampler's own arithmetic vs the network evaluations it drives.

Each comparison's variants are interleaved over ``--repeats`` rounds (one torch thread unless
``--threads``); ratios are medians of per-round ratios with their spread, flagged above 10%.

    python benchmarks/bench_soft.py                        # CPU, small U-Net on 32x32
    python benchmarks/bench_soft.py --device cuda --image-size 64 --channels 128 --batch 128
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_repeat_arguments,
    configure_threads,
    interleave_calls,
    paired_ratio,
    ratio_text,
    seconds_text,
)

import noisecls  # noqa: F401  (before torchvision / lightning)
from noisecls.methods import DDM
from noisecls.methods.soft import SoftDiffusion
from noisecls.nets import UNet
from noisecls.process.blur import BlurNoiseProcess, gaussian_blur
from noisecls.process.schedules import DiscreteSchedule
from noisecls.samplers.momentum import sample_momentum


def symmetric_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """Half-sample-symmetric padding (d c b a | a b c d, scipy's "reflect"), the DCT-II's
    boundary, by r pixels on both spatial axes (r <= size)."""
    x = torch.cat([x[..., :r].flip(-1), x, x[..., -r:].flip(-1)], dim=-1)
    return torch.cat([x[..., :r, :].flip(-2), x, x[..., -r:, :].flip(-2)], dim=-2)


def conv_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable convolution with the sampled Gaussian (truncated at 4 sigma), symmetric
    padding."""
    radius = math.ceil(4 * sigma)
    m = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(m**2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)
    c = x.shape[1]
    x = symmetric_pad(x, radius)
    x = F.conv2d(x, k.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def unet(args: argparse.Namespace) -> UNet:
    torch.manual_seed(0)
    return UNet(
        image_size=args.image_size, in_channels=3, model_channels=args.channels,
        channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(args.image_size // 2,),
    )  # fmt: skip


def train_step(model: torch.nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer):
    def step() -> None:
        loss, _ = model.training_loss(x, None, torch.Generator(x.device).manual_seed(0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--calls", type=int, default=5, help="timed calls per variant and round")
    p.add_argument("--sampler-steps", type=int, default=10)
    add_repeat_arguments(p, repeats=5)
    args = p.parse_args()
    configure_threads(args.threads)
    device = torch.device(args.device)
    shape = (3, args.image_size, args.image_size)
    x = (torch.rand(args.batch, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(
        device
    )
    timed = {"repeats": args.repeats, "calls_per_round": args.calls}

    print(f"device {device}, batch {args.batch} x {shape}, {args.threads} thread(s), "
          f"{args.repeats} interleaved rounds")  # fmt: skip
    print("1. blur: DCT vs spatial convolution (symmetric padding)")
    for sigma in (1.0, 3.0, args.image_size / 8):
        calls = {"dct": lambda s=sigma: gaussian_blur(x, s)}
        if math.ceil(4 * sigma) <= args.image_size:
            calls["conv"] = lambda s=sigma: conv_blur(x, s)
        times = interleave_calls(calls, device, **timed)
        if "conv" in times:
            err = float((gaussian_blur(x, sigma, "continuous") - conv_blur(x, sigma)).abs().max())
            ratio = paired_ratio(times["dct"], times["conv"])
            conv = (f"conv {seconds_text(times['conv'])}   dct/conv {ratio_text(ratio, 2)}   "
                    f"max |diff| {err:.1e}")  # fmt: skip
        else:
            conv = "conv: kernel wider than the image (padding impossible)"
        print(f"   sigma {sigma:5.1f} px: dct {seconds_text(times['dct'])}   {conv}")

    print("2. training step on the same U-Net: Soft Diffusion vs DDM")
    process = BlurNoiseProcess(blur_sigma_max=args.image_size / 2, kernel="continuous")
    soft = SoftDiffusion(unet(args), process, data_shape=shape).to(device)
    ddm = DDM(unet(args), DiscreteSchedule(), prediction="x0", data_shape=shape).to(device)
    steps = {name: train_step(model, x, torch.optim.Adam(model.parameters(), lr=1e-4))
             for name, model in (("soft", soft), ("ddm", ddm))}  # fmt: skip
    times = interleave_calls(steps, device, **timed)
    print(f"   soft {seconds_text(times['soft'])}/step   ddm {seconds_text(times['ddm'])}/step   "
          f"soft/ddm {ratio_text(paired_ratio(times['soft'], times['ddm']))}")  # fmt: skip

    print(f"3. momentum sampler, {args.sampler_steps} steps: own arithmetic vs with the U-Net")
    soft.fit_statistics(x)
    soft.eval()
    x1 = soft.initial_noise(args.batch, generator=torch.Generator(device).manual_seed(0))
    t = process.sampling_times(args.sampler_steps)

    def run(predictor) -> None:
        with torch.no_grad():
            sample_momentum(predictor, process, x1, t, generator=torch.Generator(device))

    runs = {"own": lambda: run(lambda y, _t: y), "full": lambda: run(soft.predictor())}
    times = interleave_calls(runs, device, **timed)
    share = paired_ratio(times["own"], times["full"])
    print(f"   sampler alone {seconds_text(times['own'])}   with U-Net "
          f"{seconds_text(times['full'])}   sampler share {ratio_text(share)}")  # fmt: skip


if __name__ == "__main__":
    main()
