"""`noisecls compare`: results.json files of several runs -> one table, a CSV and plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from noisecls.compare import (
    denoising_figure,
    fid_vs_nfe_figure,
    load_runs,
    main,
    markdown_table,
    nll_figure,
    wide_csv,
    write_all,
)
from noisecls.errors import NoiseclsError


def record(metric: str, value: float, **fields: object) -> dict:
    """One record as ResultsWriter writes it (MetricRecord fields)."""
    base = {"metric": metric, "value": value, "samples": None, "sampler": None, "nfe": None,
            "seconds": None, "per_rank_samples": None, "stage": "test", "epoch": 3,
            "step": 400}  # fmt: skip
    return base | fields


def write_run(directory: Path, model: str, records: list[dict]) -> Path:
    path = directory / "lightning_logs" / "version_1" / "results.json"
    path.parent.mkdir(parents=True)
    payload = {"checkpoint": "last.ckpt", "checkpoint_step": 400, "model": model,
               "world_size": 1, "records": records}  # fmt: skip
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    ddm = write_run(tmp_path / "ddm", "noisecls.methods.ddm.DDM", [
        record("test/fid", 40.5, samples=1000, sampler="ddim(50)", nfe=50),
        record("test/kid", 2.0e4, samples=1000, sampler="ddim(50)", nfe=50),
        record("test/kid_std", 3.0e3),
        record("test/nll_bpd", 2.51, samples=360, sampler="ode(hutchinson,32)", nfe=64),
        record("test/denoise_mse/sigma=0.1", 0.005, nfe=1),
        record("test/denoise_mse/sigma=1", 0.12, nfe=1),
        record("test/loss", 0.03),
    ])  # fmt: skip
    cdm = write_run(tmp_path / "cdm", "noisecls.methods.cdm.CDM", [
        record("test/fid", 55.25, samples=1000, sampler="ddim(25)", nfe=25),
        record("test/cdm_nll_bpd", 2.9, samples=360, sampler="cdm", nfe=1),
        record("test/cdm_nll_bpd_paper", 2.7, samples=360),
        record("test/denoise_mse/sigma=0.1", 0.006, nfe=1),
        record("test/denoise_mse/sigma=1", 0.13, nfe=1),
        record("test/denoise_mse_x1.5/sigma=1", 0.3, nfe=1),
    ])  # fmt: skip
    return [ddm.parents[2], cdm.parents[2]]


def test_table_has_one_row_per_run_with_its_numbers(two_runs: list[Path]) -> None:
    runs = load_runs(two_runs)
    assert [r.label for r in runs] == ["ddm", "cdm"] and [r.method for r in runs] == ["DDM", "CDM"]
    lines = markdown_table(runs).splitlines()
    assert lines[0] == ("| run | method | step | sampler | NFE | FID | KID "
                        "| cdm_nll_bpd (bits/dim) | cdm_nll_bpd_paper (bits/dim) "
                        "| nll_bpd (bits/dim) |")  # fmt: skip
    assert lines[2] == ("| ddm | DDM | 400 | ddim(50) | 50 | 40.5 | 2e+04 ± 3e+03 |  |  "
                        "| 2.51 (ode(hutchinson,32), NFE 64) |")  # fmt: skip
    assert lines[3] == "| cdm | CDM | 400 | ddim(25) | 25 | 55.25 |  | 2.9 (cdm, NFE 1) | 2.7 |  |"
    assert "KID" in lines[-1] and "feature space" in lines[-1]
    rows = list(csv.DictReader(io.StringIO(wide_csv(runs))))
    assert len(rows) == 2
    assert float(rows[0]["test/loss"]) == 0.03 and rows[1]["test/loss"] == ""
    assert (
        rows[1]["test/fid NFE"] == "25" and rows[0]["test/nll_bpd sampler"] == "ode(hutchinson,32)"
    )


def test_plots_show_the_runs_numbers(two_runs: list[Path]) -> None:
    runs = load_runs(two_runs)
    ax = fid_vs_nfe_figure(runs).axes[0]
    points = sorted(tuple(c.get_offsets()[0]) for c in ax.collections)
    assert points == [(25.0, 55.25), (50.0, 40.5)]
    lines = {
        line.get_label(): line.get_xydata().tolist()
        for line in denoising_figure(runs).axes[0].lines
    }
    assert lines == {"ddm": [[0.1, 0.005], [1.0, 0.12]], "cdm": [[0.1, 0.006], [1.0, 0.13]],
                     "cdm (denoise_mse_x1.5)": [[1.0, 0.3]]}  # fmt: skip
    bars = nll_figure(runs).axes[0].containers
    assert [[p.get_height() for p in c] for c in bars] == [[2.51], [2.9, 2.7]]


def test_outputs_are_written_and_several_results_in_one_directory_are_rows(
    two_runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    second = two_runs[0] / "lightning_logs" / "version_2" / "results.json"
    second.parent.mkdir()
    second.write_text((two_runs[0] / "lightning_logs/version_1/results.json").read_text())
    assert main([*map(str, two_runs), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "| ddm/lightning_logs/version_1 | DDM |" in printed
    assert "| ddm/lightning_logs/version_2 | DDM |" in printed
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["compare.csv", "compare.md", "denoise_mse.png", "fid_vs_nfe.png", "nll.png"]
    assert (tmp_path / "out" / "fid_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(NoiseclsError, match=r"holds no results\.json; run `noisecls test"):
        load_runs([tmp_path])
    with pytest.raises(NoiseclsError, match="does not exist"):
        load_runs([tmp_path / "nowhere"])
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(NoiseclsError, match=r"is not a results\.json"):
        load_runs([tmp_path / "results.json"])


@pytest.mark.slow
def test_wandb_table_offline(two_runs: list[Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    write_all(load_runs(two_runs), tmp_path / "out")
    assert main([*map(str, two_runs), "--out", str(tmp_path / "out"), "--wandb"]) == 0
    (run_file,) = (tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.stat().st_size > 0
    tables = list(
        (tmp_path / "out" / "wandb").glob("offline-run-*/files/media/table/compare/*.json")
    )
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert [row[0] for row in table["data"]] == ["ddm", "cdm"]
