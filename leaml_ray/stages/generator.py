"""generator: the QA generator trained on labeled QA with selective neuron caption distillation.

The train rows are the captioned unlabeled images (teacher captions); the labeled QA pairs go to every worker
whole and the objective schedules them independently of the captions (each pair once per pass, a new order each
pass; train/neurons.py). Steps cover `epochs` passes over the labeled pairs and at least `caption_epochs` passes
over the captions. `heldout_captions` captioned images stay out of training: pseudo_qa measures the generator's
own captions on them. With `caption_distill: off` (the ablation) the same QA batches train without the caption pass.
Outputs `generator/` (HF folder that vLLM loads), `generator/neurons/neurons.safetensors` (scores + masks; in a
subfolder because vLLM loads every top-level *.safetensors file as weights) and `generator/neurons/neuron_scores.png`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from leaml_ray import storage
from leaml_ray.config import Config
from leaml_ray.data import examples
from leaml_ray.pipeline import Stage, StageContext, StageError
from leaml_ray.plots import neuron_scores
from leaml_ray.stages.common import heldout_caption_ids, train_job, unlabeled_captions
from leaml_ray.train.job import TrainJob, TrainRun

log = logging.getLogger("leaml_ray")


@dataclass(frozen=True)
class GeneratorPlan:
    """What the generator stage needs: the training job, the two budgets and the objective's settings."""

    job: TrainJob
    caption_prompt: str  # the teacher's: the caption rows' instruction
    qa_prompt: str  # pseudo_qa's: the labeled pairs' instruction
    epochs: float  # passes over the labeled QA pairs
    caption_epochs: float  # passes over the captioned unlabeled images (at least)
    heldout_captions: int
    caption_distill: bool
    caption_weight: float
    distill_scope: str
    score: str
    neuron_ratio: float
    score_batches: int


def plan(cfg: Config) -> GeneratorPlan:
    """The generator stage's plan."""
    gen = cfg.generator
    return GeneratorPlan(
        job=train_job(cfg, "generator", gen.finetune),
        caption_prompt=cfg.teacher.caption_prompt,
        qa_prompt=cfg.pseudo_qa.qa_prompt,
        epochs=gen.epochs,
        caption_epochs=gen.caption_epochs,
        heldout_captions=gen.heldout_captions,
        caption_distill=gen.caption_distill,
        caption_weight=gen.caption_weight,
        distill_scope=gen.distill_scope,
        score=gen.score,
        neuron_ratio=gen.neuron_ratio,
        score_batches=gen.score_batches,
    )


def run(plan: GeneratorPlan, ctx: StageContext) -> dict[str, Any]:
    """Run the generator stage (see the module docstring)."""
    # here, not at the top: a plan (`--plan`, the pipeline's keys) must not import torch or Ray Train
    from leaml_ray.train.loop import run_training
    from leaml_ray.train.neurons import NeuronDistillation, mask_summary, pair_views, score_arrays

    images_path = ctx.input("prepared/images.parquet")
    qa = examples.read_table(ctx.input("prepared/qa.parquet"), split="labeled")
    qa = examples.generator_examples(qa, plan.qa_prompt)
    if qa.num_rows == 0:
        raise StageError("generator: no labeled QA pairs to train on")
    qa = qa.append_column("pair", pa.array(range(qa.num_rows), pa.int64()))
    labeled = examples.labeled_rows(images_path, qa).drop_columns(["image_id"])

    captions = unlabeled_captions(images_path, ctx.input("captions.parquet"))
    heldout = heldout_caption_ids(captions["image_id"].to_pylist(), plan.heldout_captions, plan.job.seed)
    captions = captions.filter(pc.invert(pc.is_in(captions["image_id"], value_set=pa.array(sorted(heldout)))))
    if captions.num_rows == 0:
        raise StageError("generator: no captioned unlabeled images (run the caption stage on unlabeled images)")
    rows = examples.caption_examples(captions, plan.caption_prompt)
    rows = examples.with_images(images_path, rows).drop_columns(["image_id"])

    objective = NeuronDistillation(
        score=plan.score,
        ratio=plan.neuron_ratio,
        caption_weight=plan.caption_weight,
        score_batches=plan.score_batches,
        seed=plan.job.seed,
        scope=plan.distill_scope,
        caption_distill=plan.caption_distill,
    )
    out = ctx.output("generator")
    # the caption rows are the clock: enough passes over them for both budgets
    budget = max(plan.epochs * qa.num_rows, plan.caption_epochs * captions.num_rows)
    epochs = budget / captions.num_rows
    train_run = TrainRun(num_rows=captions.num_rows, epochs=epochs, output=out, run_dir=ctx.run_dir)
    log.info(
        "generator: %d captioned images (%d held out) and %d labeled QA pairs, %.1f passes over the pairs, "
        "caption distillation %s",
        captions.num_rows,
        len(heldout),
        qa.num_rows,
        budget / qa.num_rows,
        "on" if plan.caption_distill else "off",
    )
    storage_path = storage.join(ctx.resume_dir, "ray_train")
    result = run_training(
        plan.job, train_run, rows, "generator", storage_path, objective=objective, labeled_dataset=labeled
    )
    storage.write_json_atomic(storage.join(out, "train_log.json"), result["history"])
    steps = result["history"][-1]["step"]
    views = pair_views(qa.num_rows, result["samples"], plan.job.seed)
    counts: dict[str, Any] = {
        "captions": captions.num_rows,
        "heldout_captions": len(heldout),
        "labeled_qa": qa.num_rows,
        "steps": steps,
        "final_loss": round(result["history"][-1]["loss"], 4),
        # how often each labeled pair was trained on: equal up to one
        "pair_views_min": int(views.min()),
        "pair_views_max": int(views.max()),
    }
    neurons_path = storage.join(out, "neurons", "neurons.safetensors")
    if storage.exists(neurons_path):
        from safetensors.torch import load

        state = load(storage.read_bytes(neurons_path))
        summary = mask_summary(state)
        masks = {k[len("mask.") :]: v.bool().numpy() for k, v in state.items() if k.startswith("mask.")}
        storage.write_bytes_atomic(
            storage.join(out, "neurons", "neuron_scores.png"), neuron_scores(score_arrays(state), masks)
        )
        counts["neurons_selected"] = sum(s for s, _ in summary.values())
        counts["neurons_total"] = sum(n for _, n in summary.values())
    return counts


GENERATOR = Stage(
    name="generator",
    plan=plan,
    run=run,
    inputs=("prepared", "captions.parquet"),
    outputs=("generator",),
)
