"""Soft Diffusion against its Gaussian oracle: the soft Tweedie identity, Soft Score Matching with
a linear predictor, the momentum vs. naive samplers with the exact predictor, a trained module's
improvement bound, the module's plumbing, and the configs end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from noisecls.data.toy import ToyDataModule
from noisecls.errors import NoiseclsError
from noisecls.methods.soft import SoftDiffusion, soft_score_matching_loss
from noisecls.nets import ResidualMLP
from noisecls.oracles import DCTGaussian
from noisecls.process.blur import BlurNoiseProcess, dct, dct_spectrum
from noisecls.samplers import SamplerConfig
from noisecls.samplers.momentum import SoftSamplerConfig, sample_momentum, sample_naive

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spectrum_oracle(shape: tuple[int, ...], power: float = 1.0) -> DCTGaussian:
    """Gaussian data with variance 1 / (1 + |k|)^power per DCT frequency and a bright mean."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=F64) for n in shape[-2:]], indexing="ij")
    radius = sum(g for g in grids) if len(shape) == 3 else torch.arange(shape[-1], dtype=F64)
    variance = (1.0 / (1.0 + radius) ** power).expand(shape).contiguous()
    mean = torch.zeros(shape, dtype=F64)
    mean[(..., 0, 0) if len(shape) == 3 else (..., 0)] = 0.3
    return DCTGaussian(mean, variance)


# ------------------------------------------------------------------------------------ the oracle
def test_soft_tweedie_identity_holds_exactly_for_the_dct_gaussian():
    shape = (2, 4, 4)
    oracle = _spectrum_oracle(shape)
    process = BlurNoiseProcess(blur_sigma_max=3.0, noise_min=0.02, noise_max=0.3)
    t = torch.tensor([0.0, 0.1, 0.35, 0.7, 1.0] * 4, dtype=F64)
    c, s = process.gains(t, shape), process.noise_std(t)
    x = oracle.sample_corrupted(t.numel(), c, s, _gen(0)).requires_grad_(True)
    (score_autograd,) = torch.autograd.grad(oracle.log_prob(x, c, s).sum(), x)
    x = x.detach()
    x0_hat = oracle.posterior_mean(x, c, s)
    s2 = s.reshape(-1, 1, 1, 1) ** 2
    # C_t E[x0 | x_t] = x_t + s_t^2 grad log q_t(x_t), exactly
    torch.testing.assert_close(process.blur(x0_hat, t), x + s2 * score_autograd, rtol=0, atol=1e-12)
    torch.testing.assert_close(oracle.score(x, c, s), score_autograd, rtol=0, atol=1e-10)
    # the process recovers the score from the x0 prediction
    torch.testing.assert_close(process.score(x0_hat, x, t), score_autograd, rtol=0, atol=1e-9)
    # and the per-frequency oracle is the general Gaussian-mixture oracle with C as a matrix
    mixture = oracle.to_mixture()
    for i in (1, 3):
        C = oracle.operator(c[i])
        torch.testing.assert_close(C, process.blur(torch.eye(32, dtype=F64).reshape(32, *shape),
                                   t[i : i + 1]).reshape(32, 32).T, rtol=0, atol=1e-13)  # fmt: skip
        flat = x[i : i + 1].flatten(1)
        ref_mean = mixture.posterior_mean(flat, 1.0, float(s[i]), C=C).reshape(1, *shape)
        # (the mixture oracle eigendecomposes the ill-conditioned C Sigma Cᵀ: ~1e-8 rounding)
        torch.testing.assert_close(x0_hat[i : i + 1], ref_mean, rtol=1e-6, atol=1e-7)
        ref_lp = mixture.noisy_log_prob(flat, 1.0, float(s[i]), C=C)
        torch.testing.assert_close(oracle.log_prob(x[i : i + 1], c[i : i + 1], s[i]), ref_lp)


def test_linear_predictor_fitted_with_the_soft_loss_matches_the_oracle_on_the_range_of_c():
    torch.manual_seed(0)
    shape = (16,)
    oracle = _spectrum_oracle(shape)
    process = BlurNoiseProcess(blur_sigma_max=6.0, noise_min=0.01, noise_max=0.1)
    n = 10000
    t = torch.full((n,), 0.6, dtype=F64)
    gains = process.gains(t[:1], shape)[0]
    assert float(gains.min()) < 1e-10 < 0.5 < float(gains.max())  # killed and kept frequencies
    x0 = oracle.sample(n, _gen(1))
    x_t = process.corrupt(x0, t, torch.randn(n, 16, dtype=F64, generator=_gen(2)))
    h = torch.nn.Linear(16, 16, dtype=F64)
    optimizer = torch.optim.LBFGS(
        h.parameters(), max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = soft_score_matching_loss(h(x_t), x0, t, process)
        loss.backward()
        return loss

    optimizer.step(closure)
    x_test = oracle.sample_corrupted(4000, gains, process.noise_std(t[:1]), _gen(3))
    t_test = t[:4000]
    with torch.no_grad():
        fitted, exact = h(x_test), oracle.posterior_mean(x_test, gains, process.noise_std(t[:1]))
    # C_t h = C_t E[x0 | x_t], up to the fit's sampling error
    err = (
        process.blur(fitted - exact, t_test).pow(2).mean()
        / process.blur(exact, t_test).var(0).sum()
    )
    assert float(err) < 1e-5
    # per frequency: h itself is learnt where C_t keeps the frequency, not where it kills it
    per_freq = dct(fitted - exact, 1).pow(2).mean(0).sqrt() / oracle.variance.sqrt()
    assert float(per_freq[gains > 0.05].max()) < 0.05
    assert float(per_freq[gains < 1e-8].min()) > 0.05


def test_momentum_sampler_keeps_the_variances_and_the_naive_sampler_halves_them():
    shape = (8,)
    oracle = _spectrum_oracle(shape)
    process = BlurNoiseProcess(blur_sigma_max=8.0, noise_min=0.01, noise_max=0.1)
    gains_1 = process.gains(torch.ones(1, dtype=F64), shape)
    assert float(gains_1.min()) < 1e-12  # the high frequencies start as pure noise

    def exact_predictor(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return oracle.posterior_mean(x, process.gains(t[:1], shape), process.noise_std(t[:1]))

    n = 10000
    s_1 = process.noise_std(torch.ones(1, dtype=F64))
    x_1 = oracle.sample_corrupted(n, gains_1, s_1, _gen(0)).float()  # float32: fast noise draws
    times = process.sampling_times(1000)
    # exact law of the output E[x0 | x_{t=0}] (t = 0: no blur, noise s_min)
    s_0 = process.noise_min
    target = oracle.variance**2 / (oracle.variance + s_0**2)
    ratios = {}
    for name, sampler in (("momentum", sample_momentum), ("naive", sample_naive)):
        out = sampler(exact_predictor, process, x_1, times, generator=_gen(1))
        ratios[name] = dct(out, 1).var(0) / target
    momentum, naive = ratios["momentum"], ratios["naive"]
    assert float((momentum - 1).abs().max()) < 0.06, momentum
    assert abs(float(momentum.mean()) - 1) < 0.02, momentum
    assert float((naive - 0.5).abs().max()) < 0.05, naive
    assert abs(float(naive.mean()) - 0.5) < 0.03, naive


def test_momentum_sampler_with_the_exact_predictor_samples_a_gaussian_mixture():
    """Beyond Gaussians: the 8-mode ring (2-D points blurred as signals of length 2, so the
    x1 - x2 direction is destroyed at t = 1) with the mixture oracle's E[x0 | x_t] for C_t."""
    gmm = ToyDataModule(name="gmm").oracle
    process = BlurNoiseProcess(blur_sigma_max=3.0, noise_min=0.02, noise_max=1.0,
                               spacing="constant_distance")  # fmt: skip
    x0, _ = gmm.sample(20000, _gen(0), dtype=F64)
    process.fit_constant_distance(*dct_spectrum(x0))
    eye = torch.eye(2, dtype=F64)

    def exact_predictor(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        C = process.blur(eye, t[:1]).T  # C_t as a matrix (C e_j in column j)
        return gmm.posterior_mean(x, 1.0, float(process.noise_std(t[:1])), C=C)

    n, t_1 = 2000, torch.ones(1, dtype=F64)
    rows = torch.randint(20000, (n,), generator=_gen(1))
    x_1 = process.corrupt(x0[rows], t_1, torch.randn(n, 2, dtype=F64, generator=_gen(2)))
    times = process.sampling_times(400)
    momentum = sample_momentum(exact_predictor, process, x_1, times, generator=_gen(3))
    naive = sample_naive(exact_predictor, process, x_1, times, generator=_gen(3))
    # mean exact log-density: the data's (minus the entropy) within ~2 standard errors (0.025)
    # for momentum; the naive samples crowd the modes (too likely, as with Gaussians)
    expected = float(gmm.log_prob(x0).mean())
    assert abs(float(gmm.log_prob(momentum).mean()) - expected) < 0.08
    assert float(gmm.log_prob(naive).mean()) - expected > 0.3


# ------------------------------------------------------------------------------------ the module
def _module(shape: tuple[int, ...], **kwargs) -> SoftDiffusion:
    torch.manual_seed(0)
    process = kwargs.pop("process", None) or BlurNoiseProcess(
        blur_sigma_max=4.0, noise_min=0.02, noise_max=0.2, spacing="constant_distance"
    )
    net = ResidualMLP(dim=math.prod(shape), hidden=64, num_blocks=2)
    return SoftDiffusion(net, process, data_shape=shape, **kwargs)


def test_training_moves_the_module_towards_the_oracle_loss():
    shape = (8,)
    oracle = _spectrum_oracle(shape)
    module = _module(shape, sampler=SoftSamplerConfig(num_steps=20))
    module.fit_statistics(oracle.sample(2000, _gen(0)).float())
    process = module.process

    # held-out soft loss of the module, of the oracle predictor and of h = 0, on fixed draws
    x0 = oracle.sample(4000, _gen(1)).float()
    t = torch.rand(4000, dtype=F64, generator=_gen(2))
    x_t = process.corrupt(x0, t, torch.randn(x0.shape, generator=_gen(3)))

    def losses() -> tuple[float, float, float]:
        with torch.no_grad():
            model = soft_score_matching_loss(module.predictor()(x_t, t), x0, t, process)
        best = oracle.posterior_mean(x_t, process.gains(t, shape), process.noise_std(t))
        exact = soft_score_matching_loss(best, x0, t, process)
        zero = soft_score_matching_loss(torch.zeros_like(x0), x0, t, process)
        return float(model), float(exact), float(zero)

    before, exact, zero = losses()
    optimizer = torch.optim.Adam(module.parameters(), lr=2e-3)
    for step in range(400):
        batch = oracle.sample(256, _gen(100 + step)).float()
        loss, _ = module.training_loss(batch, None, _gen(10_000 + step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after, _, _ = losses()
    assert exact < after < before
    assert after - exact < 0.1 * (zero - exact), (before, after, exact, zero)


@pytest.mark.parametrize("prior", ["data", "gaussian"])
def test_module_samples_round_trips_and_refuses_what_it_cannot_do(prior):
    shape = (2, 4, 4)
    oracle = _spectrum_oracle(shape)
    module = _module(shape, prior=prior, sampler=SoftSamplerConfig(num_steps=5))
    with pytest.raises(NoiseclsError, match="not fitted"):
        module.sample(2)
    assert not module.fitted
    module.fit_statistics(oracle.sample(300, _gen(0)).float())
    assert module.fitted
    samples, nfe = module.sample(6, generator=_gen(1))
    assert samples.shape == (6, *shape) and nfe == 6 and torch.isfinite(samples).all()
    naive = SoftSamplerConfig(name="naive", num_steps=3, denoise_final=False)
    assert module.sample(2, generator=_gen(1), sampler=naive)[1] == 3
    # the fitted spacing and prior travel with the state dict: same samples after reloading
    clone = _module(shape, prior=prior, sampler=SoftSamplerConfig(num_steps=5))
    clone.load_state_dict(module.state_dict())
    assert clone.fitted
    torch.testing.assert_close(clone.sample(6, generator=_gen(1))[0], samples)
    # the Denoiser form: sigma names the time whose noise std it is
    t = torch.full((3,), 0.4, dtype=F64)
    x = samples[:3]
    out = module.denoiser()(x, module.process.noise_std(t))
    torch.testing.assert_close(out, module.predictor()(x, t))
    with pytest.raises(NoiseclsError, match="momentum"):
        module.sample(2, sampler=SamplerConfig())
    with pytest.raises(NoiseclsError, match="likelihood"):
        module.log_likelihood(samples)
    with pytest.raises(NoiseclsError, match="data_shape"):
        SoftDiffusion(ResidualMLP(dim=2), BlurNoiseProcess())


# ------------------------------------------------------------------------------------ configs
def _noisecls(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {
        **os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore",
        "NOISECLS_CACHE_DIR": str(cwd / "cache"), "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "noisecls.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["soft_celeba64", "soft_cifar10", "soft_digits", "soft_toy"])
def test_soft_configs_parse_and_build_the_model(name):
    from jsonargparse import ArgumentParser

    from noisecls.methods.base import DiffusionModule

    config = yaml.safe_load((ROOT / "experiments" / f"{name}.yaml").read_text())
    shapes = {"soft_celeba64": [3, 64, 64], "soft_cifar10": [3, 32, 32],
              "soft_digits": [1, 8, 8], "soft_toy": [2]}  # fmt: skip
    config["model"]["init_args"]["data_shape"] = shapes[name]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(DiffusionModule, "model")
    model = parser.instantiate_classes(parser.parse_object({"model": config["model"]})).model
    assert isinstance(model, SoftDiffusion)
    assert model.process.spacing == "constant_distance" and model.sampler.name == "momentum"


def test_soft_toy_fits_and_tests_from_the_cli(tmp_path):
    config = str(ROOT / "experiments" / "soft_toy.yaml")
    small = [
        "--data.init_args.n_train", "1024", "--data.init_args.n_val", "256",
        "--data.init_args.n_test", "256", "--trainer.enable_progress_bar", "false",
        "--model.init_args.sampler.num_steps", "10",
    ]  # fmt: skip
    out = _noisecls("fit", "--config", config, "--trainer.max_steps", "30",
                    "--trainer.limit_val_batches", "0", *small, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = sorted(tmp_path.glob("runs/soft_toy/**/last.ckpt"))[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert float(state["schedule.spacing_fitted"]) == 1.0 and float(state["prior.count"]) > 0
    out = _noisecls("test", "--config", config, "--ckpt_path", str(ckpt), *small, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(next(tmp_path.glob("runs/soft_toy/**/results.json")).read_text())
    fid = {r["metric"]: r for r in results["records"]}["test/fid"]
    assert math.isfinite(fid["value"]) and fid["sampler"] == "momentum(10)" and fid["nfe"] == 11
    predict = ["--model.init_args.predict.num_samples", "6", "--model.init_args.predict.batch_size",
               "4"]  # fmt: skip
    out = _noisecls("predict", "--config", config, "--ckpt_path", str(ckpt), *small, *predict,
                    cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    shards = sorted(tmp_path.glob("runs/soft_toy/samples/*.npz"))
    samples = torch.cat([torch.from_numpy(np.load(p)["samples"]) for p in shards])
    assert samples.shape == (6, 2) and torch.isfinite(samples).all()


def _fid_protocol_only(config: dict) -> dict:
    """The config with only EMA, checkpointing, FID (500 samples) and the results writer."""
    keep = ("EMAWeightAveraging", "ModelCheckpoint", "FIDCallback", "ResultsWriter")
    callbacks = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(keep)]
    for c in callbacks:
        if c["class_path"].endswith("FIDCallback"):
            c["init_args"]["num_samples"] = 500
    config["trainer"]["callbacks"] = callbacks
    return config


@pytest.mark.slow
def test_digits_fid_for_soft_diffusion_next_to_ddm(tmp_path):
    """`noisecls fit` then `noisecls test` on the digits, Soft Diffusion and the DDM baseline
    with the same FID protocol (digits CNN features): both report a finite FID."""
    configs = {
        name: _fid_protocol_only(yaml.safe_load((ROOT / "experiments" / f"{name}_digits.yaml")
                                 .read_text()))
        for name in ("soft", "ddm")
    }  # fmt: skip
    assert configs["soft"]["trainer"]["callbacks"] == configs["ddm"]["trainer"]["callbacks"]
    fids = {}
    for name, config in configs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        common = [
            "--config", f"{name}.yaml", "--trainer.default_root_dir", f"runs/{name}",
            "--trainer.enable_progress_bar", "false", "--model.init_args.sampler.num_steps", "20",
        ]  # fmt: skip
        out = _noisecls("fit", *common, "--trainer.max_steps", "200",
                        "--trainer.limit_val_batches", "0", cwd=tmp_path)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        ckpt = sorted(tmp_path.glob(f"runs/{name}/**/last.ckpt"))[-1]
        out = _noisecls("test", *common, "--ckpt_path", str(ckpt), cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        results = json.loads(next(tmp_path.glob(f"runs/{name}/**/results.json")).read_text())
        fids[name] = {r["metric"]: r["value"] for r in results["records"]}["test/fid"]
    print(f"digits FID after 200 steps: soft {fids['soft']:.2f}, ddm {fids['ddm']:.2f}")
    assert all(math.isfinite(v) and v > 0 for v in fids.values()), fids
