"""What several stages share: the training job of a trained role (a plan builder) and the captions the generator
trains on (the generator trains on them, pseudo_qa's diagnostics caption the ones it held out)."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.compute as pc

from leaml_ray.config import Config, TrainableModelSection
from leaml_ray.data import examples
from leaml_ray.models.spec import model_spec
from leaml_ray.train.job import TrainJob

TRAINED = ("leaml", "lora", "full")  # the methods of eval.methods that finetune the target (zero_shot: the base)


def methods_to_train(methods: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The methods of eval.methods that need a finetuned target."""
    return tuple(m for m in methods if m in TRAINED)


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
