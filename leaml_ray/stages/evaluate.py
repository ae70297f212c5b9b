"""evaluate: every selected method answers the test split through the generation engine (greedy) -> report.

Scoring: docs/design.md#scoring (leaml_ray/scoring.py). Writes report.json, report.md, plots/ and
predictions.parquet (every answer, for error analysis). The report's `precondition` (diagnostics.py) puts the
labeled-only target (`full`) and the QA generator side by side on the unlabeled images' hidden questions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from leaml_ray import dashboard, diagnostics, storage
from leaml_ray.config import Config
from leaml_ray.data import examples
from leaml_ray.inference.generate import generate
from leaml_ray.models.spec import Engine
from leaml_ray.pipeline import Stage, StageContext, StageError
from leaml_ray.report import build_report, render_markdown, write_plots
from leaml_ray.scoring import accuracy, is_correct
from leaml_ray.stages.common import engine, methods_to_train

log = logging.getLogger("leaml_ray")


@dataclass(frozen=True)
class EvaluatePlan:
    """What evaluate needs: the methods, the target's engine (each trained method loads its own folder), the split
    and the answer length."""

    methods: tuple[str, ...]
    target: Engine
    split: str  # "test" | "val" (choosing settings)
    max_new_tokens: int
    seed: int  # which hidden questions the precondition samples

    @property
    def trained(self) -> tuple[str, ...]:
        return methods_to_train(self.methods)


def plan(cfg: Config) -> EvaluatePlan:
    """The evaluate stage's plan."""
    e = cfg.eval
    return EvaluatePlan(tuple(e.methods), engine(cfg, "target"), e.split, e.max_new_tokens, cfg.run.seed)


def evaluate_model(
    prepared: str,
    target: Engine,
    split: str,
    max_new_tokens: int,
    name: str,
    run_dir: str,
    questions: pa.Table | None = None,
) -> tuple[dict[str, Any], pa.Table]:
    """Accuracy of one model (`target`'s engine) on the `split` (test, or val when choosing settings) of a prepared
    run (or on `questions`), and its predictions."""
    test = (
        questions if questions is not None else examples.read_table(storage.join(prepared, "qa.parquet"), split=split)
    )
    if test.num_rows == 0:
        hint = "; synthetic data: set data.val_images" if split == "val" else ""
        raise StageError(f"{prepared}: the {split} split is empty{hint}")
    asked = examples.answer_examples(test).append_column("qa_id", test["qa_id"])
    rows = examples.with_images(storage.join(prepared, "images.parquet"), asked.drop_columns(["response"]))
    sampling = {"temperature": 0.0, "max_tokens": max_new_tokens}
    out = generate(rows, target, sampling, keep=("qa_id",)).select_columns(["qa_id", "text"])
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
    dashboard.count("answers_generated", len(records), run_dir, "evaluate")
    return {**accuracy(records), "model": target.spec.model}, pa.Table.from_pylist(records)


def run(plan: EvaluatePlan, ctx: StageContext) -> dict[str, Any]:
    """Run the evaluate stage (see the module docstring)."""
    methods, predictions, elapsed = {}, [], {}
    for method in plan.methods:
        t0 = time.perf_counter()
        trained = method in plan.trained
        target = plan.target.at(ctx.input(f"target/{method}")) if trained else plan.target
        metrics, preds = evaluate_model(
            ctx.input("prepared"), target, plan.split, plan.max_new_tokens, method, ctx.run_dir
        )
        metrics["model"] = f"target/{method}" if trained else plan.target.spec.model
        methods[method] = metrics
        predictions.append(preds)
        elapsed[f"evaluate:{method}"] = time.perf_counter() - t0
        log.info("evaluate %s: accuracy %.3f (macro over categories), n=%d", method, metrics["accuracy"], metrics["n"])
    report = build_report(ctx.run_dir, methods, elapsed)
    report["precondition"] = precondition(ctx, plan)
    storage.write_json_atomic(ctx.output("report.json"), report)
    storage.write_bytes_atomic(ctx.output("report.md"), render_markdown(report).encode())
    write_plots(ctx.run_dir, ctx.output("plots"), methods)
    fs, p = storage.filesystem(ctx.output("predictions.parquet"))
    pq.write_table(pa.concat_tables(predictions), p, filesystem=fs)
    print(method_table(methods))
    return {m: round(v["accuracy"], 4) for m, v in methods.items()}


def precondition(ctx: StageContext, plan: EvaluatePlan) -> dict[str, Any]:
    """Accuracy on the unlabeled images' hidden questions of the labeled-only target (`full`, when trained) and of
    the generator (from pseudo_qa's diagnostics): LEAML can help only when the generator is ahead."""
    out: dict[str, Any] = {}
    hidden_path = storage.join(ctx.input("prepared"), "hidden", "unlabeled_qa.parquet")
    if "full" in plan.trained and storage.exists(hidden_path):
        hidden = diagnostics.hidden_sample(examples.read_table(hidden_path), plan.seed)
        if hidden.num_rows:
            full = plan.target.at(ctx.input("target/full"))
            metrics, _ = evaluate_model(
                ctx.input("prepared"), full, plan.split, plan.max_new_tokens, "full", ctx.run_dir, hidden
            )
            out.update(labeled_only=metrics["accuracy"], labeled_only_per_category=metrics["per_category"])
    if "leaml" in plan.methods:
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


def evaluate_inputs(plan: EvaluatePlan) -> tuple[str, ...]:
    """The trained targets, and pseudo_qa's diagnostics (the generator's precondition) when leaml runs."""
    trained = tuple(f"target/{m}" for m in plan.trained)
    diagnosed = ("pseudo_qa_diagnostics.json",) if "leaml" in plan.methods else ()
    return ("prepared", *trained, *diagnosed)


EVALUATE = Stage(
    name="evaluate",
    plan=plan,
    run=run,
    inputs=evaluate_inputs,
    outputs=("report.json", "report.md", "plots", "predictions.parquet"),
)
