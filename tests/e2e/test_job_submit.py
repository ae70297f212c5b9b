"""`ray job submit --working-dir . -- python jobs/adapt.py` against a head this test starts (127.0.0.1, its own
temp dir) and stops by pid; never `ray stop`, which would kill every Ray process on the machine."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from tests.unit.stages.test_prepare import write_generic

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_head():
    """A Ray head on 127.0.0.1 in a short private temp dir; yields the dashboard address; kills only its own pids."""
    temp_dir = tempfile.mkdtemp(prefix="lrh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # the job's `python` is the one on the head's PATH: this environment's, as after `. .venv/bin/activate`
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"  # Ray 2.60 turns token auth on when this file exists
    dashboard = free_port()
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            # every port of its own: a default one (e.g. the job agent's 52365) may still be held by another head
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={temp_dir}",
            "--num-cpus=4",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_processes_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_processes_of(temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, every process whose command line names `temp_dir` (a Ray instance a test started)."""
    mine = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for p in mine:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=5)
    for p in mine:
        if p.is_running():
            p.kill()


@pytest.mark.slow
def test_ray_job_submit_runs_adapt_on_the_cluster(local_head, tmp_path):
    address, env = local_head
    # the CLI contract of `adapt.py --stages prepare` on a generic JSONL source, submitted as a Ray job
    source, run_dir = write_generic(tmp_path / "generic"), tmp_path / "run"
    for _ in range(30):  # the head's job agent comes up a little after `ray start` returns
        proc = _submit(address, env, run_dir, source)
        if "No available agent to submit job" not in proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "succeeded" in proc.stdout  # "Job 'raysubmit_...' succeeded"
    assert "prepare" in proc.stdout and "ran" in proc.stdout  # the job's own summary, streamed back
    splits = set(pq.read_table(run_dir / "prepared" / "qa.parquet")["split"].to_pylist())
    assert splits <= {"labeled", "unlabeled", "test"} and "labeled" in splits
    # the README's `ray job logs` step: the driver log is kept by the head
    job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", proc.stdout).group(1)
    logs = subprocess.run(
        [str(BIN / "ray"), "job", "logs", f"--address={address}", job_id],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert logs.returncode == 0 and "stage prepare: done" in logs.stdout + logs.stderr


def _submit(address: str, env: dict, run_dir: Path, source: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            f"--address={address}",
            "--working-dir",
            str(ROOT),
            "--runtime-env",
            str(ROOT / "cluster" / "runtime_env.yaml"),  # as the README's cluster section submits
            "--",
            "python",
            "jobs/adapt.py",
            "--stages",
            "prepare",
            f"run.dir={run_dir}",
            "data.source=jsonl",
            f"data.path={source}",
            "data.label_ratio=0.01",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_the_submitted_working_dir_holds_the_shipped_zoo_and_no_local_state(tmp_path):
    """The package `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml` uploads, built by Ray's own
    packaging with what submit combines (Ray's default excludes, .gitignore, the runtime_env's excludes): the tiny zoo's
    weights are in it (an excluded *.safetensors left the embedded default without models on a cluster), a run
    dir and the venv are not."""
    import zipfile

    import yaml
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    (ROOT / "runs").mkdir(exist_ok=True)  # gitignored local state that must stay home
    marker = ROOT / "runs" / f"never-uploaded-{os.getpid()}.txt"
    marker.write_text("x")
    try:
        runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
        excludes = ray_constants.get_runtime_env_default_excludes() + runtime_env["excludes"]
        create_package(str(ROOT), tmp_path / "pkg.zip", include_gitignore=True, excludes=excludes)
    finally:
        marker.unlink()
    names = set(zipfile.ZipFile(tmp_path / "pkg.zip").namelist())
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "leaml_ray" / "zoo_shipped").rglob("*") if p.is_file()}
    assert {n for n in shipped if n.endswith(".safetensors")} and shipped <= names
    assert "jobs/adapt.py" in names and "cluster/runtime_env.yaml" in names
    assert not any(n.startswith((".venv/", "runs/", ".git/")) for n in names)
    assert sum(zipfile.ZipFile(tmp_path / "pkg.zip").getinfo(n).file_size for n in names) < 100 * 2**20
