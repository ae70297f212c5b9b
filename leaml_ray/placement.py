"""Placement from the config: where every engine replica and every training worker runs, and the Ray configs that
say so (ray.data.llm processors, Ray Data actor pools, Ray Serve LLM deployments, Ray Train scaling).

Nothing here looks at the hardware of the calling process: under `ray job submit` the driver that builds these
configs runs on a GPU-less head, and the GPUs it asks for are what makes the autoscaler add GPU nodes.
`plan(cfg)` reports the same figures per stage (`jobs/adapt.py --plan`), computed by the same functions, and
`check_cluster` compares them with the node types of a Ray cluster launcher YAML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from leaml_ray.config import Config, ModelSection

ROLES = ("teacher", "generator", "target")
# the environment of vLLM replicas on CPUs: in-process engine (3 s start instead of ~50 s), a small KV cache, no CPU
# pinning on shared machines
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}
# a role's engine (spec_for + engine_settings): these fields can change what it generates...
ENGINE_FIELDS = ("model", "trust_remote_code", "dtype", "max_pixels", "max_model_len")
ENGINE_PARALLEL_FIELDS = ("tensor_parallel_size", "pipeline_parallel_size")  # kernels and reductions differ
# ...these only say where it runs
ENGINE_PLACEMENT_FIELDS = ("device", "engine", "replicas", "cpus_per_replica", "engine_batch_size")


def engine_keys(role: str) -> tuple[str, ...]:
    """The config keys through which a role's engine can change its generations (a stage's `config_keys`)."""
    return (*(f"{role}.{f}" for f in ENGINE_FIELDS + ENGINE_PARALLEL_FIELDS), "run.seed")


def engine_unhashed_keys(role: str) -> tuple[str, ...]:
    """The config keys that only place a role's engine (a stage's `unhashed_keys`); the teacher may be served."""
    served = ("teacher.mode", "teacher.endpoint") if role == "teacher" else ()
    return (*(f"{role}.{f}" for f in ENGINE_PLACEMENT_FIELDS), *served)


@dataclass(frozen=True)
class EngineSettings:
    """How one role's inference engine runs: device, replicas, parallelism, batch size and lengths."""

    batch_size: int = 16
    replicas: int = 1
    max_model_len: int = 512
    max_num_seqs: int = 64
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    dtype: str = "auto"
    seed: int = 0
    backend: str = "ray_data_llm"  # or "actor_pool": Ray Data actors owning an in-process vllm.LLM
    device: str = "cpu"
    cpus_per_replica: float = 1.0
    max_pixels: int = 256 * 28 * 28

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size if self.device == "gpu" else 0

    @property
    def rows_per_part(self) -> int:
        """Results per resumable part file: a crash loses at most this many generations."""
        return 4 * self.batch_size


def engine_settings(cfg: Config, role: str) -> EngineSettings:
    """The engine settings of one role (teacher, generator, target), from that role's section only."""
    section: ModelSection = getattr(cfg, role)
    return EngineSettings(
        batch_size=section.engine_batch_size,
        replicas=section.replicas,
        max_model_len=section.max_model_len,
        tensor_parallel_size=section.tensor_parallel_size,
        pipeline_parallel_size=section.pipeline_parallel_size,
        dtype=section.dtype,
        seed=cfg.run.seed,
        backend=section.engine,
        device=section.device,
        cpus_per_replica=section.cpus_per_replica,
        max_pixels=section.max_pixels,
    )


def _bundles(s: EngineSettings) -> dict[str, Any]:
    """One placement group per replica: a GPU bundle per tensor/pipeline rank, or one CPU bundle."""
    if s.device == "cpu":
        return {"bundles": [{"CPU": s.cpus_per_replica}]}
    n = s.gpus_per_replica
    # tensor parallel ranks talk every layer: all on one node (STRICT_PACK); pipeline stages may span nodes
    return {
        "bundles": [{"GPU": 1, "CPU": s.cpus_per_replica / n} for _ in range(n)],
        "strategy": "STRICT_PACK" if s.pipeline_parallel_size == 1 else "PACK",
    }


def ray_data_llm_placement(s: EngineSettings) -> dict[str, Any]:
    """Placement keywords of `vLLMEngineProcessorConfig`."""
    return {
        "concurrency": s.replicas,
        "placement_group_config": _bundles(s),
        "runtime_env": {"env_vars": CPU_ENV} if s.device == "cpu" else None,
    }


def actor_pool_placement(s: EngineSettings) -> dict[str, Any]:
    """Resource keywords of the Ray Data actor pool (`map_batches`) whose actors own an in-process vLLM engine."""
    args: dict[str, Any] = {"num_cpus": s.cpus_per_replica, "num_gpus": 1 if s.device == "gpu" else 0}
    if s.device == "cpu":
        args["runtime_env"] = {"env_vars": CPU_ENV}
    return args


def serve_placement(s: EngineSettings) -> dict[str, Any]:
    """Placement keywords of a Ray Serve `LLMConfig`."""
    out: dict[str, Any] = {"placement_group_config": _bundles(s)}
    if s.device == "cpu":
        out["accelerator_config"] = {"kind": "cpu"}
        out["runtime_env"] = {"env_vars": CPU_ENV}
    else:
        out["accelerator_config"] = {"kind": "gpu"}
    return out


@dataclass(frozen=True)
class TrainPlacement:
    """Where the workers of a Ray Train run go."""

    device: str = "cpu"
    workers: int = 2
    cpus_per_worker: float = 1.0

    @property
    def gpus_per_worker(self) -> int:
        return 1 if self.device == "gpu" else 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "gpu" else "gloo"


def train_placement(cfg: Config) -> TrainPlacement:
    """The training placement of a run (generator and target training share it)."""
    t = cfg.train
    return TrainPlacement(device=t.device, workers=t.num_workers, cpus_per_worker=t.cpus_per_worker)


def scaling_config(p: TrainPlacement) -> Any:
    """Ray Train's `ScalingConfig` for a placement."""
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=p.workers, use_gpu=p.device == "gpu", resources_per_worker={"CPU": p.cpus_per_worker}
    )


def torch_config(p: TrainPlacement) -> Any:
    """Ray Train's `TorchConfig`: nccl on GPUs, gloo on CPUs."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend=p.backend)


# --- the plan: the same figures per stage, and a check against a cluster's node types ---------------------------


def _engine_entry(cfg: Config, role: str) -> dict[str, Any]:
    s = engine_settings(cfg, role)
    return {
        "role": role,
        "device": s.device,
        "replicas": s.replicas,
        "gpus_per_replica": s.gpus_per_replica,
        "cpus_per_replica": s.cpus_per_replica,
    }


def plan(cfg: Config) -> dict[str, Any]:
    """Device, replicas / workers, GPUs and CPUs of every stage of a run, computed by the functions above."""
    t = train_placement(cfg)
    train = {
        "device": t.device,
        "workers": t.workers,
        "gpus_per_worker": t.gpus_per_worker,
        "cpus_per_worker": t.cpus_per_worker,
    }
    stages: dict[str, dict[str, Any]] = {"prepare": {"device": "cpu"}}
    if cfg.teacher.mode == "offline":  # in serve mode the shared teacher runs outside this job
        stages["caption"] = _engine_entry(cfg, "teacher")
    stages["generator"] = dict(train)
    stages["pseudo_qa"] = _engine_entry(cfg, "generator")
    check = cfg.pseudo_qa.consistency_filter
    if check == "target" or (check == "teacher" and cfg.teacher.mode == "offline"):
        stages[f"pseudo_qa/{check}"] = _engine_entry(cfg, check)
    stages["finetune"] = dict(train)
    stages["evaluate"] = _engine_entry(cfg, "target")
    return {"stages": stages}


def _node_types(cluster: dict) -> tuple[dict[str, dict], list[str]]:
    """Worker node types with explicit CPU/GPU counts, and the problems of the YAML itself."""
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
        types[name] = {"CPU": res["CPU"], "GPU": res["GPU"], "max_workers": node.get("max_workers", 0)}
    return types, problems


def _fit(need_gpus: int, need_cpus: float, count: int, types: dict[str, dict], max_workers: int) -> str | None:
    """Why `count` units of (GPUs, CPUs), each on one node, do not fit the worker node types; None when they do."""
    usable = {n: t for n, t in types.items() if t["GPU"] >= need_gpus and t["CPU"] >= need_cpus}
    if not usable:
        have = max((t["GPU"] for t in types.values()), default=0) if need_gpus else None
        what = f"{need_gpus} GPUs and {need_cpus:g} CPUs" if need_gpus else f"{need_cpus:g} CPUs"
        largest = f"; the largest GPU node type has {have}" if need_gpus else ""
        return f"needs {what} on one node, and no worker node type has that{largest}"
    per_node = {
        n: min(t["GPU"] // need_gpus if need_gpus else math.inf, int(t["CPU"] // need_cpus)) for n, t in usable.items()
    }
    capacity, nodes = 0, 0
    for name in sorted(usable, key=lambda n: -per_node[n]):
        take = min(usable[name]["max_workers"], max_workers - nodes, math.ceil((count - capacity) / per_node[name]))
        take = max(take, 0)
        capacity += take * per_node[name]
        nodes += take
        if capacity >= count:
            return None
    return f"needs {count} x ({need_gpus} GPUs, {need_cpus:g} CPUs); the node types fit {capacity} within max_workers"


def check_cluster(the_plan: dict[str, Any], cluster: dict) -> list[str]:
    """Problems (one line each) of running the plan's stages on a launcher YAML's node types; empty when it fits."""
    types, problems = _node_types(cluster)
    max_workers = cluster.get("max_workers", sum(t["max_workers"] for t in types.values()))
    for stage, entry in the_plan["stages"].items():
        if entry["device"] == "cpu":
            continue
        if "workers" in entry:
            why = _fit(entry["gpus_per_worker"], entry["cpus_per_worker"], entry["workers"], types, max_workers)
        else:
            why = _fit(entry["gpus_per_replica"], entry["cpus_per_replica"], entry["replicas"], types, max_workers)
        if why:
            problems.append(f"{stage}: {why}")
    return problems


def format_plan(the_plan: dict[str, Any]) -> str:
    """The plan as a table for people."""
    rows = [f"{'stage':<18} {'device':<6} {'replicas/workers':>16} {'GPUs each':>9} {'CPUs each':>9}  role"]
    for stage, e in the_plan["stages"].items():
        count = e.get("replicas", e.get("workers", ""))
        gpus = e.get("gpus_per_replica", e.get("gpus_per_worker", ""))
        cpus = e.get("cpus_per_replica", e.get("cpus_per_worker", ""))
        role = e.get("role", "train" if "workers" in e else "")
        rows.append(f"{stage:<18} {e['device']:<6} {count!s:>16} {gpus!s:>9} {cpus!s:>9}  {role}")
    return "\n".join(rows)
