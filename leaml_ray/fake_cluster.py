"""A Ray cluster on this machine whose worker nodes Ray's autoscaler launches and removes: the `fake_multinode`
node provider (ray/autoscaler/_private/fake_multi_node/node_provider.py), as Ray's own autoscaler tests use it.

Every worker node is a real raylet process with the resources its node type declares (GPUs and accelerator types as
logical resources: nothing touches a GPU), started and terminated by the real autoscaler from resource demand, and
killable like a lost spot instance. Unlike `ray.cluster_utils.AutoscalingCluster`, which runs `ray stop --force`
(every Ray process on the machine), the head runs in a temp dir of its own on free ports, and `stop` ends only the
processes this cluster started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

NODE_TYPE_LABEL = "leaml-ray/node-type"  # a label on every fake worker node: which node type it is
HEAD_NODE_TYPE = "ray.head.default"  # the fake provider's name for the head (FAKE_HEAD_NODE_TYPE)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeNodeProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider, with one difference: each node unpacks runtime envs into a folder of its own.

    Fake nodes share the head's session dir, and a node that sets up a job's working dir for the first time unpacks
    it afresh (working_dir.py `create`: overwrite=True), deleting the folder the other nodes' workers and the job's
    driver run in (`FileNotFoundError` from `Path.resolve()`); real nodes have disks of their own."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):  # noqa: ANN001
        import functools

        import ray._private.parameter as parameter

        with self.lock:  # the autoscaler launches from several threads; RayParams is swapped only while this runs
            params = parameter.RayParams
            folder = f"runtime_resources_{self._next_node_id + 1}"  # the id the base class gives this node
            parameter.RayParams = functools.partial(params, runtime_env_dir_name=folder)
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                parameter.RayParams = params


def autoscaling_config(
    node_types: dict[str, dict[str, Any]],
    head_resources: dict[str, float],
    gcs_address: str,
    max_workers: int,
    idle_timeout_minutes: float,
    upscaling_speed: float = 1.0,
) -> dict[str, Any]:
    """The autoscaler's cluster config for the fake provider: the worker node types (`resources`, `max_workers`,
    `min_workers`, `labels`) each labelled with its own name, and a head with `head_resources`."""
    types: dict[str, dict[str, Any]] = {}
    for name, node in node_types.items():
        types[name] = {
            "resources": dict(node["resources"]),
            "labels": {**(node.get("labels") or {}), NODE_TYPE_LABEL: name},
            "min_workers": node.get("min_workers", 0),
            "max_workers": node["max_workers"],
            "node_config": {},
        }
    types[HEAD_NODE_TYPE] = {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "leaml-fake",
        "max_workers": max_workers,
        "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": idle_timeout_minutes,
        # the provider starts each node in-process: no SSH updater, and node ids as the ips the autoscaler tracks
        "provider": {
            "type": "external",
            "module": f"{__name__}.{FakeNodeProvider.__name__}",
            "gcs_address": gcs_address,
            "launch_multiple": True,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ray"},
        "available_node_types": types,
        "head_node_type": HEAD_NODE_TYPE,
        # the launcher's setup keys, which nothing runs here (the autoscaler reads them)
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **dict.fromkeys(("cluster_synced_files", "rsync_exclude", "rsync_filter"), []),
        **dict.fromkeys(("initialization_commands", "setup_commands", "head_setup_commands"), []),
        **dict.fromkeys(("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"), []),
    }


class FakeCluster:
    """A fake autoscaling cluster: `start()` returns the GCS address to `ray.init`; `stop()` ends only its processes.

    `head_resources` may name CPU (the head's, for the driver only set 0), GPU, object_store_memory and custom
    resources; each worker node type: `resources` (object_store_memory included: the fake nodes share this machine's
    /dev/shm), `max_workers`, optional `min_workers` and `labels`. `system_config`: Ray's `--system-config` for the
    whole cluster (the worker nodes read it from the head)."""

    def __init__(
        self,
        node_types: dict[str, dict[str, Any]],
        head_resources: dict[str, float],
        max_workers: int,
        idle_timeout_minutes: float = 0.1,
        env: dict[str, str] | None = None,
        system_config: dict[str, Any] | None = None,
    ):
        self.temp_dir = tempfile.mkdtemp(prefix="lrf-", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.metrics_port = free_port()  # the head's Prometheus endpoint: a job driver's metrics
        self.system_config = system_config or {}
        self.config = autoscaling_config(node_types, head_resources, self.address, max_workers, idle_timeout_minutes)
        self.env = {
            **os.environ,
            **(env or {}),
            "RAY_FAKE_CLUSTER": "1",  # the fake provider refuses to start without it
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # the autoscaler's loop: every second, not every 5
            # Ray 2.60's `ray start` turns token auth on when ~/.ray/auth_token exists, and a driver that imported
            # ray before knowing it could not connect; this cluster is on 127.0.0.1 and lives for one command
            "RAY_AUTH_MODE": "disabled",
        }
        self.head: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> str:
        """Start the head (its autoscaler launches the worker nodes); returns the address once it accepts drivers."""
        path = Path(self.temp_dir) / "autoscaling.json"
        path.write_text(json.dumps(self.config))
        head = dict(self.config["available_node_types"][HEAD_NODE_TYPE]["resources"])
        args = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            f"--temp-dir={self.temp_dir}",
            f"--autoscaling-config={path}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            # every port of its own: a default one may be held by another Ray instance on this machine
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={self.metrics_port}",
            f"--runtime-env-agent-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--num-cpus={head.pop('CPU', 0)}",
            f"--num-gpus={head.pop('GPU', 0)}",
            "--disable-usage-stats",
        ]
        if self.system_config:
            args.append(f"--system-config={json.dumps(self.system_config)}")
        if "object_store_memory" in head:
            args.append(f"--object-store-memory={int(head.pop('object_store_memory'))}")
        if head:
            args.append(f"--resources={json.dumps(head)}")
        log = open(Path(self.temp_dir) / "head.log", "w")  # noqa: SIM115 - the head writes it until stop()
        # its own session: stop() finds every process it started, whatever they call themselves
        self.head = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self._accepts_drivers():
            if self.head.poll() is not None or time.monotonic() > deadline:
                tail = (Path(self.temp_dir) / "head.log").read_text()[-2000:]
                self.stop()
                raise RuntimeError(f"the fake cluster's head did not start:\n{tail}")
            time.sleep(1)
        return self.address

    def _accepts_drivers(self) -> bool:
        import urllib.request

        try:
            urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)
            return True
        except OSError:
            return False

    def processes(self) -> list[Any]:
        """Every live process this cluster started: the head's session, whatever names its temp dir (the autoscaler's
        worker raylets), and their children (workers rename themselves `ray::...`)."""
        import psutil

        if self.head is None:
            return []
        sid = self.head.pid
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if os.getsid(p.pid) == sid or self.temp_dir in " ".join(p.info["cmdline"] or []):
                    roots.append(p)
            except (OSError, psutil.Error):
                continue
        found = {p.pid: p for p in roots}
        for p in roots:
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                continue
        return list(found.values())

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every process of this cluster (never another Ray instance's)."""
        import psutil

        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.head = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def kill_node(self, node_id: str) -> int:
        """Lose a worker node as a spot instance is lost: SIGKILL its raylet and every process under it at once
        (workers, agents); returns the raylet's pid. Only this cluster's processes are searched."""
        import psutil

        for p in self.processes():
            try:
                if p.name() == "raylet" and f"--node_id={node_id}" in " ".join(p.cmdline()):
                    doomed = [p, *p.children(recursive=True)]
                    break
            except psutil.Error:
                continue
        else:
            raise LookupError(f"no raylet of node {node_id} in this cluster")
        for q in doomed:
            try:
                q.kill()
            except psutil.Error:
                pass
        return doomed[0].pid

    def __enter__(self) -> FakeCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def worker_nodes(alive_only: bool = True) -> dict[str, str]:
    """Node id -> node type of the connected fake cluster's worker nodes."""
    import ray

    return {
        n["NodeID"]: n["Labels"][NODE_TYPE_LABEL]
        for n in ray.nodes()
        if NODE_TYPE_LABEL in (n.get("Labels") or {}) and (n["Alive"] or not alive_only)
    }
