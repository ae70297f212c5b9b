"""Placement from the config, built on this CPU machine: the exact ray.data.llm, actor-pool, Ray Serve and Ray Train
configs of the paper presets (GPU bundles, tensor parallel 8 on one node, no CPU env, nccl, bf16), the tiny-cpu
preset's CPU configs, and the `--plan` dry run against the shipped cluster configs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leaml_ray.config import load_config
from leaml_ray.inference.engine import engine_args
from leaml_ray.placement import (
    CPU_ENV,
    actor_pool_placement,
    check_cluster,
    engine_settings,
    plan,
    ray_data_llm_placement,
    scaling_config,
    serve_placement,
    torch_config,
    train_placement,
)
from leaml_ray.train.core import deepspeed_config
from leaml_ray.train.loop import job_for

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["kvasir-vqa-1pct", "sportu-1pct"]


def cluster(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("preset", PAPER)
def test_paper_teacher_is_one_tensor_parallel_8_replica_packed_on_one_gpu_node(preset):
    from ray.data.llm import vLLMEngineProcessorConfig

    settings = engine_settings(load_config(preset), "teacher")
    kwargs = engine_args(settings, "/models/teacher")
    assert kwargs["tensor_parallel_size"] == 8 and kwargs["enforce_eager"] is False
    assert kwargs["mm_processor_kwargs"]["max_pixels"] == 1003520  # the preset's pixel budget reaches vLLM
    kwargs.pop("model")
    config = vLLMEngineProcessorConfig(
        model_source="/models/teacher",
        engine_kwargs=kwargs,
        batch_size=settings.batch_size,
        **ray_data_llm_placement(settings),
    )
    assert config.concurrency == 1 and config.runtime_env is None  # no CPU env on GPUs
    bundles = config.placement_group_config["bundles"]
    assert len(bundles) == 8 and all(b["GPU"] == 1 for b in bundles)
    assert config.placement_group_config["strategy"] == "STRICT_PACK"  # all 8 ranks on one node


@pytest.mark.parametrize("preset", PAPER)
def test_paper_generator_and_target_engines_are_gpu_replicas(preset):
    cfg = load_config(preset)
    for role in ("generator", "target"):
        settings = engine_settings(cfg, role)
        assert settings.device == "gpu" and settings.replicas == 8 and settings.gpus_per_replica == 1
        assert actor_pool_placement(settings) == {"num_cpus": 4.0, "num_gpus": 1}
        placement = ray_data_llm_placement(settings)
        assert placement["placement_group_config"]["bundles"] == [{"GPU": 1, "CPU": 4.0}]


def test_serve_configs_follow_the_role_not_the_machine():
    from ray.serve.llm import LLMConfig

    from leaml_ray.inference.deploy import llm_config

    gpu = llm_config("teacher", "/models/teacher", engine_settings(load_config("kvasir-vqa-1pct"), "teacher"))
    assert isinstance(gpu, LLMConfig) and gpu.accelerator_config.kind == "gpu"
    assert len(gpu.placement_group_config["bundles"]) == 8
    cpu = llm_config("teacher", "/models/teacher", engine_settings(load_config(), "teacher"))
    assert cpu.accelerator_config.kind == "cpu" and cpu.runtime_env["env_vars"] == CPU_ENV
    assert serve_placement(engine_settings(load_config(), "target"))["placement_group_config"] == {
        "bundles": [{"CPU": 1.0}]
    }


@pytest.mark.parametrize("preset", PAPER)
def test_paper_training_is_zero3_on_gpus_over_nccl_in_bf16(preset):
    cfg = load_config(preset)
    placement = train_placement(cfg)
    scaling = scaling_config(placement)
    assert scaling.num_workers == 8 and scaling.use_gpu and scaling.resources_per_worker == {"CPU": 8}
    assert torch_config(placement).backend == "nccl"
    for role in ("generator", "target"):
        section = getattr(cfg, role)
        job = job_for(cfg, section, "/models/x", "s3://b/out", num_rows=1000)
        assert job.device == "gpu" and job.gradient_checkpointing and job.attention == "sdpa"
        assert job.lr == section.lora_lr == 1e-4  # LoRA runs use lora_lr, which the preset sets
        assert job.max_pixels == section.max_pixels == 1003520  # training sees the engines' pixel budget
        assert job.spec().dtype == "bfloat16"
        ds = deepspeed_config(job, hidden_size=3584)
        assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    full = job_for(cfg, cfg.target, "/models/x", "out", num_rows=10, finetune="full")
    assert full.lr == 1e-5  # the full-finetuning baseline has its own rate


def test_tiny_cpu_keeps_every_engine_and_worker_on_the_cpu():
    cfg = load_config()
    for role in ("teacher", "generator", "target"):
        settings = engine_settings(cfg, role)
        assert settings.device == "cpu" and engine_args(settings, "/m")["enforce_eager"]
        assert actor_pool_placement(settings) == {"num_cpus": 1.0, "num_gpus": 0, "runtime_env": {"env_vars": CPU_ENV}}
        assert ray_data_llm_placement(settings)["placement_group_config"] == {"bundles": [{"CPU": 1.0}]}
    assert not scaling_config(train_placement(cfg)).use_gpu
    assert torch_config(train_placement(cfg)).backend == "gloo"
    assert not deepspeed_config(job_for(cfg, cfg.target, "/m", "o", 10))["bf16"]["enabled"]


@pytest.mark.parametrize("preset", PAPER)
@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_paper_plans_fit_the_shipped_clusters(preset, name):
    the_plan = plan(load_config(preset))
    stages = the_plan["stages"]
    assert stages["caption"]["gpus_per_replica"] == 8
    assert all(e["device"] == "gpu" for s, e in stages.items() if s != "prepare")
    assert check_cluster(the_plan, cluster(name)) == []


def test_a_node_type_with_too_few_gpus_is_a_problem():
    small = cluster("aws")
    for node in small["available_node_types"].values():
        node["resources"]["GPU"] = min(node["resources"]["GPU"], 4)
    problems = check_cluster(plan(load_config("kvasir-vqa-1pct")), small)
    assert problems and all("8 GPUs" in p for p in problems)
    assert {p.split(":")[0] for p in problems} == {"caption", "pseudo_qa/teacher"}


def test_more_workers_than_the_gpu_nodes_hold_is_a_problem():
    problems = check_cluster(plan(load_config("sportu-1pct", ["train.num_workers=64"])), cluster("gcp"))
    assert {p.split(":")[0] for p in problems} == {"generator", "finetune"}


def test_undeclared_node_resources_are_a_problem():
    bare = cluster("aws")
    bare["available_node_types"]["gpu_8x_train"]["resources"] = {}
    assert any("gpu_8x_train" in p for p in check_cluster(plan(load_config("kvasir-vqa-1pct")), bare))


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    # an unreachable RAY_ADDRESS: if --plan touched Ray, it would fail or hang instead of printing
    env = {"RAY_ADDRESS": "127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "adapt.py"), "--plan", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )


def test_plan_cli_prints_a_table_and_a_json_last_line_without_starting_ray(tmp_path):
    ok = _plan_cli("--config", "kvasir-vqa-1pct", "--cluster", str(ROOT / "cluster" / "aws.yaml"))
    assert ok.returncode == 0, ok.stderr
    last = json.loads(ok.stdout.strip().splitlines()[-1])
    assert last["fits"] and last["problems"] == []
    assert last["stages"]["caption"] == {
        "role": "teacher",
        "device": "gpu",
        "replicas": 1,
        "gpus_per_replica": 8,
        "cpus_per_replica": 8.0,
    }
    assert last["stages"]["finetune"]["workers"] == 8 and last["stages"]["finetune"]["gpus_per_worker"] == 1
    tiny = json.loads(_plan_cli().stdout.strip().splitlines()[-1])
    assert {e["device"] for e in tiny["stages"].values()} == {"cpu"}
    small = cluster("aws")
    small["available_node_types"]["gpu_8x_teacher"]["resources"]["GPU"] = 4
    small["available_node_types"]["gpu_8x_train"]["resources"]["GPU"] = 4
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small))
    bad = _plan_cli("--config", "kvasir-vqa-1pct", "--cluster", str(tmp_path / "small.yaml"))
    assert bad.returncode == 1 and "problem: caption: needs 8 GPUs" in bad.stdout
    assert not json.loads(bad.stdout.strip().splitlines()[-1])["fits"]


def test_a_local_run_dir_is_refused_where_other_nodes_would_write(ray_local, tmp_path):
    from leaml_ray.pipeline import StageError
    from leaml_ray.runtime import check_run_dir_for_cluster

    local = f"run.dir={tmp_path / 'run'}"
    check_run_dir_for_cluster(load_config(None, [local]))  # one CPU node: every stage runs here
    # GPU stages on a cluster without GPUs yet: the autoscaler will add nodes that cannot see this disk
    with pytest.raises(StageError, match="run.dir .* is a local path on a cluster"):
        check_run_dir_for_cluster(load_config(None, [local, "train.device=gpu"]))
    check_run_dir_for_cluster(load_config(None, [local, "train.device=gpu", "run.shared_fs=true"]))
    check_run_dir_for_cluster(load_config(None, ["run.dir=s3://bucket/run", "target.device=gpu"]))
