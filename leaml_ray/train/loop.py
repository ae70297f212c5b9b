"""The one train loop: Ray Train TorchTrainer + DeepSpeed ZeRO, used by zoo pretraining, the QA generator and the
target finetuning.

Rows come from a Ray Data shard as {"image": bytes, "instruction": str, "response": str, ...}; each worker encodes
them with the model's processor. An `Objective` decides the parameter groups and what one micro step computes:
the generator stage subclasses it to add the caption loss and its gradient masks, without copying this loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from leaml_ray import dashboard, storage
from leaml_ray.config import Config, TrainableModelSection
from leaml_ray.data import examples
from leaml_ray.models import chat
from leaml_ray.models.registry import LM_PROJECTIONS, ModelSpec, load_model, load_processor

log = logging.getLogger("leaml_ray")
CACHE = Path(os.environ.get("LEAML_CACHE", Path.home() / ".cache" / "leaml-ray"))
LOG_NAME = "train_log.jsonl"
OBJECTIVE_STATE = "objective.safetensors"


@dataclass
class TrainJob:
    """Everything a training run needs besides its data (plain values: it travels to every worker)."""

    model_path: str  # HF folder to start from
    output: str  # where the trained HF folder goes (local path or URI)
    num_rows: int  # rows in the dataset, for the step count and LR schedule
    finetune: str = "full"  # "full" | "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_target_modules: str = LM_PROJECTIONS
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    epochs: float = 1.0
    batch_size: int = 16  # per worker
    grad_accum: int = 1
    zero_stage: int = 2
    checkpoint_every: int = 50  # optimizer steps
    seed: int = 0
    use_gpu: bool = False
    threads_per_worker: int = 1
    run_dir: str = ""  # tags the dashboard's train gauges, with the Ray Train run's name
    fault: dict[str, Any] = field(default_factory=dict)  # {"step": k, "marker": path}: die once at step k (tests)

    def optimizer_steps(self, world: int) -> int:
        micro = self.micro_per_epoch(world)
        return max(1, math.floor(micro * self.epochs / self.grad_accum))

    def micro_per_epoch(self, world: int) -> int:
        return max(1, (self.num_rows // world) // self.batch_size)


class Objective:
    """What one micro step computes; subclasses add losses, gradient masks and state saved with checkpoints."""

    backward_passes = 1  # backward passes per micro batch (each followed by engine.step())
    # its state is saved as <output>/<state_name>/<state_name>.safetensors: vLLM loads every *.safetensors
    # file at the top of a model folder as weights
    state_name = "objective"

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def setup(self, engine: Any, job: TrainJob, processor: Any, score_batches: Any) -> bool:
        """Called once the DeepSpeed engine exists (`score_batches()` iterates the "score" dataset's shard);
        returns True when it computed state worth checkpointing."""
        return False

    def step(self, engine: Any, batch: dict[str, Any]) -> dict[str, float]:
        """Forward and backward one micro batch; returns metrics to log."""
        out = engine(**batch["model_inputs"])
        engine.backward(out.loss)
        return {"loss": out.loss.item()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to keep in checkpoints and next to the trained model (identical on every rank)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned (on resume)."""


def deepspeed_config(job: TrainJob, backward_passes: int = 1, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a job. Bucket sizes follow the model's hidden size as the HF Trainer's "auto" does:
    DeepSpeed's fixed defaults (5e8-element reduce buckets) are larger than a small model and cost memory."""
    zero: dict[str, Any] = {"stage": job.zero_stage}
    if hidden_size:
        # at least 4 M elements (16 MiB fp32): h^2 buckets of a small model (4,096 elements at h=64) meant ~200
        # gloo collectives per step, and 2 workers were barely faster than 1
        zero["reduce_bucket_size"] = max(hidden_size * hidden_size, 1 << 22)
    if job.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if hidden_size:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
            # DeepSpeed's 1e9 defaults let every gathered layer stay resident (the whole model, as under ZeRO-2);
            # these keep about one decoder layer (~16 h^2 parameters) gathered at a time
            zero["stage3_max_live_parameters"] = 16 * hidden_size * hidden_size
            zero["stage3_max_reuse_distance"] = 16 * hidden_size * hidden_size
            # the optimizer step flattens each sub group's gradients into a new fp32 tensor and Adam makes a
            # temporary of the same size: per layer-sized sub group instead of per whole partition (measured:
            # ZeRO-3 peak 2,674 -> 2,557 MiB per worker for 150 M parameters)
            zero["sub_group_size"] = 16 * hidden_size * hidden_size
    return {
        "train_micro_batch_size_per_gpu": job.batch_size,
        "gradient_accumulation_steps": job.grad_accum * backward_passes,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed's CPU Adam needs a compiled op
        "bf16": {"enabled": job.use_gpu},
        "steps_per_print": 10**9,
    }


def _hidden_size(path: str) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return getattr(getattr(config, "text_config", config), "hidden_size", None)


def _fixed_mmap_threshold() -> None:
    """Serve every allocation over 1 MiB from its own mmap, returned to the OS when freed (glibc only).

    glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which layer-sized
    tensors come from the heap and freed ones stay resident: measured on CPU training of a 150 M-parameter
    model, that retained memory was ~1 GiB of each worker's peak (see bench/train_scaling.py).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD; setting it also stops the dynamic adjustment


def _prepare_environment(job: TrainJob) -> None:
    if not job.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(job.threads_per_worker)
        _fixed_mmap_threshold()
    # DeepSpeed JIT-compiles its CPU comm op once per machine; keep it across runs
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))


def _build_model(job: TrainJob, spec: ModelSpec) -> torch.nn.Module:
    model = load_model(spec, job.model_path)
    if job.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=job.lora_r, lora_alpha=job.lora_alpha, target_modules=job.lora_target_modules, lora_dropout=0.0
        )
        model = get_peft_model(model, lora)
    return model


def _batches(shard: Any, processor: Any, job: TrainJob, epoch: int, skip: int = 0):
    """Encoded micro batches of one epoch of this worker's shard; the first `skip` are consumed unencoded."""
    pad = processor.tokenizer.pad_token_id
    for rows in shard.iter_batches(
        batch_size=job.batch_size,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=4 * job.batch_size,
        local_shuffle_seed=job.seed + epoch,
    ):
        if skip:
            skip -= 1
            yield None
            continue
        examples = [
            chat.encode(processor, chat.open_image(img), ins, resp)
            for img, ins, resp in zip(rows["image"], rows["instruction"], rows["response"], strict=True)
        ]
        extra = {k: v for k, v in rows.items() if k not in ("image", "instruction", "response")}
        yield {"model_inputs": chat.collate(examples, pad), **extra}


def _timed(items: Any, clock: dict[str, float]):
    """Yield from `items`, adding the time spent waiting for each item to clock["data_seconds"]."""
    it = iter(items)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        clock["data_seconds"] += time.perf_counter() - t
        yield item


def _save_hf(engine: Any, job: TrainJob, spec: ModelSpec, processor: Any, rank: int, objective: Objective) -> None:
    """Gather the full weights (ZeRO-3 shards them) and save an HF folder; LoRA: the adapter and merged weights."""
    import deepspeed

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None, enabled=job.zero_stage == 3):
        state = (
            {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}
            if rank == 0
            else None
        )
    if rank != 0:
        return
    model = _build_model(job, spec)
    model.load_state_dict(state)
    with tempfile.TemporaryDirectory() as tmp:
        if job.finetune == "lora":
            model.save_pretrained(os.path.join(tmp, "adapter"))
            model = model.merge_and_unload()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        _save_state(objective, os.path.join(tmp, objective.state_name, f"{objective.state_name}.safetensors"))
        storage.upload_dir(tmp, job.output)


def _save_state(objective: Objective, path: str) -> None:
    from safetensors.torch import save_file

    state = objective.state_dict()
    if state:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, path)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function (see the module docstring)."""
    job = TrainJob(**config["job"])
    objective: Objective = config["objective"]
    _prepare_environment(job)
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(job.seed)
    spec = ModelSpec("train", job.model_path, dtype="bfloat16" if job.use_gpu else "float32")
    processor = load_processor(spec, job.model_path)
    ds_config = deepspeed_config(job, objective.backward_passes, _hidden_size(job.model_path))
    model = _build_model(job, spec)
    total = job.optimizer_steps(world)
    optimizer = torch.optim.AdamW(objective.param_groups(model, job.weight_decay), lr=job.lr, betas=(0.9, 0.98))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(job.warmup_ratio * total), total)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
    )
    init_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # model load and partitioning

    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        from safetensors.torch import load_file

        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag="ds")
            step = client["step"]
            history = [json.loads(line) for line in Path(d, LOG_NAME).read_text().splitlines()]
            if Path(d, OBJECTIVE_STATE).exists():
                objective.load_state_dict(load_file(str(Path(d, OBJECTIVE_STATE))))
        print(f"[rank {rank}] resumed at optimizer step {step}/{total}", flush=True)

    shard = ray.train.get_dataset_shard("train")
    score_batches = lambda: _batches(ray.train.get_dataset_shard("score"), processor, job, epoch=0)  # noqa: E731
    if objective.setup(engine, job, processor, score_batches) and not checkpoint:
        # e.g. neuron masks: a worker lost from here on resumes with them instead of recomputing them
        _report(engine, {"step": 0, "setup": True}, history, 0, rank, objective)

    start = step
    micro_per_epoch = job.micro_per_epoch(world)
    micro = step * job.grad_accum  # micro batches already consumed
    t0, metrics, clock = time.perf_counter(), {}, {"data_seconds": 0.0}
    while step < total:
        epoch, skip = divmod(micro, micro_per_epoch)
        seen = 0
        for k, batch in enumerate(_timed(_batches(shard, processor, job, epoch, skip), clock)):
            seen += 1
            if batch is None:
                continue  # consumed before the restart
            if k >= micro_per_epoch or step >= total:
                break
            metrics = objective.step(engine, batch)
            engine.step()
            micro += 1
            if micro % job.grad_accum:
                continue
            step += 1
            if job.fault.get("step") == step and not os.path.exists(job.fault["marker"]):
                Path(job.fault["marker"]).touch()
                raise RuntimeError(f"injected fault at step {step}")
            elapsed = time.perf_counter() - t0
            rate = (step - start) * job.grad_accum * job.batch_size * world / elapsed
            record = {
                "step": step,
                "epoch": epoch,
                "seconds": elapsed,  # since this attempt's first batch was requested
                "data_seconds": clock["data_seconds"],  # of which waiting for (and encoding) batches
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": rate,
                "resumed_from": start,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # this worker
                "init_peak_rss_mib": init_peak_mib,
                **metrics,
            }
            history.append(record)
            if rank == 0:
                _show(record, job.run_dir, config["name"])
            if step % job.checkpoint_every == 0 or step == total:
                _report(engine, record, history, step, rank, objective)
            elif rank == 0 and step % 10 == 0:
                print(json.dumps(record), flush=True)
        if seen == 0:
            raise ValueError(f"rank {rank}: no full batch of {job.batch_size} rows in its data shard")
    _save_hf(engine, job, spec, processor, rank, objective)


def _show(record: dict, run_dir: str, name: str) -> None:
    """Rank 0's latest step on the dashboard's Metrics tab (the gauges live while the worker does)."""
    for key in ("samples_per_s", "loss", "step"):
        if key in record:
            dashboard.gauge(f"train_{key}", record[key], run_dir, name)


def _report(engine: Any, record: dict, history: list[dict], step: int, rank: int, objective: Objective) -> None:
    """Checkpoint every rank's shard (DeepSpeed), the step log and the objective's state; report to Ray Train."""
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag="ds", client_state={"step": step})
        if rank == 0:
            Path(d, LOG_NAME).write_text("".join(json.dumps(h) + "\n" for h in history))
            _save_state(objective, os.path.join(d, OBJECTIVE_STATE))
        ray.train.report(record, checkpoint=Checkpoint.from_directory(d))


def run_training(
    job: TrainJob,
    dataset: ray.data.Dataset,
    name: str,
    storage_path: str,
    num_workers: int,
    cpus_per_worker: float,
    max_failures: int,
    objective: Objective | None = None,
    score_dataset: ray.data.Dataset | None = None,
) -> dict:
    """Run one training job to completion; returns its final metrics and the step log.

    A rerun with the same `name` and `storage_path` resumes from the latest checkpoint (Ray Train restores its
    state from storage), so a killed driver loses at most `checkpoint_every` steps.
    """
    # run the upstream joins and shuffle once: a lazy dataset re-executes them at every epoch's streaming split
    # (Ray Data spills materialized blocks to disk when they outgrow the object store); in blocks of a few batches:
    # each block is a round trip to the split coordinator, and small ones (e.g. after a filter or from_items) left
    # the workers waiting for input; in order, with an ordered split below, so one seed gives one run
    ctx = dataset.context
    was_ordered, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        dataset = examples.in_blocks_of(dataset, 4 * job.batch_size).materialize()
    finally:
        ctx.execution_options.preserve_order = was_ordered
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # blocks go to workers in order, not by arrival (and not by node locality)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": asdict(job), "objective": objective or Objective(), "name": name},
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=job.use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset, **({"score": score_dataset} if score_dataset is not None else {})},
        dataset_config=DataConfig(execution_options=ingest),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        history = [json.loads(line) for line in Path(d, LOG_NAME).read_text().splitlines()]
    return {"metrics": result.metrics, "history": history, "checkpoint": result.checkpoint.path}


def job_for(
    cfg: Config,
    section: TrainableModelSection,
    model_path: str,
    output: str,
    num_rows: int,
    finetune: str | None = None,
) -> TrainJob:
    """A TrainJob for one model section (generator or target) and the run's train settings."""
    t = cfg.train
    finetune = finetune or section.finetune
    return TrainJob(
        model_path=model_path,
        output=output,
        num_rows=num_rows,
        finetune=finetune,
        lora_r=section.lora_r,
        lora_alpha=section.lora_alpha,
        lr=section.lora_lr if finetune == "lora" else section.lr,
        weight_decay=t.weight_decay,
        warmup_ratio=t.warmup_ratio,
        epochs=section.epochs,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        zero_stage=t.zero_stage,
        checkpoint_every=t.checkpoint_every,
        seed=cfg.run.seed,
        use_gpu=t.use_gpu,
        run_dir=cfg.run.dir,
    )


def train_on(cfg: Config, job: TrainJob, dataset: ray.data.Dataset, name: str, storage_path: str, **kwargs) -> dict:
    """run_training with the run's scaling and failure settings."""
    t = cfg.train
    return run_training(job, dataset, name, storage_path, t.num_workers, t.cpus_per_worker, t.max_failures, **kwargs)
