"""Placement: the Ray configs that say where every engine replica runs (ray.data.llm processors, Ray Data actor pools,
Ray Serve LLM deployments), from a stage plan's engine handles; a training job's workers: `train/loop.py`
(`scaling_config`).

Nothing here looks at the hardware of the calling process: under `ray job submit` the driver that builds these
configs runs on a GPU-less head, and the GPUs it asks for are what makes the autoscaler add GPU nodes.
`cluster_plan.py` reports the same figures per stage (`jobs/adapt.py --plan`) and places them on a cluster YAML.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leaml_ray.models.spec import Engine

# the environment of vLLM replicas on CPUs: in-process engine (3 s start instead of ~50 s), a small KV cache, no CPU
# pinning on shared machines
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}


def _bundles(engine: Engine) -> dict[str, Any]:
    """One placement group per replica: a GPU bundle per tensor/pipeline rank, or one CPU bundle."""
    if engine.device == "cpu":
        return {"bundles": [{"CPU": engine.cpus_per_replica}]}
    n = engine.gpus_per_replica
    # tensor parallel ranks talk every layer: all on one node (STRICT_PACK); pipeline stages may span nodes
    return {
        "bundles": [{"GPU": 1, "CPU": engine.cpus_per_replica / n} for _ in range(n)],
        "strategy": "STRICT_PACK" if engine.pipeline_parallel_size == 1 else "PACK",
    }


def ray_data_llm_placement(engine: Engine) -> dict[str, Any]:
    """Placement keywords of `vLLMEngineProcessorConfig`: a fixed pool of `replicas` engine actors (an int would be
    a pool that ramps up from one), each one actor on one node holding all its devices (see `ray_data_llm_backend`).
    """
    bundle: dict[str, float] = {"CPU": engine.cpus_per_replica}
    if engine.gpus_per_replica:
        bundle["GPU"] = engine.gpus_per_replica
    return {
        "concurrency": (engine.replicas, engine.replicas),
        "placement_group_config": {"bundles": [bundle]},
        "runtime_env": {"env_vars": CPU_ENV} if engine.device == "cpu" else None,
        # with the "mp" / "uni" executor vLLMEngineStage passes it to map_batches: accelerator_type:<name> on each
        # replica actor (ray/llm/_internal/batch/stages/vllm_engine_stage.py, post_init)
        "accelerator_type": engine.accelerator_type,
    }


def ray_data_llm_backend(engine: Engine) -> str:
    """vLLM's executor for a ray.data.llm replica: its tensor / pipeline ranks are vLLM's own processes ("mp") inside
    the replica's actor, which holds every device of the replica, so the replica reserves nothing else.

    Not "ray", ray.data.llm's default above one device: its `ray_remote_args_fn` creates a new placement group at
    every call, and Ray Data calls it at executor start and from its memory issue detector every 30 s; nothing
    removes them, so the stage keeps reserving whole GPU nodes that no actor uses and a later Ray Train run never
    places its workers (ray-project/ray#64035, #64012; ray 2.60 vllm_engine_stage._ray_scheduling_strategy_fn).
    """
    return "mp" if engine.tensor_parallel_size * engine.pipeline_parallel_size > 1 else "uni"


def actor_pool_placement(engine: Engine) -> dict[str, Any]:
    """Resource keywords of the Ray Data actor pool (`map_batches`) whose actors own an in-process vLLM engine."""
    args: dict[str, Any] = {"num_cpus": engine.cpus_per_replica, "num_gpus": 1 if engine.device == "gpu" else 0}
    if engine.device == "cpu":
        args["runtime_env"] = {"env_vars": CPU_ENV}
    if engine.accelerator_type:  # map_batches turns it into the resource accelerator_type:<name> of each actor
        args["accelerator_type"] = engine.accelerator_type
    return args


def replica_resources(engine: Engine) -> dict[str, float]:
    """The resources one engine replica's actor holds, as Ray's scheduler and autoscaler see them: the remote args
    its backend gives the actor (ray.data.llm derives `num_cpus` / `num_gpus` from the placement bundle under the
    "uni" / "mp" executors: vllm_engine_stage.py, post_init), turned into resources by Ray's own function."""
    from ray._common.utils import resources_from_ray_options

    if engine.backend == "actor_pool":
        args = actor_pool_placement(engine)
        options = {"num_cpus": args["num_cpus"], "num_gpus": args["num_gpus"]}
    else:
        (bundle,) = ray_data_llm_placement(engine)["placement_group_config"]["bundles"]
        options = {"num_cpus": bundle["CPU"], "num_gpus": bundle.get("GPU", 0)}
    resources = resources_from_ray_options({**options, "accelerator_type": engine.accelerator_type})
    return {k: v for k, v in resources.items() if v}


def serve_placement(engine: Engine) -> dict[str, Any]:
    """Placement keywords of a Ray Serve `LLMConfig`."""
    out: dict[str, Any] = {"placement_group_config": _bundles(engine)}
    if engine.device == "cpu":
        out["accelerator_config"] = {"kind": "cpu"}
        out["runtime_env"] = {"env_vars": CPU_ENV}
    else:
        out["accelerator_config"] = {"kind": "gpu"}
    if (
        engine.accelerator_type
    ):  # LLMConfig adds accelerator_type:<name> to every bundle (vllm_models.placement_bundles)
        out["accelerator_type"] = engine.accelerator_type
    return out
