"""evaluate: every selected method answers the test split through the generation engine (greedy) -> report.

Scoring is DESIGN.md section 4 (leaml_ray/scoring.py). Writes report.json, report.md, plots/ and
predictions.parquet (every answer, for error analysis). The report's `precondition` (diagnostics.py) puts the
labeled-only target (`full`) and the QA generator side by side on the unlabeled images' hidden questions.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from leaml_ray import dashboard, diagnostics, storage
from leaml_ray.config import Config
from leaml_ray.data import examples
from leaml_ray.inference.offline import generate
from leaml_ray.models.registry import ModelSpec, spec_for
from leaml_ray.pipeline import Stage, StageContext, StageError
from leaml_ray.placement import engine_keys, engine_settings, engine_unhashed_keys
from leaml_ray.report import build_report, render_markdown, write_plots
from leaml_ray.scoring import accuracy, is_correct
from leaml_ray.stages.finetune import methods_to_train
from leaml_ray.zoo import resolve

log = logging.getLogger("leaml_ray")


def evaluate_model(
    prepared: str, spec: ModelSpec, path: str, cfg: Config, name: str, questions: pa.Table | None = None
) -> tuple[dict[str, Any], pa.Table]:
    """Accuracy of one model folder on the `eval.split` (test, or val when choosing settings) of a prepared run
    (or on `questions`), and its predictions."""
    split = cfg.eval.split
    test = (
        questions if questions is not None else examples.read_table(storage.join(prepared, "qa.parquet"), split=split)
    )
    if test.num_rows == 0:
        hint = "; synthetic data: set data.val_images" if split == "val" else ""
        raise StageError(f"{prepared}: the {split} split is empty{hint}")
    asked = examples.answer_examples(test).append_column("qa_id", test["qa_id"])
    rows = examples.with_images(storage.join(prepared, "images.parquet"), asked.drop_columns(["response"]))
    sampling = {"temperature": 0.0, "max_tokens": cfg.eval.max_new_tokens}
    settings = engine_settings(cfg, "target")
    out = generate(rows, spec, path, sampling, settings, keep=("qa_id",)).select_columns(["qa_id", "text"])
    answers = {r["qa_id"]: r["text"].strip() for r in out.iter_rows()}
    records = []
    for r in test.to_pylist():
        prediction = answers.get(r["qa_id"])
        records.append(
            {
                "method": name,
                "qa_id": r["qa_id"],
                "category": r["category"],
                "answer": r["answer"],
                "prediction": prediction,
                "correct": prediction is not None and is_correct(prediction, r["answer"], r["choices"]),
            }
        )
    missing = sum(r["prediction"] is None for r in records)
    if missing:
        raise StageError(f"evaluate {name}: {missing} test questions got no answer from the engine")
    dashboard.count("answers_generated", len(records), cfg.run.dir, "evaluate")
    return {**accuracy(records), "model": path}, pa.Table.from_pylist(records)


def evaluate_stage(ctx: StageContext) -> dict[str, Any]:
    """Run the evaluate stage (see the module docstring)."""
    cfg = ctx.cfg
    trained = set(methods_to_train(cfg))
    spec = spec_for(cfg, "target")
    methods, predictions, elapsed = {}, [], {}
    for method in cfg.eval.methods:
        t0 = time.perf_counter()
        path = ctx.input(f"target/{method}") if method in trained else resolve(cfg.target.model)
        metrics, preds = evaluate_model(ctx.input("prepared"), spec, path, cfg, method)
        metrics["model"] = f"target/{method}" if method in trained else cfg.target.model
        methods[method] = metrics
        predictions.append(preds)
        elapsed[f"evaluate:{method}"] = time.perf_counter() - t0
        log.info("evaluate %s: accuracy %.3f (macro over categories), n=%d", method, metrics["accuracy"], metrics["n"])
    report = build_report(ctx.run_dir, methods, elapsed)
    report["precondition"] = precondition(ctx, spec, trained)
    storage.write_json_atomic(ctx.output("report.json"), report)
    storage.write_bytes_atomic(ctx.output("report.md"), render_markdown(report).encode())
    write_plots(ctx.run_dir, ctx.output("plots"), methods)
    fs, p = storage.resolve(ctx.output("predictions.parquet"))
    pq.write_table(pa.concat_tables(predictions), p, filesystem=fs)
    print(method_table(methods))
    return {m: round(v["accuracy"], 4) for m, v in methods.items()}


def precondition(ctx: StageContext, spec: ModelSpec, trained: set[str]) -> dict[str, Any]:
    """Accuracy on the unlabeled images' hidden questions of the labeled-only target (`full`, when trained) and of
    the generator (from pseudo_qa's diagnostics): LEAML can help only when the generator is ahead."""
    out: dict[str, Any] = {}
    hidden_path = storage.join(ctx.input("prepared"), "hidden", "unlabeled_qa.parquet")
    if "full" in trained and storage.exists(hidden_path):
        hidden = diagnostics.hidden_sample(examples.read_table(hidden_path), ctx.cfg.run.seed)
        if hidden.num_rows:
            metrics, _ = evaluate_model(ctx.input("prepared"), spec, ctx.input("target/full"), ctx.cfg, "full", hidden)
            out.update(labeled_only=metrics["accuracy"], labeled_only_per_category=metrics["per_category"])
    if "leaml" in ctx.cfg.eval.methods:
        found = storage.read_json(ctx.input("pseudo_qa_diagnostics.json")).get("precondition", {})
        out.update({k: v for k, v in found.items() if k.startswith("generator")})
    if "generator" in out and "labeled_only" in out:
        log.info(
            "precondition: generator %.1f%% vs labeled-only target %.1f%% on the unlabeled images' hidden questions",
            100 * out["generator"],
            100 * out["labeled_only"],
        )
    return out


def method_table(methods: dict[str, dict]) -> str:
    """The methods x accuracy table printed at the end of a run."""
    rows = [f"{'method':<12} {'accuracy':>9} {'n':>6}"]
    for name, m in sorted(methods.items(), key=lambda kv: -kv[1]["accuracy"]):
        rows.append(f"{name:<12} {100 * m['accuracy']:>8.1f}% {m['n']:>6}")
    return "\n".join(rows)


def evaluate_inputs(cfg: Config) -> tuple[str, ...]:
    trained = tuple(f"target/{m}" for m in methods_to_train(cfg))
    diagnosed = ("pseudo_qa_diagnostics.json",) if "leaml" in cfg.eval.methods else ()
    return ("prepared", *trained, *diagnosed)


EVALUATE = Stage(
    name="evaluate",
    run=evaluate_stage,
    inputs=evaluate_inputs,
    outputs=("report.json", "report.md", "plots", "predictions.parquet"),
    # what changes the answers: the target's weights and how it is prompted (not where its engine runs)
    config_keys=("eval", *engine_keys("target")),
    unhashed_keys=engine_unhashed_keys("target"),
)
