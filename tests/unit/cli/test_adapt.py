"""jobs/adapt.py's command line: one-line errors and exit codes, --print-config, the console scripts, and the
answers that start nothing loading no torch or vLLM."""

import subprocess
import sys
from pathlib import Path

from leaml_ray.config import load_config

ROOT = Path(__file__).resolve().parents[3]


def test_cli_config_error_exits_2_with_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "adapt.py"), "data.label_ratio=7", f"run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["adapt.py: config error: data.label_ratio: Input should be less than or equal to 1 (got 7)"]
    assert not (tmp_path / "manifest.json").exists()


def test_cli_unknown_stage_is_one_line_before_anything_starts(tmp_path):
    """Under --stages and --force, and with --plan or --print-config too: exit 2 with one line, nothing started."""
    unknown = (
        "adapt.py: unknown stage(s) nope; available: prepare, caption, generator, pseudo_qa, finetune:leaml,"
        " finetune:lora, finetune:full, evaluate"
    )
    for args in (["--stages", "prepare,nope"], ["--force", "nope"], ["--plan", "--stages", "nope"]):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / "adapt.py"), *args, f"run.dir={tmp_path}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [unknown], (args, proc.stderr)
        assert not (tmp_path / "manifest.json").exists()
    from leaml_ray.cli import adapt

    assert adapt.main(["--print-config", "--force", "finetune", f"run.dir={tmp_path}"]) == 0  # a family name is one


def test_cli_prints_the_resolved_config_and_its_help_names_the_presets(tmp_path):
    adapt = [sys.executable, str(ROOT / "jobs" / "adapt.py")]
    proc = subprocess.run(
        [*adapt, "--config", "kvasir-vqa-1pct", "--print-config", "data.label_ratio=0.2", f"run.dir={tmp_path}/r"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    printed = tmp_path / "printed.yaml"
    printed.write_text(proc.stdout)
    assert load_config(str(printed)) == load_config(
        "kvasir-vqa-1pct", ["data.label_ratio=0.2", f"run.dir={tmp_path}/r"]
    )
    assert not (tmp_path / "r").exists()  # printing runs nothing
    helped = subprocess.run([*adapt, "--help"], capture_output=True, text=True, timeout=120)
    assert "presets: kvasir-vqa-1pct, sportu-1pct, tiny-cpu" in " ".join(helped.stdout.split())
    assert "--force" in helped.stdout


def test_console_scripts_are_installed_and_run_the_same_mains(tmp_path):
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run(
        [str(bin_dir / "leaml-adapt"), "--print-config", "data.label_ratio=0.3"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "label_ratio: 0.3" in proc.stdout, proc.stderr
    proc = subprocess.run(
        [str(bin_dir / "leaml-serve"), "--model", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.startswith("leaml-serve: model "), proc.stderr
    for name in ("leaml-evaluate", "leaml-serve-teacher"):
        assert subprocess.run([str(bin_dir / name), "--help"], capture_output=True).returncode == 0


def test_answers_that_start_nothing_load_no_torch_or_vllm(tmp_path):
    # --help, --print-config, --plan, config errors and a missing model answer in under a second: a newcomer's first
    # commands, and every one of them used to import the whole stack (~7 s each on 2 cores)
    script = f"""
import contextlib, io, sys
from leaml_ray.cli import adapt, evaluate, serve, serve_teacher
calls = [(adapt, ["--help"]), (adapt, ["--print-config"]), (adapt, ["--plan"]), (adapt, ["data.label_ratio=7"]),
         (evaluate, ["--help"]), (serve, ["--model", "{tmp_path}/nope"]), (serve_teacher, ["--help"])]
for cli, argv in calls:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main(argv)
        except SystemExit:
            pass
print(sorted(m for m in ("torch", "vllm", "transformers", "deepspeed", "ray.train") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
