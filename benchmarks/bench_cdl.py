"""CDL's extra training cost: seconds per optimizer step of DDM + CDL against the plain DDM loss
on the same U-Net, batch and data, as a ratio, over the number of ITD integration points K and
of CDL examples per batch n.

Each CDL example adds one denoiser call on 2 (clean / noised) x 2 (log p, log p_zeta) x K rows,
forward and backward, next to the denoising batch of B rows, so the ratio should grow about
like 1 + 4·n·K / B; the script prints that prediction next to the measurement. All variants
(the plain loss and every (n, K)) are interleaved over ``--repeats`` rounds, one torch thread
unless ``--threads``; each ratio is the median of per-round ratios with its spread, flagged
above 10%.

    python benchmarks/bench_cdl.py                                   # CPU, small U-Net, 16x16
    python benchmarks/bench_cdl.py --device cuda --image-size 32 --channels 128 --batch 64 \\
        --points 16 64 128 --examples 1 2 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch


def build(args: argparse.Namespace, cdl: dict | None):
    from noisecls.likelihood.itd import ITDConfig
    from noisecls.methods import CDL, DDM
    from noisecls.nets import UNet
    from noisecls.process.schedules import DiscreteSchedule

    torch.manual_seed(0)
    net = UNet(
        image_size=args.image_size, in_channels=3, model_channels=args.channels,
        channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(args.image_size // 2,),
        dropout=0.1,
    )  # fmt: skip
    shape = (3, args.image_size, args.image_size)
    if cdl is None:
        return DDM(net=net, schedule=DiscreteSchedule(), data_shape=shape)
    model = CDL(
        net=net, schedule=DiscreteSchedule(), data_shape=shape,
        itd=ITDConfig(loc=4.0, scale=4.0, reference="diagonal"), **cdl,
    )  # fmt: skip
    d = 3 * args.image_size**2
    model.set_reference(torch.zeros(d), torch.eye(d) * 0.25)
    return model


def training_step(args: argparse.Namespace, cdl: dict | None) -> Callable[[], None]:
    """One optimizer step of the model (plain DDM loss, or with the CDL term ``cdl``)."""
    device = torch.device(args.device)
    model = build(args, cdl).to(device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=g, device=device)
    x = 2 * x - 1

    def step() -> None:
        loss, _ = model.training_loss(x, None, g)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def main() -> None:
    from common import add_repeat_arguments, configure_threads, interleave_calls, paired_ratio

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--points", type=int, nargs="+", default=[4, 16, 32])
    p.add_argument("--examples", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--calls", type=int, default=2, help="timed steps per variant and round")
    add_repeat_arguments(p, repeats=5)
    args = p.parse_args()
    configure_threads(args.threads)
    configs = [(n, k) for n in args.examples for k in args.points]
    steps = {"plain": training_step(args, None)} | {
        f"{n},{k}": training_step(args, {"cdl_examples": n, "cdl_points": k, "cdl_weight": 1e-4})
        for n, k in configs
    }
    times = interleave_calls(steps, torch.device(args.device), args.repeats, args.calls,
                             args.warmup)  # fmt: skip
    print(
        f"CDL training step vs the plain DDM loss: U-Net width {args.channels}, "
        f"{args.image_size}x{args.image_size}, batch {args.batch}, device {args.device}, "
        f"{args.threads} thread(s), {args.repeats} interleaved rounds"
    )
    print(f"plain DDM loss: {statistics.median(times['plain']):.4f} s/step")
    print(f"{'examples n':>10}{'points K':>10}{'s/step':>10}{'ratio':>8}{'spread':>8}"
          f"{'1+4nK/B':>10}")  # fmt: skip
    for n, k in configs:
        key = f"{n},{k}"
        ratio = paired_ratio(times[key], times["plain"])
        flag = "  ** UNSTABLE **" if ratio.unstable else ""
        print(f"{n:>10}{k:>10}{statistics.median(times[key]):>10.4f}{ratio.median:>8.2f}"
              f"{ratio.spread:>8.1%}{1 + 4 * n * k / args.batch:>10.2f}{flag}")  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import noisecls  # noqa: F401  (before lightning / torchvision)

    main()
