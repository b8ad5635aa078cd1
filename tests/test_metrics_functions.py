"""noisecls.metrics: FID / KID over feature arrays against an independent computation (scipy's
matrix square root, MMD written out), over image folders and .npz shards written here, and the
``noisecls fid`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from noisecls.callbacks.features import FlattenFeatures
from noisecls.callbacks.samples import save_png
from noisecls.metrics import (
    FeatureStatistics,
    fid_between,
    fid_command,
    fid_from_features,
    kid_from_features,
    load_batches,
)


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def _mmd2(a: np.ndarray, b: np.ndarray) -> float:
    d = a.shape[1]
    kxx, kyy, kxy = ((u @ v.T / d + 1) ** 3 for u, v in ((a, a), (b, b), (a, b)))
    m = len(a)
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def _features(seed: int, n: int = 300, d: int = 8, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.double() + shift


def test_fid_and_kid_of_feature_arrays_match_an_independent_computation():
    a, b = _features(0), _features(1, n=250, shift=0.3)
    assert fid_from_features(a, b) == pytest.approx(_frechet(a.numpy(), b.numpy()), rel=1e-9)
    assert abs(fid_from_features(a, a)) < 1e-9
    # statistics accumulate batch by batch exactly as all at once
    stats = FeatureStatistics.empty(8)
    for chunk in a.split(70):
        stats.update(chunk)
    assert torch.allclose(stats.covariance(), torch.cov(a.T), atol=1e-12)
    # KID with one subset of everything is the MMD of the two sets, with zero spread
    kid, std = kid_from_features(a[:250], b, subsets=3, subset_size=250)
    assert kid == pytest.approx(_mmd2(a[:250].numpy(), b.numpy()), rel=1e-9) and std < 1e-12
    g = torch.Generator().manual_seed(0)
    kid_same, std_same = kid_from_features(a[:150], a[150:], subsets=20, subset_size=100,
                                           generator=g)  # fmt: skip
    assert abs(kid_same) < 3 * std_same < kid  # unbiased: zero within its spread


def _write_images(folder: Path, images: torch.Tensor) -> None:
    folder.mkdir()
    for i, image in enumerate(images):
        save_png(image, folder / f"{i:04d}.png")


def _uint8_images(seed: int, n: int, shift: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 200, (n, 3, 6, 6), generator=g) + shift).to(torch.uint8)


def test_fid_between_folders_and_shards(tmp_path: Path):
    a, b = _uint8_images(0, 40), _uint8_images(1, 30, shift=40)
    _write_images(tmp_path / "a", a)
    _write_images(tmp_path / "b", b)
    # the same images as noisecls predict shards (float in [-1, 1]) and as an ADM-style npz
    shards = tmp_path / "shards"
    shards.mkdir()
    scaled = a.float() / 127.5 - 1
    np.savez(shards / "samples_00000000-00000024.npz", samples=scaled[:25].numpy())
    np.savez(shards / "samples_00000025-00000039.npz", samples=scaled[25:].numpy())
    np.savez(tmp_path / "adm.npz", arr_0=a.permute(0, 2, 3, 1).numpy())

    loaded = torch.cat(list(load_batches(tmp_path / "a", batch_size=16)))
    assert torch.equal(loaded, scaled)  # PNG round trip, [-1, 1], channels first
    assert torch.allclose(torch.cat(list(load_batches(shards, batch_size=16))), scaled)
    flat = FlattenFeatures()
    expected = _frechet(flat(scaled).double().numpy(), flat(b.float() / 127.5 - 1).double().numpy())
    for source in ("a", "shards", "adm.npz"):
        result = fid_between(tmp_path / source, tmp_path / "b", flat, kid=True, kid_subsets=5,
                             kid_subset_size=20, batch_size=16)  # fmt: skip
        assert result["num_a"] == 40 and result["num_b"] == 30
        assert result["fid"] == pytest.approx(expected, rel=1e-6)
        assert result["kid"] > 0 and result["extractor"] == flat.identity()
    assert abs(fid_between(tmp_path / "a", shards, flat)["fid"]) < 1e-6
    assert fid_between(tmp_path / "a", tmp_path / "b", flat, limit=10)["num_a"] == 10


def test_fid_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    _write_images(tmp_path / "a", _uint8_images(0, 20))
    _write_images(tmp_path / "b", _uint8_images(1, 20, shift=40))
    assert fid_command([str(tmp_path / "a"), str(tmp_path / "b"), "--extractor", "flatten",
                        "--kid", "--kid-subset-size", "10", "--json"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    direct = fid_between(tmp_path / "a", tmp_path / "b", FlattenFeatures(), kid=True,
                         kid_subset_size=10)  # fmt: skip
    assert printed == pytest.approx(direct)
    assert fid_command([str(tmp_path / "a"), str(tmp_path / "a"), "--extractor", "flatten"]) == 0
    assert capsys.readouterr().out.startswith("FID ")
    # a missing folder, a folder without images, missing Inception weights: one line, status 1
    (tmp_path / "empty").mkdir()
    for argv in ([str(tmp_path / "nowhere"), str(tmp_path / "a"), "--extractor", "flatten"],
                 [str(tmp_path / "empty"), str(tmp_path / "a"), "--extractor", "flatten"],
                 [str(tmp_path / "a"), str(tmp_path / "b"), "--weights-path",
                  str(tmp_path / "no.pth")]):  # fmt: skip
        assert fid_command(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("noisecls fid: error:") and err.count("\n") == 1
