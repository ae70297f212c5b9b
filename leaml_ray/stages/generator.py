"""generator: the QA generator trained on labeled QA with selective neuron caption distillation.

Each training row pairs one captioned unlabeled image (cap_*) with a labeled QA example chosen by a hash of the
image id, so an epoch covers every caption once and cycles the labeled pairs. With `caption_distill: off`
(the ablation) the same QA sequence trains without the caption pass.
Outputs `generator/` (HF folder that vLLM loads), `generator/neurons/neurons.safetensors` (scores + masks; in a
subfolder because vLLM loads every top-level *.safetensors file as weights) and `generator/neurons/neuron_scores.png`.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow.compute as pc

from leaml_ray import storage
from leaml_ray.data import examples
from leaml_ray.models.zoo import resolve
from leaml_ray.pipeline import Stage, StageContext, StageError
from leaml_ray.plots import neuron_scores
from leaml_ray.train.core import Objective
from leaml_ray.train.loop import job_for, train_on
from leaml_ray.train.neurons import NeuronDistillation, mask_summary, score_arrays

log = logging.getLogger("leaml_ray")


def generator_stage(ctx: StageContext) -> dict[str, Any]:
    """Run the generator stage (see the module docstring)."""
    cfg, gen = ctx.cfg, ctx.cfg.generator
    images_path = ctx.input("prepared/images.parquet")
    qa = examples.generator_examples(examples.read_table(ctx.input("prepared/qa.parquet"), split="labeled"))
    if qa.num_rows == 0:
        raise StageError("generator: no labeled QA pairs to train on")
    labeled = examples.labeled_with_images(images_path, qa).drop_columns(["image_id"])

    splits = examples.read_table(images_path, ["image_id", "split"])
    unlabeled = splits.filter(pc.equal(splits["split"], "unlabeled"))["image_id"]
    captions = examples.read_table(ctx.input("captions.parquet"))
    captions = captions.filter(pc.is_in(captions["image_id"], value_set=unlabeled))
    if captions.num_rows == 0:
        raise StageError("generator: no captioned unlabeled images (run the caption stage on unlabeled images)")
    cap_rows = examples.with_images(images_path, examples.caption_examples(captions)).rename_columns(
        {"image": "cap_image", "instruction": "cap_instruction", "response": "cap_response"}
    )
    rows = examples.pair_with(cap_rows, labeled, prefix="", seed=cfg.run.seed).drop_columns(["image_id"])

    objective: Objective
    if gen.caption_distill:
        objective = NeuronDistillation(
            score=gen.score,
            ratio=gen.neuron_ratio,
            caption_weight=gen.caption_weight,
            score_batches=gen.score_batches,
            seed=cfg.run.seed,
            scope=gen.distill_scope,
        )
    else:
        objective = Objective()
        rows = rows.select_columns(examples.EXAMPLE_COLUMNS)
    out = ctx.output("generator")
    job = job_for(cfg, gen, resolve(gen.model), out, num_rows=captions.num_rows)
    log.info(
        "generator: %d captioned images paired with %d labeled QA, caption distillation %s",
        captions.num_rows,
        labeled.num_rows,
        "on" if gen.caption_distill else "off",
    )
    # every worker needs `score_batches` full batches: a few labeled pairs (1% labels) are cycled to fill them
    score_rows = max(labeled.num_rows, cfg.train.batch_size * cfg.train.num_workers * gen.score_batches)
    score_ds = examples.ray_dataset(examples.cycled(labeled, score_rows)) if gen.caption_distill else None
    result = train_on(
        cfg,
        job,
        rows,
        "generator",
        storage.join(ctx.resume_dir, "ray_train"),
        objective=objective,
        score_dataset=score_ds,
    )
    storage.write_json_atomic(storage.join(out, "train_log.json"), result["history"])
    counts: dict[str, Any] = {
        "captions": captions.num_rows,
        "labeled_qa": labeled.num_rows,
        "steps": result["history"][-1]["step"],
        "final_loss": round(result["history"][-1]["loss"], 4),
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
    run=generator_stage,
    inputs=("prepared", "captions.parquet"),
    outputs=("generator",),
    config_keys=("generator", "train", "run.seed"),
)
