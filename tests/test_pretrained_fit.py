"""A diffusers model fine-tuned by a noisecls method through the CLI, with no code: CDL holds
DiffusersModel as its net and DiffusersSchedule as its schedule (config only); the checkpoint
loads back through load_pretrained and is written back in diffusers' format."""

import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from noisecls.cli import main  # noqa: E402
from noisecls.denoisers import PredictionDenoiser  # noqa: E402
from noisecls.pretrained import load_pretrained, save_diffusers  # noqa: E402

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 3
  limit_val_batches: 0
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
    - class_path: noisecls.callbacks.ModelCheckpoint
      init_args: {{save_last: true, dirpath: {root}/ckpt}}
model:
  class_path: noisecls.methods.CDL
  init_args:
    prediction: eps
    cdl_examples: 2
    cdl_points: 8
    cdl_weight: 1.0
    net:
      class_path: noisecls.pretrained.DiffusersModel
      init_args: {{path: {model}}}
    schedule:
      class_path: noisecls.pretrained.DiffusersSchedule
      init_args: {{path: {model}}}
    optimizer:
      class_path: torch.optim.Adam
      init_args: {{lr: 0.01}}
data:
  class_path: noisecls.data.DigitsDataModule
  init_args: {{batch_size: 16}}
"""


def test_cdl_fine_tunes_a_diffusers_model_from_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    model_dir = tmp_path / "pretrained"
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(
        model_dir
    )
    config = tmp_path / "cdl.yaml"
    config.write_text(CONFIG.format(root=tmp_path / "run", model=model_dir))
    monkeypatch.setattr("sys.argv", ["noisecls"])
    main(["fit", "--config", str(config)])

    ckpt = tmp_path / "run" / "ckpt" / "last.ckpt"
    tuned = load_pretrained(str(ckpt))
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in tuned.net.state_dict().items():
        assert torch.equal(value, saved[f"net.{name}"]), name
    original = load_pretrained(str(model_dir))
    changed = [not torch.equal(a, b) for a, b in
               zip(tuned.net.parameters(), original.net.parameters(), strict=True)]  # fmt: skip
    assert sum(changed) > len(changed) // 2  # fine-tuning moved the weights

    back = tmp_path / "tuned-diffusers"
    save_diffusers(tuned.net, back, tuned.schedule, tuned.prediction)
    reloaded = diffusers.UNet2DModel.from_pretrained(back / "unet")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 1.0, 5.0, 40.0], dtype=torch.float64)
    ours = PredictionDenoiser(tuned.net.eval(), tuned.schedule, "eps")
    theirs = PredictionDenoiser(load_pretrained(str(back)).net.eval(), tuned.schedule, "eps")
    with torch.no_grad():
        assert torch.equal(ours(x, sigma), theirs(x, sigma))
        t = torch.tensor([3.0, 500.0, 900.0, 999.0])
        assert torch.equal(reloaded(x, t).sample, tuned.net(x, t))
    assert os.path.isfile(back / "model_index.json")
