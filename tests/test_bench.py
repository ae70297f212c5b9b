"""The label-efficiency bench's bookkeeping: the JSON contract, the --quick merge, the table and the plot
(the pipeline runs it drives are the stages' own tests)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("label_efficiency", ROOT / "bench" / "label_efficiency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    return module


def test_cells_hold_mean_std_and_runs_per_ratio_and_method(bench):
    cells = bench.summarise({0.01: {"leaml": [0.3, 0.5], "zero_shot": [0.2, 0.2]}, 1.0: {"full": [0.9]}})
    assert list(cells) == ["0.01", "1"]
    assert list(cells["0.01"]) == ["zero_shot", "leaml"]  # the table's method order
    assert cells["0.01"]["leaml"]["mean"] == pytest.approx(0.4)
    assert cells["0.01"]["leaml"]["std"] == pytest.approx(0.1414, abs=1e-4)  # sample standard deviation
    assert cells["0.01"]["leaml"]["runs"] == [0.3, 0.5]
    assert cells["1"]["full"] == {"mean": 0.9, "std": 0.0, "runs": [0.9]}


def test_a_partial_run_replaces_only_the_cells_it_measured_and_writes_all_three_files(bench, tmp_path):
    first = {0.01: {"leaml": [0.1, 0.2], "full": [0.5, 0.5]}, 0.05: {"leaml": [0.3, 0.4]}}
    full = bench.merge(None, bench.summarise(first), "3 seeds", 60)
    quick = bench.merge(full, bench.summarise({0.01: {"leaml": [0.9]}}), "1 seed", 30)
    assert quick["ratios"]["0.01"]["leaml"]["runs"] == [0.9]
    assert quick["ratios"]["0.01"]["full"] == full["ratios"]["0.01"]["full"]
    assert list(quick["ratios"]["0.01"]) == ["full", "leaml"]  # the table's method order
    assert quick["ratios"]["0.05"] == full["ratios"]["0.05"]
    variant = bench.merge(quick, bench.summarise({0.01: {"leaml_caption_filter": [0.7]}}), "variant", 10)
    assert set(variant["ratios"]["0.01"]) == {"full", "leaml", "leaml_caption_filter"}
    bench.write_results(quick)
    table = json.loads((tmp_path / "label_efficiency.json").read_text())
    for row in table["ratios"].values():
        for cell in row.values():
            assert set(cell) == {"mean", "std", "runs"} and all(0 <= v <= 1 for v in cell["runs"])
    md = (tmp_path / "label_efficiency.md").read_text()
    assert "| 1% | 50.0 ± 0.0 (2) | 90.0 ± 0.0 (1) |" in md and "| 5% | - | 35.0 ± 7.1 (2) |" in md
    assert (tmp_path / "label_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
