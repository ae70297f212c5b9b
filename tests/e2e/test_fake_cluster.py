"""The embedded pipeline submitted with `ray job submit` (the README's command and runtime env) to a fake autoscaling
cluster on this machine: a head with no CPUs for work, 1-CPU worker nodes that Ray's autoscaler launches for the
work and removes when idle (leaml_ray/fake_cluster.py, started in its own temp dir and stopped by pid, never
`ray stop`), the run dir on the local S3 server.

One job, two lost nodes (SIGKILL of a node's raylet and every process under it, as a spot instance goes): the node of
a caption engine replica once its engine is up, and the node of a generator training worker once Ray Train has
registered a checkpoint of a step. The job finishes without a person: Ray Data restarts the replica elsewhere and
retries its batches (every image captioned once), Ray Train restarts the worker group from that checkpoint, neuron
masks included (every step once in the step log). What a single-node run of the same config makes before training
(its splits, its greedy captions) comes out identical; the trained weights and the report are not compared: a
restarted group re-seeds its RNG and redoes the lost steps, so they are not promised bit-identical."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from leaml_ray import storage
from leaml_ray.fake_cluster import FakeCluster

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MIB = 2**20
ENGINE = "_EngineActor"  # an engine replica of the embedded default (actor_pool: MapWorker(MapBatches(_EngineActor)))


def _overrides(run_dir: str, model: str, teacher: str) -> list[str]:
    return [
        f"run.dir={run_dir}",
        "data.num_images=32",
        "data.label_ratio=0.1",
        "data.test_ratio=0.25",
        f"teacher.model={teacher}",  # its greedy captions differ from image to image
        f"generator.model={model}",
        f"target.model={model}",
        "teacher.max_new_tokens=8",
        "teacher.max_model_len=256",
        "teacher.replicas=2",  # one per 1-CPU node
        "teacher.engine_batch_size=2",  # a part every 8 captions
        "pseudo_qa.samples_per_image=1",
        "pseudo_qa.max_new_tokens=8",
        "generator.epochs=1",
        "generator.caption_epochs=2",  # 4 steps: a node is lost after the first step's checkpoint, before the last
        "generator.distill_scope=lm_mlp",  # neuron masks: a restarted worker must get them back from the checkpoint
        "target.epochs=1",
        "train.batch_size=4",
        "train.checkpoint_every=1",
        "train.cpus_per_worker=1",  # one worker per 1-CPU node
        "eval.max_new_tokens=4",
        "eval.methods=[leaml]",
    ]


def _files(uri: str, prefix: str) -> list[str]:
    """Paths under `uri` (recursively) whose file name starts with `prefix`."""
    fs, path = storage.filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError:
        return []
    return [i.path for i in infos if i.base_name.startswith(prefix)]


def _checkpointed_step(uri: str) -> int:
    """The step of the latest checkpoint Ray Train registered under `uri` (-1: none yet). Files of a checkpoint
    still being reported do not count: a worker lost before its report is registered resumes from the one before."""
    snapshots = _files(uri, "checkpoint_manager_snapshot.json")
    if not snapshots:
        return -1
    fs, _ = storage.filesystem(uri)
    with fs.open_input_stream(snapshots[0]) as f:
        latest = json.loads(f.read()).get("latest_checkpoint_result") or {}
    return latest.get("metrics", {}).get("step", -1)


def _stage_done(run_dir: str, stage: str) -> bool:
    manifest = storage.join(run_dir, "manifest.json")
    entry = json.loads(storage.read_bytes(manifest))["stages"].get(stage, {}) if storage.exists(manifest) else {}
    return entry.get("status") == "done"


def _lose_a_node(cluster: FakeCluster, actor_class: str, ready, job_running) -> str:
    """Once `ready()` and an actor whose class name holds `actor_class` is alive, kill its node; returns the node id."""
    from ray.util.state import list_actors

    while True:
        assert job_running(), f"the job ended before a node running {actor_class} could be lost"
        if ready():
            actors = list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")], limit=10000)
            nodes = [a.node_id for a in actors if actor_class in a.class_name]
            if nodes:
                cluster.kill_node(nodes[0])
                return nodes[0]
        time.sleep(0.25)


def _submit(cluster: FakeCluster, job_id: str, args: list[str]) -> None:
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={cluster.dashboard_url}", f"--submission-id={job_id}"]
    cmd += ["--no-wait", "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml")]
    cmd += ["--", "python", "jobs/adapt.py", *args]
    for _ in range(30):  # the head's job agent comes up a little after the head
        proc = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env, timeout=300)
        if "No available agent to submit job" not in proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pipeline_on_a_fake_autoscaling_cluster_that_loses_two_nodes(
    tiny_model_dir, greedy_reference, s3_run_dir, tmp_path
):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    run_dir, teacher = s3_run_dir, greedy_reference[0].model
    node = {"resources": {"CPU": 1, "object_store_memory": 400 * MIB}, "max_workers": 6}
    cluster = FakeCluster(
        {"cpu_1": node},
        {"CPU": 0, "object_store_memory": 400 * MIB},  # the driver only, as on the launcher YAMLs' head
        max_workers=6,
        idle_timeout_minutes=0.25,
        env={"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},  # the job's `python`: this environment's
    )
    with cluster:
        job_id = f"fake-cluster-{uuid.uuid4().hex[:8]}"
        _submit(cluster, job_id, _overrides(run_dir, tiny_model_dir, teacher))
        jobs = JobSubmissionClient(cluster.dashboard_url)
        running = lambda: not jobs.get_job_status(job_id).is_terminal()  # noqa: E731
        resume = storage.join(run_dir, "_resume")

        # mid-caption: as soon as a caption replica has its engine up (the whole stage takes seconds here)
        caption_node = _lose_a_node(cluster, ENGINE, lambda: True, running)
        assert not _stage_done(run_dir, "caption"), "the caption stage ended before its node was lost"
        # mid-training: Ray Train registered a checkpoint of the generator's first step (its masks with it)
        generator = storage.join(resume, "generator")
        train_node = _lose_a_node(cluster, "RayTrainWorker", lambda: _checkpointed_step(generator) >= 1, running)
        assert not _stage_done(run_dir, "generator"), "the generator stage ended before its node was lost"

        deadline = time.monotonic() + 1500
        while running() and time.monotonic() < deadline:
            time.sleep(2)
        logs = jobs.get_job_logs(job_id)[-4000:]
        assert jobs.get_job_status(job_id) == JobStatus.SUCCEEDED, logs

        actors = list_actors(address=cluster.dashboard_url, detail=True, limit=10000, raise_on_missing_output=False)
        engines = {a.node_id for a in actors if ENGINE in a.class_name}
        runs: dict[str, list[str]] = {}  # a worker group's workers share its placement group
        for a in actors:
            if a.class_name == "RayTrainWorker":
                runs.setdefault(a.placement_group_id, []).append(a.node_id)
        nodes = list_nodes(address=cluster.dashboard_url, detail=True, limit=1000)
        head = next(n.node_id for n in nodes if n.is_head_node)
        # caption, pseudo_qa and evaluate replicas on 1-CPU nodes, not the head; the caption replica on the lost node
        # was restarted elsewhere (an actor keeps its id: its node is the new one)
        assert len(engines) >= 2 and head not in engines and caption_node not in engines, engines
        assert any(a.num_restarts >= 1 for a in actors if ENGINE in a.class_name)
        # the generator (restarted once: a second worker group) and the target
        assert len(runs) == 3 and any(train_node in ns for ns in runs.values()), runs
        for ns in runs.values():
            assert len(ns) == len(set(ns)) == 2 and head not in ns, runs

        # the autoscaler launched worker nodes for the work (and for the lost ones), then removed every one once idle
        deadline = time.monotonic() + 120
        while True:
            workers = [
                n for n in list_nodes(address=cluster.dashboard_url, detail=True, limit=1000) if not n.is_head_node
            ]
            if all(n.state == "DEAD" for n in workers) or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert len(workers) >= 4 and all(n.state == "DEAD" for n in workers), [(n.node_id, n.state) for n in workers]

    manifest = json.loads(storage.read_bytes(storage.join(run_dir, "manifest.json")))
    print("stage seconds", {name: entry.get("seconds") for name, entry in manifest["stages"].items()})
    done = {name for name, entry in manifest["stages"].items() if entry.get("status") == "done"}
    assert done >= {"prepare", "caption", "generator", "pseudo_qa", "finetune:leaml", "evaluate"}, manifest["stages"]
    # no batch a lost replica had delivered came out again (the stage would have dropped and counted it)
    assert manifest["stages"]["caption"]["counts"]["duplicates_dropped"] == 0, manifest["stages"]["caption"]
    report = json.loads(storage.read_bytes(storage.join(run_dir, "report.json")))
    assert set(report["methods"]) == {"leaml"} and report["methods"]["leaml"]["n"] > 0
    assert storage.exists(storage.join(run_dir, "target", "leaml", "config.json"))

    # the generator resumed from its last checkpoint, masks included: every step once, in order
    history = json.loads(storage.read_bytes(storage.join(run_dir, "generator", "train_log.json")))
    print("generator history", [(h["step"], h["resumed_from"], h.get("masks_restored")) for h in history])
    assert [h["step"] for h in history] == list(range(1, len(history) + 1))
    resumed = [h for h in history if h["resumed_from"] > 0]
    assert resumed and all(h["masks_restored"] == 1.0 for h in resumed), history

    # the same config on one node (the test session's Ray): the same splits, the same greedy captions, each once
    from leaml_ray.config import load_config
    from leaml_ray.pipeline import run_pipeline
    from leaml_ray.stages import pipeline_stages

    local = load_config(None, [*_overrides(str(tmp_path / "run"), tiny_model_dir, teacher), "teacher.replicas=1"])
    run_pipeline(local, pipeline_stages(local), ["prepare", "caption"])

    def table(run: str, rel: str, columns: list[str]) -> list[tuple]:
        fs, path = storage.filesystem(storage.join(run, rel))
        rows = pq.read_table(path, columns=columns, filesystem=fs).to_pylist()
        return sorted(tuple(r[c] for c in columns) for r in rows)

    split = ["image_id", "split"]
    assert table(run_dir, "prepared/images.parquet", split) == table(
        str(tmp_path / "run"), "prepared/images.parquet", split
    )
    captions = table(run_dir, "captions.parquet", ["image_id", "caption"])
    assert len({i for i, _ in captions}) == len(captions) and len({c for _, c in captions}) > 1
    assert captions == table(str(tmp_path / "run"), "captions.parquet", ["image_id", "caption"])
