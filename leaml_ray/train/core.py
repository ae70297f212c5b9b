"""The per-step training core: model + DeepSpeed engine + `Objective`, with no Ray in it.

`train/loop.py` runs it under Ray Train (one process per worker, data from Ray Data shards); `bench/gpu_smoke.py`
runs the same functions in one process (torch.distributed world size 1), which is how a GPU machine without Ray
checks it. Batches go to the engine's device here, every collective runs on the backend's device (nccl cannot
reduce CPU tensors), and GPU runs train in bf16.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from leaml_ray.models import chat
from leaml_ray.models.registry import LM_PROJECTIONS, load_model, load_processor, model_folder
from leaml_ray.models.spec import ModelSpec
from leaml_ray.train.job import TrainJob, TrainRun, optimizer_steps

THREADS_PER_WORKER = 1  # torch threads of a CPU worker: one per worker process, Ray gives each its CPUs


class Objective:
    """What one micro step computes; subclasses add losses, gradient masks and state saved with checkpoints."""

    backward_passes = 1  # backward passes per micro batch (each followed by engine.step())
    # its state is saved as <output>/<state_name>/<state_name>.safetensors: vLLM loads every *.safetensors
    # file at the top of a model folder as weights
    state_name = "objective"

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def setup(self, engine: Any, job: TrainJob, processor: Any, labeled: Any) -> bool:
        """Called once the DeepSpeed engine exists (`labeled()` returns the run's unsplit labeled table, or None);
        returns True when it computed state worth checkpointing."""
        return False

    def batch_rows(self, rows: dict[str, Any], micro: int) -> dict[str, dict[str, Any]]:
        """The row sets micro batch `micro` trains on, by the name `step` finds them encoded under (`rows`: this
        rank's train rows; `micro`: the batch's index in the run, the same on every rank). The data path encodes
        them ahead of the step."""
        return {"model_inputs": rows}

    def step(self, engine: Any, batch: dict[str, Any]) -> dict[str, float]:
        """Forward and backward one micro batch: `batch` holds each row set of `batch_rows`, encoded on the
        engine's device, and `micro`."""
        out = engine(**batch["model_inputs"])
        engine.backward(out.loss)
        return {"loss": out.loss.item()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to keep in checkpoints and next to the trained model (identical on every rank)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned (on resume)."""


def collective_device() -> torch.device:
    """The device collectives run on: the current GPU under nccl, the CPU under gloo (or without a group)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A collated batch on the training device (DeepSpeed does not move inputs)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def encode_rows(processor: Any, images: Any, instructions: Any, responses: Any, device: Any) -> dict[str, Any]:
    """Image bytes + instruction + response rows -> one padded batch on `device`."""
    examples = [
        chat.encode(processor, chat.open_image(img), ins, resp)
        for img, ins, resp in zip(images, instructions, responses, strict=True)
    ]
    return to_device(chat.collate(examples, processor.tokenizer.pad_token_id), device)


def encode_batch(objective: Objective, processor: Any, rows: dict[str, Any], micro: int, device: Any) -> dict:
    """Micro batch `micro` as `objective.step` takes it: every row set it asks for, encoded onto `device`."""
    batch: dict[str, Any] = {"micro": micro}
    for name, part in objective.batch_rows(rows, micro).items():
        batch[name] = encode_rows(processor, part["image"], part["instruction"], part["response"], device)
    return batch


def deepspeed_config(job: TrainJob, backward_passes: int = 1, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a job. Bucket sizes follow the model's hidden size as the HF Trainer's "auto" does:
    DeepSpeed's fixed defaults (5e8-element reduce buckets) are larger than a small model and cost memory."""
    zero: dict[str, Any] = {"stage": job.zero_stage}
    if hidden_size:
        # at least 4 M elements (16 MiB fp32): h^2 buckets of a small model meant hundreds of gloo collectives per
        # step (bench/results/design_choices.md)
        zero["reduce_bucket_size"] = max(hidden_size * hidden_size, 1 << 22)
    if job.zero_stage == 3:
        # the saved HF folder is gathered layer by layer onto rank 0 (save_hf)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if hidden_size:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
            # DeepSpeed's 1e9 defaults let every gathered layer stay resident (the whole model, as under ZeRO-2);
            # these keep about one decoder layer (~16 h^2 parameters) gathered at a time
            zero["stage3_max_live_parameters"] = 16 * hidden_size * hidden_size
            zero["stage3_max_reuse_distance"] = 16 * hidden_size * hidden_size
            # the optimizer step flattens each sub group's gradients into a new fp32 tensor and Adam makes a
            # temporary of the same size: per layer-sized sub group instead of per whole partition (a lower peak:
            # bench/results/design_choices.md)
            zero["sub_group_size"] = 16 * hidden_size * hidden_size
    return {
        "train_micro_batch_size_per_gpu": job.batch_size,
        "gradient_accumulation_steps": job.grad_accum * backward_passes,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed's CPU Adam needs a compiled op
        "bf16": {"enabled": job.on_gpu},
        "steps_per_print": 10**9,
    }


def hidden_size(path: str, trust_remote_code: bool = False) -> int | None:
    """The language model's hidden size of a model folder (sizes DeepSpeed's buckets); remote-code configs (NVILA)
    load only with trust_remote_code."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return getattr(getattr(config, "text_config", config), "hidden_size", None)


def _fixed_mmap_threshold() -> None:
    """Serve every allocation over 1 MiB from its own mmap, returned to the OS when freed (glibc only).

    glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which layer-sized
    tensors come from the heap and freed ones stay resident: a large part of a CPU worker's peak
    (bench/results/design_choices.md).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD; setting it also stops the dynamic adjustment


def prepare_environment(job: TrainJob) -> None:
    """Process settings before DeepSpeed is imported: its CPU accelerator, thread count, allocator."""
    if not job.on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(THREADS_PER_WORKER)
        _fixed_mmap_threshold()


def build_model(job: TrainJob, spec: ModelSpec) -> torch.nn.Module:
    """The model to train: the job's attention kernel, LoRA adapters, gradient checkpointing."""
    model = load_model(spec, attn_implementation=job.attention)
    if job.gradient_checkpointing:
        model.config.use_cache = False
        # non-reentrant: recomputation works with frozen inputs (LoRA) and with the caption pass's grad hooks
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if job.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=job.lora_r, lora_alpha=job.lora_alpha, target_modules=LM_PROJECTIONS, lora_dropout=0.0)
        model = get_peft_model(model, lora)
    return model


@dataclass
class Trainee:
    """A model ready to train: the DeepSpeed engine, its scheduler, the processor and where the weights came from."""

    engine: Any
    scheduler: Any
    processor: Any
    spec: ModelSpec  # the starting weights, in a folder on this node
    total_steps: int


def import_deepspeed() -> ModuleType:
    """deepspeed, imported without MLflow: its autotuner (never used here) imports MLflow at import time when it is
    installed (the `track` extra): most of a training worker's import time (bench/results/design_choices.md)."""
    if "mlflow" in sys.modules:
        import deepspeed
    else:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, which the autotuner catches
        try:
            import deepspeed
        finally:
            del sys.modules["mlflow"]
    return deepspeed


def build_trainee(job: TrainJob, run: TrainRun, objective: Objective, world: int) -> Trainee:
    """Load the model and processor and wrap them in a DeepSpeed engine (needs torch.distributed set up)."""
    from transformers import get_cosine_schedule_with_warmup

    deepspeed = import_deepspeed()
    if not job.on_gpu:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory comm op (a g++ build on a fresh machine, then a load
        # in every worker of every run) that only its inference all-reduce uses: training all-reduces through
        # torch.distributed (gloo). Its probe result is one module-level dict, kept across reads: marked off here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    path = model_folder(job.spec.model)  # a URI is copied to this node once
    spec = job.spec.at(path)
    processor = load_processor(spec)
    model = build_model(job, spec)
    total = optimizer_steps(job, run, world)
    optimizer = torch.optim.AdamW(objective.param_groups(model, job.weight_decay), lr=job.lr, betas=(0.9, 0.98))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(job.warmup_ratio * total), total)
    ds_config = deepspeed_config(job, objective.backward_passes, hidden_size(path, spec.trust_remote_code))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return Trainee(engine, scheduler, processor, spec, total)


def full_state_dict(engine: Any, job: TrainJob, rank: int) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere); every rank must call it.

    ZeRO-3 gathers one layer at a time onto rank 0 (DeepSpeed's consolidated 16-bit state dict, what its
    `save_16bit_model` uses), so no rank ever holds the whole model twice."""
    if job.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if state is None:
        return None
    return {k: v.detach().cpu().clone() for k, v in state.items()}


# weight files of at most this size (transformers 5 defaults to 50GB: one 16.6 GB file for a 7B model), so every file
# of a model folder uploads, downloads and resumes in pieces an object store handles well
MAX_SHARD_SIZE = "2GB"


def save_hf(trainee: Trainee, job: TrainJob, run: TrainRun, rank: int, objective: Objective) -> None:
    """Save the trained model as an HF folder at `run.output` from rank 0 (LoRA: the adapter and merged weights)."""
    state = full_state_dict(trainee.engine, job, rank)
    if rank != 0:
        return
    model = build_model(job, trainee.spec)
    model.load_state_dict(state)
    with tempfile.TemporaryDirectory() as tmp:
        if job.finetune == "lora":
            model.save_pretrained(os.path.join(tmp, "adapter"))
            model = model.merge_and_unload()
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        trainee.processor.save_pretrained(tmp)
        save_state(objective, os.path.join(tmp, objective.state_name, f"{objective.state_name}.safetensors"))
        from leaml_ray import storage

        storage.upload_dir(tmp, run.output)  # from whichever node rank 0 runs on: a URI run dir gets it from any node


def save_state(objective: Objective, path: str) -> None:
    """The objective's tensors as safetensors (nothing when it has none)."""
    from safetensors.torch import save_file

    state = objective.state_dict()
    if state:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, path)
