"""What several stages share: the plan builders of a model role's handles (its spec, its engine, its training job)
and the captions the generator trains on (pseudo_qa's diagnostics caption the ones it held out)."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.compute as pc

from leaml_ray.config import Config, ModelSection, TrainableModelSection
from leaml_ray.data import examples
from leaml_ray.models.spec import Engine, ModelSpec
from leaml_ray.models.zoo import recipe_key
from leaml_ray.train.job import TrainJob

TRAINED = ("leaml", "lora", "full")  # the methods of eval.methods that finetune the target (zero_shot: the base)


def methods_to_train(methods: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The methods of eval.methods that need a finetuned target."""
    return tuple(m for m in methods if m in TRAINED)


def model_spec(cfg: Config, role: str) -> ModelSpec:
    """The spec of a role (teacher, generator, target) from its config section."""
    section: ModelSection = getattr(cfg, role)
    recipe = recipe_key() if section.model.startswith("zoo:") else None
    return ModelSpec(role, section.model, section.trust_remote_code, section.dtype, section.max_pixels, recipe)


def engine(cfg: Config, role: str) -> Engine:
    """The engine handle of a role from its config section (and the run's seed)."""
    section: ModelSection = getattr(cfg, role)
    served = role == "teacher" and cfg.teacher.mode == "serve"
    return Engine(
        spec=model_spec(cfg, role),
        max_model_len=section.max_model_len,
        tensor_parallel_size=section.tensor_parallel_size,
        pipeline_parallel_size=section.pipeline_parallel_size,
        seed=cfg.run.seed,
        device=section.device,
        backend=section.engine,
        replicas=section.replicas,
        cpus_per_replica=section.cpus_per_replica,
        batch_size=section.engine_batch_size,
        max_num_seqs=section.max_num_seqs,
        accelerator_type=section.accelerator_type,
        endpoint=cfg.teacher.endpoint if served else None,
    )


def train_job(cfg: Config, role: str, finetune: str) -> TrainJob:
    """The training job of a role (generator or target) trained in `finetune` mode, with the run's train settings;
    only the learning rate and LoRA shape of that mode are read."""
    section: TrainableModelSection = getattr(cfg, role)
    t = cfg.train
    lora = finetune == "lora"
    return TrainJob(
        spec=dataclasses.replace(model_spec(cfg, role), dtype="bfloat16" if t.device == "gpu" else "float32"),
        finetune=finetune,
        lora_r=section.lora_r if lora else 0,
        lora_alpha=section.lora_alpha if lora else 0,
        lr=section.lora_lr if lora else section.lr,
        weight_decay=t.weight_decay,
        warmup_ratio=t.warmup_ratio,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        zero_stage=t.zero_stage,
        seed=cfg.run.seed,
        device=t.device,
        workers=t.num_workers,
        gradient_checkpointing=t.gradient_checkpointing,
        attention=t.attention,
        cpus_per_worker=t.cpus_per_worker,
        accelerator_type=t.accelerator_type,
        max_failures=t.max_failures,
        checkpoint_every=t.checkpoint_every,
    )


def heldout_caption_ids(image_ids: list[str], heldout: int, seed: int) -> set[str]:
    """The captioned images kept out of the generator's training (`heldout`, at most a tenth of them), chosen by a
    seeded hash."""
    k = min(heldout, len(image_ids) // 10)
    return set(sorted(image_ids, key=lambda i: examples.stable_int(i, seed + 17))[:k])


def unlabeled_captions(images_path: str, captions_path: str) -> pa.Table:
    """The teacher's captions of the unlabeled images."""
    splits = examples.read_table(images_path, ["image_id", "split"])
    unlabeled = splits.filter(pc.equal(splits["split"], "unlabeled"))["image_id"]
    captions = examples.read_table(captions_path)
    return captions.filter(pc.is_in(captions["image_id"], value_set=unlabeled))
