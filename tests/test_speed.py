"""Speed options (noisecls.speed): bf16 autocast and compiled networks agree with float32 eager
within stated tolerances, the options reach the module as asked, and combinations that cannot
work are refused in one line."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import Tensor

from noisecls.data.base import NoiseclsDataModule, TensorPairDataset
from noisecls.methods import CDL, CDM, DDM, DiffusionModule
from noisecls.methods.soft import SoftDiffusion
from noisecls.nets import LogitsHead, ResidualMLP, UNet
from noisecls.process.blur import BlurNoiseProcess
from noisecls.process.schedules import DiscreteSchedule
from noisecls.speed import SpeedConfig, SpeedOptions, SpeedOptionsError, check_speed

SIZE = 16
SHAPE = (3, SIZE, SIZE)
#: noise levels of the denoiser comparison, one per example (sigma space)
SIGMAS = torch.tensor([0.05, 0.3, 1.0, 5.0, 20.0, 0.1, 2.0, 10.0])


def unet(**kwargs) -> UNet:
    torch.manual_seed(0)
    return UNet(image_size=SIZE, in_channels=3, model_channels=32, channel_mult=(1, 2),
                attention_resolutions=(8,), dropout=0.0, **kwargs)  # fmt: skip


def perturbed(module: DiffusionModule) -> DiffusionModule:
    """The module in eval mode with every weight moved off its initialisation (zero-initialised
    output layers would make every network output 0 in any precision)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return module.eval()


def clean_batch() -> Tensor:
    return torch.rand(8, *SHAPE, generator=torch.Generator().manual_seed(2)) * 2 - 1


def build(method: str) -> DiffusionModule:
    schedule = DiscreteSchedule()
    if method == "ddm":
        return perturbed(DDM(unet(), schedule, data_shape=SHAPE))
    if method == "cdm":
        head = LogitsHead(num_logits=1002, hidden_channels=64, cumsum=True)
        net = unet(time_conditioning=False, attention_backend="math", head=head)
        return perturbed(CDM(net, schedule, data_shape=SHAPE))
    if method == "soft":
        module = SoftDiffusion(unet(), BlurNoiseProcess(), data_shape=SHAPE)
        module.fit_statistics(clean_batch())
        return perturbed(module)
    raise ValueError(method)


def loss_and_denoised(module: DiffusionModule) -> tuple[Tensor, Tensor]:
    """(training loss of the fixed batch, denoiser output [8, 3, 16, 16] at SIGMAS), fixed noise."""
    x0 = clean_batch()
    loss, _ = module.training_loss(x0, None, torch.Generator().manual_seed(3))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    x = x0 + SIGMAS.view(-1, 1, 1, 1) * eps
    return loss.detach(), module.denoiser()(x, SIGMAS).detach()


def relative(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# Measured at this size (CPU): relative loss error 1e-4 to 2e-3, denoiser 1e-3 to 1e-2 (Soft's
# the largest); tolerances: loss 5e-3 (~ bf16's 2^-8 resolution), denoiser 3e-2.
@pytest.mark.parametrize("method", ["ddm", "cdm", "soft"])
def test_bf16_autocast_loss_and_denoiser_agree_with_float32(method: str) -> None:
    module = build(method)
    loss32, den32 = loss_and_denoised(module)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, den16 = loss_and_denoised(module)
    assert den16.dtype == torch.float32 and loss16.dtype == torch.float32  # float32 outside the net
    assert abs(float(loss16 - loss32)) <= 5e-3 * abs(float(loss32))
    assert relative(den16, den32) <= 3e-2


def test_bf16_autocast_leaves_cdl_contrastive_loss_in_float32() -> None:
    """CDL's denoising loss is DDM's and runs under autocast (within 5e-3 of float32, as above);
    its contrastive term compares ITD log-densities of thousands of nats (bf16 moved it by ~10%
    at this size) and is computed outside autocast: equal to float32 within 1e-5 (same float32
    operations; the tolerance allows a different reduction order)."""
    dims = SIZE * SIZE * 3
    module = CDL(unet(), DiscreteSchedule(), data_shape=SHAPE, cdl_weight=1.0, cdl_examples=4,
                 cdl_points=4)  # fmt: skip
    module.set_reference(torch.zeros(dims), 0.25 * torch.eye(dims))
    module = perturbed(module)

    def losses() -> tuple[float, float, float]:
        x0 = clean_batch()
        loss, extras = module.training_loss(x0, None, torch.Generator().manual_seed(3))
        return float(loss), float(extras["denoise_loss"]), float(extras["cdl_loss"])

    loss32, denoise32, cdl32 = losses()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, denoise16, cdl16 = losses()
    assert abs(cdl16 - cdl32) <= 1e-5 * abs(cdl32)
    assert abs(denoise16 - denoise32) <= 5e-3 * abs(denoise32)
    assert abs(loss16 - loss32) <= 5e-3 * abs(loss32)


def test_unet_returns_its_input_dtype_in_float64() -> None:
    net = unet().double()
    x = torch.zeros(2, *SHAPE, dtype=torch.float64)
    assert net(x, torch.ones(2, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize(
    ("method", "config", "precision", "words"),
    [
        ("cdm", SpeedConfig(compile=True), "32-true", "compile refused for CDM"),
        ("cdm", SpeedConfig(), "16-mixed", "GradScaler"),
        ("ddm", SpeedConfig(), "bf16-true", "half precision"),
        ("ddm", SpeedConfig(), "16-true", "half precision"),
    ],
)
def test_refused_combinations_name_the_reason(method, config, precision, words) -> None:
    with pytest.raises(SpeedOptionsError, match=words) as info:
        check_speed(config, build(method), precision)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("option", ["compile", "channels_last"])
def test_options_for_convolutions_refuse_an_mlp(option: str) -> None:
    module = DDM(ResidualMLP(dim=2, hidden=16, num_blocks=1), DiscreteSchedule(), data_shape=(2,))
    with pytest.raises(SpeedOptionsError, match=f"{option} needs convolution"):
        check_speed(SpeedConfig(**{option: True}), module, "32-true")


def test_a_method_that_names_a_mixed_precision_refusal_is_refused() -> None:
    module = build("ddm")
    module.mixed_precision_refusal = "its loss compares log-densities"
    with pytest.raises(SpeedOptionsError, match="bf16-mixed refused for DDM: its loss compares"):
        check_speed(SpeedConfig(), module, "bf16-mixed")
    check_speed(SpeedConfig(), module, "32-true")


def test_safe_options_pass_for_every_image_method() -> None:
    for method in ("ddm", "soft"):
        check_speed(SpeedConfig(tf32=True, channels_last=True, compile=True), build(method),
                    "bf16-mixed")  # fmt: skip
    check_speed(SpeedConfig(tf32=True, channels_last=True), build("cdm"), "bf16-mixed")


def test_fit_applies_channels_last_and_tf32_only_inside_training_batches(tmp_path) -> None:
    """Under bf16-mixed with tf32 and channels_last: the conv weights are NHWC, TF32 is on in
    every training batch and off again afterwards (evaluation stays full float32)."""
    seen: list[bool] = []

    class Record(L.Callback):
        def on_train_batch_start(self, *_):  # runs after SpeedOptions (listed later)
            seen.append(torch.backends.cuda.matmul.allow_tf32)

    module = DDM(unet(), DiscreteSchedule(), data_shape=SHAPE)
    data = torch.utils.data.TensorDataset(clean_batch(), torch.zeros(8, dtype=torch.long))
    trainer = L.Trainer(
        max_steps=2, precision="bf16-mixed", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[SpeedOptions(tf32=True, channels_last=True), Record()],
    )  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = False
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert seen == [True, True] and not torch.backends.cuda.matmul.allow_tf32
    conv = module.net.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.slow
def test_compiled_backbone_agrees_with_eager_and_survives_deep_copy() -> None:
    """Inductor (C++ on CPU): loss, parameter gradients and denoiser within 1e-4 relative of
    eager float32; a deep copy (the EMA's AveragedModel) of the compiled net uses its own
    weights; the state-dict keys do not change."""
    eager, compiled = build("ddm"), build("ddm")
    keys = list(compiled.state_dict())
    compiled.net.compile()
    assert list(compiled.state_dict()) == keys
    results = []
    for module in (eager, compiled):
        module.zero_grad()
        loss, _ = module.training_loss(clean_batch(), None, torch.Generator().manual_seed(3))
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
        with torch.no_grad():
            results.append((loss.detach(), grads, loss_and_denoised(module)[1]))
    for got, want in zip(results[1], results[0], strict=True):
        assert relative(got, want) <= 1e-4
    twin = copy.deepcopy(compiled.net)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
        x = clean_batch()
        assert (
            twin(x, torch.ones(8)).abs().max() == 0
            and compiled.net(x, torch.ones(8)).abs().max() > 0
        )


def test_accumulated_micro_batches_draw_their_own_noise(tmp_path) -> None:
    """With accumulate_grad_batches 2 the two micro-batches of a step (same global_step, same
    weights) are fed the same images here: their losses differ only if their noise differs."""
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, *_):
            losses.append(float(outputs["loss"]))

    x = clean_batch()[:4].repeat(2, 1, 1, 1)
    data = torch.utils.data.TensorDataset(x, torch.zeros(8, dtype=torch.long))
    trainer = L.Trainer(
        max_steps=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[Record()],
    )  # fmt: skip
    trainer.fit(DDM(unet(), DiscreteSchedule(), data_shape=SHAPE),
                torch.utils.data.DataLoader(data, batch_size=4))  # fmt: skip
    assert len(losses) == 2 and abs(losses[0] - losses[1]) > 1e-3 * losses[0]


class Examples(NoiseclsDataModule):
    """18 training examples whose value is their index (a training step sees which ones)."""

    data_shape = (1,)

    def _build(self) -> None:
        self.train_set = TensorPairDataset(torch.arange(18.0)[:, None], torch.zeros(18))


class SeenExamples(L.LightningModule):
    """Records (global step, example indices) of each training micro-batch; learns nothing. More
    micro-batches than ``limit`` is an error (a loader that never reaches the optimizer step)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.limit = limit
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.seen.append((self.global_step, batch[0].flatten().int().tolist()))
        if len(self.seen) > self.limit:
            raise RuntimeError("more micro-batches than max_steps x accumulate_grad_batches")
        return self.weight * batch[0].sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def seen_with_accumulation(root, max_steps: int, ckpt_path: str | None = None) -> SeenExamples:
    """A fit of SeenExamples on Examples at batch 2 with accumulate_grad_batches 2, ending with
    root/last.ckpt (resumed from ``ckpt_path``)."""
    model = SeenExamples(limit=2 * max_steps)
    trainer = L.Trainer(
        max_steps=max_steps, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, Examples(batch_size=2), ckpt_path=ckpt_path)
    trainer.save_checkpoint(root / "last.ckpt")
    return model


def test_accumulation_takes_each_epoch_once_and_resumes_in_place(tmp_path) -> None:
    """18 examples, micro-batches of 2, 2 per step: an epoch is 4 steps (8 micro-batches, 16
    distinct examples; the 9th micro-batch, half a step, is dropped), every step gets 2
    micro-batches, and a run resumed at step 3 continues with the uninterrupted run's batches.
    (The sampler used to count micro-batches as steps: epoch 2 replayed the end of epoch 1, then
    a lone micro-batch repeated without an optimizer step, forever.)"""
    whole = seen_with_accumulation(tmp_path / "whole", 8).seen
    assert [step for step, _ in whole] == [s for s in range(8) for _ in range(2)]
    for epoch in (whole[:8], whole[8:]):
        examples = [i for _, batch in epoch for i in batch]
        assert len(examples) == len(set(examples)) == 16
    assert whole[:8] != whole[8:]
    first = seen_with_accumulation(tmp_path / "first", 3).seen
    rest = seen_with_accumulation(tmp_path / "rest", 8, str(tmp_path / "first" / "last.ckpt")).seen
    assert first + rest == whole
