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

import dataclasses
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from leaml_ray import storage
from leaml_ray.config import Config
from leaml_ray.data import examples
from leaml_ray.pipeline import Stage, StageContext, StageError
from leaml_ray.plots import neuron_scores
from leaml_ray.train.loop import TRAIN_UNHASHED_KEYS, job_for, train_on, trained_keys
from leaml_ray.train.neurons import NeuronDistillation, mask_summary, pair_views, score_arrays
from leaml_ray.zoo import resolve

log = logging.getLogger("leaml_ray")


def heldout_caption_ids(image_ids: list[str], cfg: Config) -> set[str]:
    """The captioned images kept out of the generator's training (at most a tenth of them), chosen by a seeded hash."""
    k = min(cfg.generator.heldout_captions, len(image_ids) // 10)
    return set(sorted(image_ids, key=lambda i: examples.stable_int(i, cfg.run.seed + 17))[:k])


def unlabeled_captions(images_path: str, captions_path: str) -> pa.Table:
    """The teacher's captions of the unlabeled images."""
    splits = examples.read_table(images_path, ["image_id", "split"])
    unlabeled = splits.filter(pc.equal(splits["split"], "unlabeled"))["image_id"]
    captions = examples.read_table(captions_path)
    return captions.filter(pc.is_in(captions["image_id"], value_set=unlabeled))


def generator_stage(ctx: StageContext) -> dict[str, Any]:
    """Run the generator stage (see the module docstring)."""
    cfg, gen = ctx.cfg, ctx.cfg.generator
    images_path = ctx.input("prepared/images.parquet")
    qa = examples.generator_examples(examples.read_table(ctx.input("prepared/qa.parquet"), split="labeled"))
    if qa.num_rows == 0:
        raise StageError("generator: no labeled QA pairs to train on")
    qa = qa.append_column("pair", pa.array(range(qa.num_rows), pa.int64()))
    labeled = examples.labeled_rows(images_path, qa).drop_columns(["image_id"])

    captions = unlabeled_captions(images_path, ctx.input("captions.parquet"))
    heldout = heldout_caption_ids(captions["image_id"].to_pylist(), cfg)
    captions = captions.filter(pc.invert(pc.is_in(captions["image_id"], value_set=pa.array(sorted(heldout)))))
    if captions.num_rows == 0:
        raise StageError("generator: no captioned unlabeled images (run the caption stage on unlabeled images)")
    rows = examples.with_images(images_path, examples.caption_examples(captions)).drop_columns(["image_id"])

    objective = NeuronDistillation(
        score=gen.score,
        ratio=gen.neuron_ratio,
        caption_weight=gen.caption_weight,
        score_batches=gen.score_batches,
        seed=cfg.run.seed,
        scope=gen.distill_scope,
        caption_distill=gen.caption_distill,
    )
    out = ctx.output("generator")
    # the caption rows are the clock: enough of them for both budgets
    budget = max(gen.epochs * qa.num_rows, gen.caption_epochs * captions.num_rows)
    job = job_for(cfg, gen, resolve(gen.model), out, num_rows=captions.num_rows)
    job = dataclasses.replace(job, epochs=budget / captions.num_rows)
    log.info(
        "generator: %d captioned images (%d held out) and %d labeled QA pairs, %.1f passes over the pairs, "
        "caption distillation %s",
        captions.num_rows,
        len(heldout),
        qa.num_rows,
        budget / qa.num_rows,
        "on" if gen.caption_distill else "off",
    )
    result = train_on(
        cfg,
        job,
        rows,
        "generator",
        storage.join(ctx.resume_dir, "ray_train"),
        objective=objective,
        labeled_dataset=labeled,
    )
    storage.write_json_atomic(storage.join(out, "train_log.json"), result["history"])
    steps = result["history"][-1]["step"]
    views = pair_views(qa.num_rows, steps * cfg.train.grad_accum * cfg.train.num_workers * job.batch_size, job.seed)
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
    run=generator_stage,
    inputs=("prepared", "captions.parquet"),
    outputs=("generator",),
    config_keys=lambda cfg: (
        *trained_keys("generator", cfg.generator.finetune),
        *(f"generator.{f}" for f in ("finetune", "caption_epochs", "heldout_captions", "caption_distill")),
        *(f"generator.{f}" for f in ("caption_weight", "distill_scope", "score", "neuron_ratio", "score_batches")),
    ),
    unhashed_keys=TRAIN_UNHASHED_KEYS,
)
