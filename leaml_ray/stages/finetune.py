"""finetune: the target model trained per method on the shared train loop -> target/<method>/ (HF folders).

- leaml: labeled pairs (repeated `labeled_upsample` times) + pseudo QA, `target.finetune` (full or LoRA);
- lora / full: the paper's labeled-only baselines, given the same number of training samples as leaml
  (the labeled pairs cycled), so every method gets the same compute;
- zero_shot trains nothing (evaluate uses the base model).
A method folder whose recorded recipe matches is reused as is, so adding a method trains only that one.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from leaml_ray import storage
from leaml_ray.config import Config, stable_hash
from leaml_ray.data import examples
from leaml_ray.pipeline import Stage, StageContext, StageError
from leaml_ray.train.loop import job_for, train_on
from leaml_ray.zoo import resolve

log = logging.getLogger("leaml_ray")
TRAINED = ("leaml", "lora", "full")
ABLATIONS = ("leaml_no_caption", "leaml_full_distill", "leaml_selective", "leaml_all_neurons", "leaml_random_neurons")
RECIPE = "method.json"


def methods_to_train(cfg: Config) -> list[str]:
    """The methods of eval.methods that need a finetuned target."""
    ablations = [m for m in cfg.eval.methods if m in ABLATIONS]
    if ablations:
        raise StageError(
            f"eval.methods {ablations}: an ablation needs its own generator; run it as its own run dir with "
            "method leaml and generator.caption_distill=false / distill_scope=lm_mlp / score=all / score=random "
            "(bench/label_efficiency.py does this, reusing prepare and caption)"
        )
    return [m for m in cfg.eval.methods if m in TRAINED]


def finetune_inputs(cfg: Config) -> tuple[str, ...]:
    return ("prepared", "pseudo_qa.parquet") if "leaml" in cfg.eval.methods else ("prepared",)


def finetune_stage(ctx: StageContext) -> dict[str, Any]:
    """Run the finetune stage (see the module docstring)."""
    cfg, target = ctx.cfg, ctx.cfg.target
    images_path = ctx.input("prepared/images.parquet")
    labeled = examples.answer_examples(examples.read_table(ctx.input("prepared/qa.parquet"), split="labeled"))
    if labeled.num_rows == 0:
        raise StageError("finetune: no labeled QA pairs")
    pseudo = None
    if "leaml" in cfg.eval.methods:
        pseudo_qa = examples.read_table(ctx.input("pseudo_qa.parquet"))
        pseudo = pa.table(
            {"image_id": pseudo_qa["image_id"], "instruction": pseudo_qa["question"], "response": pseudo_qa["answer"]}
        )
    budget = labeled.num_rows * target.labeled_upsample + (pseudo.num_rows if pseudo is not None else 0)
    base = resolve(target.model)
    counts: dict[str, Any] = {}
    for method in methods_to_train(cfg):
        if method == "leaml":
            text = examples.cycled(labeled, labeled.num_rows * target.labeled_upsample)
            unlabeled = pseudo
            finetune = target.finetune
        else:
            text, unlabeled, finetune = examples.cycled(labeled, budget), None, method
        recipe = {
            "method": method,
            "target": cfg.subset(("target", "train", "run.seed")),
            "finetune": finetune,
            "data": stable_hash([text["instruction"].to_pylist(), text["response"].to_pylist()]),
            "pseudo": storage.fingerprint(ctx.input("pseudo_qa.parquet")) if unlabeled is not None else None,
            "prepared": storage.fingerprint(ctx.input("prepared")),
        }
        out = ctx.output(f"target/{method}")
        previous = ctx.input(f"target/{method}")
        if (
            not ctx.forced
            and storage.exists(storage.join(previous, RECIPE))
            and storage.read_json(storage.join(previous, RECIPE)) == recipe
        ):
            log.info("finetune %s: the trained model in target/%s matches its recipe, reused", method, method)
            storage.copy_dir(previous, out)
            counts[method] = storage.read_json(storage.join(out, "summary.json"))
            continue
        labeled_part = examples.ray_dataset(examples.labeled_with_images(images_path, text))
        parts = [labeled_part]
        if unlabeled is not None and unlabeled.num_rows:
            parts.append(examples.with_images(images_path, unlabeled))
        data = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        data = data.select_columns(examples.EXAMPLE_COLUMNS).random_shuffle(seed=cfg.run.seed)
        job = job_for(cfg, target, base, out, num_rows=budget, finetune=finetune)
        log.info("finetune %s: %s on %d rows (%d labeled-derived)", method, finetune, budget, text.num_rows)
        result = train_on(cfg, job, data, f"target-{method}", storage.join(ctx.resume_dir, "ray_train", method))
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
        storage.write_json_atomic(storage.join(out, RECIPE), recipe)
        counts[method] = summary
    if not counts:  # zero_shot only: an empty folder keeps the stage contract
        fs, p = storage.resolve(ctx.output("target"))
        fs.create_dir(p, recursive=True)
    return counts


FINETUNE = Stage(
    name="finetune",
    run=finetune_stage,
    inputs=finetune_inputs,
    outputs=("target",),
    config_keys=("target", "train", "eval.methods", "run.seed"),
)
