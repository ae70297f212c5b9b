"""The dry run (`jobs/adapt.py --plan [--cluster YAML]`): what every stage reserves, taken from the stages' own plans
and placement's functions, where Ray's autoscaler would launch it on a cluster launcher YAML's node types (its own
scheduling code), and whether it fits there, GPU memory included."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from leaml_ray.config import Config
from leaml_ray.models.spec import Engine
from leaml_ray.train.job import TrainJob

GIB = 2**30
ACCELERATOR_PREFIX = "accelerator_type:"  # ray._common.utils.RESOURCE_CONSTRAINT_PREFIX
# a GPU node type's memory per GPU in a launcher YAML: one of its `labels` (ray-schema.json allows string values;
# the launcher gives them to `ray start` as node labels, so a task could also select on it)
GPU_MEMORY_LABEL = "leaml-ray/gpu-memory-gb"
VLLM_GPU_SHARE = 0.9  # vLLM's default gpu_memory_utilization: the share of each GPU an engine allocates
ENGINE_OVERHEAD_GB = 4.0  # CUDA context, CUDA graphs, the peak activations of a profiled batch (vision encoder too)
TRAIN_OVERHEAD_GB = 3.0  # CUDA context, NCCL buffers, ZeRO-3's gathered layers, allocator slack
ADAM_BYTES = 16  # per trainable parameter: bf16 weight and gradient (2 + 2), fp32 master copy, Adam m and v (3 x 4)
PIXELS_PER_TOKEN = 28 * 28  # Qwen2.5-VL: 14-pixel patches merged 2 x 2 into one language-model token
TEXT_TOKENS = 256  # a training row's instruction and response beside its image tokens
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs of a model: its parameter count and its language model's shapes."""

    params: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


# Hub models of the presets, for when no config.json is on this disk: parameter counts as their Hugging Face model
# pages give them (huggingface.co/Qwen/Qwen2.5-VL-72B-Instruct etc., safetensors totals), shapes from the text part
# of their config.json; NVILA-Lite-2B (huggingface.co/Efficient-Large-Model/NVILA-Lite-2B-hf-preview): its Qwen2-1.5B
# language model, ~2 B with the SigLIP tower. Also found by folder name (s3://bucket/models/Qwen2.5-VL-72B-Instruct).
KNOWN_MODELS = {
    "Qwen2.5-VL-72B-Instruct": ModelShape(73.4e9, 80, 8192, 64, 8, 128, 29568, 152064),
    "Qwen2.5-VL-7B-Instruct": ModelShape(8.29e9, 28, 3584, 28, 4, 128, 18944, 152064),
    "Qwen2.5-VL-3B-Instruct": ModelShape(3.75e9, 36, 2048, 16, 2, 128, 11008, 151936),
    "NVILA-Lite-2B-hf-preview": ModelShape(2.0e9, 28, 1536, 12, 2, 128, 8960, 151936),
}


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """A model's shape from its config.json (the text part of a multimodal one), parameters counted from the shapes:
    the language model's attention, gated MLP and embeddings, and a Qwen2.5-VL vision tower and patch merger."""
    text = config.get("text_config") or config.get("llm_config") or config
    h, layers, heads = text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or h // heads
    inter, vocab = text["intermediate_size"], text["vocab_size"]
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    layer = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim + 3 * h * inter  # q, o; k, v; gate, up, down
    params = layers * layer + vocab * h * (1 if tied else 2)
    vision = config.get("vision_config") or {}
    vh, vi = vision.get("hidden_size", 0), vision.get("intermediate_size", 0)
    params += (vision.get("depth") or vision.get("num_hidden_layers") or 0) * (4 * vh * vh + 3 * vh * vi)
    if "out_hidden_size" in vision:  # Qwen2.5-VL's merger: 2 x 2 patches -> the language model's width
        params += (4 * vh) ** 2 + 4 * vh * vision["out_hidden_size"]
    return ModelShape(float(params), layers, h, heads, kv_heads, head_dim, inter, vocab)


def _config_json(model: str) -> dict[str, Any] | None:
    """config.json of a local model folder; None for hub ids, object-store folders and `zoo:` models (the CPU demo's
    tiny zoo: looking it up here would import the zoo, which builds on this module)."""
    import json
    from pathlib import Path

    path = Path(model).expanduser() / "config.json"
    return json.loads(path.read_text()) if "://" not in model and ":" not in model and path.is_file() else None


def model_shape(model: str) -> tuple[ModelShape, str] | None:
    """A model's shape and checkpoint dtype: from its config.json when it is on this disk, else from KNOWN_MODELS by
    its last path component; None when neither knows it."""
    config = _config_json(model)
    if config is not None:
        text = config.get("text_config") or {}
        dtype = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or "bfloat16"
        return shape_from_config(config), dtype
    shape = KNOWN_MODELS.get(model.rstrip("/").rsplit("/", 1)[-1])
    return (shape, "bfloat16") if shape else None


def engine_memory(shape: ModelShape, s: Engine, dtype_bytes: int) -> dict[str, float]:
    """GB (2^30 bytes) per GPU of one engine replica: its share of the weights, a KV cache that holds `max_num_seqs`
    sequences of `max_model_len` tokens (a full batch at full length), and a fixed overhead."""
    tp, pp = s.tensor_parallel_size, s.pipeline_parallel_size
    kv_heads = math.ceil(shape.kv_heads / tp)  # vLLM replicates KV heads when tensor parallel exceeds their count
    per_token = shape.layers / pp * 2 * kv_heads * shape.head_dim * dtype_bytes  # K and V of this rank's layers
    return {
        "weights": shape.params * dtype_bytes / (tp * pp) / GIB,
        "kv_cache": s.max_num_seqs * s.max_model_len * per_token / GIB,
        "overhead": ENGINE_OVERHEAD_GB,
    }


def lora_params(shape: ModelShape, rank: int) -> float:
    """LoRA parameters on the language model's q, k, v, o, gate, up and down projections (train/core.py's targets)."""
    h, q, kv, inter = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    return float(shape.layers * rank * (2 * (h + q) + 2 * (h + kv) + 3 * (h + inter)))


def train_memory(shape: ModelShape, job: TrainJob, seq: int) -> dict[str, float]:
    """GB per GPU of one bf16 training worker of a job: model states (ZeRO-3 shards all of them
    over the workers, ZeRO-2 all but the weights), activations of a micro batch of `seq`-token rows, a fixed
    overhead. Activations: a decoder layer keeps ~7 bf16 tensors of the hidden width (norms, projections' inputs and
    outputs) and 4 of the MLP width (gate, up, activation, product) per token; with gradient checkpointing only each
    layer's input, plus one layer being recomputed; the logits: bf16, the loss's fp32 copy and the bf16 gradient."""
    full = job.finetune == "full"
    trainable = shape.params if full else lora_params(shape, job.lora_r)
    weights = (shape.params + (0 if full else trainable)) * 2
    rest = trainable * (ADAM_BYTES - 2)
    states = (weights + rest) / job.workers if job.zero_stage == 3 else weights + rest / job.workers
    tokens = job.batch_size * seq
    layer = tokens * 2 * (7 * shape.hidden + 4 * shape.intermediate)
    stored = shape.layers * tokens * shape.hidden * 2 + layer if job.gradient_checkpointing else shape.layers * layer
    return {
        "model_states": states / GIB,
        "activations": stored / GIB,
        "logits": tokens * shape.vocab * 8 / GIB,
        "overhead": TRAIN_OVERHEAD_GB,
    }


def _rounded(parts: dict[str, float] | None) -> dict[str, Any]:
    """The plan's memory keys of a GPU stage: the estimate per GPU and its parts (None: a model it does not know)."""
    if parts is None:
        return {"gpu_memory_needed_gb": None, "gpu_memory_parts_gb": None}
    return {
        "gpu_memory_needed_gb": round(sum(parts.values()), 1),
        "gpu_memory_parts_gb": {k: round(v, 1) for k, v in parts.items()},
    }


def _engine_entry(s: Engine) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "role": s.spec.role,
        "device": s.device,
        "replicas": s.replicas,
        "gpus_per_replica": s.gpus_per_replica,
        "cpus_per_replica": s.cpus_per_replica,
    }
    if s.device == "gpu":
        known = model_shape(s.spec.model)
        dtype_bytes = DTYPE_BYTES.get(s.spec.dtype, DTYPE_BYTES.get(known[1], 2)) if known else 2
        parts = engine_memory(known[0], s, dtype_bytes) if known else None
        entry.update(accelerator_type=s.accelerator_type, node_type=None, gpu_memory_gb=None, **_rounded(parts))
    return entry


def _train_entry(jobs: tuple[TrainJob, ...], max_model_len: int) -> dict[str, Any]:
    """One training stage (or the finetune stages, which share the train settings): its workers, and on GPUs the
    memory of its largest job (`max_model_len`: the role's engine context, which caps a training row too)."""
    t = jobs[0]
    entry: dict[str, Any] = {
        "device": t.device,
        "workers": t.workers,
        "gpus_per_worker": t.gpus_per_worker,
        "cpus_per_worker": t.cpus_per_worker,
        "trains": t.spec.role,
    }
    if t.on_gpu:
        known = model_shape(t.spec.model)
        seq = min(max_model_len, t.spec.max_pixels // PIXELS_PER_TOKEN + TEXT_TOKENS)
        estimates = [train_memory(known[0], job, seq) for job in jobs] if known else []
        parts = max(estimates, key=lambda p: sum(p.values())) if estimates else None  # the largest finetuning mode
        entry.update(accelerator_type=t.accelerator_type, node_type=None, gpu_memory_gb=None, **_rounded(parts))
    return entry


def stage_work(cfg: Config) -> dict[str, Engine | tuple[TrainJob, ...]]:
    """What every stage that reserves resources runs, from the stages' own plans: an engine's replicas, or training
    jobs' workers (the finetune stages: one job per method, which share the train settings)."""
    from leaml_ray.stages import caption, evaluate, finetune, generator, pseudo_qa
    from leaml_ray.stages.common import methods_to_train

    work: dict[str, Engine | tuple[TrainJob, ...]] = {}
    teacher = caption.plan(cfg).teacher
    if teacher.endpoint is None:  # in serve mode the shared teacher runs outside this job
        work["caption"] = teacher
    answers = pseudo_qa.plan(cfg)
    work["generator"] = (generator.plan(cfg).job,)
    work["pseudo_qa"] = answers.generator
    if answers.judge is not None and answers.judge.endpoint is None:
        work[f"pseudo_qa/{answers.consistency_filter}"] = answers.judge
    # the finetune stages train the target as leaml does and as the lora / full baselines of eval.methods do
    jobs = tuple(finetune.plan_for(cfg, m).job for m in methods_to_train(cfg.eval.methods))
    if jobs:
        work["finetune"] = jobs
    work["evaluate"] = evaluate.plan(cfg).target
    return work


def stage_resources(cfg: Config) -> dict[str, Any]:
    """Device, replicas / workers, GPUs and CPUs of every stage of a run, from the stages' own plans; a GPU stage also
    names its accelerator type and its estimated memory per GPU (node type: see `place_on_cluster`)."""
    work = stage_work(cfg)
    # a training row is capped by its role's engine context
    context = {w.spec.role: w.max_model_len for w in work.values() if isinstance(w, Engine)}
    stages: dict[str, dict[str, Any]] = {"prepare": {"device": "cpu"}}
    for stage, w in work.items():
        stages[stage] = _engine_entry(w) if isinstance(w, Engine) else _train_entry(w, context[w[0].spec.role])
    return {"stages": stages}


def stage_demands(entry: dict[str, Any]) -> list[dict[str, float]]:
    """The resource demands Ray's autoscaler sees for a GPU stage: one per engine replica (one actor holding all its
    GPUs) or per training worker (Ray Train's PACK placement group, which the autoscaler flattens into its bundles),
    with 0.001 of `accelerator_type:<name>` when the stage names one (as Ray Data, Ray Train and Serve ask)."""
    train = "workers" in entry
    bundle: dict[str, float] = {
        "CPU": entry["cpus_per_worker" if train else "cpus_per_replica"],
        "GPU": entry["gpus_per_worker" if train else "gpus_per_replica"],
    }
    if entry.get("accelerator_type"):
        bundle[ACCELERATOR_PREFIX + entry["accelerator_type"]] = 0.001
    return [dict(bundle) for _ in range(entry["workers" if train else "replicas"])]


def _node_types(cluster: dict) -> tuple[dict[str, dict], list[str]]:
    """Worker node types as Ray's autoscaler takes them (resources, max_workers) with each GPU type's memory per GPU,
    and the problems of the YAML itself."""
    problems, types = [], {}
    head = cluster.get("head_node_type")
    for name, node in (cluster.get("available_node_types") or {}).items():
        res = node.get("resources") or {}
        if "CPU" not in res or "GPU" not in res:
            problems.append(f"node type {name}: resources must state CPU and GPU counts (e.g. {{CPU: 96, GPU: 8}})")
            continue
        if name == head:
            if res["GPU"]:
                problems.append(f"head node type {name} has GPUs; the shipped configs keep the head GPU-less")
            continue
        types[name] = {"resources": dict(res), "max_workers": node.get("max_workers", 0)}
        if res["GPU"]:
            try:
                types[name]["gpu_memory_gb"] = float((node.get("labels") or {})[GPU_MEMORY_LABEL])
            except (KeyError, TypeError, ValueError):
                example = f'{{{GPU_MEMORY_LABEL}: "80"}}'
                problems.append(f"node type {name}: its labels must state its GPU memory, e.g. {example} (GB per GPU)")
    return types, problems


def autoscaler_nodes(
    types: dict[str, dict], max_workers: int, demands: list[dict[str, float]], up: tuple[tuple[str, dict], ...] = ()
) -> tuple[dict[str, int], list[dict[str, float]], dict[str, int]]:
    """Where Ray's autoscaler puts `demands` on a cluster whose worker nodes `up` (type, resources) are idle: the nodes
    launched (count per type), the demands it cannot place, and the idle nodes it packs demands onto (count per
    type). Its own bin packing and utilization scorer, called as `ResourceDemandScheduler.get_nodes_to_launch` calls
    them (ray/autoscaler/_private/resource_demand_scheduler.py)."""
    import logging
    from functools import partial

    from ray.autoscaler._private import resource_demand_scheduler as scheduler
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary

    scorer = partial(scheduler._default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))
    log = logging.getLogger(scheduler.__name__)
    level = log.level
    log.setLevel(logging.ERROR)  # its warning for demands no node type fits: the plan says why in a problem line
    try:
        left, after = scheduler.get_bin_pack_residual([dict(r) for _, r in up], demands)
        existing: dict[str, int] = {}
        for name, _ in up:
            existing[name] = existing.get(name, 0) + 1
        nodes, residual = scheduler.get_nodes_for(types, existing, "", max_workers - len(up), left, scorer)
    finally:
        log.setLevel(level)
    reused: dict[str, int] = {}
    for (name, before), packed in zip(up, after, strict=True):
        if packed != before:
            reused[name] = reused.get(name, 0) + 1
    return {name: n for name, n in nodes.items() if n}, residual, reused


def _unplaced(entry: dict[str, Any], types: dict[str, dict], placed: int) -> str:
    """Why a stage's demands do not all fit the node types: its accelerator type, its shape, or max_workers."""
    (bundle, *_), count = stage_demands(entry), entry.get("workers", entry.get("replicas"))
    gpus, cpus, accelerator = bundle["GPU"], bundle["CPU"], entry.get("accelerator_type")
    key = ACCELERATOR_PREFIX + (accelerator or "")
    offering = {n: t for n, t in types.items() if not accelerator or key in t["resources"]}
    if not offering:
        owner = "train" if "workers" in entry else entry["role"]
        offered = sorted(
            f"{r.removeprefix(ACCELERATOR_PREFIX)} ({n})"
            for n, t in types.items()
            for r in t["resources"]
            if r.startswith(ACCELERATOR_PREFIX)
        )
        return (
            f"{owner}.accelerator_type {accelerator}: no node type declares accelerator_type:{accelerator}; set it to"
            f" one they do: {', '.join(offered) or 'none'}"
        )
    if not any(all(t["resources"].get(k, 0) >= v for k, v in bundle.items()) for t in offering.values()):
        of = f" of accelerator type {accelerator}" if accelerator else ""
        have = max(t["resources"]["GPU"] for t in offering.values())
        return f"needs {gpus} GPUs and {cpus:g} CPUs on one node{of}; no worker node type has that (largest: {have})"
    return f"needs {count} x ({gpus} GPUs, {cpus:g} CPUs); the node types fit {placed} within max_workers"


def _too_little_memory(entry: dict[str, Any], node_type: str) -> str | None:
    """Why a stage does not fit in its node type's GPU memory; None when it does (or either is unknown)."""
    need, have = entry["gpu_memory_needed_gb"], entry["gpu_memory_gb"]
    usable = have * (1.0 if "workers" in entry else VLLM_GPU_SHARE) if have else None
    if need is None or usable is None or need <= usable:
        return None
    parts = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in entry["gpu_memory_parts_gb"].items())
    engine = "" if "workers" in entry else f" (vLLM allocates {VLLM_GPU_SHARE:.0%}: {usable:g})"
    return f"needs ~{need:g} GB per GPU ({parts}) and {node_type} has {have:g} GB GPUs{engine}"


def place_on_cluster(the_plan: dict[str, Any], cluster: dict) -> tuple[dict[str, Any], list[str]]:
    """The plan with each GPU stage's node types (`nodes`: the nodes it runs on, per type; `launched`: those Ray's
    autoscaler adds for it) and their GPU memory, and the problems (one line each) of running it there; none: it fits.

    Stages run one after another and each outlasts the cluster's idle_timeout_minutes (GPU stages take tens of
    minutes to hours): when a stage starts, the nodes the stage before it ran on are idle and still up, and Ray places
    the new work on them where it fits before launching any; older nodes are gone. An accelerator type is what keeps a
    stage off another's nodes. `jobs/adapt.py --rehearse` checks this on a fake cluster with Ray's own autoscaler."""
    types, problems = _node_types(cluster)
    max_workers = cluster.get("max_workers", sum(t["max_workers"] for t in types.values()))
    stages = {}
    up: tuple[tuple[str, dict], ...] = ()  # the worker nodes the previous GPU stage ran on: (type, resources)
    for stage, entry in the_plan["stages"].items():
        stages[stage] = entry = dict(entry)
        if entry["device"] == "cpu":
            up = ()  # idle through a CPU stage: gone
            continue
        demands = stage_demands(entry)
        launched, residual, reused = autoscaler_nodes(types, max_workers, demands, up)
        nodes = dict(reused)
        for name, n in launched.items():
            nodes[name] = nodes.get(name, 0) + n
        memories = [types[n]["gpu_memory_gb"] for n in nodes if "gpu_memory_gb" in types[n]]
        entry.update(
            node_type="+".join(sorted(nodes)) or None,
            nodes=nodes,
            launched=launched,
            gpu_memory_gb=min(memories, default=None),
        )
        why = _unplaced(entry, types, len(demands) - len(residual)) if residual else None
        why = why or (_too_little_memory(entry, entry["node_type"]) if nodes else None)
        if why:
            problems.append(f"{stage}: {why}")
        up = tuple((name, types[name]["resources"]) for name, n in sorted(nodes.items()) for _ in range(n))
    return {**the_plan, "stages": stages}, problems


def check_cluster(the_plan: dict[str, Any], cluster: dict) -> list[str]:
    """Problems (one line each) of running the plan's stages on a launcher YAML's node types; empty when it fits."""
    return place_on_cluster(the_plan, cluster)[1]


def format_plan(the_plan: dict[str, Any]) -> str:
    """The plan as a table for people (GPU GB: the estimate per GPU / the node type's memory per GPU)."""
    rows = [
        f"{'stage':<18} {'device':<6} {'replicas/workers':>16} {'GPUs each':>9} {'CPUs each':>9}  {'role':<16}"
        f" {'accelerator':<11} {'node type':<16} {'GPU GB need/have':>16}"
    ]
    for stage, e in the_plan["stages"].items():
        count = e.get("replicas", e.get("workers", ""))
        gpus = e.get("gpus_per_replica", e.get("gpus_per_worker", ""))
        cpus = e.get("cpus_per_replica", e.get("cpus_per_worker", ""))
        role = e.get("role", f"train {e['trains']}" if "workers" in e else "")
        row = f"{stage:<18} {e['device']:<6} {count!s:>16} {gpus!s:>9} {cpus!s:>9}  {role:<16}"
        if e["device"] == "gpu":
            need, have = e["gpu_memory_needed_gb"], e["gpu_memory_gb"]
            memory = f"{'?' if need is None else f'{need:.1f}'}/{'-' if have is None else f'{have:g}'}"
            row += f" {e['accelerator_type'] or 'any':<11} {e['node_type'] or '-':<16} {memory:>16}"
        rows.append(row.rstrip())
    if any(e["device"] == "gpu" for e in the_plan["stages"].values()):
        rows.append(
            f"(GPU GB: the estimated need per GPU / the node type's memory per GPU, of which vLLM engines allocate"
            f" {VLLM_GPU_SHARE:.0%}; ? unknown model, - no cluster)"
        )
    return "\n".join(rows)
