"""ITD and ODE bits/dim of the same trained digits checkpoint(s) on the same dequantized test
digits (issue "CDL that actually trains", item 3: they should agree within 0.15 bits/dim).

    python benchmarks/itd_vs_ode.py runs/ddm_digits/lightning_logs/version_0/checkpoints/last.ckpt

Both estimate the density of the data smoothed at the schedule's sigma_min: ITD (256 log-SNR
points between the schedule's sigma_max and sigma_min, the Gaussian reference fitted to the
training digits) and the probability-flow ODE (RK4, 64 steps, Hutchinson trace with one
probe). ITD is a denoising-error bound, the ODE is not: for an imperfect denoiser the two
weigh its errors differently, so the gap measures the model's inconsistency, not a bug (on the
exact lattice oracle they agree to 0.01, tests/test_cdl.py). A model trained on the 17-level
lattice is wrong off it at small sigma and the gap grows with training (0.41 at 4000 steps);
trained on dequantized digits (``--data.init_args.dequantize_train true``) it is 0.04. Prints one JSON line per
checkpoint: {"checkpoint", "step", "itd_bpd", "ode_bpd", "gap"}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

import noisecls  # noqa: F401  (before lightning / torchvision: see noisecls._compat)
from noisecls.data import DigitsDataModule
from noisecls.errors import NoiseclsError
from noisecls.likelihood import dequantize, itd_log_likelihood, nll_to_bits_per_dim
from noisecls.likelihood.itd import GaussianReference, ITDConfig
from noisecls.methods.dg import load_module_checkpoint

LEVELS = 17  # the digits' grey levels 0..16


def itd_and_ode_bits_per_dim(path: str, itd_points: int = 256, ode_steps: int = 64) -> dict:
    """Both estimates (bits/dim, 17-level dequantized test digits) of one checkpoint."""
    model = load_module_checkpoint(path).eval()
    data = DigitsDataModule(batch_size=128)
    data.setup("fit")
    mean, covariance = data.train_statistics()
    reference = GaussianReference.fit(mean, covariance, min_eigenvalue=1e-5)
    x = torch.stack([data.test_set[i][0] for i in range(len(data.test_set))])
    x = dequantize(x, LEVELS, torch.Generator().manual_seed(0))
    sigmas = model.schedule.sampling_sigmas(2)  # [sigma_max, sigma_min, 0]
    limits = (-2 * math.log(float(sigmas[0])), -2 * math.log(float(sigmas[-2])))
    with torch.no_grad():
        itd = itd_log_likelihood(model.denoiser(), x, reference, ITDConfig(num_points=itd_points),
                                 log_snr_limits=limits,
                                 generator=torch.Generator().manual_seed(1))  # fmt: skip
    ode = model.log_likelihood(x, estimator="ode", trace="hutchinson", num_steps=ode_steps,
                               generator=torch.Generator().manual_seed(2))  # fmt: skip
    dims = x[0].numel()
    itd_bpd, ode_bpd = (float(nll_to_bits_per_dim(-v.mean(), dims, LEVELS)) for v in (itd, ode))
    step = torch.load(path, map_location="cpu", weights_only=True).get("global_step")
    return {"checkpoint": str(path), "step": step, "itd_bpd": round(itd_bpd, 4),
            "ode_bpd": round(ode_bpd, 4), "gap": round(itd_bpd - ode_bpd, 4)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--itd-points", type=int, default=256)
    parser.add_argument("--ode-steps", type=int, default=64)
    args = parser.parse_args()
    if args.itd_points < 2 or args.ode_steps < 1:
        parser.error("--itd-points must be at least 2 and --ode-steps at least 1")
    for path in args.checkpoints:
        try:
            print(json.dumps(itd_and_ode_bits_per_dim(path, args.itd_points, args.ode_steps)))
        except NoiseclsError as err:
            sys.exit(f"itd_vs_ode: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
