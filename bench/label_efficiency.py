"""Label efficiency: LEAML vs the labeled-only baselines and the generator ablations, end to end, real pipeline.

For each seed and label ratio, one run dir `<root>/seed<S>/ratio<R>` runs the pipeline (jobs/adapt.py's
`run_pipeline`, one local Ray instance for the whole bench):
  - methods leaml, lora, full; zero_shot once per seed (the test split depends on the seed only, so the zero-shot
    model answers the same questions at every ratio: its figure is copied to the other ratios);
  - the ablations at `--ablation-ratios` (default: 1%, the paper's setting), on the same run dir with
    `eval.methods=[leaml]` and generator.caption_distill=false (leaml_no_caption), generator.score=all
    (leaml_all_neurons), generator.score=random (leaml_random_neurons): the manifest reuses prepare and caption,
    only generator, pseudo_qa, finetune and evaluate run again;
  - ratio 1.0 is the upper bound: lora and full on every label (no unlabeled images are left to caption), each
    labeled pair seen `target.epochs` times (labeled_upsample 1).
Writes bench/results/label_efficiency.{json,md,png}: mean, standard deviation and the runs of every cell.
`--quick`: seed 0 at 1% only; it rewrites the 1% cell of an existing table and keeps the rest.
key=value overrides pass through to every run, e.g. `data.source=jsonl data.path=my.jsonl`.
Last line: {"ratios": {...}, "seconds": f}.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leaml_ray import plots, storage  # noqa: E402
from leaml_ray.config import load_config  # noqa: E402
from leaml_ray.pipeline import run_pipeline  # noqa: E402
from leaml_ray.runtime import connect, setup_logging  # noqa: E402
from leaml_ray.stages import ALL_STAGES  # noqa: E402

log = logging.getLogger("leaml_ray")
RESULTS = Path(__file__).parent / "results"
ABLATIONS = {
    "leaml_no_caption": ["generator.caption_distill=false"],
    "leaml_all_neurons": ["generator.score=all"],
    "leaml_random_neurons": ["generator.score=random"],
}
METHOD_ORDER = ["zero_shot", "lora", "full", "leaml", *ABLATIONS]
# The paper's headline (Kvasir-VQA, 1% labels, accuracy %), quoted next to ours in the README and the .md.
PAPER_1PCT = {"lora": 62.4, "full": 63.1, "leaml": 76.7}


def run_methods(config: str | None, overrides: list[str], methods: list[str], stages: list[str] | None = None) -> dict:
    """Run the pipeline with these overrides and eval.methods; accuracy per method from its report.json."""
    cfg = load_config(config, [*overrides, f"eval.methods={json.dumps(methods)}"])
    t0 = time.perf_counter()
    run_pipeline(cfg, ALL_STAGES, stages, before_first_run=lambda: connect(cfg.cluster))
    report = storage.read_json(storage.join(cfg.run.dir, "report.json"))
    log.info("bench %s: %s in %.0f s", cfg.run.dir, methods, time.perf_counter() - t0)
    return {m: report["methods"][m]["accuracy"] for m in methods}


def one_seed(
    config: str | None, root: str, seed: int, ratios: list[float], ablation_ratios: set[float], extra: list[str]
):
    """Every (ratio, method) accuracy of one seed."""
    out: dict[float, dict[str, float]] = {}
    zero_shot = None
    for ratio in ratios:
        base = [f"run.dir={root}/seed{seed}/ratio{ratio:g}", f"run.seed={seed}", f"data.label_ratio={ratio}", *extra]
        if ratio >= 1.0:
            methods, stages = ["lora", "full"], ["prepare", "finetune", "evaluate"]
            base.append("target.labeled_upsample=1")
        else:
            methods, stages = ["leaml", "lora", "full"], None
        if zero_shot is None:
            methods.append("zero_shot")
        acc = run_methods(config, base, methods, stages)
        zero_shot = acc.get("zero_shot", zero_shot)
        acc["zero_shot"] = zero_shot
        if ratio in ablation_ratios:
            for name, knobs in ABLATIONS.items():
                acc[name] = run_methods(config, [*base, *knobs], ["leaml"])["leaml"]
        out[ratio] = acc
    return out


def summarise(runs: dict[float, dict[str, list[float]]]) -> dict[str, dict]:
    """{ratio: {method: {mean, std, runs}}} with string ratio keys (the JSON contract)."""
    cells = {}
    for ratio, methods in sorted(runs.items()):
        cells[f"{ratio:g}"] = {
            m: {
                "mean": statistics.fmean(v),
                "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                "runs": v,
            }
            for m, v in sorted(methods.items(), key=lambda kv: METHOD_ORDER.index(kv[0]))
        }
    return cells


def markdown(table: dict) -> str:
    """The results table: accuracy % mean ± std (n runs) per label ratio and method, the paper's 1% row below."""
    cells = table["ratios"]
    methods = [m for m in METHOD_ORDER if any(m in row for row in cells.values())]
    lines = [
        "| label ratio | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for ratio in sorted(cells, key=float):
        row = cells[ratio]
        values = [
            f"{100 * row[m]['mean']:.1f} ± {100 * row[m]['std']:.1f} ({len(row[m]['runs'])})" if m in row else "-"
            for m in methods
        ]
        lines.append(f"| {100 * float(ratio):g}% | " + " | ".join(values) + " |")
    paper = [f"{PAPER_1PCT[m]:.1f}" if m in PAPER_1PCT else "-" for m in methods]
    lines.append("| paper, Kvasir-VQA 1% | " + " | ".join(paper) + " |")
    lines += ["", f"Macro accuracy (%) on the test split, mean ± standard deviation (runs); {table['note']}", ""]
    return "\n".join(lines)


def merge(previous: dict | None, cells: dict[str, dict], scope: str, seconds: float) -> dict:
    """The results table: these cells over the previous table's (a --quick run replaces only its own cell)."""
    table = previous or {"ratios": {}}
    ratios = {**table["ratios"], **cells}
    table["ratios"] = dict(sorted(ratios.items(), key=lambda kv: float(kv[0])))
    table["runs"] = {**table.get("runs", {}), **{r: {"scope": scope, "seconds": round(seconds)} for r in cells}}
    table["note"] = f"last run: {scope}, {seconds / 60:.1f} min"
    return table


def write_results(table: dict) -> None:
    """bench/results/label_efficiency.{json,md,png}, each written to a temp name and renamed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    storage.write_json_atomic(str(RESULTS / "label_efficiency.json"), table)
    storage.write_bytes_atomic(str(RESULTS / "label_efficiency.md"), markdown(table).encode())
    storage.write_bytes_atomic(str(RESULTS / "label_efficiency.png"), plots.label_efficiency(table["ratios"]))


def main(argv: list[str] | None = None) -> int:
    """Run the bench; prints the table and, last, the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="preset or YAML (default: the embedded tiny-cpu preset)")
    parser.add_argument("--quick", action="store_true", help="seed 0 at 1%% only; rewrites the 1%% cell")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ratios", default="0.01,0.05,0.1,1.0")
    parser.add_argument("--ablation-ratios", default="0.01", help="ratios that also run the three ablations")
    parser.add_argument("--root", default="runs/label_efficiency", help="parent of the run dirs")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every run")
    args = parser.parse_args(argv)
    setup_logging("INFO")
    seeds = [0] if args.quick else list(range(args.seeds))
    ratios = [0.01] if args.quick else [float(r) for r in args.ratios.split(",")]
    ablation_ratios = {float(r) for r in args.ablation_ratios.split(",") if r}
    t0 = time.perf_counter()
    runs: dict[float, dict[str, list[float]]] = {}
    for seed in seeds:
        for ratio, acc in one_seed(args.config, args.root, seed, ratios, ablation_ratios, args.overrides).items():
            for method, value in acc.items():
                runs.setdefault(ratio, {}).setdefault(method, []).append(value)
    seconds = time.perf_counter() - t0
    cells = summarise(runs)
    path = RESULTS / "label_efficiency.json"
    previous = json.loads(path.read_text()) if args.quick and path.exists() else None
    scope = f"{len(seeds)} seed(s), ratios {', '.join(cells)}, overrides {args.overrides or 'none'}"
    table = merge(previous, cells, scope, seconds)
    write_results(table)
    print(markdown(table))
    print(json.dumps({"ratios": cells, "seconds": round(seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
