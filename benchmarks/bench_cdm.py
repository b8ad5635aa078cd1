"""CDM's cost next to a DDM with the same backbone and batch, measured side by side in one run.

Training step (loss, backward, Adam step; a plain loop over ``training_loss``, so only the
methods differ): the DDM (eps loss; the U-Net with time embedding and image head, fused "sdpa"
attention, and again with the "math" attention CDM must use), the CDM (0.001·CE + 1·MSE of the
gradient denoiser: one forward, an input-gradient backward with create_graph, then the backward
of both) and its CE-only ablation (no double backward). Denoiser call (what a sampler pays per
step, no parameter gradients): the DDM's eps network vs the CDM gradient denoiser (forward plus
an input-gradient backward): the sampling cost per denoiser call, printed as a ratio next to
the training-step ratio. Every variant runs in its own subprocess, so its peak memory (CUDA
allocator peak on GPU, max RSS on CPU) is its own; "+step" is the part the steps add. The
variants are interleaved over ``--repeats`` rounds, one torch thread per process
(``--threads``); ratios are medians of per-round ratios with their spread (flagged above 10%).
Target: CDM step <= 2.5x the DDM step.

    python benchmarks/bench_cdm.py                       # CPU, small U-Net on 16x16
    python benchmarks/bench_cdm.py --device cuda --image-size 32 --channels 128 --batch 128 \
        --channel-mult 1,2,2,2                           # the paper's CIFAR-10 setting
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Spread,
    add_repeat_arguments,
    configure_threads,
    interleave,
    paired_ratio,
    peak_memory_mib,
    ratio_text,
    reset_peak_memory,
    time_per_call,
)

TRAIN_VARIANTS = ("ddm", "ddm-math", "cdm", "cdm-ce-only")
CALL_VARIANTS = ("ddm-denoiser", "cdm-denoiser")


def build(args: argparse.Namespace, variant: str):
    """The model of one variant: a DDM or a CDM over the same U-Net trunk."""
    import noisecls  # noqa: F401  (before lightning / torchvision)
    from noisecls.methods import CDM, DDM
    from noisecls.nets import LogitsHead, UNet
    from noisecls.process.schedules import DiscreteSchedule

    torch.manual_seed(0)
    mult = tuple(int(m) for m in args.channel_mult.split(","))
    trunk = dict(
        image_size=args.image_size, in_channels=3, model_channels=args.channels,
        channel_mult=mult, num_res_blocks=2, attention_resolutions=(args.image_size // 2,),
        dropout=0.1,
    )  # fmt: skip
    schedule = DiscreteSchedule()
    shape = (3, args.image_size, args.image_size)
    if variant.startswith("ddm"):
        backend = "math" if variant == "ddm-math" else "sdpa"
        net = UNet(**trunk, attention_backend=backend)
        return DDM(net=net, schedule=schedule, data_shape=shape)
    head = LogitsHead(schedule.num_levels + 2, hidden_channels=4 * args.channels, cumsum=True)
    net = UNet(**trunk, time_conditioning=False, attention_backend="math", head=head)
    mse_weight = 0.0 if variant == "cdm-ce-only" else 1.0
    return CDM(net=net, schedule=schedule, mse_weight=mse_weight, data_shape=shape)


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    device = torch.device(args.device)
    model = build(args, variant.removesuffix("-denoiser")).to(device)
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device) * 2 - 1
    reset_peak_memory(device)
    before = peak_memory_mib(device)  # model and batch (CPU: the whole process so far)
    if variant in CALL_VARIANTS:
        model.eval()
        denoiser = model.denoiser()
        levels = torch.randint(1, model.schedule.num_levels + 1, (args.batch,), generator=g,
                               device=device)  # fmt: skip
        sigma = model.schedule.ve_sigma(levels.double())
        x = x0 + sigma.to(x0)[:, None, None, None] * torch.randn_like(x0)

        def step() -> None:
            with torch.no_grad():
                denoiser(x, sigma)

    else:
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=2e-4)

        def step() -> None:
            loss, _ = model.training_loss(x0, None, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    seconds = time_per_call(step, device, warmup=args.warmup, repeats=args.steps)
    peak = peak_memory_mib(device)
    return {"sec": seconds, "peak_mib": peak, "step_mib": peak - before, "params": params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--channel-mult", default="1,2,2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    add_repeat_arguments(p, repeats=3)
    args = p.parse_args()
    configure_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args, args.variant)))
        return
    last: dict[str, dict] = {}

    def measure(variant: str) -> float:
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--variant", variant],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        last[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        return last[variant]["sec"]

    times = interleave(measure, (*TRAIN_VARIANTS, *CALL_VARIANTS), args.repeats)
    print(
        f"CDM vs DDM, same U-Net trunk (width {args.channels}, mult {args.channel_mult}), batch "
        f"{args.batch}, {args.image_size}x{args.image_size}, device {args.device}, median of "
        f"{args.steps} steps, {args.threads} thread(s), {args.repeats} interleaved rounds"
    )
    rows = [
        ("ddm", "DDM train step (sdpa attention)", "ddm"),
        ("ddm-math", "DDM train step (math attention)", "ddm"),
        ("cdm", "CDM train step (CE + MSE)", "ddm"),
        ("cdm-ce-only", "CDM train step (CE only)", "ddm"),
        ("ddm-denoiser", "DDM denoiser call", "ddm-denoiser"),
        ("cdm-denoiser", "CDM gradient denoiser call", "ddm-denoiser"),
    ]
    print(f"{'variant':<34}{'params':>12}{'s/step':>10}{'x DDM':>8}{'spread':>8}{'peak MiB':>10}"
          f"{'+step MiB':>11}")  # fmt: skip
    for key, label, ref in rows:
        r, ratio = last[key], paired_ratio(times[key], times[ref])
        print(
            f"{label:<34}{r['params']:>12,}{Spread.of(times[key]).median:>10.4f}"
            f"{ratio.median:>8.2f}{ratio.spread:>8.1%}{r['peak_mib']:>10.0f}{r['step_mib']:>11.0f}"
        )
    train = paired_ratio(times["cdm"], times["ddm"])
    call = paired_ratio(times["cdm-denoiser"], times["ddm-denoiser"])
    print(f"CDM / DDM training-step ratio: {ratio_text(train, 2)} (target <= 2.5)")
    print(f"CDM / DDM sampling cost per denoiser call: {ratio_text(call, 2)}")
    print("peak MiB: CUDA allocator peak (GPU) or process max RSS (CPU); +step MiB: the peak")
    print("minus the memory held before the timed steps (model, batch; CPU: the process)")


if __name__ == "__main__":
    main()
