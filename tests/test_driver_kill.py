"""The driver (jobs/adapt.py) SIGKILLed right after a stage finished and again in the middle of a stage: the same
command, rerun, skips what finished, resumes the interrupted stage from its parts and ends with the outputs of an
uninterrupted run. The killed drivers join the test session's Ray instance, as a job's driver joins its cluster."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from leaml_ray import storage
from leaml_ray.pipeline import run_pipeline
from leaml_ray.stages import ALL_STAGES
from tests.conftest import make_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
ROOT = Path(__file__).resolve().parents[1]


def _overrides(run_dir: Path, model: str) -> list[str]:
    # 144 images to caption in parts of 4 engine batches (64): the second kill lands between two parts
    return [
        f"run.dir={run_dir}",
        "data.num_images=160",
        "data.test_ratio=0.1",
        "teacher.batch_size=16",
        f"teacher.model={model}",
        "teacher.dtype=float32",
        "teacher.max_new_tokens=8",
        "teacher.max_model_len=256",
    ]


def _adapt(overrides: list[str]) -> subprocess.Popen:
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "jobs/adapt.py", "--stages", "prepare,caption", *overrides, f"cluster.address={address}"]
    env = dict(os.environ)
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"  # the session's instance turned token auth on (Ray 2.60)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stage(run_dir: Path, name: str) -> dict:
    try:
        return json.loads((run_dir / "manifest.json").read_text())["stages"].get(name, {})
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"adapt.py exited (rc {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _caption_parts(run_dir: Path) -> list[Path]:
    return list((run_dir / "_resume" / "caption").glob("*/parts/part-*.parquet"))


def test_killed_driver_resumes_and_matches_an_uninterrupted_run(tmp_path, greedy_reference):
    model = greedy_reference[0].name_or_path  # outputs depend on the image: a mixed-up caption would show
    run_dir = tmp_path / "killed"
    overrides = _overrides(run_dir, model)

    # 1. killed right after prepare finished (between stages)
    _kill_when(_adapt(overrides), lambda: _stage(run_dir, "prepare").get("status") == "done", "prepare finished")
    assert (run_dir / ".lock").exists()  # the killed driver could not release its lock

    # 2. killed in the middle of caption, after its first part was written
    proc = _adapt(overrides)
    _kill_when(proc, lambda: len(_caption_parts(run_dir)) >= 1, "the first caption part")
    assert _stage(run_dir, "caption").get("status") == "running"
    assert _stage(run_dir, "prepare")["last_action"] == "skipped"  # not recomputed by the second run

    # 3. the same command again finishes
    proc = _adapt(overrides)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    prepare, caption = _stage(run_dir, "prepare"), _stage(run_dir, "caption")
    assert prepare["last_action"] == "skipped" and caption["status"] == "done"
    assert caption["counts"]["resumed"] >= 64  # the killed attempt's parts were kept, not recaptioned
    assert caption["counts"]["duplicates_dropped"] == 0
    assert not (run_dir / ".lock").exists() and not (run_dir / "_resume" / "caption").exists()

    # the outputs equal an uninterrupted run of the same config
    reference = make_config(tmp_path, *_overrides(tmp_path / "reference", model))
    run_pipeline(reference, ALL_STAGES, ["prepare", "caption"])
    for rel, key in (("prepared/qa.parquet", "qa_id"), ("prepared/images.parquet", "image_id")):
        ours, theirs = (pq.read_table(d / rel).sort_by(key) for d in (run_dir, tmp_path / "reference"))
        assert ours.equals(theirs), rel
    killed = pq.read_table(run_dir / "captions.parquet").to_pylist()
    uninterrupted = pq.read_table(storage.join(reference.run.dir, "captions.parquet")).to_pylist()
    assert len(killed) == caption["counts"]["captioned"] == 144
    assert {r["image_id"]: r["caption"] for r in killed} == {r["image_id"]: r["caption"] for r in uninterrupted}
