"""The label-efficiency bench's bookkeeping: the JSON contract, the --quick merge, the table and the plot
(the pipeline runs it drives are the stages' own tests)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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


def test_precondition_and_diagnostics_are_means_over_seeds_next_to_the_methods(bench, tmp_path):
    seeds = {
        "leaml": [0.4, 0.6],
        "full": [0.5, 0.5],
        "precondition": [{"generator": 0.5, "labeled_only": 0.4}, {"generator": 0.7, "labeled_only": 0.4}],
        "diagnostics": [{"pair_precision": 0.6, "absent_share": 0.2}, {"pair_precision": 0.8}],
    }
    cells = bench.summarise({0.01: seeds})
    row = cells["0.01"]
    assert list(row) == ["full", "leaml", "precondition", "diagnostics"]
    assert row["precondition"] == {"generator": pytest.approx(0.6), "labeled_only": pytest.approx(0.4)}
    assert row["diagnostics"] == {"absent_share": pytest.approx(0.2), "pair_precision": pytest.approx(0.7)}
    table = bench.merge(None, cells, "2 seeds", 10)
    bench.write_results(table)
    md = (tmp_path / "label_efficiency.md").read_text()
    assert "| 1% | 60.0 | 40.0 | - | 70.0 | 20.0 |" in md
    assert (tmp_path / "label_efficiency.png").exists()


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


def test_world_3_has_the_papers_proportions_and_its_priors_are_the_recorded_ones():
    """bench/world.py (issue 30): 1% is >= 40 images and >= 300 pairs, >= 2,000 test questions, >= 6 categories;
    the chance and blind figures in bench/results/world.json are what the code measures (seed 0 agrees with the
    recorded 3-seed means within a seed's spread)."""
    spec = importlib.util.spec_from_file_location("world", ROOT / "bench" / "world.py")
    world = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(world)
    got = world.measure(seeds=1)
    assert got["labeled"]["0.01"]["images"] >= 40 and got["labeled"]["0.01"]["pairs"] >= 300
    assert got["test_questions"] >= 2000 and got["categories"] >= 6
    assert 0 < got["chance"]["0.01"] < got["blind"]["0.1"] < 0.5  # priors: far from what a model should reach
    recorded = json.loads((ROOT / "bench" / "results" / "world.json").read_text())
    assert recorded["labeled"] == got["labeled"] and recorded["test_questions"] == got["test_questions"]
    for key in ("chance", "blind"):
        assert all(abs(recorded[key][r] - got[key][r]) < 0.03 for r in got[key]), (key, recorded[key], got[key])
    # the zoo's figures are those of the world-3 recipe in code (a recipe change means measuring again)
    from leaml_ray.models import zoo as lookup

    assert recorded["zoo_recipe_key"] == lookup.recipe_key(lookup.WORLD3_RECIPES), "rerun bench/world.py --zoo"
    params = recorded["params"]
    assert params["teacher"] > params["generator"] > 3 * params["target"]  # the generator ~4x the target
    for role in ("teacher", "generator", "target"):
        assert set(recorded[f"{role}_zero_shot"]) == set(got["category_names"]), role
