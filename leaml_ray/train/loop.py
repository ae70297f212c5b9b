"""The one train loop: Ray Train TorchTrainer + DeepSpeed ZeRO, used by zoo pretraining, the QA generator and the
target finetuning.

Rows come from a Ray Data shard as {"image": bytes, "instruction": str, "response": str}. An `Objective` decides
the parameter groups, which rows a micro batch trains on (`batch_rows`) and what one micro step computes: the
generator stage subclasses it to add the labeled pairs, the caption loss and its gradient masks, without copying
this loop. Each worker encodes its micro batches with the model's processor in the data path (`_batches`), so
`Objective.step` is loss math only. Encoding stays inline: a background thread that encoded ahead lowered CPU
workers' throughput, the two Python threads contending for the GIL between the tiny model's many small kernels
(bench/results/design_choices.md).
"""

from __future__ import annotations

import json
import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from leaml_ray import dashboard
from leaml_ray.data.blocks import in_blocks_of
from leaml_ray.train.core import Objective, build_trainee, encode_batch, prepare_environment, save_hf, save_state
from leaml_ray.train.job import TrainJob, TrainRun, micro_per_epoch, scaling_config

log = logging.getLogger("leaml_ray")
LOG_NAME = "train_log.jsonl"
OBJECTIVE_STATE = "objective.safetensors"


def _batches(
    shard: Any,
    processor: Any,
    job: TrainJob,
    objective: Objective,
    epoch: int,
    first_micro: int,
    device: Any,
    skip: int,
):
    """Encoded micro batches of one epoch of this worker's shard, on `device` (the epoch's first has index
    `first_micro` in the run); the first `skip` are consumed unencoded (None)."""
    windows = shard.iter_batches(batch_size=4 * job.batch_size, batch_format="numpy")
    for k, rows in enumerate(shuffled_batches(windows, job, epoch)):
        yield None if k < skip else encode_batch(objective, processor, rows, first_micro + k, device)


def shuffled_batches(windows: Any, job: TrainJob, epoch: int):
    """Batches of `job.batch_size` rows, shuffled within each window of rows by a permutation seeded with the job's
    seed and the epoch (a last partial batch is dropped). Ray Data's local shuffle buffer mixes whatever blocks have
    arrived when a batch is asked for, so the same seed gave different batches from run to run."""
    rng = np.random.default_rng([job.seed, epoch])
    for window in windows:
        n = len(next(iter(window.values())))
        order = rng.permutation(n)
        for start in range(0, n - job.batch_size + 1, job.batch_size):
            picked = order[start : start + job.batch_size]
            yield {k: v[picked] for k, v in window.items()}


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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function (see the module docstring)."""
    job: TrainJob = config["job"]
    run: TrainRun = config["run"]
    objective: Objective = config["objective"]
    prepare_environment(job)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(job.seed)
    trainee = build_trainee(job, run, objective, world)
    engine, scheduler, processor, total = trainee.engine, trainee.scheduler, trainee.processor, trainee.total_steps
    device = ray.train.torch.get_device()  # this worker's GPU (or the CPU)
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
    if objective.setup(engine, job, processor, lambda: _whole("labeled")) and not checkpoint:
        # e.g. neuron masks: a worker lost from here on resumes with them instead of recomputing them
        _report(engine, {"step": 0, "setup": True}, history, 0, rank, objective)

    start = step
    per_epoch = micro_per_epoch(job, run, world)
    micro = step * job.grad_accum  # micro batches already consumed
    t0, metrics, clock = time.perf_counter(), {}, {"data_seconds": 0.0}
    while step < total:
        epoch, skip = divmod(micro, per_epoch)
        seen = 0
        batches = _batches(shard, processor, job, objective, epoch, epoch * per_epoch, device, skip)
        for k, batch in enumerate(_timed(batches, clock)):
            seen += 1
            if batch is None:
                continue  # consumed before the restart
            if k >= per_epoch or step >= total:
                break
            metrics = objective.step(engine, batch)
            engine.step()
            micro += 1
            if micro % job.grad_accum:
                continue
            step += 1
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
                _show(record, run.run_dir, config["name"])
            # only with checkpoints: a metric-only ray.train.report costs seconds each (see
            # bench/results/design_choices.md); the dashboard's Metrics tab gets rank 0's step live through _show
            if step % job.checkpoint_every == 0 or step == total:
                _report(engine, record, history, step, rank, objective)
            if rank == 0 and step % 10 == 0:
                print(json.dumps(record), flush=True)
        if seen == 0:
            raise ValueError(f"rank {rank}: no full batch of {job.batch_size} rows in its data shard")
    save_hf(trainee, job, run, rank, objective)


def _whole(name: str) -> pa.Table | None:
    """An unsplit dataset (e.g. the labeled pairs), whole, on this worker; None when the run has none."""
    try:
        it = ray.train.get_dataset_shard(name)
    except KeyError:
        return None
    if it is None:
        return None
    return pa.concat_tables(list(it.iter_batches(batch_size=None, batch_format="pyarrow")))


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
            save_state(objective, str(Path(d, OBJECTIVE_STATE)))
        ray.train.report(record, checkpoint=Checkpoint.from_directory(d))


class FixedShards(DataConfig):
    """Each worker's "train" shard is a fixed, equal part of the materialized dataset (`Dataset.split`), the same
    blocks in the same order every epoch, so one seed gives one run. Ray Train's default streaming split hands out
    blocks in arrival order (a different run each time); with `preserve_order` it hands them out in turn and the
    workers wait for each other. Both streaming splits were slower than these shards (bench/results/design_choices.md).
    """

    def configure(self, datasets: dict, world_size: int, worker_handles: Any, worker_node_ids: Any, **kwargs) -> list:
        """Per rank, its iterators: the fixed "train" shard, and the other datasets as Ray Train gives them. None of
        them draws a progress bar: every worker drew one per epoch and dataset, and each refresh reached the driver's
        log as a line (13,000 of them in one demo run)."""
        rest = {name: ds for name, ds in datasets.items() if name != "train"}
        for ds in rest.values():
            ds.context.enable_progress_bars = False  # the dataset's own context (Ray Data copies it per dataset)
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        if "train" in datasets:
            for rank, shard in enumerate(datasets["train"].split(world_size, equal=True)):
                shard.context.enable_progress_bars = False  # each split has its own context
                output[rank]["train"] = shard.iterator()
        return output


def torch_config(job: TrainJob) -> Any:
    """Ray Train's `TorchConfig`: nccl on GPUs, gloo on CPUs."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if job.on_gpu else "gloo")


def run_training(
    job: TrainJob,
    run: TrainRun,
    dataset: ray.data.Dataset,
    name: str,
    storage_path: str,
    objective: Objective | None = None,
    labeled_dataset: ray.data.Dataset | None = None,
) -> dict:
    """Run one training job to completion; returns its final metrics, the step log and the samples it trained on.

    `labeled_dataset` reaches every worker whole (not split): the objective draws from it (the QA generator's
    labeled pairs).
    A rerun with the same `name` and `storage_path` resumes from the latest checkpoint (Ray Train restores its
    state from storage), so a killed driver loses at most `job.checkpoint_every` steps.
    """
    # run the upstream joins once: a lazy dataset re-executes them every epoch (Ray Data spills materialized blocks
    # to disk when they outgrow the object store); in blocks of a few batches (small ones, e.g. after a filter or
    # from_items, made a worker fetch block after block); in order, so that FixedShards gives one run per seed
    ctx = dataset.context
    was_ordered, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        dataset = in_blocks_of(dataset, 4 * job.batch_size).materialize()
    finally:
        ctx.execution_options.preserve_order = was_ordered
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "run": run, "objective": objective or Objective(), "name": name},
        scaling_config=scaling_config(job),
        torch_config=torch_config(job),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset, **({"labeled": labeled_dataset} if labeled_dataset is not None else {})},
        dataset_config=FixedShards(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    history = train_log(result.checkpoint)
    # a worker's gauges leave the dashboard with the worker: the driver keeps the run's final values there
    _show(history[-1], run.run_dir, name)
    samples = history[-1]["step"] * job.grad_accum * job.workers * job.batch_size
    return {"metrics": result.metrics, "history": history, "checkpoint": result.checkpoint.path, "samples": samples}


def train_log(checkpoint: Checkpoint) -> list[dict]:
    """The step log of a run's checkpoint, read from where the checkpoint lives: `as_directory` would first download
    the whole checkpoint to the driver (~45 GB of ZeRO-3 states for the full 3B baseline)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{LOG_NAME}") as f:
        return [json.loads(line) for line in f.read().decode().splitlines()]
