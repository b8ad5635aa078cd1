"""The DDM baseline trained briefly on a 2-D Gaussian mixture, judged against the exact oracle
denoiser E[x0 | x]: a few hundred Lightning steps must bring the denoiser close to it."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from noisecls.data import ToyDataModule
from noisecls.methods import DDM
from noisecls.nets import ResidualMLP
from noisecls.process.schedules import DiscreteSchedule, EDMSchedule

SIGMAS = (0.1, 0.5, 1.0, 2.0, 4.0)


def denoiser_gap(model: DDM, oracle, n: int = 4000) -> float:
    """Mean over SIGMAS of E||D(x, s) - E[x0|x]||^2 / D, x = x0 + s·eps, x0 from the mixture."""
    g = torch.Generator().manual_seed(123)
    x0, _ = oracle.sample(n, generator=g, dtype=torch.float32)
    gaps = []
    with torch.no_grad():
        for s in SIGMAS:
            x = x0 + s * torch.randn(x0.shape, generator=g)
            sigma = torch.full((n,), s)
            ideal = oracle.denoiser()(x.double(), sigma.double()).float()
            gaps.append(((model.denoiser()(x, sigma) - ideal) ** 2).mean().item())
    return sum(gaps) / len(gaps)


def oracle_error(oracle, n: int = 4000) -> float:
    """The same sigmas' MMSE of the oracle itself: the scale the gap is measured against."""
    g = torch.Generator().manual_seed(123)
    x0, _ = oracle.sample(n, generator=g, dtype=torch.float64)
    errs = []
    for s in SIGMAS:
        x = x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        ideal = oracle.denoiser()(x, torch.full((n,), s, dtype=torch.float64))
        errs.append(((ideal - x0) ** 2).mean().item())
    return sum(errs) / len(errs)


@pytest.mark.parametrize(
    ("schedule", "prediction"),
    [(DiscreteSchedule(), "eps"), (EDMSchedule(), "edm")],
    ids=["ddpm-eps", "edm"],
)
def test_short_training_approaches_the_oracle_denoiser(schedule, prediction):
    torch.manual_seed(0)
    data = ToyDataModule(
        "gmm", n_train=8192, n_val=256, n_test=256, batch_size=256, gmm_components=4,
        gmm_radius=2.0, gmm_std=0.4,
    )  # fmt: skip
    net = ResidualMLP(dim=2, hidden=128, num_blocks=3)
    model = DDM(net=net, schedule=schedule, prediction=prediction, data_shape=(2,))
    model.optimizer_factory = lambda params: torch.optim.Adam(params, lr=2e-3)
    before = denoiser_gap(model, data.oracle)
    trainer = L.Trainer(
        max_steps=400, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    after = denoiser_gap(model, data.oracle)
    scale = oracle_error(data.oracle)
    # Stated bound: the trained denoiser's excess error over the oracle is below 10% of the
    # oracle's own MMSE at these noise levels, and far below the untrained network's.
    assert after < 0.10 * scale, (after, scale)
    assert after < 0.05 * before, (after, before)


def test_noise_seed_is_logged_apart_from_the_data_seed(tmp_path) -> None:
    """Loggers get the module's training-noise seed as noise_seed (Lightning refuses to merge a
    module 'seed' with a different DataModule 'seed'); checkpoints keep it as seed."""
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.utilities import _log_hyperparams

    model = DDM(ResidualMLP(dim=2, hidden=8, num_blocks=1), DiscreteSchedule(), data_shape=(2,),
                seed=3)  # fmt: skip
    assert model.hparams["seed"] == 3 and "seed" not in model.hparams_initial
    trainer = L.Trainer(logger=CSVLogger(str(tmp_path)), max_steps=0, enable_progress_bar=False)
    trainer.fit(model, datamodule=ToyDataModule("gmm", batch_size=64, seed=0))
    _log_hyperparams(trainer)  # raised "Error while merging hparams" before
    assert "noise_seed: 3" in next(tmp_path.rglob("hparams.yaml")).read_text()


@pytest.mark.parametrize("ours", [True, False])
def test_last_checkpoint_holds_the_final_step(tmp_path, ours: bool) -> None:
    """A run whose last validation (and save) precedes max_steps: noisecls' ModelCheckpoint
    writes last.ckpt at the final step; Lightning's keeps the earlier one (the bug it fixes)."""
    from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

    from noisecls.callbacks import ModelCheckpoint

    checkpoint = (ModelCheckpoint if ours else LightningModelCheckpoint)(
        dirpath=str(tmp_path), save_last=True
    )
    model = DDM(ResidualMLP(dim=2, hidden=8, num_blocks=1), DiscreteSchedule(), data_shape=(2,))
    trainer = L.Trainer(max_steps=7, val_check_interval=5, check_val_every_n_epoch=None,
                        limit_val_batches=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoint])  # fmt: skip
    trainer.fit(model, datamodule=ToyDataModule("gmm", batch_size=64, n_train=4096))
    step = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert step == (7 if ours else 5)
