"""Label efficiency: LEAML vs the labeled-only baselines and the generator ablations, end to end, real pipeline.

For each seed and label ratio, one run dir `<root>/seed<S>/ratio<R>` runs the pipeline (jobs/adapt.py's
`run_pipeline`, one local Ray instance for the whole bench):
  - methods leaml, lora, full; zero_shot once per seed (the test split depends on the seed only, so the zero-shot
    model answers the same questions at every ratio: its figure is copied to the other ratios);
  - at `--variant-ratios` (default 1%, the paper's setting) the `--variants`: leaml with one thing changed, on the
    same run dir with `eval.methods=[leaml]`, so the manifest reuses prepare and caption and only generator,
    pseudo_qa, finetune and evaluate run again. Default: the paper's ablations leaml_no_caption
    (generator.caption_distill=false), leaml_full_distill (generator.distill_scope=full: the caption gradient on
    every parameter, no selection), leaml_all_neurons (generator.score=all: every neuron in scope),
    leaml_random_neurons (generator.score=random); also known: leaml_generated_questions (the paper's pseudo QA:
    the generator writes the question too, answers sampled), leaml_sampled_answers, leaml_caption_filter;
  - ratio 1.0 is the upper bound: lora and full on every label (no unlabeled images are left to caption), under
    the same mixing rule as the other rows (the labeled pairs repeated `target.labeled_upsample` times);
  - the mixing factor of each method at 5% and 10% is the one it did best with on the validation split (`MIXING`);
    the other ratios were not measured there and keep the default. An override of target.labeled_upsample wins.
Writes bench/results/<name>.{json,md,png} (default name label_efficiency): mean, standard deviation and the runs of
every cell; per ratio also `precondition` (the generator's and the labeled-only target's accuracy on the unlabeled
images' hidden questions) and `diagnostics` (leaml's caption fidelity and kept-pair precision), means over seeds.
A full run starts the table afresh; `--quick` (seed 0 at 1%), `--variants-only` and `--merge` replace only the
cells they measure and keep the rest.
key=value overrides pass through to every run, e.g. `data.source=jsonl data.path=my.jsonl --name my_data`.
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
from leaml_ray.stages import pipeline_stages  # noqa: E402

log = logging.getLogger("leaml_ray")
RESULTS = Path(__file__).parent / "results"
# leaml with one thing changed, each on the same run dir as the baselines (prepare and caption reused)
VARIANTS = {
    "leaml_no_caption": ["generator.caption_distill=false"],
    # the caption gradient on every parameter (the default, chosen on validation): equal to leaml,
    # so its cell is leaml's (no second run)
    "leaml_full_distill": ["generator.distill_scope=full"],
    # the paper's selective neurons: the top 10% LM MLP neurons by QA-gradient score
    "leaml_selective": ["generator.distill_scope=lm_mlp"],
    "leaml_all_neurons": ["generator.distill_scope=lm_mlp", "generator.score=all"],
    "leaml_random_neurons": ["generator.distill_scope=lm_mlp", "generator.score=random"],
    # the paper's pseudo QA: the generator writes the question too, answers sampled
    "leaml_generated_questions": ["pseudo_qa.questions=generated", "pseudo_qa.answer_decoding=sampled"],
    "leaml_sampled_answers": ["pseudo_qa.answer_decoding=sampled"],
    "leaml_caption_filter": ["pseudo_qa.consistency_filter=caption"],
    # the mixing factor: labeled pairs repeated 16x instead of 4x next to ~1,000 pseudo pairs
    "leaml_labeled_x16": ["target.labeled_upsample=16"],
    # candidates for the defaults, compared on the validation split (eval.split=val, data.val_images)
    "leaml_all_mlp": ["generator.distill_scope=all_mlp"],
    "leaml_lm_mlp_pmi_confident": [
        "generator.distill_scope=lm_mlp",
        "pseudo_qa.min_question_pmi=-1.0",
        "pseudo_qa.min_answer_confidence=0.5",
    ],
    "leaml_pmi": ["pseudo_qa.min_question_pmi=-1.0"],
    "leaml_confident": ["pseudo_qa.min_answer_confidence=0.5"],
    "leaml_pmi_confident": ["pseudo_qa.min_question_pmi=-1.0", "pseudo_qa.min_answer_confidence=0.5"],
    "leaml_qa_x3": ["generator.epochs=120"],  # 3x the passes over the labeled pairs
}
# Each method's better labeled-pair factor (4x or 16x) on the validation split, 2 seeds x 150 images
# (bench/results/validation_v3{,_x16}.md, session 13); chosen by the rule written down before those runs.
MIXING = {
    0.05: "target.labeled_upsample={leaml: 4, lora: 16, full: 4}",
    0.1: "target.labeled_upsample={leaml: 16, lora: 16, full: 4}",
}
ABLATIONS = ["leaml_no_caption", "leaml_full_distill", "leaml_selective", "leaml_all_neurons", "leaml_random_neurons"]
METHOD_ORDER = ["zero_shot", "lora", "full", "leaml", *VARIANTS]
# The paper's headline (Kvasir-VQA, 1% labels, accuracy %), quoted next to ours in the README and the .md.
PAPER_1PCT = {"lora": 62.4, "full": 63.1, "leaml": 76.7}


DIAGNOSTICS = {  # name -> (section, key) of pseudo_qa_diagnostics.json
    "caption_fidelity": ("caption_fidelity", "share_of_teacher"),
    "caption_f1_vs_teacher": ("caption_fidelity", "generator_vs_teacher"),
    "pair_precision": ("pairs", "precision"),
    "absent_share": ("pairs", "absent_share"),
}


def run_methods(
    config: str | None, overrides: list[str], methods: list[str], stages: list[str] | None = None
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Run the pipeline with these overrides and eval.methods; accuracy per method from its report.json, and
    the run's precondition and leaml diagnostics."""
    cfg = load_config(config, [*overrides, f"eval.methods={json.dumps(methods)}"])
    t0 = time.perf_counter()
    run_pipeline(cfg, pipeline_stages(cfg), stages, before_first_run=lambda: connect(cfg.cluster))
    report = storage.read_json(storage.join(cfg.run.dir, "report.json"))
    log.info("bench %s: %s in %.0f s", cfg.run.dir, methods, time.perf_counter() - t0)
    extras: dict[str, dict[str, float]] = {}
    found = report.get("precondition", {})
    extras["precondition"] = {k: found[k] for k in ("generator", "labeled_only") if k in found}
    if "leaml" in methods:
        diag = storage.read_json(storage.join(cfg.run.dir, "pseudo_qa_diagnostics.json"))
        values = {name: diag.get(section, {}).get(key) for name, (section, key) in DIAGNOSTICS.items()}
        extras["diagnostics"] = {k: v for k, v in values.items() if v is not None}
    return {m: report["methods"][m]["accuracy"] for m in methods}, extras


def one_seed(
    config: str | None,
    root: str,
    seed: int,
    ratios: list[float],
    variants: list[str],
    variant_ratios: set[float],
    extra: list[str],
    baselines: bool = True,
) -> dict[float, dict[str, float]]:
    """Every (ratio, method) accuracy of one seed."""
    out: dict[float, dict] = {}
    zero_shot = None
    for ratio in ratios:
        base = [f"run.dir={root}/seed{seed}/ratio{ratio:g}", f"run.seed={seed}", f"data.label_ratio={ratio}"]
        base += [*([MIXING[ratio]] if ratio in MIXING else []), *extra]
        acc: dict[str, float] = {}
        if baselines:
            if ratio >= 1.0:
                methods, stages = ["lora", "full"], ["prepare", "finetune", "evaluate"]
            else:
                methods, stages = ["leaml", "lora", "full"], None
            if zero_shot is None:
                methods.append("zero_shot")
            acc, extras = run_methods(config, base, methods, stages)
            zero_shot = acc.get("zero_shot", zero_shot)
            acc["zero_shot"] = zero_shot
            acc.update(extras)
        if ratio in variant_ratios and ratio < 1.0:
            for name in variants:
                if "leaml" in acc and load_config(config, [*base, *VARIANTS[name]]) == load_config(config, base):
                    acc[name] = acc["leaml"]  # the default configuration: leaml's run is this variant's run
                    continue
                acc[name] = run_methods(config, [*base, *VARIANTS[name]], ["leaml"])[0]["leaml"]
        out[ratio] = acc
    return out


EXTRAS = ("precondition", "diagnostics")  # per-ratio entries that are not methods


def _order(key: str) -> int:
    return METHOD_ORDER.index(key) if key in METHOD_ORDER else len(METHOD_ORDER) + EXTRAS.index(key)


def summarise(runs: dict[float, dict[str, list]]) -> dict[str, dict]:
    """{ratio: {method: {mean, std, runs}, "precondition": {...}, "diagnostics": {...}}} with string ratio keys
    (the JSON contract); the extras are means over seeds."""
    cells = {}
    for ratio, methods in sorted(runs.items()):
        row: dict[str, dict] = {}
        for m, v in sorted(methods.items(), key=lambda kv: _order(kv[0])):
            if m in EXTRAS:
                names = sorted({k for seed in v for k in seed})
                row[m] = {k: statistics.fmean(seed[k] for seed in v if k in seed) for k in names}
            else:
                row[m] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v}
        cells[f"{ratio:g}"] = row
    return cells


def markdown(table: dict) -> str:
    """The results table: accuracy % mean ± std (n runs) per label ratio and method, the paper's 1% row below."""
    cells = table["ratios"]
    methods = [m for m in METHOD_ORDER if any(m in row for row in cells.values())]
    extra = [
        f"| {100 * float(r):g}% | "
        + " | ".join(
            f"{100 * row[e][k]:.1f}" if k in row.get(e, {}) else "-"
            for e, k in (
                ("precondition", "generator"),
                ("precondition", "labeled_only"),
                ("diagnostics", "caption_fidelity"),
                ("diagnostics", "pair_precision"),
                ("diagnostics", "absent_share"),
            )
        )
        + " |"
        for r, row in sorted(cells.items(), key=lambda kv: float(kv[0]))
        if set(EXTRAS) & set(row)
    ]
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
    split = "validation" if "eval.split=val" in table["note"] else "test"
    lines += ["", f"Macro accuracy (%) on the {split} split, mean ± standard deviation (runs); {table['note']}", ""]
    if extra:
        lines += [
            "| label ratio | generator on hidden questions | labeled-only target on them | caption fidelity"
            " (share of teacher's) | kept-pair precision | kept pairs asking about something absent |",
            "|---|---|---|---|---|---|",
            *extra,
            "",
            "Diagnostics (%), means over seeds (leaml's default configuration).",
            "",
        ]
    return "\n".join(lines)


def merge(previous: dict | None, cells: dict[str, dict], scope: str, seconds: float) -> dict:
    """The results table: these (ratio, method) cells over the previous table's; the rest is kept."""
    table = json.loads(json.dumps(previous)) if previous else {"ratios": {}}  # a copy: the caller's stays as it was
    ratios = {r: dict(row) for r, row in table["ratios"].items()}
    for ratio, row in cells.items():
        ratios.setdefault(ratio, {}).update(row)
    table["ratios"] = {
        r: dict(sorted(row.items(), key=lambda kv: _order(kv[0])))
        for r, row in sorted(ratios.items(), key=lambda kv: float(kv[0]))
    }
    runs = table.setdefault("runs", {})
    for ratio, row in cells.items():
        runs.setdefault(ratio, {})[",".join(row)] = {"scope": scope, "seconds": round(seconds)}
    table["note"] = f"last run: {scope}, {seconds / 60:.1f} min"
    return table


def write_results(table: dict, name: str = "label_efficiency") -> None:
    """bench/results/<name>.{json,md,png}, each written to a temp name and renamed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    storage.write_json_atomic(str(RESULTS / f"{name}.json"), table)
    storage.write_bytes_atomic(str(RESULTS / f"{name}.md"), markdown(table).encode())
    storage.write_bytes_atomic(str(RESULTS / f"{name}.png"), plots.label_efficiency(table["ratios"]))


def main(argv: list[str] | None = None) -> int:
    """Run the bench; prints the table and, last, the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="preset or YAML (default: the embedded tiny-cpu preset)")
    parser.add_argument("--quick", action="store_true", help="seed 0 at 1%% only; rewrites the 1%% cell")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ratios", default="0.01,0.05,0.1,1.0")
    parser.add_argument("--variants", default=",".join(ABLATIONS), help="of: " + ", ".join(VARIANTS))
    parser.add_argument("--variant-ratios", default="0.01", help="ratios that also run the variants")
    parser.add_argument("--variants-only", action="store_true", help="skip the baselines and leaml")
    parser.add_argument("--merge", action="store_true", help="replace only the cells measured, keep the rest")
    parser.add_argument("--root", default="runs/label_efficiency", help="parent of the run dirs")
    parser.add_argument("--name", default="label_efficiency", help="results file name under bench/results/")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every run")
    args = parser.parse_args(argv)
    setup_logging("INFO")
    seeds = [0] if args.quick else list(range(args.seeds))
    ratios = [0.01] if args.quick else [float(r) for r in args.ratios.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    variant_ratios = {float(r) for r in args.variant_ratios.split(",") if r}
    t0 = time.perf_counter()
    path = RESULTS / f"{args.name}.json"
    partial = args.quick or args.variants_only or args.merge
    previous = json.loads(path.read_text()) if partial and path.exists() else None
    runs: dict[float, dict[str, list[float]]] = {}
    for done, seed in enumerate(seeds, 1):
        per_ratio = one_seed(
            args.config, args.root, seed, ratios, variants, variant_ratios, args.overrides, not args.variants_only
        )
        for ratio, acc in per_ratio.items():
            for method, value in acc.items():
                runs.setdefault(ratio, {}).setdefault(method, []).append(value)
        # written after every seed: a run cut short keeps the seeds it finished (its run dirs resume the rest)
        seconds = time.perf_counter() - t0
        cells = summarise(runs)
        seeds_done = f"{done} seed(s)" + ("" if done == len(seeds) else f" of {len(seeds)}")
        scope = f"{seeds_done}, ratios {', '.join(cells)}, overrides {args.overrides or 'none'}"
        table = merge(previous, cells, scope, seconds)
        write_results(table, args.name)
    print(markdown(table))
    print(json.dumps({"ratios": cells, "seconds": round(seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
