"""bench/gpu_smoke.py stays alive on CPU: the training core runs in one process without Ray (what a GPU machine
without Ray's wheel can run), LoRA and full under ZeRO-3, and the generator objective leaves unselected neurons
bit-identical."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# ray, vllm and pyarrow are made unimportable: the smoke script must not need them
RUN = """import runpy, sys
sys.modules.update({"ray": None, "vllm": None, "pyarrow": None})
sys.argv = ["bench/gpu_smoke.py", *sys.argv[1:]]
runpy.run_path("bench/gpu_smoke.py", run_name="__main__")
"""


@pytest.mark.slow
def test_gpu_smoke_runs_on_cpu_without_ray():
    runs = "target_full_zero3,target_lora_zero3,generator_zero3"
    out = subprocess.run(
        [sys.executable, "-c", RUN, "--device", "cpu", "--steps", "2", "--runs", runs],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"] and [r["run"] for r in result["runs"]] == runs.split(",")
    by_run = {r["run"]: r for r in result["runs"]}
    assert by_run["target_full_zero3"]["loss_last"] < by_run["target_full_zero3"]["loss_first"]
    assert by_run["target_lora_zero3"]["params"] > by_run["target_full_zero3"]["params"]  # adapters added
    generator = by_run["generator_zero3"]
    assert generator["unselected_unchanged"] and generator["selected_moved"] > 0
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mib"] > 0 for r in result["runs"])
