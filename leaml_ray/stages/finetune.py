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
from typing import Any

import pyarrow as pa

from leaml_ray import storage
from leaml_ray.config import Config
from leaml_ray.data import examples
from leaml_ray.pipeline import Stage, StageContext, StageError
from leaml_ray.train.loop import TRAIN_UNHASHED_KEYS, job_for, train_on, trained_keys
from leaml_ray.zoo import resolve

log = logging.getLogger("leaml_ray")
TRAINED = ("leaml", "lora", "full")


def methods_to_train(cfg: Config) -> list[str]:
    """The methods of eval.methods that need a finetuned target."""
    return [m for m in cfg.eval.methods if m in TRAINED]


def finetune_mode(cfg: Config, method: str) -> str:
    """How a method trains the target: the baselines are their mode, leaml trains as `target.finetune` says."""
    return cfg.target.finetune if method == "leaml" else method


def row_budget(cfg: Config, method: str, labeled: int, pseudo: int) -> tuple[int, int]:
    """(labeled-derived rows, all rows) of a method: leaml's labeled pairs x its factor + the pseudo pairs; a baseline
    gets that formula at its own factor, every row labeled."""
    labeled_rows = labeled * cfg.target.upsample(method)
    budget = labeled_rows + pseudo
    return (labeled_rows if method == "leaml" else budget), budget


def finetune_method(ctx: StageContext, method: str) -> dict[str, Any]:
    """Train the target for one method (see the module docstring)."""
    cfg, target = ctx.cfg, ctx.cfg.target
    images_path = ctx.input("prepared/images.parquet")
    labeled = examples.answer_examples(examples.read_table(ctx.input("prepared/qa.parquet"), split="labeled"))
    if labeled.num_rows == 0:
        raise StageError("finetune: no labeled QA pairs")
    pseudo = None
    if "pseudo_qa.parquet" in finetune_inputs(cfg):
        pseudo_qa = examples.read_table(ctx.input("pseudo_qa.parquet"))
        pseudo = pa.table(
            {"image_id": pseudo_qa["image_id"], "instruction": pseudo_qa["question"], "response": pseudo_qa["answer"]}
        )
    labeled_rows, budget = row_budget(cfg, method, labeled.num_rows, pseudo.num_rows if pseudo is not None else 0)
    finetune = finetune_mode(cfg, method)
    text = examples.cycled(labeled, labeled_rows)
    unlabeled = pseudo if method == "leaml" else None
    parts = [examples.labeled_rows(images_path, text)]
    if unlabeled is not None and unlabeled.num_rows:
        parts.append(examples.with_images(images_path, unlabeled))
    data = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    data = data.select_columns(examples.EXAMPLE_COLUMNS).random_shuffle(seed=cfg.run.seed)
    out = ctx.output(f"target/{method}")
    job = job_for(cfg, target, resolve(target.model), out, num_rows=budget, finetune=finetune)
    log.info("finetune %s: %s on %d rows (%d labeled-derived)", method, finetune, budget, text.num_rows)
    result = train_on(cfg, job, data, f"target-{method}", storage.join(ctx.resume_dir, "ray_train"))
    history = result["history"]
    summary = {
        "rows": budget,
        "labeled_rows": text.num_rows,
        "pseudo_rows": unlabeled.num_rows if unlabeled is not None else 0,
        "finetune": finetune,
        "steps": history[-1]["step"],
        "final_loss": round(history[-1]["loss"], 4),
    }
    storage.write_json_atomic(storage.join(out, "train_log.json"), history)
    storage.write_json_atomic(storage.join(out, "summary.json"), summary)
    return summary


def finetune_inputs(cfg: Config) -> tuple[str, ...]:
    """leaml trains on the pseudo QA; the baselines read only its row count (their budget) when leaml runs too."""
    return ("prepared", "pseudo_qa.parquet") if "leaml" in cfg.eval.methods else ("prepared",)


def finetune_stage(method: str) -> Stage:
    """The stage that trains one method's target."""
    return Stage(
        name=f"finetune:{method}",
        run=functools.partial(finetune_method, method=method),
        inputs=finetune_inputs,
        outputs=(f"target/{method}",),
        config_keys=lambda cfg: (
            *trained_keys("target", finetune_mode(cfg, method)),
            "target.labeled_upsample",
            *(("target.finetune",) if method == "leaml" else ()),
        ),
        unhashed_keys=(*TRAIN_UNHASHED_KEYS, "eval.methods"),  # eval.methods: only through the inputs
    )


def finetune_stages(cfg: Config) -> list[Stage]:
    """One finetune stage per trained method of `eval.methods`."""
    return [finetune_stage(m) for m in methods_to_train(cfg)]
