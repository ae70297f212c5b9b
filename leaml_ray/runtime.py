"""Process setup shared by the jobs: logging and the Ray connection."""

from __future__ import annotations

import logging
import os
import tempfile

import ray

from leaml_ray.config import ClusterSection


def setup_logging(level: str = "INFO") -> None:
    """Timestamped leaml_ray log lines on stderr (Ray's own loggers keep their settings)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s leaml %(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("leaml_ray")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def connect(cluster: ClusterSection) -> None:
    """Join the cluster this job runs on (ray job submit sets RAY_ADDRESS), or start a private local one."""
    if ray.is_initialized():
        return
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # address="local": never attach to some other user's `ray start` cluster on this machine.
    temp_dir = cluster.temp_dir or tempfile.mkdtemp(prefix="leaml-ray-")
    # at least 4 logical CPUs: the engine and detokenizer actors hold one each and would starve the
    # read tasks of a 2-core laptop (the job then hangs without an error)
    ray.init(
        address="local",
        num_cpus=cluster.num_cpus or max(4, os.cpu_count() or 1),
        include_dashboard=cluster.dashboard,
        dashboard_host=cluster.dashboard_host,
        _temp_dir=temp_dir,
    )
