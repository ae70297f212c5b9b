"""The embedded pipeline submitted with `ray job submit` (the README's command and runtime env) to a fake autoscaling
cluster on this machine: a head with no CPUs for work, 1-CPU worker nodes that Ray's autoscaler launches for the
work and removes when idle (leaml_ray/fake_cluster.py, started in its own temp dir and stopped by pid, never
`ray stop`), the run dir on the local S3 server. The two caption replicas and the two training workers of each
training stage run on different nodes; every stage's outputs land in the run dir."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leaml_ray import storage
from leaml_ray.fake_cluster import FakeCluster

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MIB = 2**20


def _overrides(run_dir: str, model: str) -> list[str]:
    return [
        f"run.dir={run_dir}",
        "data.num_images=32",
        "data.label_ratio=0.1",
        "data.test_ratio=0.25",
        f"teacher.model={model}",
        f"generator.model={model}",
        f"target.model={model}",
        "teacher.max_new_tokens=8",
        "teacher.max_model_len=256",
        "teacher.replicas=2",  # one per 1-CPU node
        "pseudo_qa.samples_per_image=2",
        "pseudo_qa.max_new_tokens=8",
        "generator.epochs=1",
        "generator.caption_epochs=1",
        "target.epochs=1",
        "train.batch_size=4",
        "train.cpus_per_worker=1",  # one worker per 1-CPU node
        "eval.max_new_tokens=4",
        "eval.methods=[leaml]",
    ]


def test_pipeline_on_a_fake_autoscaling_cluster(tiny_model_dir, s3_run_dir):
    from ray.util.state import list_actors, list_nodes

    node = {"resources": {"CPU": 1, "object_store_memory": 400 * MIB}, "max_workers": 6}
    cluster = FakeCluster(
        {"cpu_1": node},
        {"CPU": 0, "object_store_memory": 400 * MIB},  # the driver only, as on the launcher YAMLs' head
        max_workers=6,
        idle_timeout_minutes=0.25,
        env={"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},  # the job's `python`: this environment's
    )
    with cluster:
        cmd = [str(BIN / "ray"), "job", "submit", f"--address={cluster.dashboard_url}", "--working-dir", str(ROOT)]
        cmd += ["--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"), "--", "python", "jobs/adapt.py"]
        cmd += _overrides(s3_run_dir, tiny_model_dir)
        for _ in range(30):  # the head's job agent comes up a little after the head
            proc = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env, timeout=1500)
            if "No available agent to submit job" not in proc.stderr:
                break
            time.sleep(2)
        log = (proc.stdout + proc.stderr)[-4000:]
        assert proc.returncode == 0 and "succeeded" in proc.stdout, log

        actors = list_actors(address=cluster.dashboard_url, detail=True, limit=10000, raise_on_missing_output=False)
        engines = {a.node_id for a in actors if "_EngineActor" in a.class_name}
        runs: dict[str, list[str]] = {}  # a training run's workers share its placement group
        for a in actors:
            if a.class_name == "RayTrainWorker":
                runs.setdefault(a.placement_group_id, []).append(a.node_id)
        head = next(n.node_id for n in list_nodes(address=cluster.dashboard_url) if n.is_head_node)
        # caption, pseudo_qa and evaluate replicas, two at a time on 1-CPU nodes; none on the CPU-less head
        assert len(engines) >= 2 and head not in engines
        assert len(runs) == 2, runs  # the generator and the target
        for nodes in runs.values():
            assert len(nodes) == len(set(nodes)) == 2 and head not in nodes, runs

        # the autoscaler launched worker nodes for the work, then removed every one once idle
        deadline = time.monotonic() + 120
        while True:
            nodes = list_nodes(address=cluster.dashboard_url, detail=True, limit=1000)
            workers = [n for n in nodes if not n.is_head_node]
            if all(n.state == "DEAD" for n in workers) or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert len(workers) >= 2 and all(n.state == "DEAD" for n in workers), [(n.node_id, n.state) for n in workers]

    manifest = json.loads(storage.read_bytes(storage.join(s3_run_dir, "manifest.json")))
    done = {name for name, entry in manifest["stages"].items() if entry.get("status") == "done"}
    assert done >= {"prepare", "caption", "generator", "pseudo_qa", "finetune:leaml", "evaluate"}, manifest["stages"]
    report = json.loads(storage.read_bytes(storage.join(s3_run_dir, "report.json")))
    assert set(report["methods"]) == {"leaml"} and report["methods"]["leaml"]["n"] > 0
    assert storage.exists(storage.join(s3_run_dir, "target", "leaml", "config.json"))
