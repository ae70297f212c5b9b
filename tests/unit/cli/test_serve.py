"""Serving fails fast: a missing or empty model folder or a port in use is one line and exit code 2, before any Ray
process starts (the temp dir a local instance would use stays empty)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from leaml_ray import zoo
from leaml_ray.inference import deploy

ROOT = Path(__file__).resolve().parents[3]


def run_job(script: str, *args: str, ray_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "jobs" / script), *args, f"cluster.temp_dir={ray_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local instance, never someone's cluster
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def listening():
    """A port some other program already listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def one_line(proc: subprocess.CompletedProcess, ray_dir: Path) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not ray_dir.exists() or not any(ray_dir.iterdir())  # no Ray started, nothing left behind
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def test_a_missing_or_empty_model_folder_is_one_line(tmp_path):
    line = one_line(run_job("serve.py", "--model", str(tmp_path / "nope"), ray_dir=tmp_path / "ray"), tmp_path / "ray")
    assert line == f"serve.py: model {tmp_path / 'nope'}: no such model folder (and not a hub id of the form org/name)"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    line = one_line(run_job("serve.py", "--model", str(empty), ray_dir=tmp_path / "ray"), tmp_path / "ray")
    assert line == f"serve.py: model {empty}: no weights there (*.safetensors or *.bin)"


def test_a_port_in_use_is_one_line(tmp_path, listening):
    base = zoo.ensure_zoo()["target"]
    proc = run_job("serve.py", "--model", base, "--port", str(listening), ray_dir=tmp_path / "ray")
    assert (
        one_line(proc, tmp_path / "ray")
        == f"serve.py: cannot serve on 127.0.0.1:{listening}: Address already in use; pick another port"
    )
    proc = run_job("serve_teacher.py", f"teacher.endpoint=http://127.0.0.1:{listening}", ray_dir=tmp_path / "ray")
    assert "serve_teacher.py: cannot serve on 127.0.0.1" in one_line(proc, tmp_path / "ray")


def test_hub_ids_and_uris_are_left_to_the_engine(tmp_path):
    deploy.preflight("Qwen/Qwen2.5-VL-3B-Instruct", "127.0.0.1", 0, local=True)
    deploy.preflight("s3://bucket/models/target", "127.0.0.1", 0, local=True)
    with pytest.raises(deploy.ServeError, match="no such model folder"):
        deploy.preflight("runs/x/target/leaml", "127.0.0.1", 0, local=True)
