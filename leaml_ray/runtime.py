"""Process setup shared by the jobs: logging and the Ray connection."""

from __future__ import annotations

import logging
import os
import tempfile

import ray

from leaml_ray.config import ClusterSection, Config
from leaml_ray.errors import UserError


def setup_logging(level: str = "INFO") -> None:
    """Timestamped leaml_ray log lines on stderr (Ray's own loggers keep their settings)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s leaml %(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("leaml_ray")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def cluster_address(cluster: ClusterSection) -> str | None:
    """The Ray cluster to join (ray job submit sets RAY_ADDRESS); None: a private local instance."""
    return cluster.address or os.environ.get("RAY_ADDRESS")


def local_ray_env() -> None:
    """Defaults for a Ray instance this process starts on its own machine (its workers inherit them): Ray Data's
    parquet reader lists every read's files through a pool of footer-reading actors, 32 by default, each a new
    worker process, which costs a few-core machine seconds per read of a handful of files (1.5-2 s a read instead of
    ~8 s on 2 cores). A cluster keeps Ray's default: there the footers are many and on object storage."""
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(max(1, (os.cpu_count() or 1) // 4)))


def connect(cluster: ClusterSection) -> None:
    """Join the cluster this job runs on (ray job submit sets RAY_ADDRESS), or start a private local one."""
    if ray.is_initialized():
        return
    address = cluster_address(cluster)
    if address:
        ray.init(address=address)
        return
    # address="local": never attach to some other user's `ray start` cluster on this machine.
    temp_dir = cluster.temp_dir or tempfile.mkdtemp(prefix="leaml-ray-")
    local_ray_env()
    # at least 4 logical CPUs: the engine and detokenizer actors hold one each and would starve the
    # read tasks of a 2-core laptop (the job then hangs without an error)
    ray.init(
        address="local",
        num_cpus=cluster.num_cpus or max(4, os.cpu_count() or 1),
        include_dashboard=cluster.dashboard,
        dashboard_host=cluster.dashboard_host,
        _temp_dir=temp_dir,
    )


def check_run_dir_for_cluster(cfg: Config) -> None:
    """Refuse a local run dir that other nodes cannot see: rank 0 of a training run or an engine replica on another
    node would write to its own disk, and the driver would find nothing."""
    if "://" in cfg.run.dir or cfg.run.shared_fs:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpu_roles = cfg.train.device == "gpu" or any(
        getattr(cfg, r).device == "gpu" for r in ("teacher", "generator", "target")
    )
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    if len(nodes) > 1 or (gpu_roles and not has_gpus):
        why = f"{len(nodes)} nodes" if len(nodes) > 1 else "GPU nodes the autoscaler adds"
        raise UserError(
            f"run.dir {cfg.run.dir} is a local path on a cluster with {why}; use an s3:// / gs:// run dir, "
            "or set run.shared_fs=true if every node mounts it"
        )
