"""Discriminator Guidance cost: one sampling step with DG (score network forward + discriminator
forward and backward) vs the unguided step, and the pipeline's cost split (fake-sample
generation, discriminator training) as in the paper's budget table.

All measured side by side in one run on the same score network, discriminator and batch:

    python benchmarks/bench_dg.py                                  # CPU, digits-sized nets
    python benchmarks/bench_dg.py --device cuda --image-size 32 --channels 128 --batch 256

Prints seconds per denoiser call (unguided / DG), their ratio, the NFE of a Heun run with and
without DG (DG adds no score evaluations), then the split: seconds to generate ``--num-fake``
samples and to train ``--train-steps`` discriminator steps, extrapolated to the paper's budget
(``--paper-fake`` samples, ``--paper-steps`` steps) at this speed. Last, a discriminator on a
frozen feature extractor (the score network's encoder): a training step running the extractor
live vs one reading precomputed features (``DG.feature_cache``), seconds and (CUDA) peak memory.
Compared variants are interleaved over ``--repeats`` rounds (one torch thread unless
``--threads``); ratios are medians of per-round ratios with their spread, flagged above 10%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import noisecls  # noqa: F401  (before lightning / torchvision)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_repeat_arguments,
    configure_threads,
    interleave_calls,
    paired_ratio,
    ratio_text,
    synchronize,
    time_per_call,
)


def build(args: argparse.Namespace, device: torch.device):
    from noisecls.methods.ddm import DDM
    from noisecls.methods.dg import DG, GuidanceConfig
    from noisecls.nets import ScalarHead, UNet
    from noisecls.process.schedules import DiscreteSchedule

    torch.manual_seed(0)
    size, ch = args.image_size, args.channels
    mult = (1, 2, 2) if size >= 16 else (1, 2)
    score = DDM(
        UNet(size, 3, ch, mult, 2, (size // 2,), dropout=0.0),
        DiscreteSchedule(),
        data_shape=(3, size, size),
    )
    disc_net = UNet(size, 3, ch // 2, mult, 1, (size // 2,), dropout=0.0, head=ScalarHead())
    dg = DG(disc_net, score_model=score, guidance=GuidanceConfig(weight=2.0))
    mid = ch * mult[-1]  # the score U-Net's bottleneck channels
    feature_net = UNet(size // 2 ** (len(mult) - 1), mid, ch // 2, (1,), 1, (), dropout=0.0,
                       head=ScalarHead())  # fmt: skip
    on_features = DG(feature_net, score_model=score, feature_model=score)
    return score.to(device), dg.to(device), on_features.to(device)


def feature_cache_steps(
    dg, x: torch.Tensor, y: torch.Tensor, device: torch.device, repeats: int
) -> tuple[list[float], list[float], int, int]:
    """Seconds per discriminator training step with live / cached features (one value per
    interleaved round), and (CUDA) the peak memory in bytes of each."""
    import tempfile

    from torch.utils.data import TensorDataset

    from noisecls.methods.dg_features import FeatureCacheBuilder, FeatureCacheConfig

    opt = torch.optim.Adam(dg.discriminator.net.parameters(), lr=3e-4)
    gen = torch.Generator(device=device).manual_seed(1)
    index = torch.arange(x.shape[0], device=device)
    targets = torch.stack([y.long().cpu(), torch.zeros_like(index.cpu()), index.cpu()], dim=1)
    with tempfile.TemporaryDirectory() as root:
        config = FeatureCacheConfig(draws=4, directory=root, chunk_size=16)
        features = dg.discriminator.features
        builder = FeatureCacheBuilder(features, features.state_dict(),
                                      TensorDataset(x.cpu(), targets), dg.vp_schedule, dg.t_min,
                                      config, 0, False, device)  # fmt: skip
        dg.cached_features = builder.build(0, 1, lambda name: None)

        def live() -> None:
            opt.zero_grad()
            dg.training_loss(x, None, gen, y)[0].backward()
            opt.step()

        def cached() -> None:
            opt.zero_grad()
            logits, _ = dg.cached_logits(index, None, gen)
            dg.classification(logits, y)[0].backward()
            opt.step()

        times = interleave_calls({"live": live, "cached": cached}, device, repeats)
        peaks = []
        for step in (live, cached):  # (CUDA) peak memory of one step each
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step()
            peaks.append(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0)
        dg.cached_features = None
    return times["live"], times["cached"], peaks[0], peaks[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=18, help="Heun steps")
    parser.add_argument("--num-fake", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--paper-fake", type=int, default=50000)
    parser.add_argument("--paper-steps", type=int, default=23460, help="60 epochs of 100k/256")
    add_repeat_arguments(parser, repeats=5)
    args = parser.parse_args()
    configure_threads(args.threads)
    device = torch.device(args.device)
    from noisecls.samplers import SamplerConfig

    score, dg, on_features = build(args, device)
    shape = (args.batch, 3, args.image_size, args.image_size)
    x = torch.randn(shape, device=device)
    sigma = torch.full((args.batch,), 1.0, device=device, dtype=torch.float64)
    plain, guided = score.denoiser(), dg.denoiser()
    with torch.no_grad():
        calls = {"plain": lambda: plain(x, sigma), "dg": lambda: guided(x, sigma)}
        per_call = interleave_calls(calls, device, args.repeats)
    config = SamplerConfig("heun", args.steps)
    gen = torch.Generator(device=device).manual_seed(0)
    _, nfe_plain = score.sample(args.batch, generator=gen, sampler=config)
    _, nfe_dg = dg.sample(args.batch, generator=gen, sampler=config)
    print(f"device {device}, batch {args.batch}, {args.image_size}x{args.image_size}")
    t_plain, t_dg = (statistics.median(per_call[k]) for k in ("plain", "dg"))
    print(f"{'per denoiser call':<28}{'unguided':>12}{'DG':>12}")
    print(f"{'seconds':<28}{t_plain:>12.4f}{t_dg:>12.4f}")
    dg_ratio = paired_ratio(per_call["dg"], per_call["plain"])
    print(f"DG / unguided per call: {ratio_text(dg_ratio, 2)}")
    print(f"{'Heun NFE (score network)':<28}{nfe_plain:>12d}{nfe_dg:>12d}")

    # pipeline split: fake-sample generation and discriminator training at this speed
    start = time.perf_counter()
    done = 0
    while done < args.num_fake:
        n = min(args.batch, args.num_fake - done)
        score.sample(n, generator=gen, sampler=config)
        done += n
    synchronize(device)
    t_gen = (time.perf_counter() - start) / args.num_fake
    opt = torch.optim.Adam(dg.discriminator.parameters(), lr=3e-4)
    y = torch.randint(0, 2, (args.batch,), device=device).float()

    def train_step() -> None:
        opt.zero_grad()
        loss, _ = dg.training_loss(x, None, gen, y)
        loss.backward()
        opt.step()

    t_train = time_per_call(train_step, device, 2, args.train_steps)  # absolute, not a ratio
    print(f"\n{'pipeline stage':<36}{'measured':>14}{'paper budget (extrap.)':>26}")
    print(f"{'fake generation, s/sample':<36}{t_gen:>14.4f}{t_gen * args.paper_fake:>22.0f} s")
    print(
        f"{'discriminator training, s/step':<36}{t_train:>14.4f}"
        f"{t_train * args.paper_steps:>22.0f} s"
    )

    t_live, t_cached, m_live, m_cached = feature_cache_steps(
        on_features, x, y, device, args.train_steps
    )
    print(f"\n{'discriminator on frozen features':<36}{'live':>12}{'cached':>12}")
    print(f"{'s/step':<36}{statistics.median(t_live):>12.4f}{statistics.median(t_cached):>12.4f}")
    print(f"live / cached step: {ratio_text(paired_ratio(t_live, t_cached), 2)}")
    if device.type == "cuda":
        mib = 2**20
        print(f"{'peak memory, MiB':<36}{m_live / mib:>12.0f}{m_cached / mib:>12.0f}"
              f"{m_live / max(m_cached, 1):>10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
