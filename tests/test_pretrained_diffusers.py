"""The diffusers adapter against diffusers itself: a small randomly initialised UNet2DModel saved
with save_pretrained; noisecls's DDIM / DDPM samplers through DiffusersSchedule +
PredictionDenoiser reproduce DDIMScheduler / DDPMScheduler loops on the same noise."""

import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from noisecls.denoisers import PredictionDenoiser  # noqa: E402
from noisecls.errors import NoiseclsError  # noqa: E402
from noisecls.pretrained import (  # noqa: E402
    DiffusersModel,
    DiffusersSchedule,
    MissingExtraError,
    load_pretrained,
    save_diffusers,
)
from noisecls.samplers import sample_ddim, sample_ddpm  # noqa: E402


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()  # fmt: skip


def save_pipeline(unet, scheduler, path):
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return str(path)


def diffusers_loop(unet, scheduler, x, num_steps, seed, **step_kwargs):
    """diffusers' own sampling loop (as its pipelines run it), VP scaling."""
    scheduler.set_timesteps(num_steps)
    g = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        out = unet(x, t).sample
        x = scheduler.step(out, t, x, generator=g, **step_kwargs).prev_sample
    return x


def noisecls_run(path, x_vp, num_steps, seed, sampler, **kwargs):
    """noisecls's sampler through the adapter from the same x_T (sigma space: x_T / alpha)."""
    pre = load_pretrained(path)
    schedule = DiffusersSchedule(path, timestep_spacing=None)
    denoiser = PredictionDenoiser(pre.net.eval(), schedule, pre.prediction)
    sigmas = schedule.sampling_sigmas(num_steps)
    x = x_vp * (1 + sigmas[0] ** 2).sqrt().float()
    g = torch.Generator().manual_seed(seed)
    return sampler(denoiser, x, sigmas, generator=g, **kwargs)


CASES = [  # (scheduler, timestep_spacing, prediction_type, DDIM eta or None for DDPM)
    ("DDIMScheduler", "leading", "epsilon", 0.0),
    ("DDIMScheduler", "trailing", "v_prediction", 0.0),
    ("DDIMScheduler", "leading", "v_prediction", 0.5),
    ("DDPMScheduler", "trailing", "v_prediction", None),
    ("DDPMScheduler", "leading", "epsilon", None),
    ("DDPMScheduler", "linspace", "epsilon", None),
    ("DDPMScheduler", "linspace", "sample", None),
]


@pytest.mark.parametrize(("scheduler_name", "spacing", "prediction_type", "eta"), CASES)
@torch.no_grad()
def test_samplers_reproduce_diffusers_loops(
    unet, tmp_path, scheduler_name, spacing, prediction_type, eta
):
    scheduler = getattr(diffusers, scheduler_name)(
        clip_sample=False, prediction_type=prediction_type, timestep_spacing=spacing,
        steps_offset=1 if spacing == "leading" else 0,
    )  # fmt: skip
    path = save_pipeline(unet, scheduler, tmp_path / "pipe")
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    if eta is None:  # DDPM: ancestral sampling with beta-tilde
        ours = noisecls_run(path, x_T, 10, 2, sample_ddpm)
        theirs = diffusers_loop(unet, scheduler, x_T, 10, 2)
    else:
        ours = noisecls_run(path, x_T, 10, 2, sample_ddim, eta=eta)
        theirs = diffusers_loop(unet, scheduler, x_T, 10, 2, eta=eta)
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-5 * scale  # measured 2e-7 .. 5e-7 relative


@torch.no_grad()
def test_ddim_without_alpha_one_stops_at_final_sigma(unet, tmp_path):
    """set_alpha_to_one false: diffusers' last DDIM step lands at alpha_bar_0, i.e. noisecls's
    grid with its final 0 replaced by ``final_sigma`` (returned at VP scale sqrt(alpha_bar_0))."""
    scheduler = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    path = save_pipeline(unet, scheduler, tmp_path / "pipe")
    schedule = DiffusersSchedule(path, timestep_spacing=None)
    denoiser = PredictionDenoiser(DiffusersModel(path).eval(), schedule, "eps")
    sigmas = schedule.sampling_sigmas(5)
    sigmas[-1] = schedule.final_sigma
    assert schedule.final_sigma == pytest.approx(float(schedule.ve_sigma_at_levels()[0]))
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    ours = sample_ddim(denoiser, x_T * (1 + sigmas[0] ** 2).sqrt().float(), sigmas)
    ours = ours / (1 + schedule.final_sigma**2) ** 0.5
    theirs = diffusers_loop(unet, scheduler, x_T, 5, 0)
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


@torch.no_grad()
def test_sigma_between_levels_interpolates_or_rounds_the_timestep(unet, tmp_path):
    """Off the grid the UNet sees the timestep linear in log sigma between levels (numpy's interp
    over the scheduler's own table) or the nearest one, and x scaled by 1/sqrt(1 + sigma²)."""
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    path = save_pipeline(unet, scheduler, tmp_path / "pipe")
    abar = scheduler.alphas_cumprod.double().numpy()
    log_sigma = 0.5 * np.log((1 - abar) / abar)
    sigma = torch.tensor([0.05, 1.3, 17.0], dtype=torch.float64)
    k = torch.from_numpy(np.interp(np.log(sigma.numpy()), log_sigma, np.arange(abar.size)))
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    x_in = x / (1 + sigma**2).sqrt()[:, None, None, None].float()
    for rounding, timestep in (("interpolate", k), ("nearest", k.round())):
        schedule = DiffusersSchedule(path, timestep_rounding=rounding)
        denoiser = PredictionDenoiser(DiffusersModel(path).eval(), schedule, "eps")
        eps = unet(x_in, timestep.float()).sample
        expected = x - sigma[:, None, None, None].float() * eps
        assert torch.allclose(denoiser(x, sigma), expected, atol=1e-4, rtol=1e-5), rounding
    assert not torch.equal(k, k.round())


def test_save_diffusers_round_trip(unet, tmp_path):
    """Changed weights written with save_diffusers load in diffusers itself (DDPMPipeline) and
    back through load_pretrained with the same outputs; the prediction type travels along."""
    path = save_pipeline(
        unet, diffusers.DDPMScheduler(prediction_type="v_prediction"), tmp_path / "a"
    )
    pre = load_pretrained(path)
    assert pre.prediction == "v" and pre.data_shape == (3, 8, 8)
    with torch.no_grad():
        for p in pre.net.parameters():
            p.add_(0.01)
    out_dir = save_diffusers(pre.net, tmp_path / "b", pre.schedule)
    pipe = diffusers.DDPMPipeline.from_pretrained(out_dir)
    back = load_pretrained(str(out_dir))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        ours = pre.net(x, t)
        assert torch.equal(pipe.unet(x, t).sample, ours)
        assert torch.equal(back.net(x, t), ours)
        assert not torch.allclose(unet(x, t).sample, ours)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and back.prediction == "v"
    assert torch.equal(back.schedule.alpha_bar, pre.schedule.alpha_bar)


def test_model_folder_with_sibling_scheduler_and_errors(unet, tmp_path):
    path = save_pipeline(unet, diffusers.DDPMScheduler(), tmp_path / "pipe")
    net = DiffusersModel(f"{path}/unet")  # model folder: the scheduler is its sibling
    assert net.data_shape == (3, 8, 8) and net.num_classes is None
    with pytest.raises(NoiseclsError, match="local Hugging Face cache") as err:
        load_pretrained("noisecls-tests/never-downloaded")  # a hub id: cache only, no network
    assert "\n" not in str(err.value)
    with pytest.raises(NoiseclsError, match="neither a diffusers model directory"):
        load_pretrained(str(tmp_path / "missing.ckpt"))


def test_missing_extra_is_one_line_naming_it(unet, tmp_path, monkeypatch):
    path = save_pipeline(unet, diffusers.DDPMScheduler(), tmp_path / "pipe")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    for build in (DiffusersModel, DiffusersSchedule):
        with pytest.raises(MissingExtraError) as err:
            build(path)
        message = str(err.value)
        assert 'pip install -e ".[diffusers]"' in message and "\n" not in message
