"""Framework overhead: the DDM training step through noisecls + Lightning vs a hand-written
PyTorch loop on the same model, batch and data, measured side by side in one run.

Each variant runs in its own subprocess (so peak memory is its own) for ``--steps`` optimizer
steps after ``--warmup``, the two variants interleaved over ``--repeats`` rounds with one torch
thread per process (``--threads``); the script prints the median seconds/step with its spread,
the median per-round ratio with its spread (flagged above 10%) and peak memory.
Target: overhead <= 5%.

    python benchmarks/bench_ddm.py                       # CPU, small U-Net on 16x16
    python benchmarks/bench_ddm.py --device cuda --image-size 32 --channels 128 --batch 128
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import noisecls  # noqa: F401  (before lightning / torchvision: see noisecls._compat)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_repeat_arguments,
    configure_threads,
    interleave,
    paired_ratio,
    peak_memory_mib,
    ratio_text,
    seconds_text,
)


def build(args: argparse.Namespace):
    from noisecls.methods import DDM
    from noisecls.nets import UNet
    from noisecls.process.schedules import DiscreteSchedule

    torch.manual_seed(0)
    net = UNet(
        image_size=args.image_size,
        in_channels=3,
        model_channels=args.channels,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(args.image_size // 2,),
        dropout=0.1,
    )
    return DDM(
        net=net, schedule=DiscreteSchedule(), data_shape=(3, args.image_size, args.image_size)
    )


def data(args: argparse.Namespace) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps + args.warmup)
    x = torch.rand(n, 3, args.image_size, args.image_size, generator=g) * 2 - 1
    ds = torch.utils.data.TensorDataset(x, torch.zeros(n, dtype=torch.long))
    return torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=False, drop_last=True)


def run_lightning(args: argparse.Namespace) -> dict:
    import lightning as L

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, *_):
            if trainer.global_step == args.warmup:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

    model = build(args)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_steps=args.steps + args.warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, data(args))
    if args.device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - timer.start
    return {
        "sec_per_step": elapsed / args.steps,
        "peak_mib": peak_memory_mib(torch.device(args.device)),
    }


def run_plain(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model = build(args).to(device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    start = None
    for step, (x, _) in enumerate(data(args)):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x = x.to(device)
        g = torch.Generator(device=device).manual_seed(step)
        loss, _ = model.training_loss(x, None, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {
        "sec_per_step": (time.perf_counter() - start) / args.steps,
        "peak_mib": peak_memory_mib(device),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--variant", choices=["lightning", "plain"], help=argparse.SUPPRESS)
    add_repeat_arguments(p, repeats=5)
    args = p.parse_args()
    configure_threads(args.threads)
    if args.variant:
        result = run_lightning(args) if args.variant == "lightning" else run_plain(args)
        print(json.dumps(result))
        return
    peaks: dict[str, float] = {}

    def measure(variant: str) -> float:
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--variant", variant],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        peaks[variant] = max(peaks.get(variant, 0.0), r["peak_mib"])
        return r["sec_per_step"]

    times = interleave(measure, ("plain", "lightning"), args.repeats)
    print(
        f"DDM training step, batch {args.batch}, {args.image_size}x{args.image_size}, "
        f"width {args.channels}, device {args.device}, {args.steps} timed steps, "
        f"{args.threads} thread(s), {args.repeats} interleaved rounds"
    )
    print(f"{'variant':<22}{'s/step (median, spread)':>28}{'peak MiB':>12}")
    for key, label in (("plain", "hand-written loop"), ("lightning", "noisecls + Lightning")):
        print(f"{label:<22}{seconds_text(times[key]):>28}{peaks[key]:>12.0f}")
    ratio = paired_ratio(times["lightning"], times["plain"])
    print(f"overhead ratio: {ratio_text(ratio)} (target <= 1.05)")


if __name__ == "__main__":
    main()
