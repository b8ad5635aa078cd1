"""Sampling settings of the paper configs (``*_cifar10*.yaml``, ``*64.yaml``): x0 clipping to the
data range where the method's sampler takes it (DDM, CDM, CDL, DG; Soft Diffusion's samplers do
not), the DG fake set written with the sampler DG guides, and likelihoods that never clip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from noisecls.methods import CDL, CDM, DDM, DiffusionModule
from noisecls.nets import LogitsHead, ResidualMLP
from noisecls.process.schedules import DiscreteSchedule
from noisecls.samplers import SamplerConfig
from noisecls.samplers.momentum import SoftSamplerConfig

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PAPER_CONFIGS = sorted({*EXPERIMENTS.glob("*_cifar10*.yaml"), *EXPERIMENTS.glob("*64.yaml")})


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=[p.stem for p in PAPER_CONFIGS])
def test_image_samplers_clip_x0_where_the_method_takes_it(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    model = config["model"]
    sampler = model["init_args"]["sampler"]
    if model["class_path"].endswith("SoftDiffusion"):
        assert "clip_x0" not in sampler  # the momentum / naive samplers have no such option
        SoftSamplerConfig(**sampler)
        return
    assert SamplerConfig(**sampler).clip_x0 == 1.0
    if model["class_path"].endswith(".DG"):
        # step 1 of the header writes the fake set with the sampler DG guides (DG refuses another)
        flags = dict(re.findall(r"--model\.init_args\.sampler\.(\w+) (\S+)", path.read_text()))
        assert flags == {
            "name": sampler["name"], "num_steps": str(sampler["num_steps"]),
            "ladder": sampler["ladder"], "rho": f"{sampler['rho']:g}", "clip_x0": "1.0",
        }  # fmt: skip


def tiny(method: str, clip: float | None) -> DiffusionModule:
    """A small 2-D DDM / CDM / CDL (the same weights whatever ``clip``) whose sampler is DDPM's
    (4 steps) with x0 clipping at ``clip``."""
    torch.manual_seed(0)
    schedule = DiscreteSchedule(num_levels=20)
    sampler = SamplerConfig("ddpm", 4, clip_x0=clip)
    if method == "cdm":
        head = LogitsHead(22, hidden_channels=16, cumsum=True)
        net = ResidualMLP(dim=2, hidden=16, num_blocks=1, time_conditioning=False, head=head)
        return CDM(net=net, schedule=schedule, sampler=sampler, data_shape=(2,))
    net = ResidualMLP(dim=2, hidden=16, num_blocks=1)
    if method == "ddm":
        return DDM(net, schedule, sampler=sampler, data_shape=(2,))
    module = CDL(net, schedule, sampler=sampler, data_shape=(2,))
    module.set_reference(torch.zeros(2), torch.eye(2))
    return module


@pytest.mark.parametrize("method", ["ddm", "cdm", "cdl"])
def test_likelihoods_ignore_the_samplers_x0_clip(method: str) -> None:
    """The same model with and without ``clip_x0``: its default log-likelihood estimate (DDM:
    probability-flow ODE, CDM: one pass, CDL: ITD) of points far outside [-1, 1] is identical,
    while its samples are clipped only with the clip."""
    clipped, free = tiny(method, 1.0), tiny(method, None)
    x = 3 * torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    options = {"num_steps": 4} if method == "ddm" else {}
    likelihoods = [
        m.log_likelihood(x, generator=torch.Generator().manual_seed(2), **options)
        for m in (clipped, free)
    ]
    assert torch.equal(*likelihoods) and torch.isfinite(likelihoods[0]).all()
    samples = [m.sample(64, generator=torch.Generator().manual_seed(3))[0] for m in (clipped, free)]
    assert samples[0].abs().max() <= 1.0 < samples[1].abs().max()
