"""Device check: every paper config trained for a few steps and sampled on this machine, with
projected wall-clock of the paper budgets and the speed-up of each speed option.

Nothing is downloaded: the script writes a synthetic CIFAR-10 in torchvision's on-disk format
(``cifar-10-batches-py`` pickles) and folders of random images (178x218 for CelebA's crop,
64x64 for FFHQ / AFHQ). torchvision checks the CIFAR files against the official md5 sums, which
no synthetic file can match, so this process replaces that one check by an existence check (as
the tests do); the DataModule and torchvision's loader otherwise run unchanged.

For each paper config (``*_cifar10*.yaml``, ``*64.yaml``): the config's model, data (batch
size) and trainer precision / accumulation / speed options, ``--warmup`` then ``--steps``
optimizer steps timed, then one batch sampled with the config's sampler cut to
``--sample-steps`` steps (time per step scaled to the paper's step count). DG configs first get
their score run: the score model (ddm_cifar10.yaml, class-conditional or at 64x64 as the DG
config needs) trained for a few steps, then its fake set written with DG's sampler. One table:

    config | steps/s | img/s trained | peak GPU MiB | sampling img/s | paper training h | 50k FID h

then the speed-up of each option over float32 eager on ``--option-configs``, and with 2+ GPUs
the 2-process DDP scaling of ddm_cifar10. Exit status 1 if any run failed (a config the CLI
rejects included: its row says FAILED and the check goes on). On a CPU the backbone is never
compiled (inductor takes minutes per U-Net there).

``--tiny`` is a dry run of the same code paths, not a measurement: tiny networks (width 16, one
residual block per level), batch 4, one optimizer step, one sampler step, 64x64 configs at 16x16,
2 CDL points, and DG's fake set cut to 8 samples written with a 2-step sampler (DG guides the
same); no speed-option table unless ``--option-configs`` names configs. About 40 s on 2 busy
CPU cores (``tests/test_gpu_check.py`` runs it).

    python benchmarks/gpu_check.py                         # one GPU, at most ~8 minutes
    python benchmarks/gpu_check.py --device cpu --tiny     # CPU dry run (~40 s)
    python benchmarks/gpu_check.py --memory                # activation-memory estimate (CPU)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

import noisecls  # noqa: F401  (before lightning / torchvision: see noisecls._compat)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_runs import EXPERIMENTS
from common import peak_memory_mib, reset_peak_memory, synchronize

#: real training-set sizes (images per epoch of the paper budgets given in epochs)
TRAIN_SIZES = {"cifar10": 50_000, "celeba64": 162_770, "ffhq64": 70_000, "afhq64": 15_803}
FID_SAMPLES = 50_000
GIB80 = 80 * 2**30


def paper_configs() -> list[Path]:
    return sorted({*EXPERIMENTS.glob("*_cifar10*.yaml"), *EXPERIMENTS.glob("*64.yaml")})


def data_set_of(config_path: Path) -> str:
    """cifar10 / celeba64 / ffhq64 / afhq64 from the config's name."""
    return next(name for name in TRAIN_SIZES if name in config_path.stem)


# ------------------------------------------------------------------------- synthetic data
def write_cifar(root: Path, per_batch: int) -> Path:
    """cifar-10-batches-py under root: data_batch_1..5 and test_batch of ``per_batch`` random
    images each (pickled dicts, data [N, 3072] uint8 CHW, labels 0..9) and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        entry = {
            "batch_label": f"batch {b}",
            "labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch,
            "num_vis": 3072}  # fmt: skip
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def write_images(folder: Path, count: int, width: int, height: int) -> Path:
    """``count`` random RGB PNGs of width x height in folder."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")
    return folder


def trust_synthetic_cifar() -> None:
    """torchvision's md5 check of the CIFAR files, replaced by an existence check."""
    import torchvision.datasets.cifar as cifar

    cifar.check_integrity = lambda path, md5=None: Path(path).is_file()


@dataclass
class SyntheticData:
    cifar: Path
    celeba: Path
    square64: Path

    @classmethod
    def write(cls, root: Path, tiny: bool) -> SyntheticData:
        n = TINY_IMAGES if tiny else 1000
        return cls(write_cifar(root / "cifar10", n), write_images(root / "celeba", n, 178, 218),
                   write_images(root / "images64", n, 64, 64))  # fmt: skip

    def point(self, data: dict) -> None:
        """Point a data section (class_path / init_args, RealFake's ``real`` too) here."""
        args = data["init_args"]
        if "real" in args:
            self.point(args["real"])
        elif "CIFAR10" in data["class_path"]:
            args["root"] = str(self.cifar)
        elif "CelebA" in data["class_path"]:
            args["path"] = str(self.celeba)
        else:
            args["path"] = str(self.square64)


# ------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Variant:
    """A trainer precision and speed options (None: the config's own)."""

    name: str
    precision: str | None = None
    options: dict | None = None


PAPER = Variant("paper")
OPTION_VARIANTS = (
    Variant("float32 eager", "32-true", {}),
    Variant("tf32", "32-true", {"tf32": True}),
    Variant("bf16-mixed", "bf16-mixed", {}),
    Variant("bf16 + channels_last", "bf16-mixed", {"channels_last": True}),
    Variant("bf16 + compile", "bf16-mixed", {"compile": True}),
)


def speed_callbacks(config: dict) -> list[dict]:
    return [c for c in config["trainer"].get("callbacks") or []
            if c["class_path"].endswith("SpeedOptions")]  # fmt: skip


#: --tiny (a dry run of the code paths, not a measurement): U-Net width and residual blocks per
#: level (heads' hidden widths follow the width), the resolution 64x64 configs run at (CDL's
#: Gaussian reference of 3·64·64 dimensions needs ~20 GB of host memory), training and sampling
#: batch, images per synthetic CIFAR batch file and per image folder, CDL's ITD points per
#: density in the loss, and DG's fake set (samples) and sampler steps (the fake set's sampler
#: and the guided one: DG refuses a mismatch)
TINY_WIDTH, TINY_BLOCKS, TINY_RESOLUTION, TINY_BATCH, TINY_IMAGES = 16, 1, 16, 4, 8
TINY_CDL_POINTS, TINY_FAKE_SAMPLES, TINY_DG_SAMPLER_STEPS = 2, 8, 2
TINY_NOTE = (
    f"tiny dry run (width {TINY_WIDTH}, {TINY_BLOCKS} block per level, batch {TINY_BATCH}, "
    f"{TINY_CDL_POINTS} CDL points, DG fake set of {TINY_FAKE_SAMPLES} with "
    f"{TINY_DG_SAMPLER_STEPS}-step samplers; 64x64 configs at {TINY_RESOLUTION}x{TINY_RESOLUTION}; "
    "speed options only with --option-configs): a check that every config runs, not a measurement"
)


def shrink(config: dict) -> None:
    """Tiny widths and blocks (heads' hidden widths follow), batches and CDL point counts;
    64x64 configs at ``TINY_RESOLUTION`` (DG's discriminator then reads the bottleneck of the
    score U-Net's 4 levels: TINY_RESOLUTION / 8)."""
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    if "cdl_points" in model:  # CDL's loss evaluates the net at 2 x examples x points inputs
        model["cdl_points"] = TINY_CDL_POINTS
    for key in ("net", "discriminator_net"):
        if key in model:
            net = model[key]["init_args"]
            net.update(model_channels=TINY_WIDTH, num_res_blocks=TINY_BLOCKS)
            head = net.get("head", {}).get("init_args", {})
            if "hidden_channels" in head:
                head["hidden_channels"] = 2 * TINY_WIDTH
    for section in (data, data.get("real", {}).get("init_args", {})):
        if "batch_size" in section:
            section["batch_size"] = TINY_BATCH
        if "path" in section:
            section["resolution"] = TINY_RESOLUTION
            if "net" in model:
                model["net"]["init_args"]["image_size"] = TINY_RESOLUTION
            if "discriminator_net" in model:
                side = TINY_RESOLUTION // 8
                model["discriminator_net"]["init_args"].update(
                    image_size=side, attention_resolutions=[side, side // 2]
                )


def prepare(config: dict, data: SyntheticData, args: argparse.Namespace, variant: Variant,
            root: Path, max_steps: int) -> dict:  # fmt: skip
    """The config for a timed run: its model and data (pointed at the synthetic sets; tiny
    widths and batches with --tiny), its trainer's precision / accumulation / clipping /
    SpeedOptions (or the variant's), no loggers / checkpoints / validation / evaluation
    callbacks."""
    config = copy.deepcopy(config)
    old = config["trainer"]
    precision = variant.precision or old.get("precision", "32-true")
    speed = speed_callbacks(config) if variant.options is None else [
        {"class_path": "noisecls.speed.SpeedOptions", "init_args": variant.options}]  # fmt: skip
    config["trainer"] = {
        "accelerator": "gpu" if args.device == "cuda" else "cpu", "devices": 1,
        "max_steps": max_steps, "precision": precision,
        "accumulate_grad_batches": old.get("accumulate_grad_batches", 1),
        "gradient_clip_val": old.get("gradient_clip_val"), "logger": False,
        "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "limit_val_batches": 0, "num_sanity_val_steps": 0,
        "default_root_dir": str(root), "callbacks": speed,
    }  # fmt: skip
    if args.device == "cpu":  # inductor compiles a U-Net for minutes on a CPU: eager there
        for callback in speed:
            callback["init_args"] = {**callback.get("init_args", {}), "compile": False}
    data.point(config["data"])
    data_args = config["data"]["init_args"]
    data_args["num_workers"] = 0 if args.tiny else 4
    for split in ("fake_val_size", "fake_test_size"):  # counts of the real (large) sets
        if split in data_args:
            data_args[split] = 0.1
    if args.tiny:
        shrink(config)
    return config


class ConfigRejectedError(Exception):
    """The CLI refused a config (a row of the table fails instead of the whole check)."""


def build(config: dict, root: Path):
    """(model, datamodule, trainer) of a config dict, through the project's CLI (without its
    SaveConfigCallback: a timed run writes no config.yaml). A config the CLI rejects (it writes
    its one-line error and exits) raises :class:`ConfigRejectedError`."""
    from lightning.pytorch.cli import SaveConfigCallback

    from noisecls.cli import build_cli

    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        cli = build_cli(["--config", str(path), "--wandb", "false"], run=False)
    except SystemExit as err:
        raise ConfigRejectedError(f"the CLI rejected it (exit {err.code}, error above)") from err
    trainer = cli.trainer
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, SaveConfigCallback)]
    return cli.model, cli.datamodule, trainer


# ------------------------------------------------------------------------- measurements
@dataclass
class Row:
    config: str
    steps_per_s: float
    images_per_step: int
    peak_mib: float
    sample_images_per_s: float
    train_hours: float
    fid_hours: float


class StepTimer:
    """Wall-clock of the optimizer steps after the first ``warmup`` ones (a Lightning callback
    built on demand: lightning is imported after torchvision's check is replaced)."""

    def __new__(cls, warmup: int, device: torch.device):
        import lightning as L

        class Timer(L.Callback):
            start: float | None = None
            seconds: float = 0.0

            def on_train_start(self, trainer, pl_module) -> None:
                reset_peak_memory(device)
                if warmup == 0:
                    self.start = time.perf_counter()

            def on_train_batch_end(self, trainer, *_) -> None:
                if self.start is None and trainer.global_step == warmup:
                    synchronize(device)
                    self.start = time.perf_counter()

            def on_train_end(self, trainer, pl_module) -> None:
                synchronize(device)
                self.seconds = time.perf_counter() - self.start

        return Timer()


def training_budget(config: dict, config_path: Path, images_per_step: int) -> int:
    """The paper's optimizer steps: trainer.max_steps, or max_epochs over the real training set
    at the global batch."""
    trainer = config["trainer"]
    if trainer.get("max_steps", -1) > 0:
        return int(trainer["max_steps"])
    per_epoch = math.ceil(TRAIN_SIZES[data_set_of(config_path)] / images_per_step)
    return int(trainer["max_epochs"]) * per_epoch


def global_batch(config: dict) -> int:
    data = config["data"]["init_args"]
    return int(data["batch_size"]) * int(config["trainer"].get("accumulate_grad_batches", 1))


def sampler_steps(config: dict) -> int:
    """The config's sampler steps (the paper sampler's, read from its YAML)."""
    return int(config["model"]["init_args"]["sampler"]["num_steps"])


def time_sampling(module, trainer, n: int, steps: int, device: torch.device,
                  warmup: bool) -> float:  # fmt: skip
    """Seconds per sampler step of a batch of n with the module's sampler cut to ``steps``
    steps (after one warm-up call of one step if ``warmup``), under the trainer's precision
    context (as ``predict`` runs it)."""
    module.eval()
    sampler = module.sampler
    labels = module.predict_labels(torch.arange(n))
    cond = {} if labels is None else {"class_labels": labels}
    generator = torch.Generator(device=device).manual_seed(0)

    def run(k: int) -> None:
        config = dataclasses.replace(sampler, num_steps=k)
        with trainer.precision_plugin.forward_context():
            module.sample(n, generator=generator, sampler=config, **cond)

    if warmup:
        run(1)
    synchronize(device)
    start = time.perf_counter()
    run(steps)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def measure(config_path: Path, config: dict, data: SyntheticData, args: argparse.Namespace,
            variant: Variant) -> Row:  # fmt: skip
    """Train ``--warmup`` + ``--steps`` optimizer steps and sample one batch (see module docs)."""
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        run = prepare(config, data, args, variant, Path(tmp), args.warmup + args.steps)
        model, datamodule, trainer = build(run, Path(tmp))
        timer = StepTimer(args.warmup, device)
        trainer.callbacks.append(timer)
        trainer.fit(model, datamodule)
        per_step = global_batch(run)
        steps_per_s = args.steps / timer.seconds
        peak = peak_memory_mib(device)
        n = TINY_BATCH if args.tiny else 250
        step_seconds = time_sampling(model, trainer, n, args.sample_steps, device, args.warmup > 0)
    sample_rate = n / (step_seconds * sampler_steps(yaml.safe_load(config_path.read_text())))
    budget = training_budget(config, config_path, global_batch(config))
    return Row(config_path.stem, steps_per_s, per_step, peak, sample_rate,
               budget / steps_per_s / 3600, FID_SAMPLES / sample_rate / 3600)  # fmt: skip


# ------------------------------------------------------------------------- DG score runs
def score_config(dg_config: dict) -> dict:
    """The score model DG's config expects (its header): ddm_cifar10.yaml, class-conditional
    for a class-conditional DG, at the DG data set's resolution, on the DG's real data."""
    config = yaml.safe_load((EXPERIMENTS / "ddm_cifar10.yaml").read_text())
    real = dg_config["data"]["init_args"]["real"]
    config["data"] = copy.deepcopy(real)
    model, net = config["model"]["init_args"], config["model"]["init_args"]["net"]["init_args"]
    if dg_config["model"]["init_args"].get("class_conditional"):
        model["class_conditional"] = True
        net["num_classes"] = 10
        config["data"]["init_args"]["use_labels"] = True
    if "CIFAR10" not in real["class_path"]:
        net["image_size"] = 64
    return config


def write_score_run(dg_config: dict, data: SyntheticData, args: argparse.Namespace,
                    root: Path) -> Path:  # fmt: skip
    """Train the score model a few steps, checkpoint it, and write its fake set with DG's
    sampler under root/samples, as ``noisecls predict`` does (as many samples as the training
    split; tiny: ``TINY_FAKE_SAMPLES`` in one batch); returns root (DG's ``score_run``)."""
    from noisecls.callbacks import SampleWriter

    config = prepare(score_config(dg_config), data, args, PAPER, root, 1 if args.tiny else 2)
    model_args = config["model"]["init_args"]
    model_args["sampler"] = dg_config["model"]["init_args"]["sampler"]
    model_args["predict"] = (
        {"num_samples": TINY_FAKE_SAMPLES, "batch_size": TINY_FAKE_SAMPLES}
        if args.tiny
        else {"num_samples": "train", "batch_size": 500}
    )
    model, datamodule, trainer = build(config, root)
    trainer.fit(model, datamodule)
    checkpoint = root / "score.ckpt"
    trainer.save_checkpoint(checkpoint)
    trainer.callbacks.append(SampleWriter(str(root / "samples")))
    trainer.predict(model, datamodule, ckpt_path=str(checkpoint), return_predictions=False)
    return root


def with_score_run(config: dict, config_path: Path, data: SyntheticData,
                   args: argparse.Namespace, root: Path) -> dict:  # fmt: skip
    """DG configs get a fresh score run (tiny: DG's sampler, and so the fake set's, cut to
    ``TINY_DG_SAMPLER_STEPS`` steps; the discriminator reads a tiny score model's bottleneck, so
    its input width follows); other configs are returned unchanged."""
    if "score_run" not in config["model"]["init_args"]:
        return config
    config = copy.deepcopy(config)
    model = config["model"]["init_args"]
    if args.tiny:
        model["sampler"]["num_steps"] = TINY_DG_SAMPLER_STEPS
        model["discriminator_net"]["init_args"]["in_channels"] = TINY_WIDTH * 2
    model["score_run"] = str(write_score_run(config, data, args, root / config_path.stem))
    return config


# ------------------------------------------------------------------------- memory estimate
def saved_bytes(step: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves while step() runs (activations kept for backward,
    including a double backward's first-order graph)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total


def memory_estimate(config_path: Path, data: SyntheticData) -> tuple[int, float, float, int]:
    """(parameters, activation MiB per image, estimated GiB at the config's per-step batch,
    accumulate_grad_batches to fit 80 GB): activations counted on CPU at paper width for
    batches 1 and 2 (float32; the slope is per image), weights + gradients + Adam moments +
    EMA = 20 bytes per parameter. An estimate: allocator fragmentation, cuDNN workspaces and
    bf16 (which roughly halves activations) are not modelled."""
    config = yaml.safe_load(config_path.read_text())
    data.point(config["data"])
    from noisecls.cli import build_cli

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        config["trainer"] = {"logger": False, "enable_progress_bar": False}
        path.write_text(yaml.safe_dump(config))
        module = build_cli(["--config", str(path), "--wandb", "false"], run=False).model
    module.train()
    if hasattr(module, "set_reference"):  # CDL: a standard Gaussian reference (no data pass)
        dims = math.prod(module.data_shape)
        module.set_reference(torch.zeros(dims), torch.eye(dims))
    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    per_batch = []
    for b in (1, 2):
        x0 = torch.rand(b, *module.data_shape) * 2 - 1
        labels = module.class_labels(torch.zeros(b, dtype=torch.long))
        per_batch.append(saved_bytes(lambda x0=x0, labels=labels: module.training_loss(
            x0, labels, torch.Generator().manual_seed(0))))  # fmt: skip
    per_image = per_batch[1] - per_batch[0]
    batch = int(config["data"]["init_args"]["batch_size"])
    total = 20 * params + batch * per_image
    accumulate = max(1, math.ceil(batch * per_image / (0.8 * GIB80 - 20 * params)))
    return params, per_image / 2**20, total / 2**30, accumulate


# ------------------------------------------------------------------------- output
def print_rows(rows: list[Row | str], device: str) -> None:
    print(
        f"\npaper configs on {device}: steps/s and memory at the config's precision, batch and "
        "speed options; sampling at the paper sampler's step count; h = projected hours"
    )
    head = (f"{'config':<22}{'steps/s':>9}{'img/s':>9}{'peak MiB':>10}{'sample img/s':>14}"
            f"{'train h':>10}{'50k FID h':>11}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for row in rows:
        if isinstance(row, str):
            print(row)
            continue
        images_per_s = row.steps_per_s * row.images_per_step
        print(
            f"{row.config:<22}{row.steps_per_s:>9.2f}{images_per_s:>9.1f}{row.peak_mib:>10.0f}"
            f"{row.sample_images_per_s:>14.2f}{row.train_hours:>10.1f}{row.fid_hours:>11.2f}"
        )


def options_table(config_path: Path, data: SyntheticData, args: argparse.Namespace,
                  failures: list[str]) -> None:  # fmt: skip
    """Each option's training steps/s and sampling img/s relative to float32 eager."""
    from noisecls.speed import SpeedOptionsError

    config = yaml.safe_load(config_path.read_text())
    print(f"\nspeed options on {config_path.stem} (ratio to float32 eager)")
    print(f"{'variant':<24}{'steps/s':>9}{'speed-up':>10}{'sample img/s':>14}{'speed-up':>10}")
    base: Row | None = None
    for variant in OPTION_VARIANTS:
        if args.device == "cpu" and (variant.options or {}).get("compile"):
            print(f"{variant.name:<24}skipped on CPU (inductor compiles for minutes)")
            continue
        try:
            row = measure(config_path, config, data, args, variant)
        except SpeedOptionsError as err:
            print(f"{variant.name:<24}refused: {err}")
            continue
        except Exception as err:  # the check reports every failure, then exits 1
            failures.append(f"{config_path.stem} [{variant.name}]: {type(err).__name__}: {err}")
            print(f"{variant.name:<24}FAILED: {type(err).__name__}: {str(err)[:120]}")
            continue
        base = base or row
        train_ratio = row.steps_per_s / base.steps_per_s
        sample_ratio = row.sample_images_per_s / base.sample_images_per_s
        print(
            f"{variant.name:<24}{row.steps_per_s:>9.2f}{train_ratio:>10.2f}"
            f"{row.sample_images_per_s:>14.2f}{sample_ratio:>10.2f}"
        )


def ddp_scaling(args: argparse.Namespace) -> None:
    """2-process DDP steps/s of ddm_cifar10 against 1 process (same per-GPU batch)."""
    rates = {}
    for devices in (1, 2):
        out = subprocess.run(
            [sys.executable, __file__, "--ddp-worker", str(devices), "--steps", str(args.steps),
             "--warmup", str(args.warmup)],
            capture_output=True, text=True,
        )  # fmt: skip
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("DDP_RATE ")]
        if out.returncode != 0 or not lines:
            print(f"DDP with {devices} GPU(s) failed: {out.stderr[-500:]}")
            return
        rates[devices] = float(lines[-1].split()[1])
    print(f"\nDDP ddm_cifar10: 1 GPU {rates[1]:.2f} steps/s, 2 GPUs {rates[2]:.2f} steps/s at the "
          f"same per-GPU batch: {2 * rates[2] / rates[1]:.2f}x images/s (ideal 2)")  # fmt: skip


def ddp_worker(args: argparse.Namespace, devices: int) -> None:
    """One DDP measurement (Lightning re-launches this command for rank 1)."""
    config_path = EXPERIMENTS / "ddm_cifar10.yaml"
    root = Path(tempfile.gettempdir()) / "noisecls_gpu_check_ddp"
    data = SyntheticData(root / "cifar10", root / "celeba", root / "images64")
    if not (root / "cifar10").exists():
        write_cifar(root / "cifar10", 1000)
    config = prepare(yaml.safe_load(config_path.read_text()), data, args, PAPER, root / "run",
                     args.warmup + args.steps)  # fmt: skip
    config["trainer"].update(devices=devices, strategy="ddp" if devices > 1 else "auto")
    (root / "run").mkdir(parents=True, exist_ok=True)
    model, datamodule, trainer = build(config, root / "run")
    timer = StepTimer(args.warmup, torch.device("cuda"))
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule)
    if trainer.global_rank == 0:
        print(f"DDP_RATE {args.steps / timer.seconds}")


def main(argv: list[str] | None = None) -> None:
    """The command line (``argv``: its arguments, default ``sys.argv[1:]``); exits 1 if any run
    failed, else 0."""
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny widths, batches and steps")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (20; tiny 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed first steps (5; tiny 0, and no sampling warm-up)")  # fmt: skip
    p.add_argument("--sample-steps", type=int, default=None, help="timed sampler steps (10; 1)")
    p.add_argument("--configs", nargs="*", help="config stems (default: every paper config)")
    p.add_argument(
        "--option-configs",
        nargs="*",
        default=None,
        help="configs whose speed options are compared (ddm_cifar10; tiny: none)",
    )
    p.add_argument("--memory", action="store_true",
                   help="only the activation-memory estimate at paper width (CPU)")  # fmt: skip
    p.add_argument("--ddp-worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (1 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 5)
    args.sample_steps = args.sample_steps or (1 if args.tiny else 10)
    if args.option_configs is None:
        args.option_configs = [] if args.tiny else ["ddm_cifar10"]
    trust_synthetic_cifar()
    if args.ddp_worker:
        ddp_worker(args, args.ddp_worker)
        return
    configs = [c for c in paper_configs() if not args.configs or c.stem in args.configs]
    failures: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = SyntheticData.write(Path(tmp) / "data", tiny=args.tiny or args.memory)
        if args.memory:
            print(f"{'config':<22}{'params':>12}{'MiB/img':>9}{'est. GiB':>10}{'accumulate':>11}")
            for path in configs:
                if "score_run" in yaml.safe_load(path.read_text())["model"]["init_args"]:
                    print(f"{path.stem:<22}n/a: the discriminator reads a trained score run")
                    continue
                params, per_image, gib, accumulate = memory_estimate(path, data)
                print(f"{path.stem:<22}{params:>12,}{per_image:>9.1f}{gib:>10.1f}{accumulate:>11}")
            return
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 eager is the reference
        rows: list[Row | str] = []
        for path in configs:
            try:
                config = with_score_run(yaml.safe_load(path.read_text()), path, data, args,
                                        Path(tmp) / "score_runs")  # fmt: skip
                rows.append(measure(path, config, data, args, PAPER))
            except Exception as err:  # reported; exit status 1 at the end
                traceback.print_exc()
                failures.append(f"{path.stem}: {type(err).__name__}: {err}")
                rows.append(f"{path.stem:<22}FAILED: {type(err).__name__}")
        name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
        print_rows(rows, name)
        if args.tiny:
            print(TINY_NOTE)
        for stem in args.option_configs:
            options_table(EXPERIMENTS / f"{stem}.yaml", data, args, failures)
    if args.device == "cuda" and torch.cuda.device_count() >= 2:
        ddp_scaling(args)
    print(f"\n{len(configs)} configs in {time.perf_counter() - start:.0f} s; "
          f"{len(failures)} failed")  # fmt: skip
    for failure in failures:
        print(f"FAILED {failure}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
