"""finetune:<method>: the target model trained per method on the shared train loop -> target/<method>/ (HF folder).

- leaml: labeled pairs (repeated `labeled_upsample` times) + pseudo QA, `target.finetune` (full or LoRA);
- lora / full: the paper's labeled-only baselines, given leaml's number of training samples at their own mixing
  factor (the labeled pairs cycled): at one shared factor every method gets the same compute, and a per-method
  factor (`target.labeled_upsample={leaml: 16, lora: 16, full: 4}`) tunes each like an epoch count;
- zero_shot trains nothing (evaluate uses the base model).
One stage per method (`finetune_stages`), each with its own manifest entry, so adding a method trains only that one;
`--force finetune` / `--stages finetune` name them all.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from leaml_ray import storage
from leaml_ray.config import Config
from leaml_ray.data import examples
from leaml_ray.pipeline import Stage, StageContext, StageError
from leaml_ray.stages.common import methods_to_train, train_job
from leaml_ray.train.job import TrainJob, TrainRun

log = logging.getLogger("leaml_ray")


@dataclass(frozen=True)
class FinetunePlan:
    """What training one method's target needs."""

    method: str
    job: TrainJob  # in the method's mode: the baselines are their mode, leaml trains as `target.finetune` says
    epochs: float
    labeled_upsample: int  # this method's mixing factor
    with_pseudo: bool  # leaml runs: leaml trains on the pseudo pairs, a baseline takes their count as its budget
    seed: int


def plan_for(cfg: Config, method: str) -> FinetunePlan:
    """The plan of one method's finetune stage."""
    mode = cfg.target.finetune if method == "leaml" else method
    return FinetunePlan(
        method=method,
        job=train_job(cfg, "target", mode),
        epochs=cfg.target.epochs,
        labeled_upsample=cfg.target.upsample(method),
        with_pseudo="leaml" in cfg.eval.methods,
        seed=cfg.run.seed,
    )


def row_budget(plan: FinetunePlan, labeled: int, pseudo: int) -> tuple[int, int]:
    """(labeled-derived rows, all rows) of a method: leaml's labeled pairs x its factor + the pseudo pairs; a baseline
    gets that formula at its own factor, every row labeled."""
    labeled_rows = labeled * plan.labeled_upsample
    budget = labeled_rows + pseudo
    return (labeled_rows if plan.method == "leaml" else budget), budget


def run(plan: FinetunePlan, ctx: StageContext) -> dict[str, Any]:
    """Train the target for one method (see the module docstring)."""
    from leaml_ray.train.loop import run_training  # here: a plan must not import torch or Ray Train

    method = plan.method
    images_path = ctx.input("prepared/images.parquet")
    labeled = examples.answer_examples(examples.read_table(ctx.input("prepared/qa.parquet"), split="labeled"))
    if labeled.num_rows == 0:
        raise StageError("finetune: no labeled QA pairs")
    pseudo = None
    if plan.with_pseudo:
        pseudo_qa = examples.read_table(ctx.input("pseudo_qa.parquet"))
        pseudo = pa.table(
            {"image_id": pseudo_qa["image_id"], "instruction": pseudo_qa["question"], "response": pseudo_qa["answer"]}
        )
    labeled_rows, budget = row_budget(plan, labeled.num_rows, pseudo.num_rows if pseudo is not None else 0)
    text = examples.cycled(labeled, labeled_rows)
    unlabeled = pseudo if method == "leaml" else None
    parts = [examples.labeled_rows(images_path, text)]
    if unlabeled is not None and unlabeled.num_rows:
        parts.append(examples.with_images(images_path, unlabeled))
    data = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    data = data.select_columns(examples.EXAMPLE_COLUMNS).random_shuffle(seed=plan.seed)
    out = ctx.output(f"target/{method}")
    log.info("finetune %s: %s on %d rows (%d labeled-derived)", method, plan.job.finetune, budget, text.num_rows)
    train_run = TrainRun(num_rows=budget, epochs=plan.epochs, output=out, run_dir=ctx.run_dir)
    storage_path = storage.join(ctx.resume_dir, "ray_train")
    result = run_training(plan.job, train_run, data, f"target-{method}", storage_path)
    history = result["history"]
    summary = {
        "rows": budget,
        "labeled_rows": text.num_rows,
        "pseudo_rows": unlabeled.num_rows if unlabeled is not None else 0,
        "finetune": plan.job.finetune,
        "steps": history[-1]["step"],
        "final_loss": round(history[-1]["loss"], 4),
    }
    storage.write_json_atomic(storage.join(out, "train_log.json"), history)
    storage.write_json_atomic(storage.join(out, "summary.json"), summary)
    return summary


def finetune_stage(method: str) -> Stage:
    """The stage that trains one method's target."""
    return Stage(
        name=f"finetune:{method}",
        plan=functools.partial(plan_for, method=method),
        run=run,
        # leaml trains on the pseudo QA; the baselines read only its row count (their budget) when leaml runs too
        inputs=lambda plan: ("prepared", "pseudo_qa.parquet") if plan.with_pseudo else ("prepared",),
        outputs=(f"target/{method}",),
    )


def finetune_stages(cfg: Config) -> list[Stage]:
    """One finetune stage per trained method of `eval.methods`."""
    return [finetune_stage(m) for m in methods_to_train(cfg.eval.methods)]
