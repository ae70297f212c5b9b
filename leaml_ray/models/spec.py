"""One handle per model role, built once in a stage's plan: which model (`ModelSpec`) and how its inference engine
runs (`Engine`); plain values, built by the stages' plan builders (`stages/common.py`).

A model is named by its reference as the config gives it (`zoo:<role>`, a local folder, an s3:// / gs:// folder or a
hub id); the folder is resolved where the model is loaded (`registry.model_folder`), never in the plan, so a cache
key never holds a machine-local path. A `zoo:` reference is hashed with the zoo's recipe key: a rebuilt zoo is a
different model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from leaml_ray.plan import placement


@dataclass(frozen=True)
class ModelSpec:
    """How to load and prompt one model."""

    role: str
    model: str  # zoo:<role>, local folder, s3:// / gs:// folder or hub id; a trained model: its run-dir folder
    trust_remote_code: bool
    dtype: str  # "auto" | "float32" | "bfloat16" | "float16"
    max_pixels: int  # the processor's pixel budget (training and every engine)
    zoo_recipe: str | None  # the zoo recipe key of a `zoo:` model (None otherwise)

    def at(self, folder: str) -> ModelSpec:
        """The same model setup loaded from another folder (a trained model of this role)."""
        return dataclasses.replace(self, model=folder, zoo_recipe=None)


@dataclass(frozen=True)
class Engine:
    """One role's inference engine: its model, what changes its generations (context length, parallelism: kernels
    and reductions differ, seed) and where it runs (placement: not in a cache key)."""

    spec: ModelSpec
    max_model_len: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    seed: int
    device: str = placement()  # "cpu" | "gpu"
    backend: str = placement()  # "ray_data_llm" | "actor_pool" (Ray Data actors owning an in-process vllm.LLM)
    replicas: int = placement()
    cpus_per_replica: float = placement()
    batch_size: int = placement()  # rows per engine batch
    max_num_seqs: int = placement()
    accelerator_type: str | None = placement()  # Ray's name of the GPUs a replica needs (H100, A100-40G...)
    endpoint: str | None = placement()  # the OpenAI-compatible server that answers instead (teacher.mode: serve)

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size if self.device == "gpu" else 0

    @property
    def rows_per_part(self) -> int:
        """Results per resumable part file: a crash loses at most this many generations."""
        return 4 * self.batch_size

    def at(self, folder: str) -> Engine:
        """The same engine loading another folder (a trained model of this role)."""
        return dataclasses.replace(self, spec=self.spec.at(folder))
