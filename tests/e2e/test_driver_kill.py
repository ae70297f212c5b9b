"""The driver (jobs/adapt.py) SIGKILLed in the middle of a stage, after an earlier one finished: the same command,
rerun, skips what finished, resumes the interrupted stage from its parts and ends with the outputs of an
uninterrupted run. The run dir is on a local S3-compatible server (moto): the lock, the manifest, the resumable
parts and the stage outputs all live in a bucket, as on a cluster. Each driver starts its own local Ray instance in
the test's temp dir; a kill takes the driver's process group and every process of that instance with it, as losing
the head would."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from leaml_ray import storage
from leaml_ray.pipeline import run_pipeline
from leaml_ray.stages import pipeline_stages
from tests.conftest import make_config
from tests.e2e.test_job_submit import stop_processes_of

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
ROOT = Path(__file__).resolve().parents[2]


def _overrides(run_dir: str | Path, model: str) -> list[str]:
    # 144 images to caption in parts of 4 engine batches (64): the second kill lands between two parts
    return [
        f"run.dir={run_dir}",
        "data.num_images=160",
        "data.test_ratio=0.1",
        "teacher.engine_batch_size=16",
        f"teacher.model={model}",
        "teacher.dtype=float32",
        "teacher.max_new_tokens=8",
        "teacher.max_model_len=256",
    ]


def _adapt(overrides: list[str], ray_dir: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "jobs/adapt.py", "--stages", "prepare,caption", *overrides, f"cluster.temp_dir={ray_dir}"]
    # output to a file, not a pipe: nobody reads a pipe while the driver runs, and a full one (64 KB of engine
    # log lines) blocks the driver's writes, i.e. the driver
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def _tail(proc: subprocess.Popen) -> str:
    """The end of a driver's log."""
    return "\n".join(proc.log.read_text(errors="replace").splitlines()[-40:])


def _stage(run_dir: str, name: str) -> dict:
    try:
        return json.loads(storage.read_bytes(storage.join(run_dir, "manifest.json")))["stages"].get(name, {})
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return {}


def _kill_when(proc: subprocess.Popen, ray_dir: str, ready, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"adapt.py exited (rc {proc.returncode}) before {what}:\n{_tail(proc)}")
        if time.monotonic() > deadline:
            _kill(proc, ray_dir)
            pytest.fail(f"timed out waiting for {what}:\n{_tail(proc)}")
        time.sleep(0.05)
    _kill(proc, ray_dir)


def _kill(proc: subprocess.Popen, ray_dir: str) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
    proc.wait()
    stop_processes_of(ray_dir)  # Ray processes that left the group


def _caption_parts(run_dir: str) -> list[str]:
    fs, root = storage.filesystem(storage.join(run_dir, "_resume", "caption"))
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return [i.path for i in infos if "/parts/part-" in i.path and i.path.endswith(".parquet")]


def test_killed_driver_resumes_and_matches_an_uninterrupted_run(tmp_path, greedy_reference, s3_run_dir):
    model = greedy_reference[0].model  # outputs depend on the image: a mixed-up caption would show
    run_dir = s3_run_dir
    overrides = _overrides(run_dir, model)
    ray_dir = tempfile.mkdtemp(prefix="lrk-", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        # 1. killed in the middle of caption (prepare finished), after caption's first part was written
        proc = _adapt(overrides, ray_dir, tmp_path / "driver1.log")
        _kill_when(proc, ray_dir, lambda: len(_caption_parts(run_dir)) >= 1, "the first caption part")
        assert _stage(run_dir, "prepare").get("status") == "done"
        assert _stage(run_dir, "caption").get("status") == "running"
        assert storage.exists(storage.join(run_dir, ".lock"))  # the killed driver could not release its lock

        # 2. the same command again skips prepare, resumes caption and finishes
        proc = _adapt(overrides, ray_dir, tmp_path / "driver2.log")
        assert proc.wait(timeout=600) == 0, _tail(proc)
        # the vLLM CPU worker's log reaches the driver, without its two thread-count warnings per image
        # (leaml_ray.inference.engine.tame_engine_logs, a vLLM plugin)
        log = proc.log.read_text(errors="replace")
        assert "[cpu_worker.py:" in log and "torch.set_num_threads" not in log
    finally:
        stop_processes_of(ray_dir)
        shutil.rmtree(ray_dir, ignore_errors=True)
    prepare, caption = _stage(run_dir, "prepare"), _stage(run_dir, "caption")
    assert prepare["last_action"] == "skipped" and caption["status"] == "done"
    assert caption["counts"]["resumed"] >= 64  # the killed attempt's parts were kept, not recaptioned
    assert caption["counts"]["duplicates_dropped"] == 0
    assert not storage.exists(storage.join(run_dir, ".lock"))
    assert not storage.exists(storage.join(run_dir, "_resume", "caption"))

    # the outputs equal an uninterrupted run of the same config
    reference = make_config(tmp_path, *_overrides(tmp_path / "reference", model))
    run_pipeline(reference, pipeline_stages(reference), ["prepare", "caption"])
    for rel, key in (("prepared/qa.parquet", "qa_id"), ("prepared/images.parquet", "image_id")):
        ours, theirs = (pq.read_table(storage.join(d, rel)).sort_by(key) for d in (run_dir, reference.run.dir))
        assert ours.equals(theirs), rel
    killed = pq.read_table(storage.join(run_dir, "captions.parquet")).to_pylist()
    uninterrupted = pq.read_table(storage.join(reference.run.dir, "captions.parquet")).to_pylist()
    assert len(killed) == caption["counts"]["captioned"] == 144
    assert {r["image_id"]: r["caption"] for r in killed} == {r["image_id"]: r["caption"] for r in uninterrupted}
