"""A training job and one run of it: plain values (no torch), built by a stage's plan and sent to every worker."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from leaml_ray.models.spec import ModelSpec
from leaml_ray.plan import placement


@dataclass(frozen=True)
class TrainJob:
    """How one model is trained and where its workers run, read from the config once (a training stage's plan holds
    it; it travels to every worker). What one run trains on and writes is its `TrainRun`."""

    spec: ModelSpec  # the model to start from, as a worker loads it: bf16 on GPUs (DeepSpeed keeps fp32 masters)
    finetune: str  # "full" | "lora"
    lora_r: int  # 0 unless lora
    lora_alpha: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    batch_size: int  # per worker
    grad_accum: int
    zero_stage: int
    seed: int
    device: str  # "gpu": one GPU per worker, nccl, bf16; "cpu": gloo, fp32
    workers: int  # the world size: it splits the data, so it changes what is trained
    gradient_checkpointing: bool
    attention: str
    cpus_per_worker: float = placement()
    accelerator_type: str | None = placement()  # Ray's name of the GPUs a worker needs; None: any
    max_failures: int = placement()  # worker failures Ray Train recovers from (-1: forever)
    checkpoint_every: int = placement()  # optimizer steps between checkpoints

    @property
    def on_gpu(self) -> bool:
        return self.device == "gpu"

    @property
    def gpus_per_worker(self) -> int:
        return 1 if self.on_gpu else 0


@dataclass(frozen=True)
class TrainRun:
    """One run of a job: how much data it sees and where the trained model goes (known when the stage runs)."""

    num_rows: int  # rows in the dataset, for the step count and LR schedule
    epochs: float  # passes over those rows
    output: str  # where the trained HF folder goes (local path or URI)
    run_dir: str  # tags the dashboard's train gauges, with the Ray Train run's name


def micro_per_epoch(job: TrainJob, run: TrainRun, world: int) -> int:
    """Micro batches per worker in one pass over the rows."""
    return max(1, (run.num_rows // world) // job.batch_size)


def optimizer_steps(job: TrainJob, run: TrainRun, world: int) -> int:
    """Optimizer steps of a run (the LR schedule's length)."""
    return max(1, math.floor(micro_per_epoch(job, run, world) * run.epochs / job.grad_accum))


def scaling_config(job: TrainJob) -> Any:
    """Ray Train's `ScalingConfig` of a training job's workers."""
    from ray.train import ScalingConfig

    # accelerator_type: accelerator_type:<name> 0.001 in every worker's bundle (ray/air/config.py)
    return ScalingConfig(
        num_workers=job.workers,
        use_gpu=job.on_gpu,
        resources_per_worker={"CPU": job.cpus_per_worker},
        accelerator_type=job.accelerator_type,
    )


def worker_placement(job: TrainJob) -> tuple[list[dict[str, float]], str]:
    """The placement group Ray Train reserves for a job's workers: one bundle per worker and the strategy, as its
    worker group builds them from the `ScalingConfig` (ray/train/v2/.../worker_group.py, _create_placement_group)."""
    scaling = scaling_config(job)
    return [
        dict(scaling._resources_per_worker_not_none) for _ in range(scaling.num_workers)
    ], scaling.placement_strategy
