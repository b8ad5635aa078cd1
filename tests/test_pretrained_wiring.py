"""DG's score_checkpoint and CDL's init_from accept a diffusers model directory (passes once
/tmp/pretrained_wiring.patch is applied to noisecls/methods/dg.py and cdl.py)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from noisecls.denoisers import PredictionDenoiser  # noqa: E402
from noisecls.errors import NoiseclsError  # noqa: E402
from noisecls.methods.cdl import CDL  # noqa: E402
from noisecls.methods.dg import DG, GuidanceConfig  # noqa: E402
from noisecls.nets import ScalarHead, UNet  # noqa: E402
from noisecls.pretrained import DiffusersModel, DiffusersSchedule, load_pretrained  # noqa: E402
from noisecls.samplers import SamplerConfig, sample_ddim  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("pretrained")
    scheduler = diffusers.DDPMScheduler(prediction_type="v_prediction", clip_sample=False)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return str(path)


def discriminator_net():
    return UNet(image_size=8, in_channels=1, model_channels=8, channel_mult=[1, 2],
                num_res_blocks=1, attention_resolutions=[], head=ScalarHead())  # fmt: skip


def test_dg_guides_a_diffusers_model_from_its_directory(model_dir):
    dg = DG(discriminator_net(), score_checkpoint=model_dir,
            guidance=GuidanceConfig(weight=0.0), sampler=SamplerConfig("ddim", 6))  # fmt: skip
    assert dg.data_shape == (1, 8, 8) and not any(
        p.requires_grad for p in dg.score_model.parameters()
    )
    pre = load_pretrained(model_dir)
    reference = PredictionDenoiser(pre.net.eval(), pre.schedule, "v")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.05, 0.5, 5.0, 50.0], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(dg.score_model.denoiser()(x, sigma), reference(x, sigma))
    sigmas = pre.schedule.sampling_sigmas(6)
    out, nfe = dg.run_sampler(SamplerConfig("ddim", 6), x.clone(), sigmas)
    torch.testing.assert_close(out, sample_ddim(reference, x.clone(), sigmas))
    assert nfe == 6
    labels = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0]])  # real / fake, class
    loss, _ = dg.training_loss(x, labels, torch.Generator().manual_seed(1))
    loss.backward()
    assert all(p.grad is None for p in dg.score_model.parameters())
    assert any(p.grad is not None for p in dg.discriminator.parameters())


def test_cdl_init_from_a_diffusers_directory(model_dir):
    def cdl(prediction="v", net=None, init_from=model_dir):
        return CDL(net or DiffusersModel(model_dir, weights="config"), DiffusersSchedule(model_dir),
                   prediction=prediction, init_from=init_from, data_shape=(1, 8, 8))  # fmt: skip

    model = cdl()
    pre = load_pretrained(model_dir)
    assert not all(torch.equal(a, b) for a, b in
                   zip(model.net.parameters(), pre.net.parameters(), strict=True))  # fmt: skip
    model.load_denoiser_weights(model_dir)
    for a, b in zip(model.net.parameters(), pre.net.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(NoiseclsError, match="predicts 'v'"):
        cdl("eps").load_denoiser_weights(model_dir)
    with pytest.raises(NoiseclsError, match="does not fit this network"):
        cdl(net=discriminator_net()).load_denoiser_weights(model_dir)
