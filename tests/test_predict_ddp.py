"""`noisecls predict` as DG's fake-data generator: exactly N samples, each seed once, the same on
one process and on two CPU DDP processes (gloo), resumable without rewriting a finished file,
optionally as a PNG folder that RealFakeDataModule reads like the .npz shards.

The CLI runs share one module-scoped fixture: a tiny digits DDM (experiments/ddm_digits.yaml
shrunk) trained for a few steps, then predict runs with the deterministic DDIM sampler (eta=0).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from noisecls.callbacks.samples import SampleWriter, _RankBatches
from noisecls.data import DigitsDataModule
from noisecls.data.base import DatasetNotFoundError
from noisecls.data.fake import RealFakeDataModule, load_fake_samples
from noisecls.errors import NoiseclsError
from noisecls.methods.base import PredictConfig
from noisecls.methods.ddm import DDM
from noisecls.nets import ResidualMLP, UNet
from noisecls.process.schedules import DiscreteSchedule
from noisecls.samplers import SamplerConfig

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "ddm_digits.yaml"
BATCH = 8  # predict batch size of the CLI runs
TIMEOUT = 240  # a hung DDP rank fails the test instead of stalling the suite


def noisecls(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "noisecls.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip


def tiny_digits_config(path: Path) -> Path:
    """experiments/ddm_digits.yaml with an 8-channel U-Net, 10 DDIM steps (eta = 0:
    deterministic) and no evaluation callbacks."""
    config = yaml.safe_load(DIGITS.read_text())
    net = config["model"]["init_args"]["net"]["init_args"]
    net.update(model_channels=8, attention_resolutions=[])
    config["model"]["init_args"]["sampler"] = {"name": "ddim", "num_steps": 10, "eta": 0.0}
    config["trainer"].update(
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True}}],
    )  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def shards(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every samples_*.npz under out, by file name."""
    result = {}
    for f in sorted(out.glob("samples_*.npz")):
        with np.load(f) as data:
            result[f.name] = {k: data[k] for k in data.files}
    return result


def by_seed(out: Path) -> dict[int, dict[str, np.ndarray]]:
    """Per seed: its sample, uint8 image [H, W, C] and shard; asserts each seed appears once."""
    seeds: dict[int, dict] = {}
    for name, data in shards(out).items():
        for i, seed in enumerate(data["seeds"].tolist()):
            assert seed not in seeds, f"seed {seed} in {seeds[seed]['file']} and {name}"
            seeds[seed] = {"sample": data["samples"][i], "image": data["images"][i], "file": name}
    return seeds


def stats(paths: list[Path]) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of each file: changes when a file is rewritten or replaced."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cwd = tmp_path_factory.mktemp("predict_ddp")
    config = str(tiny_digits_config(cwd / "tiny.yaml"))
    fit = noisecls("fit", "--config", config, "--trainer.max_steps", "5", cwd=cwd)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = next((cwd / "runs").rglob("last.ckpt"))

    def predict(out: str, n: int, ddp: bool, *extra: str) -> subprocess.CompletedProcess:
        args = ["predict", "--config", config, "--ckpt_path", str(ckpt),
                "--model.init_args.predict.num_samples", str(n),
                "--model.init_args.predict.batch_size", str(BATCH),
                "--trainer.callbacks+=noisecls.callbacks.SampleWriter",
                f"--trainer.callbacks.output_dir={out}", "--trainer.callbacks.image_folder=true",
                "--trainer.default_root_dir", f"logs/{out}", *extra]  # fmt: skip
        if ddp:
            args += ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
        return noisecls(*args, cwd=cwd)

    one = predict("one", 50, ddp=False)
    assert one.returncode == 0, one.stderr[-3000:]
    two = predict("two", 40, ddp=True)
    assert two.returncode == 0, two.stderr[-3000:]

    # an interrupted run: two batches' shards missing (one of each rank; their PNGs were
    # written, one even lost), a temporary file of a killed write, then 10 more samples asked
    shutil.copytree(cwd / "two", cwd / "three")
    three = cwd / "three"
    for name in ("samples_00000008-00000015.npz", "samples_00000016-00000023.npz"):
        (three / name).unlink()
    (three / "images" / "00000009.png").unlink()
    (three / ".samples_00000008-00000015.npz.4242.tmp").write_bytes(b"half-written")
    kept = sorted(three.glob("samples_*.npz")) + [
        three / "images" / f"{s:08d}.png" for s in [*range(8), *range(24, 40)]
    ]
    before = stats(kept)
    resumed = predict("three", 50, ddp=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after_resume = stats(kept)
    resumed_shards = shards(three)

    # one seed left: fewer batches than ranks (rank 1 gets none)
    everything = sorted(p for p in three.rglob("*") if p.is_file() and p.name != "grid.png")
    before_last = stats(everything)
    last = predict("three", 51, ddp=True)
    assert last.returncode == 0, last.stderr[-3000:]

    # another run (another sampler) into two/: refused on both ranks, nothing touched
    two_files = sorted(p for p in (cwd / "two").rglob("*") if p.is_file())
    two_stats = stats(two_files)
    other = predict("two", 40, True, "--model.init_args.sampler.num_steps", "5")
    return {
        "cwd": cwd, "resumed_shards": resumed_shards, "before": before,
        "after_resume": after_resume, "before_last": before_last, "everything": everything,
        "other": other, "two_stats": two_stats, "two_files": two_files,
    }  # fmt: skip


def test_ddp_writes_every_seed_once_as_one_process_does(runs: dict) -> None:
    one, two = runs["cwd"] / "one", runs["cwd"] / "two"
    single, ddp = by_seed(one), by_seed(two)
    assert sorted(single) == list(range(50)) and sorted(ddp) == list(range(40))
    names = [f"samples_{a:08d}-{a + BATCH - 1:08d}.npz" for a in range(0, 40, BATCH)]
    assert sorted(shards(two)) == names  # the single process's batches and names
    assert sorted(shards(one)) == [*names, "samples_00000040-00000047.npz",
                                   "samples_00000048-00000049.npz"]  # fmt: skip
    # both ranks sampled: batch j by rank j % 2
    assert [int(d["rank"]) for d in shards(two).values()] == [0, 1, 0, 1, 0]
    assert {int(d["rank"]) for d in shards(one).values()} == {0}
    for seed in range(40):
        np.testing.assert_allclose(ddp[seed]["sample"], single[seed]["sample"], atol=1e-5)
        np.testing.assert_array_equal(ddp[seed]["image"], single[seed]["image"])
    # distinct seeds give distinct samples (x_T of sample i from seed i)
    x = np.stack([single[s]["sample"] for s in range(50)]).reshape(50, -1)
    assert np.abs(x[:, None] - x[None]).max(-1)[~np.eye(50, dtype=bool)].min() > 1e-3
    # the DataModule side: N samples in seed order
    fake, labels = load_fake_samples([str(two)])
    assert fake.shape == (40, 1, 8, 8) and not labels.any()
    torch.testing.assert_close(fake[7].numpy(), single[7]["sample"], atol=1e-5, rtol=0)
    assert (two / "manifest.json").is_file() and (two / "grid.png").is_file()
    assert not [p for p in two.rglob(".*") if p.is_file()]  # no temporary file left


def test_resume_samples_only_missing_seeds_and_rewrites_nothing(runs: dict) -> None:
    three = runs["cwd"] / "three"
    assert runs["after_resume"] == runs["before"]  # same inode and mtime: never rewritten
    old = {Path(p).name for p in runs["before"] if p.endswith(".npz")}
    new = {name: int(d["rank"]) for name, d in runs["resumed_shards"].items() if name not in old}
    # missing: 8..23 (deleted shards) and 40..49, batched in order, batch j to rank j % 2
    assert new == {
        "samples_00000008-00000015.npz": 0, "samples_00000016-00000023.npz": 1,
        "samples_00000040-00000047.npz": 0, "samples_00000048-00000049.npz": 1,
    }  # fmt: skip
    single = by_seed(runs["cwd"] / "one")
    resumed = by_seed(three)
    assert sorted(resumed) == list(range(51))
    for seed in range(50):  # the uninterrupted single-process samples
        np.testing.assert_allclose(resumed[seed]["sample"], single[seed]["sample"], atol=1e-5)
    # the killed write's temporary file is ignored (and left alone)
    assert (three / ".samples_00000008-00000015.npz.4242.tmp").read_bytes() == b"half-written"
    assert load_fake_samples([str(three)])[0].shape == (51, 1, 8, 8)


def test_resume_with_fewer_remaining_batches_than_ranks(runs: dict) -> None:
    three = runs["cwd"] / "three"
    assert stats(runs["everything"]) == runs["before_last"]
    added = sorted(set(shards(three)) - {Path(p).name for p in runs["before_last"]})
    assert added == ["samples_00000050-00000050.npz"]
    assert int(shards(three)[added[0]]["rank"]) == 0  # rank 1 had nothing to do and waited
    assert sorted(by_seed(three)) == list(range(51))


def test_image_folder_pngs_are_the_npz_images(runs: dict) -> None:
    for run, n in (("one", 50), ("two", 40), ("three", 51)):
        out = runs["cwd"] / run
        seeds = by_seed(out)
        files = sorted(p.name for p in (out / "images").iterdir())
        assert files == [f"{s:08d}.png" for s in range(n)], run  # no temporary file either
        for seed, entry in seeds.items():
            np.testing.assert_array_equal(png(out / "images" / f"{seed:08d}.png"), entry["image"])
            # the uint8 image is the clamped sample rounded to 1/127.5
            expected = np.round((np.clip(entry["sample"], -1, 1) + 1) * 127.5).transpose(1, 2, 0)
            np.testing.assert_array_equal(entry["image"], expected.astype(np.uint8))


def test_real_fake_datamodule_reads_the_png_folder_like_the_npz(runs: dict) -> None:
    one = runs["cwd"] / "one"
    kwargs = {"batch_size": 32, "fake_val_size": 5, "fake_test_size": 5}
    from_npz = RealFakeDataModule(DigitsDataModule(), str(one), **kwargs)
    from_png = RealFakeDataModule(DigitsDataModule(), str(one / "images"), **kwargs)
    from_npz.setup("fit")
    from_png.setup("fit")
    for split in ("train", "val", "test"):
        a, b = from_npz.fake_sets[split], from_png.fake_sets[split]
        assert a.x.shape == b.x.shape and b.x.dtype == torch.float32
        # the same samples in the same order, up to the 8-bit quantisation (half a step)
        assert float((b.x - a.x.clamp(-1, 1)).abs().max()) <= 1 / 255 + 1e-6
        assert not b.y.any()
    assert len(from_png.train_set) == len(from_npz.train_set)
    x, y = next(iter(from_png.val_dataloader()))
    assert x.shape[1:] == (1, 8, 8) and y.shape[1] == 3


def test_another_runs_directory_is_refused_on_every_rank(runs: dict) -> None:
    other = runs["other"]  # returned (no hang) with a one-line error
    assert other.returncode == 1, other.stderr[-2000:]
    errors = [line for line in other.stderr.splitlines() if line.startswith("noisecls: error:")]
    assert errors and all("different run" in e and "sampler" in e for e in errors), errors
    assert stats(runs["two_files"]) == runs["two_stats"]


# --------------------------------------------------------------------- in-process checks
@pytest.mark.parametrize(("n", "batch", "ranks"), [(50, 8, 2), (41, 8, 2), (7, 8, 3), (30, 4, 3)])
def test_rank_batches_give_each_rank_whole_batches(n: int, batch: int, ranks: int) -> None:
    dataset = list(range(n))
    shares = [list(_RankBatches(dataset, batch, ranks, r)) for r in range(ranks)]
    assert sorted(i for s in shares for i in s) == dataset  # each item once
    batches = [dataset[i : i + batch] for i in range(0, n, batch)]  # one process's batches
    for r, share in enumerate(shares):
        assert share == [i for b in batches[r::ranks] for i in b]
        assert len(_RankBatches(dataset, batch, ranks, r)) == len(share)


def tiny_image_model(n: int, batch: int) -> DDM:
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2),
               num_res_blocks=1, attention_resolutions=(), dropout=0.0)  # fmt: skip
    predict = PredictConfig(num_samples=n, batch_size=batch)
    return DDM(net, DiscreteSchedule("linear"), sampler=SamplerConfig("ddim", 3),
               data_shape=(1, 8, 8), predict=predict)  # fmt: skip


def trainer(root: Path, writer: SampleWriter) -> L.Trainer:
    return L.Trainer(accelerator="cpu", default_root_dir=str(root), logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     inference_mode=False, callbacks=[writer])  # fmt: skip


def test_interrupted_batch_is_redone_and_pngs_are_backfilled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that dies between a batch's PNGs and its shard leaves no shard (and no temporary
    file): resume redoes exactly that batch. Resuming with image_folder over shards written
    without it writes the missing PNGs from the shards, rewriting no shard."""
    model, out = tiny_image_model(12, 4), tmp_path / "out"
    savez, calls = np.savez, []

    def dies_on_second(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")  # mid-write, after the batch's PNGs
        savez(*args, **kwargs)

    monkeypatch.setattr(np, "savez", dies_on_second)
    with pytest.raises(OSError, match="No space"):
        trainer(tmp_path, SampleWriter(str(out), grid_size=0, image_folder=True)).predict(
            model, return_predictions=False
        )
    monkeypatch.setattr(np, "savez", savez)
    assert sorted(shards(out)) == ["samples_00000000-00000003.npz"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{s:08d}.png" for s in range(8)]
    assert not [p for p in out.rglob(".*") if p.is_file()]
    first = stats([out / "samples_00000000-00000003.npz"])
    writer = SampleWriter(str(out), grid_size=0, image_folder=True)
    trainer(tmp_path, writer).predict(model, return_predictions=False)
    assert writer.skipped_seeds == set(range(4)) and len(writer.written) == 2
    assert stats([out / "samples_00000000-00000003.npz"]) == first
    seeds = by_seed(out)
    assert sorted(seeds) == list(range(12))
    for seed, entry in seeds.items():
        np.testing.assert_array_equal(png(out / "images" / f"{seed:08d}.png"), entry["image"])

    # shards without PNGs (image_folder off), then a run with it on: PNGs from the shards
    plain = tmp_path / "plain"
    trainer(tmp_path, SampleWriter(str(plain), grid_size=0)).predict(
        model, return_predictions=False
    )
    assert not (plain / "images").exists()
    before = stats(sorted(plain.glob("samples_*.npz")))
    writer = SampleWriter(str(plain), grid_size=0, image_folder=True)
    trainer(tmp_path, writer).predict(model, return_predictions=False)
    assert not writer.written and stats(sorted(plain.glob("samples_*.npz"))) == before
    for seed, entry in by_seed(plain).items():
        np.testing.assert_array_equal(png(plain / "images" / f"{seed:08d}.png"), entry["image"])
        np.testing.assert_array_equal(entry["image"], seeds[seed]["image"])  # same model


def test_image_folder_is_refused_for_vector_data(tmp_path: Path) -> None:
    model = DDM(ResidualMLP(dim=2, hidden=8, num_blocks=1), DiscreteSchedule("linear"),
                sampler=SamplerConfig("ddim", 2), data_shape=(2,))  # fmt: skip
    writer = SampleWriter(str(tmp_path / "out"), grid_size=0, image_folder=True)
    with pytest.raises(NoiseclsError, match=r"image_folder.*shape \[2\]"):
        trainer(tmp_path, writer).predict(model, return_predictions=False)
    assert not list((tmp_path / "out").glob("samples_*"))


def test_png_folders_load_with_clear_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"no samples_\*\.npz shards and no \*\.png"):
        load_fake_samples([str(empty)])
    with pytest.raises(DatasetNotFoundError, match="no samples"):
        RealFakeDataModule(DigitsDataModule(), str(empty)).setup("fit")
    # RGB and palette PNGs (as another tool may write them), sorted by file name
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(rgb / f"{2 - i:06d}.png")
    Image.fromarray(pixels[0]).convert("P").save(rgb / "000003.png")
    x, labels = load_fake_samples([str(rgb)])
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and not labels.any()
    expected = torch.from_numpy(pixels[::-1].copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(x[:3], expected, atol=1e-6, rtol=0)
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    # RGB fakes for grayscale digits: the existing shape check, one line
    with pytest.raises(NoiseclsError, match=r"shape \[3, 8, 8\] but the real data \[1, 8, 8\]"):
        RealFakeDataModule(DigitsDataModule(), str(rgb)).setup("fit")
    Image.fromarray(pixels[0, :4]).save(rgb / "000004.png")  # another size
    with pytest.raises(NoiseclsError, match=r"000004\.png is 8x4 .* one size and mode"):
        load_fake_samples([str(rgb)])
    wide = tmp_path / "wide"
    wide.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint16)).save(wide / "0.png")
    with pytest.raises(NoiseclsError, match="8-bit"):
        load_fake_samples([str(wide)])


@pytest.mark.slow
def test_dg_guided_predict_on_two_processes_equals_one(tmp_path: Path) -> None:
    """The whole DG toy pipeline through the CLI (ddm_toy fit, predict the fake set, dg_toy fit),
    then guided sampling (input gradients of the discriminator at every Heun stage) on 2 CPU DDP
    processes: the same files as one process, bit for bit (measured max difference 0.0)."""
    quiet = ["--trainer.enable_progress_bar", "false"]
    ddm, dg = str(ROOT / "experiments" / "ddm_toy.yaml"), str(ROOT / "experiments" / "dg_toy.yaml")

    def run(*args: str) -> None:
        done = noisecls(*args, *quiet, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]

    run("fit", "--config", ddm, "--trainer.max_steps", "300")
    (score,) = (tmp_path / "runs" / "ddm_toy").rglob("last.ckpt")
    run("predict", "--config", ddm, "--ckpt_path", str(score),
        "--model.init_args.predict.num_samples", "train",
        "--model.init_args.predict.batch_size", "2000")  # fmt: skip
    common = ["--config", dg, "--model.init_args.score_run", "runs/ddm_toy"]
    run("fit", *common, "--trainer.max_steps", "300")
    (disc,) = (tmp_path / "runs" / "dg_toy").rglob("last.ckpt")
    guided = [*common, "--ckpt_path", str(disc), "--model.init_args.predict.num_samples", "600",
              "--model.init_args.predict.batch_size", "100",
              "--trainer.callbacks+=noisecls.callbacks.SampleWriter"]  # fmt: skip
    run("predict", *guided, "--trainer.callbacks.output_dir", "one")
    run("predict", *guided, "--trainer.callbacks.output_dir", "two", "--trainer.strategy", "ddp",
        "--trainer.devices", "2")  # fmt: skip
    one, two = shards(tmp_path / "one"), shards(tmp_path / "two")
    assert list(one) == list(two) and len(one) == 6
    assert {int(d["rank"]) for d in two.values()} == {0, 1}
    for name in one:
        np.testing.assert_array_equal(one[name]["samples"], two[name]["samples"])
