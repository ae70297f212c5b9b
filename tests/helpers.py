"""Model handles and training jobs for tests that load a model folder directly (no config): the settings a test does
not care about, in one place."""

from __future__ import annotations

from typing import Any

from leaml_ray.models.spec import Engine, ModelSpec
from leaml_ray.train.job import TrainJob

PIXELS = 256 * 28 * 28  # the config's default processor budget


def local_spec(path: str, role: str = "target", dtype: str = "float32") -> ModelSpec:
    """A model folder as a role's spec (fp32: this CPU)."""
    return ModelSpec(role, str(path), False, dtype, PIXELS, None)


def local_engine(path: str, role: str = "teacher", **placement: Any) -> Engine:
    """A small CPU engine on a model folder (context 256, 8 sequences, batches of 2); keywords override any field."""
    fields: dict[str, Any] = {
        "spec": local_spec(path, role),
        "max_model_len": 256,
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "seed": 0,
        "device": "cpu",
        "backend": "ray_data_llm",
        "replicas": 1,
        "cpus_per_replica": 1.0,
        "batch_size": 2,
        "max_num_seqs": 8,
        "accelerator_type": None,
        "endpoint": None,
    }
    return Engine(**{**fields, **placement})


def local_job(path: str, **overrides: Any) -> TrainJob:
    """A full-finetuning CPU job on a model folder (2 workers, batch 16, ZeRO-2, lr 1e-3); keywords override."""
    fields: dict[str, Any] = {
        "spec": local_spec(path, "train"),
        "finetune": "full",
        "lora_r": 0,
        "lora_alpha": 0,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "warmup_ratio": 0.1,
        "batch_size": 16,
        "grad_accum": 1,
        "zero_stage": 2,
        "seed": 0,
        "device": "cpu",
        "workers": 2,
        "gradient_checkpointing": False,
        "attention": "sdpa",
        "cpus_per_worker": 1.0,
        "accelerator_type": None,
        "max_failures": 2,
        "checkpoint_every": 50,
    }
    return TrainJob(**{**fields, **overrides})


def distillation(**overrides: Any) -> Any:
    """The generator's objective with the config's defaults but for the keywords given (scope lm_mlp unless said)."""
    from leaml_ray.train.neurons import NeuronDistillation

    fields: dict[str, Any] = {
        "score": "gradient",
        "ratio": 0.1,
        "caption_weight": 1.0,
        "score_batches": 4,
        "seed": 0,
        "scope": "lm_mlp",
        "caption_distill": True,
    }
    return NeuronDistillation(**{**fields, **overrides})
