"""Why CDM trails the DDM at equal steps: toy ablations against the exact oracle, and Table 1.

``toy``: CDMs over the 2-D Gaussian mixture of experiments/cdm_toy.yaml (its MLP trunk, head,
optimizer, batch and EMA), trained in process by the module's own ``training_loss``, one arm per
ablation. At each evaluation step: the one-pass NLL (bits/dim) next to the mixture's exact NLL,
the last batch's CE, and the denoising MSE's excess over the MMSE oracle per sigma. After
training, the NLL once more with the last Linear's biases (the logits' x-independent offsets,
which the gradient denoiser never sees) refitted to convergence on the same CE (full-batch
L-BFGS over fresh noisy samples), and with every level density normalised instead
(``CDM.normalize_levels``: annealed importance sampling down the levels, the fix cdm_toy.yaml's
test uses). Then the exact classifier's CE cost of a smooth logit drift
that moves the one-pass NLL by 0.5 / 1 / 2 nats: how little the CE sees of the NLL's error.

``table1``: the paper's Table 1 ablation on the digits through the CLI: CE only (ce_weight 1,
mse_weight 0), MSE only (0, 1), both (0.001, 1), experiments/cdm_digits.yaml otherwise, each fit
for ``--steps`` and tested (CE, gradient-denoiser MSE and noise-level accuracy on the test split,
plus the one-pass NLL); FID and sample callbacks are left out.

    python benchmarks/study_cdm.py toy --steps 3000 --evals 1000 2000 3000
    python benchmarks/study_cdm.py table1 --steps 1500

Each mode appends its markdown tables to ``--markdown`` (default /tmp/readme_cdm.md).
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_runs import EXPERIMENTS, noisecls

#: sigma-space noise levels of the denoising comparison
SIGMAS = (0.01, 0.1, 0.5, 1.0, 5.0, 50.0)


@dataclass(frozen=True)
class Arm:
    """One toy ablation: cdm_toy.yaml's recipe with the named changes."""

    name: str
    ce_weight: float = 0.001
    zero_init: bool = True
    width: int = 128
    head_width: int = 128
    lr: float = 1e-3
    warmup: int = 0
    extra: dict = field(default_factory=dict)


ARMS = (
    Arm("official init (cdm_toy before)", zero_init=False),
    Arm("zero-init head (cdm_toy)"),
    Arm("ce_weight 0.01", ce_weight=0.01),
    Arm("ce_weight 0.1", ce_weight=0.1),
    Arm("ce_weight 1", ce_weight=1.0),
    Arm("ce_weight 0.01, trunk 256", ce_weight=0.01, width=256),
    Arm("ce_weight 0.01, lr 3e-3, warmup 300", ce_weight=0.01, lr=3e-3, warmup=300),
    Arm("head width 512", head_width=512),
)


def toy_model(arm: Arm):
    """The CDM of cdm_toy.yaml with the arm's changes."""
    from noisecls.methods import CDM
    from noisecls.nets import LogitsHead, ResidualMLP
    from noisecls.process.schedules import DiscreteSchedule

    torch.manual_seed(0)
    head = LogitsHead(1002, hidden_channels=arm.head_width, cumsum=True, zero_init=arm.zero_init)
    net = ResidualMLP(dim=2, hidden=arm.width, num_blocks=3, time_conditioning=False, head=head)
    return CDM(net=net, schedule=DiscreteSchedule(), ce_weight=arm.ce_weight, data_shape=(2,))


def nll_bits_per_dim(model, x: Tensor) -> float:
    """Mean one-pass NLL of 2-D points x [N, 2] in bits/dim."""
    with torch.no_grad():
        return -model.log_likelihood(x).mean().item() / (2 * math.log(2))


def mse_excess(model, mix, x0: Tensor, eps: Tensor) -> list[float]:
    """Denoising MSE / the MMSE oracle's - 1 at each of SIGMAS."""
    out = []
    for s in SIGMAS:
        sigma = torch.full((x0.shape[0],), s)
        with torch.no_grad():
            err = ((model.denoiser()(x0 + s * eps, sigma) - x0) ** 2).mean()
            best = ((mix.denoiser()(x0 + s * eps, sigma) - x0) ** 2).mean()
        out.append((err / best - 1).item())
    return out


def refit_offsets(model, mix, num: int = 100_000) -> float:
    """Refit the last Linear's biases (the logits' x-independent offsets) to the minimum of the
    CE on ``num`` fresh noisy samples, the rest of the net fixed; returns c_0 - c_{T+1}, the
    change of log p_0 - log p_{T+1}, in nats."""
    g = torch.Generator().manual_seed(11)
    x0, _ = mix.sample(num, g)
    level = torch.randint(0, 1002, (num,), generator=g)
    x = model.model.add_noise(x0, level, torch.randn(x0.shape, generator=g))
    with torch.no_grad():
        f = torch.cat([model.model.logits(c) for c in x.split(10_000)]).double()
    c = torch.zeros(f.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [c],
        max_iter=500,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(f + c, level)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # logits f + c = cumsum(increments + diff(c))
        c = c - c[0]
        model.model.net.head.linear.bias += torch.diff(c, prepend=c.new_zeros(1)).float()
    return (c[0] - c[-1]).item()


def train_arm(arm: Arm, steps: int, evals: set[int], mix, data, test, eps) -> list[dict]:
    """Train one arm (EMA 0.999 as the config) and evaluate its EMA copy at ``evals``."""
    model = toy_model(arm)
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999)
    )
    opt = torch.optim.Adam(model.parameters(), lr=arm.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / max(arm.warmup, 1), 1))
    g = torch.Generator().manual_seed(2)
    rows = []
    for step in range(1, steps + 1):
        model.train()
        batch = data[torch.randint(0, data.shape[0], (256,), generator=g)]
        loss, extras = model.training_loss(batch, None, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update_parameters(model)
        if step in evals:
            trained = copy.deepcopy(ema.module).eval()
            row = {
                "arm": arm.name,
                "step": step,
                "nll": nll_bits_per_dim(trained, test),
                "ce": extras["ce"].item(),
                "excess": mse_excess(trained, mix, test, eps),
            }
            if step == max(evals):
                normalized = copy.deepcopy(trained)
                log_z, _ = normalized.normalize_levels(generator=torch.Generator().manual_seed(5))
                row["log_z0"], row["nll_ais"] = log_z[0].item(), nll_bits_per_dim(normalized, test)
                row["offset_shift"] = refit_offsets(trained, mix)
                row["nll_refit"] = nll_bits_per_dim(trained, test)
            print(row, flush=True)
            rows.append(row)
    return rows


def drift_costs(mix, num: int = 3000) -> list[tuple[str, float, float]]:
    """(shape, NLL shift in nats/point, CE increase in nats) of the exact classifier's logits
    shifted by -delta·shape(t), shape rising from 0 at level 0 to 1 at level T + 1."""
    from noisecls.process.schedules import DiscreteSchedule

    abar = torch.cat([DiscreteSchedule().alpha_bar, torch.zeros(1, dtype=torch.float64)])
    g = torch.Generator().manual_seed(0)
    level = torch.randint(0, 1002, (num,), generator=g)
    x0, _ = mix.sample(num, g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x = abar[level].sqrt()[:, None] * x0 + (1 - abar[level]).sqrt()[:, None] * noise
    f = mix.noise_level_log_posterior(x, abar.sqrt(), (1 - abar).sqrt())
    ce0 = -f.gather(1, level[:, None]).mean()
    t = torch.arange(1002, dtype=torch.float64)
    shapes = {"linear in t": t / 1001, "ramp over levels 30-300": ((t - 30) / 270).clamp(0, 1)}
    rows = []
    for name, shape in shapes.items():
        for delta in (0.5, 1.0, 2.0):
            ce = -torch.log_softmax(f - delta * shape, 1).gather(1, level[:, None]).mean()
            rows.append((name, delta, (ce - ce0).item()))
    return rows


def toy_markdown(rows: list[dict], drift: list[tuple[str, float, float]], oracle: float) -> str:
    head = " | ".join(f"MSE excess s={s:g}" for s in SIGMAS)
    lines = [
        f"### CDM toy ablations (oracle NLL {oracle:.3f} bits/dim)",
        "",
        f"| arm | step | one-pass NLL | NLL, offsets refit | NLL, levels normalised (AIS) "
        f"| train CE | {head} |",
        "|---|---|---|---|---|---|" + "---|" * len(SIGMAS),
    ]
    for r in rows:
        refit = f"{r['nll_refit']:.3f}" if "nll_refit" in r else ""
        ais = f"{r['nll_ais']:.3f} (log Z_0 {r['log_z0']:+.2f})" if "nll_ais" in r else ""
        excess = " | ".join(f"{e:.3f}" for e in r["excess"])
        lines.append(
            f"| {r['arm']} | {r['step']} | {r['nll']:.3f} | {refit} | {ais} | {r['ce']:.3f} "
            f"| {excess} |"
        )
    lines += [
        "",
        "### Exact classifier: CE cost of a smooth logit drift",
        "",
        "| drift shape | NLL shift (nats/point) | CE increase (nats) |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {d:.1f} | {ce:.5f} |" for name, d, ce in drift]
    return "\n".join(lines) + "\n\n"


def run_toy(args: argparse.Namespace) -> str:
    from noisecls.data import ToyDataModule

    torch.set_num_threads(1)
    mix = ToyDataModule(name="gmm").oracle
    data, _ = mix.sample(20000, torch.Generator().manual_seed(1))
    test, _ = mix.sample(2000, torch.Generator().manual_seed(3))
    eps = torch.randn(test.shape, generator=torch.Generator().manual_seed(4))
    oracle = -mix.log_prob(test.double()).mean().item() / (2 * math.log(2))
    arms = [a for a in ARMS if not args.arms or a.name in args.arms]
    rows = []
    for arm in arms:
        rows += train_arm(replace(arm), args.steps, set(args.evals), mix, data, test, eps)
    return toy_markdown(rows, drift_costs(mix), oracle)


TABLE1 = {"CE only": ("1.0", "0.0"), "MSE only": ("0.0", "1.0"), "both (paper)": ("0.001", "1.0")}


def table1_config(out: Path) -> Path:
    """cdm_digits.yaml without FID, sample grids and denoising curves (only the losses and the
    one-pass NLL are tabled), logging to CSV."""
    config = yaml.safe_load((EXPERIMENTS / "cdm_digits.yaml").read_text())
    drop = ("FIDCallback", "SampleGridCallback", "DenoisingMSECallback")
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"]["callbacks"] if not c["class_path"].endswith(drop)
    ]
    path = out / "cdm_digits_table1.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def last_logged(run: Path, keys: tuple[str, ...]) -> dict[str, float]:
    """The last value of each key in the run's CSV logs."""
    values: dict[str, float] = {}
    for path in sorted(run.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime):
        with path.open() as fh:
            for row in csv.DictReader(fh):
                values |= {k: float(row[k]) for k in keys if row.get(k)}
    return values


def run_table1(args: argparse.Namespace) -> str:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = str(table1_config(out))
    keys = (
        "test/ce",
        "test/mse",
        "test/level_accuracy",
        "test/cdm_nll_bpd",
        "test/cdm_nll_bpd_paper",
    )
    lines = [
        f"### Table 1 on the digits ({args.steps} steps, cdm_digits.yaml, test split)",
        "",
        "| loss | CE | MSE | noise-level accuracy | one-pass NLL (dequantized, level 0) "
        "| paper convention |",
        "|---|---|---|---|---|---|",
    ]
    for name, (ce, mse) in TABLE1.items():
        run = out / name.split()[0].lower()
        common = [
            "--config",
            config,
            "--trainer.default_root_dir",
            str(run),
            "--trainer.logger",
            "CSVLogger",
            "--trainer.logger.save_dir",
            str(run / "logs"),
        ]
        noisecls(
            "fit",
            *common,
            "--trainer.max_steps",
            str(args.steps),
            "--model.init_args.ce_weight",
            ce,
            "--model.init_args.mse_weight",
            mse,
            cwd=out,
        )
        ckpt = sorted(run.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
        noisecls(
            "test",
            *common,
            "--model.init_args.ce_weight",
            ce,
            "--model.init_args.mse_weight",
            mse,
            "--ckpt_path",
            str(ckpt),
            cwd=out,
        )
        v = last_logged(run / "logs", keys)
        lines.append(
            f"| {name} | " + " | ".join(f"{v.get(k, float('nan')):.4g}" for k in keys) + " |"
        )
    return "\n".join(lines) + "\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    toy = sub.add_parser("toy")
    toy.add_argument("--steps", type=int, default=3000)
    toy.add_argument("--evals", type=int, nargs="+", default=[1000, 2000, 3000])
    toy.add_argument("--arms", nargs="*", help="arm names (default: all)")
    table1 = sub.add_parser("table1")
    table1.add_argument("--steps", type=int, default=1500)
    table1.add_argument("--out", type=Path, default=Path("runs/study_cdm"))
    for p in (toy, table1):
        p.add_argument("--markdown", type=Path, default=Path("/tmp/readme_cdm.md"))
    args = parser.parse_args()
    text = run_toy(args) if args.mode == "toy" else run_table1(args)
    print(text)
    with args.markdown.open("a") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
