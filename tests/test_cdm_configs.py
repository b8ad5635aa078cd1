"""The CDM experiment configs parse (``--print_config``) and instantiate as the paper specifies:
the Ho et al. U-Net trunk without time input, the logits head with cumsum, the optimizer and LR
schedule, EMA, dropout, flips, and the CelebA crop."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging

from noisecls.cli import NoiseclsCLI
from noisecls.methods import CDM, DiffusionModule
from noisecls.nets import ImageHead, LogitsHead, UNet
from noisecls.nets.layers import ResBlock
from noisecls.optim import WarmupStepDecayLR

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["cdm_cifar10", "cdm_cifar10_cond", "cdm_cifar10_unif", "cdm_celeba64", "cdm_toy",
           "cdm_digits"]  # fmt: skip
PAPER = {  # name: (channel_mult, head width, lr, schedule kind, class-conditional)
    "cdm_cifar10": ((1, 2, 2, 2), 512, 2e-4, "linear", False),
    "cdm_cifar10_cond": ((1, 2, 2, 2), 512, 2e-4, "linear", True),
    "cdm_cifar10_unif": ((1, 2, 2, 2), 512, 1e-4, "dre_uniform", False),  # App. C.2.2
    "cdm_celeba64": ((1, 2, 2, 2, 4), 1024, 1e-4, "linear", False),
}


def cli(*args: str) -> NoiseclsCLI:
    return NoiseclsCLI(
        DiffusionModule, L.LightningDataModule, subclass_mode_model=True,
        subclass_mode_data=True, trainer_defaults={"inference_mode": False},
        save_config_kwargs={"overwrite": True}, run=False, args=list(args),
    )  # fmt: skip


def params(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


@pytest.mark.parametrize("name", CONFIGS)
def test_config_prints_and_round_trips(name, capsys):
    path = str(ROOT / "experiments" / f"{name}.yaml")
    with pytest.raises(SystemExit) as exit_info:
        NoiseclsCLI(
            DiffusionModule, L.LightningDataModule, subclass_mode_model=True,
            subclass_mode_data=True, args=["fit", "--config", path, "--print_config"],
        )  # fmt: skip
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "noisecls.methods.CDM"
    net = printed["model"]["init_args"]["net"]["init_args"]
    assert net["time_conditioning"] is False
    head = net["head"]["init_args"]
    assert (head["num_logits"], head["cumsum"]) == (1002, True)


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_config_instantiates_as_the_paper_specifies(name):
    mult, head_width, lr, kind, conditional = PAPER[name]
    c = cli("--config", str(ROOT / "experiments" / f"{name}.yaml"), "--trainer.logger", "false")
    model, trainer, data = c.model, c.trainer, c.datamodule
    assert isinstance(model, CDM) and isinstance(model.net, UNet)
    net = model.net
    # the Ho et al. trunk without time input
    assert net.model_channels == 128 and net.channel_mult == mult and net.num_res_blocks == 2
    assert net.attention_resolutions == (16,) and net.attention_backend == "math"
    assert not net.time_conditioning and net.embed.time_embed is None
    dropouts = {m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)}
    assert dropouts == {0.1}
    head = net.head
    assert isinstance(head, LogitsHead) and head.cumsum and head.num_logits == 1002
    assert head.hidden_channels == head_width and isinstance(head.conv, torch.nn.Conv2d)
    assert head.conv.kernel_size == (3, 3) and isinstance(head.norm, torch.nn.GroupNorm)
    # parameters: the DDPM U-Net minus its time embedding, with the logits head for its output
    with torch.device("meta"):  # shapes only: counting needs no values
        ddpm = UNet(image_size=net.image_size, in_channels=3, channel_mult=mult, dropout=0.1)
    time_params = params(ddpm.embed.time_embed) + sum(
        params(m.emb_proj) for m in ddpm.modules() if isinstance(m, ResBlock)
    )
    class_params = params(net.embed.class_embed) + sum(
        params(m.emb_proj) for m in net.modules() if isinstance(m, ResBlock)
    )
    assert isinstance(ddpm.head, ImageHead)
    expected = params(ddpm) - time_params - params(ddpm.head) + params(head) + class_params
    assert params(net) == expected
    if name == "cdm_cifar10":
        assert params(ddpm) == 35_746_307  # Ho et al.'s 35.7M CIFAR-10 U-Net
        assert params(net) == 33_957_610
        print(f"CDM CIFAR-10 classifier: {params(net):,} parameters")
    assert (net.num_classes == 10) == conditional and model.class_conditional == conditional
    if conditional:
        assert model.label_dropout == 0.1 and data.use_labels
    # method, schedule, optimizer and learning-rate schedule
    assert (model.ce_weight, model.mse_weight) == (0.001, 1.0)
    assert model.schedule.kind == kind and model.schedule.num_levels == 1000
    optim = model.configure_optimizers()
    assert isinstance(optim["optimizer"], torch.optim.Adam)
    assert optim["optimizer"].defaults["lr"] == lr
    sched = optim["lr_scheduler"]["scheduler"]
    assert isinstance(sched, WarmupStepDecayLR) and optim["lr_scheduler"]["interval"] == "step"
    assert (sched.warmup_steps, sched.step_size, sched.gamma) == (5000, 200000, 0.1)
    # 500k iterations, global batch 4 x 128 (CIFAR-10) / 128 (CelebA) per optimizer step as 2
    # accumulated micro-batches (the double backward's float32 activations at the whole batch
    # exceed one 80 GB GPU), EMA 0.9999 from step 5k, random flips
    assert trainer.max_steps == 500000
    assert sum(isinstance(cb, EMAWeightAveraging) for cb in trainer.callbacks) == 1
    (ema,) = [cb for cb in c.config.trainer.callbacks if cb.class_path.endswith("Averaging")]
    assert ema.init_args.decay == 0.9999 and ema.init_args.update_starting_at_step == 5000
    assert trainer.accumulate_grad_batches == 2 and data.random_flip
    assert data.batch_size * 2 == (128 if name == "cdm_celeba64" else 512)
    if name == "cdm_celeba64":
        assert type(data).__name__ == "CelebA64DataModule"
        assert data.hparams.preprocessing == "celeba_cdm" and data.hparams.resolution == 64
