"""The rehearsal (`jobs/adapt.py --config NAME --rehearse --cluster YAML`): on a fake autoscaling cluster whose node
types mirror the launcher YAML's, reserve each stage's resources exactly as the real run asks for them, let Ray's
autoscaler launch nodes for it, record where it landed and how long that took, release it and go on.

What a stage reserves comes from the functions the real run builds its requests with: each engine replica's actor
resources (`placement.replica_resources`: one single-bundle placement group per replica, the demand the replica
actors of a Ray Data pool make one by one) and Ray Train's worker placement group (`train.job.worker_placement`).
No model is loaded and no GPU is touched: GPUs and accelerator types are logical resources of the fake nodes.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from leaml_ray.cluster_plan import place_on_cluster, stage_resources, stage_work
from leaml_ray.config import Config
from leaml_ray.fake_cluster import FakeCluster, worker_nodes
from leaml_ray.models.spec import Engine
from leaml_ray.placement import replica_resources
from leaml_ray.train.job import TrainJob, worker_placement

NODE_OBJECT_STORE = 100 * 2**20  # bytes of object store per fake node: placement groups hold no objects
# a real stage outlasts the YAML's idle_timeout_minutes, so the nodes it leaves idle are gone when the next starts;
# the fake cluster's short timeout lets the rehearsal wait for that instead of for ten minutes
IDLE_TIMEOUT_MINUTES = 0.1
ENGINE_STRATEGY = "PACK"  # a single bundle: PACK or not, the autoscaler sees one demand per replica


def reservations(work: Engine | tuple[TrainJob, ...]) -> list[tuple[list[dict[str, float]], str]]:
    """The placement groups (bundles, strategy) that stand for a stage's requests: one per engine replica, or the
    worker group of its largest training job (the finetune stages share the train settings: all are the same)."""
    if isinstance(work, Engine):
        return [([replica_resources(work)], ENGINE_STRATEGY) for _ in range(work.replicas)]
    return [max((worker_placement(job) for job in work), key=lambda p: len(p[0]))]


def fake_node_types(cluster: dict[str, Any]) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """The head's resources and the worker node types of a launcher YAML, as the fake provider takes them: the same
    resources (GPUs and custom resources included), `min_workers`, `max_workers` and labels."""
    head_type = cluster.get("head_node_type")
    head: dict[str, float] = {"object_store_memory": NODE_OBJECT_STORE}
    types: dict[str, dict[str, Any]] = {}
    for name, node in (cluster.get("available_node_types") or {}).items():
        resources = dict(node.get("resources") or {})
        if name == head_type:
            head.update(resources)
            continue
        types[name] = {
            "resources": {**resources, "object_store_memory": NODE_OBJECT_STORE},
            "min_workers": node.get("min_workers", 0),
            "max_workers": node.get("max_workers", 0),
            "labels": {k: str(v) for k, v in (node.get("labels") or {}).items()},
        }
    return head, types


def _place(
    stage: str, work: Engine | tuple[TrainJob, ...], min_workers: dict[str, int], timeout_s: float
) -> dict[str, Any]:
    """Reserve one stage's placement groups, wait for the autoscaler to place them, hold them until it has removed
    the nodes they left idle (down to each type's `min_workers`), then release them."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    before = set(worker_nodes())
    groups = [
        placement_group(bundles, strategy=strategy, name=f"rehearse-{stage}-{i}")
        for i, (bundles, strategy) in enumerate(reservations(work))
    ]
    start = time.monotonic()
    pending = [g.ready() for g in groups]
    ready, _ = ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
    seconds = time.monotonic() - start
    types = worker_nodes()
    placed_on: dict[str, int] = {}
    used: set[str] = set()
    bundles = 0
    for group in groups:
        table = placement_group_table(group)
        if table["state"] != "CREATED":
            continue
        for node in table["bundles_to_node_id"].values():
            bundles += 1
            used.add(node)
            kind = types.get(node, "head")
            placed_on[kind] = placed_on.get(kind, 0) + 1
    # hold a placed stage while the autoscaler removes the nodes it left idle, as during a real stage's hours
    deadline = time.monotonic() + timeout_s
    while len(ready) == len(groups) and _removable(used, min_workers) and time.monotonic() < deadline:
        time.sleep(1)
    for group in groups:
        remove_placement_group(group)
    return {
        "bundles": sum(len(b) for b, _ in reservations(work)),
        "bundles_placed": bundles,
        "placed_on": placed_on,
        "launched": sorted(types[n] for n in set(types) - before),
        "seconds_to_place": round(seconds, 1),
        "placed": len(ready) == len(groups),
    }


def _removable(used: set[str], min_workers: dict[str, int]) -> list[str]:
    """Worker nodes outside `used` that the autoscaler removes once idle: those above their type's min_workers."""
    alive = worker_nodes()
    count = Counter(alive.values())
    return [n for n, kind in alive.items() if n not in used and count[kind] > min_workers.get(kind, 0)]


def rehearse(cfg: Config, cluster: dict[str, Any], timeout_s: float = 120) -> tuple[dict[str, Any], list[str]]:
    """Each stage of `cfg` placed on a fake cluster mirroring `cluster` (a launcher YAML), in pipeline order; returns
    the plan (`--plan`'s, with each stage's rehearsal) and the problems: a stage not placed within `timeout_s`, and
    a stage that landed on other node types than `--plan` says (there the plan is wrong)."""
    import ray

    the_plan, _ = place_on_cluster(stage_resources(cfg), cluster)
    head, types = fake_node_types(cluster)
    max_workers = cluster.get("max_workers", sum(t["max_workers"] for t in types.values()))
    minimum = {name: t["min_workers"] for name, t in types.items()}
    problems: list[str] = []
    fake = FakeCluster(types, head, max_workers, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
    with fake:
        ray.init(address=fake.address, log_to_driver=False, configure_logging=False)
        try:
            for stage, work in stage_work(cfg).items():
                entry = the_plan["stages"][stage]
                entry["rehearsal"] = result = _place(stage, work, minimum, timeout_s)
                if not result["placed"]:
                    (bundle, *_), _ = reservations(work)[0]
                    problems.append(
                        f"{stage}: {result['bundles_placed']} of {result['bundles']} bundles placed in {timeout_s:g} s;"
                        f" no node type the autoscaler may launch fits {_demand(bundle)}"
                    )
                elif entry.get("nodes") and set(result["placed_on"]) != set(entry["nodes"]):
                    problems.append(
                        f"{stage}: placed on {', '.join(sorted(result['placed_on']))}, --plan says"
                        f" {', '.join(sorted(entry['nodes']))} (the rehearsal is right: report it)"
                    )
        finally:
            ray.shutdown()
    return the_plan, problems


def _demand(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def format_rehearsal(the_plan: dict[str, Any]) -> str:
    """Per stage: the node types launched for it, the bundles placed (and where), the seconds placement took."""
    rows = [f"{'stage':<18} {'launched':<28} {'bundles placed':>14} {'on':<24} {'seconds':>7}"]
    for stage, e in the_plan["stages"].items():
        r = e.get("rehearsal")
        if r is None:
            rows.append(f"{stage:<18} (reserves nothing: Ray Data tasks)")
            continue
        on = ", ".join(f"{n} x{k}" for n, k in sorted(r["placed_on"].items())) or "-"
        placed = f"{r['bundles_placed']}/{r['bundles']}"
        rows.append(
            f"{stage:<18} {', '.join(r['launched']) or '-':<28} {placed:>14} {on:<24} {r['seconds_to_place']:>7}"
        )
    return "\n".join(rows)
