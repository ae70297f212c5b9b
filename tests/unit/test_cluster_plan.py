"""The `--plan` dry run against the shipped cluster configs: the node type Ray's own autoscaler code launches for
each stage, and whether the stage fits in that type's GPU memory."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from leaml_ray.cluster_plan import (
    GPU_MEMORY_LABEL,
    KNOWN_MODELS,
    autoscaler_nodes,
    check_cluster,
    engine_memory,
    format_plan,
    lora_params,
    model_shape,
    place_on_cluster,
    shape_from_config,
    stage_demands,
    stage_resources,
    train_memory,
)
from leaml_ray.config import load_config
from leaml_ray.stages.common import engine, train_job

ROOT = Path(__file__).resolve().parents[2]


PAPER = ["kvasir-vqa-1pct", "sportu-1pct"]


# the presets name the AWS teacher type (H100); GCP's 80 GB teacher type is an A100 (preset comment, gcp.yaml)
ON = {"aws": [], "gcp": ["teacher.accelerator_type=A100-80G"]}


TEACHER_STAGES = {"caption", "pseudo_qa/teacher"}


def cluster(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / f"{name}.yaml").read_text())


def placed(preset: str, name: str, *overrides: str, on: dict | None = None) -> tuple[dict, list[str]]:
    """The preset's plan placed on a shipped cluster (or `on`), with that cloud's overrides."""
    return place_on_cluster(stage_resources(load_config(preset, [*ON[name], *overrides])), on or cluster(name))


def _qwen25_vl_config(text: dict, tied: bool, out: int) -> dict:
    """A Qwen2.5-VL config.json (transformers 5 layout): the text part given, the 32-block 1280-wide vision tower."""
    vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "out_hidden_size": out}
    return {"text_config": text, "vision_config": vision, "tie_word_embeddings": tied, "dtype": "bfloat16"}


def _text(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int) -> dict:
    """The text part of a Qwen2.5-VL config.json."""
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "vocab_size": vocab,
    }


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


@pytest.mark.parametrize("preset", PAPER)
@pytest.mark.parametrize("name, teacher_type, teacher_gb", [("aws", "H100", 80), ("gcp", "A100-80G", 80)])
def test_paper_plans_fit_the_shipped_clusters(preset, name, teacher_type, teacher_gb):
    the_plan, problems = placed(preset, name)
    stages = the_plan["stages"]
    assert problems == []
    # two tensor-parallel-4 teacher replicas: both on ONE 8-GPU teacher node (the loop below checks `nodes`)
    assert stages["caption"]["gpus_per_replica"] == 4 and stages["caption"]["replicas"] == 2
    assert sum(d["GPU"] for d in stage_demands(stages["caption"])) == 8
    assert all(e["device"] == "gpu" for s, e in stages.items() if s != "prepare")
    for stage, entry in stages.items():
        if stage == "prepare":
            continue
        teacher = stage in TEACHER_STAGES
        # the teacher on the 80 GB teacher type, everything else on the 40 GB A100 training type, one node each
        assert entry["accelerator_type"] == (teacher_type if teacher else "A100-40G")
        assert entry["node_type"] == ("gpu_8x_teacher" if teacher else "gpu_8x_train")
        assert entry["nodes"] == {entry["node_type"]: 1}
        assert entry["gpu_memory_gb"] == (teacher_gb if teacher else 40)
        assert 0 < entry["gpu_memory_needed_gb"] < entry["gpu_memory_gb"]


def test_without_an_accelerator_type_the_autoscaler_puts_the_teacher_on_the_spot_a100_type():
    """The issue: Ray's utilization score prefers the type with fewer idle CPUs (p4d 96 vs p5 192), so a teacher that
    names no accelerator type lands on the 40 GB spot type; naming H100 is what puts it on the p5."""
    unnamed, _ = placed("kvasir-vqa-1pct", "aws", "teacher.accelerator_type=")
    assert unnamed["stages"]["caption"]["accelerator_type"] is None
    assert unnamed["stages"]["caption"]["node_type"] == "gpu_8x_train"
    named, _ = placed("kvasir-vqa-1pct", "aws")
    assert named["stages"]["caption"]["node_type"] == "gpu_8x_teacher"


def test_a_stage_runs_on_the_idle_nodes_the_stage_before_it_left_when_its_work_fits_there():
    """Stages outlast the idle timeout: the previous stage's nodes are up and Ray fills them first. Training that
    names no accelerator type follows the teacher onto its p5 node (found by --rehearse, where the plan once assumed
    an empty cluster per stage and said gpu_8x_train); named types keep every stage on its own node type."""
    free = ["generator.accelerator_type=", "target.accelerator_type=", "train.accelerator_type="]
    the_plan, problems = placed("kvasir-vqa-1pct", "aws", *free)
    stages = the_plan["stages"]
    assert problems == [] and stages["caption"]["launched"] == {"gpu_8x_teacher": 1}
    for stage in ("generator", "pseudo_qa", "pseudo_qa/teacher", "finetune", "evaluate"):
        assert stages[stage]["nodes"] == {"gpu_8x_teacher": 1} and stages[stage]["launched"] == {}, stage
    named, _ = placed("kvasir-vqa-1pct", "aws")
    assert named["stages"]["generator"]["launched"] == {"gpu_8x_train": 1}
    assert named["stages"]["pseudo_qa"]["launched"] == {} and named["stages"]["finetune"]["launched"] == {
        "gpu_8x_train": 1  # the teacher stage between them ran on the teacher node: the train node went away
    }


@pytest.mark.parametrize("preset", PAPER)
def test_on_gcp_the_presets_h100_teacher_is_a_problem_that_names_the_types_there(preset):
    _, problems = place_on_cluster(stage_resources(load_config(preset)), cluster("gcp"))
    assert {p.split(":")[0] for p in problems} == TEACHER_STAGES
    for problem in problems:
        assert "teacher.accelerator_type H100: no node type declares accelerator_type:H100" in problem
        assert "A100-80G (gpu_8x_teacher)" in problem and "A100-40G (gpu_8x_train)" in problem


def test_the_launcher_yamls_declare_accelerator_types_and_gpu_memory_that_ray_accepts():
    from ray._private.label_utils import validate_node_label_syntax
    from ray.util import accelerators

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    names = {v for k, v in vars(accelerators.accelerators).items() if k.isupper() and isinstance(v, str)}
    declared = {}
    for name in ("aws", "gcp"):
        config = cluster(name)
        jsonschema.validate(config, schema)  # `labels` of a node type: string values
        for key, node in config["available_node_types"].items():
            if not node["resources"]["GPU"]:
                assert "labels" not in node
                continue
            validate_node_label_syntax(node["labels"])  # what `ray start` accepts as node labels
            accelerators_here = [r.split(":", 1)[1] for r in node["resources"] if r.startswith("accelerator_type:")]
            assert len(accelerators_here) == 1 and set(accelerators_here) <= names, accelerators_here
            assert node["resources"][f"accelerator_type:{accelerators_here[0]}"] == 1
            declared[name, key] = accelerators_here[0], float(node["labels"][GPU_MEMORY_LABEL])
    assert declared == {
        ("aws", "gpu_8x_teacher"): ("H100", 80),  # p5.48xlarge
        ("aws", "gpu_8x_train"): ("A100-40G", 40),  # p4d.24xlarge
        ("gcp", "gpu_8x_teacher"): ("A100-80G", 80),  # a2-ultragpu-8g
        ("gcp", "gpu_8x_train"): ("A100-40G", 40),  # a2-highgpu-8g
    }


def test_kuberay_groups_provide_the_accelerator_types_the_presets_ask_for():
    """The KubeRay autoscaler's own view of the groups (custom resources from rayStartParams) places every stage."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _node_type_from_group_spec

    manifest = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    groups = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    types = {g["groupName"]: _node_type_from_group_spec(g, is_head=False) for g in groups}
    the_plan = stage_resources(load_config("kvasir-vqa-1pct"))
    for stage, entry in the_plan["stages"].items():
        if entry["device"] == "gpu":
            nodes, residual, _ = autoscaler_nodes(types, 4, stage_demands(entry))
            assert residual == [] and nodes == {"gpu-8x-teacher" if stage in TEACHER_STAGES else "gpu-8x-train": 1}


def test_a_node_type_with_too_few_gpus_is_a_problem():
    # 4-GPU teacher nodes hold one tensor-parallel-4 replica each: the two replicas take two nodes
    four = cluster("aws")
    four["available_node_types"]["gpu_8x_teacher"]["resources"]["GPU"] = 4
    the_plan, problems = placed("kvasir-vqa-1pct", "aws", on=four)
    assert problems == [] and the_plan["stages"]["caption"]["nodes"] == {"gpu_8x_teacher": 2}
    # fewer GPUs than one replica's tensor parallel size: no node holds a replica
    small = cluster("aws")
    small["available_node_types"]["gpu_8x_teacher"]["resources"]["GPU"] = 2
    problems = check_cluster(stage_resources(load_config("kvasir-vqa-1pct")), small)
    assert {p.split(":")[0] for p in problems} == {"caption", "pseudo_qa/teacher"}
    for problem in problems:
        assert "needs 4 GPUs and 8 CPUs on one node of accelerator type H100" in problem
        assert "no worker node type has that (largest: 2)" in problem


def test_more_workers_than_the_gpu_nodes_hold_is_a_problem():
    _, problems = placed("sportu-1pct", "gcp", "train.num_workers=64")
    assert {p.split(":")[0] for p in problems} == {"generator", "finetune"}
    assert all("the node types fit 16 within max_workers" in p for p in problems)  # 2 A100-40G nodes of 8
    sixteen, problems = placed("sportu-1pct", "gcp", "train.num_workers=16")
    assert problems == [] and sixteen["stages"]["finetune"]["nodes"] == {"gpu_8x_train": 2}


def test_a_node_type_without_its_gpu_memory_is_a_problem():
    bare = cluster("aws")
    del bare["available_node_types"]["gpu_8x_teacher"]["labels"]
    _, problems = placed("kvasir-vqa-1pct", "aws", on=bare)
    assert any(p.startswith("node type gpu_8x_teacher: its labels must state its GPU memory") for p in problems)


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_a_teacher_that_does_not_fit_in_gpu_memory_is_a_problem(name):
    small = cluster(name)
    small["available_node_types"]["gpu_8x_teacher"]["labels"][GPU_MEMORY_LABEL] = "24"  # L4-sized GPUs
    the_plan, problems = placed("kvasir-vqa-1pct", name, on=small)
    assert {p.split(":")[0] for p in problems} == TEACHER_STAGES
    assert the_plan["stages"]["caption"]["gpu_memory_gb"] == 24
    # 58.2 GB: 34.2 of weights (73.4 B x 2 bytes / TP 4 = 36.7e9 B), a 20 GB KV cache (128 sequences x 2048 tokens
    # x 80 layers x K,V x 2 KV heads per rank x 128 x 2 bytes = 20 GiB), 4 of overhead; vLLM gets 90% of 24 GB
    assert "caption: needs ~58.2 GB per GPU (weights 34.2, kv cache 20, overhead 4)" in problems[0]
    assert "gpu_8x_teacher has 24 GB GPUs (vLLM allocates 90%: 21.6)" in problems[0]
    # at tensor parallel 4 the 72B needs the 80 GB type: on the 40 GB training type it does not fit
    forty, problems = placed("kvasir-vqa-1pct", name, "teacher.accelerator_type=A100-40G")
    assert forty["stages"]["caption"]["node_type"] == "gpu_8x_train"
    assert {p.split(":")[0] for p in problems} == TEACHER_STAGES
    assert "needs ~58.2 GB per GPU" in problems[0]
    assert "gpu_8x_train has 40 GB GPUs (vLLM allocates 90%: 36)" in problems[0]
    # tensor parallel 2: 68 GB of weights and a 40 GB KV cache per GPU do not fit an 80 GB GPU either
    tp2, problems = placed("kvasir-vqa-1pct", name, "teacher.tensor_parallel_size=2")
    assert tp2["stages"]["caption"]["gpu_memory_needed_gb"] == pytest.approx(68.4 + 40 + 4, abs=0.2)
    assert {p.split(":")[0] for p in problems} == TEACHER_STAGES and "has 80 GB GPUs" in problems[0]


def test_training_without_gradient_checkpointing_does_not_fit_the_40gb_type():
    """The presets' comment: the 7B at batch 4 with a 152k-word vocabulary needs gradient checkpointing on 40 GB."""
    with_it, problems = placed("kvasir-vqa-1pct", "aws")
    assert problems == [] and with_it["stages"]["generator"]["gpu_memory_needed_gb"] < 20
    without, problems = placed("kvasir-vqa-1pct", "aws", "train.gradient_checkpointing=false")
    assert {p.split(":")[0] for p in problems} == {"generator", "finetune"}
    assert all("gpu_8x_train has 40 GB GPUs" in p for p in problems)
    assert without["stages"]["generator"]["gpu_memory_needed_gb"] > 40


@pytest.mark.parametrize(
    "name, text, tied",
    [  # the shapes of each model's config.json on the hub; KNOWN_MODELS holds their published parameter counts
        ("Qwen2.5-VL-72B-Instruct", _text(8192, 80, 64, 8, 29568, 152064), False),
        ("Qwen2.5-VL-7B-Instruct", _text(3584, 28, 28, 4, 18944, 152064), False),
        ("Qwen2.5-VL-3B-Instruct", _text(2048, 36, 16, 2, 11008, 151936), True),
    ],
)
def test_parameters_counted_from_a_config_json_match_the_published_counts(name, text, tied, tmp_path):
    config = _qwen25_vl_config(text, tied, text["hidden_size"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape, dtype = model_shape(str(tmp_path))
    known = KNOWN_MODELS[name]
    assert dtype == "bfloat16" and shape.params == pytest.approx(known.params, rel=0.01)
    assert shape == shape_from_config(config)
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.intermediate) == (
        known.layers,
        known.kv_heads,
        known.head_dim,
        known.intermediate,
    )


def test_models_are_known_by_folder_name_local_config_or_not_at_all():
    from leaml_ray.models.registry import model_source

    assert model_shape("Qwen/Qwen2.5-VL-72B-Instruct")[0] is KNOWN_MODELS["Qwen2.5-VL-72B-Instruct"]
    assert model_shape("s3://bucket/models/Qwen2.5-VL-7B-Instruct/")[0] is KNOWN_MODELS["Qwen2.5-VL-7B-Instruct"]
    local, dtype = model_shape(
        model_source("zoo:teacher")
    )  # a local folder: its config.json (the shipped tiny teacher)
    assert local.layers == 3 and local.hidden == 128 and local.params < 5e6 and dtype == "float32"
    assert model_shape("zoo:teacher") is None  # the CPU demo's zoo is not sized (the plan shows "?")
    assert model_shape("org/unknown-model") is None
    # a model the plan cannot size: no memory figure and no memory problem, the table says "?"
    the_plan, problems = placed("kvasir-vqa-1pct", "aws", "teacher.model=org/unknown-model")
    assert problems == [] and the_plan["stages"]["caption"]["gpu_memory_needed_gb"] is None
    assert "?/80" in format_plan(the_plan).splitlines()[2]


def test_memory_estimates_follow_the_documented_formulas():
    """Checked against figures computed by hand: KV cache per token = layers x 2 (K, V) x KV heads x head dim x
    bytes; LoRA r=64 on all 7 projections of Qwen2.5-7B's language model = PEFT's 161,480,704 trainable."""
    gib = 2**30
    s72 = KNOWN_MODELS["Qwen2.5-VL-72B-Instruct"]
    cfg = load_config("kvasir-vqa-1pct")
    teacher = engine_memory(s72, engine(cfg, "teacher"), 2)
    assert teacher["weights"] == pytest.approx(73.4e9 * 2 / 4 / gib)  # TP 4: a quarter of the bf16 weights
    # 128 sequences x 2048 tokens x 80 layers x (K, V) x 2 KV heads (8 / TP 4) x 128 head dim x 2 bytes = 20 GiB
    assert teacher["kv_cache"] == pytest.approx(128 * 2048 * 80 * 2 * 2 * 128 * 2 / gib) == pytest.approx(20.0)
    assert teacher["overhead"] == 4.0
    s3 = KNOWN_MODELS["Qwen2.5-VL-3B-Instruct"]
    tp8_cfg = load_config("kvasir-vqa-1pct", ["target.tensor_parallel_size=8"])
    tp8 = engine_memory(s3, engine(tp8_cfg, "target"), 2)
    assert tp8["kv_cache"] == pytest.approx(128 * 2048 * 36 * 2 * 1 * 128 * 2 / gib)  # 2 KV heads: replicated on 8
    s7 = KNOWN_MODELS["Qwen2.5-VL-7B-Instruct"]
    assert lora_params(s7, 64) == 161_480_704
    seq = 1003520 // (28 * 28) + 256  # 1280 image tokens + the text
    lora = train_job(cfg, "target", "lora")
    zero3 = train_memory(s7, replace(lora, lora_r=64), seq)
    assert zero3["model_states"] == pytest.approx((8.29e9 * 2 + 161_480_704 * 16) / 8 / gib)
    zero2 = train_memory(s7, replace(lora, lora_r=64, zero_stage=2), seq)
    assert zero2["model_states"] == pytest.approx((8.29e9 * 2 + 161_480_704 * 2) / gib + 161_480_704 * 14 / 8 / gib)
    assert zero3["logits"] == pytest.approx(4 * seq * 152064 * 8 / gib)
    full_job = train_job(cfg, "target", "full")
    full = train_memory(s7, full_job, seq)
    assert full["model_states"] == pytest.approx(8.29e9 * 16 / 8 / gib)
    # the finetune stage is sized by its largest mode: the full-finetuning baseline of eval.methods
    finetune = stage_resources(cfg)["stages"]["finetune"]
    assert finetune["gpu_memory_parts_gb"]["model_states"] == pytest.approx(3.75e9 * 16 / 8 / gib, abs=0.05)
    lora3 = sum(train_memory(s3, replace(lora, lora_r=64), seq).values())
    assert finetune["gpu_memory_needed_gb"] == round(sum(train_memory(s3, full_job, seq).values()), 1)
    assert finetune["gpu_memory_needed_gb"] > lora3 + 4  # the full baseline's states: ~7 GB per GPU, LoRA's ~1


def test_undeclared_node_resources_are_a_problem():
    bare = cluster("aws")
    bare["available_node_types"]["gpu_8x_train"]["resources"] = {}
    assert any("gpu_8x_train" in p for p in check_cluster(stage_resources(load_config("kvasir-vqa-1pct")), bare))


def test_plan_cli_prints_a_table_and_a_json_last_line_without_starting_ray(tmp_path):
    ok = _plan_cli("--config", "kvasir-vqa-1pct", "--cluster", str(ROOT / "cluster" / "aws.yaml"))
    assert ok.returncode == 0, ok.stderr
    last = json.loads(ok.stdout.strip().splitlines()[-1])
    assert last["fits"] and last["problems"] == []
    assert last["stages"]["caption"] == {
        "role": "teacher",
        "device": "gpu",
        "replicas": 2,
        "gpus_per_replica": 4,
        "cpus_per_replica": 8.0,
        "accelerator_type": "H100",
        "node_type": "gpu_8x_teacher",  # where Ray's autoscaler launches it: p5.48xlarge
        "nodes": {"gpu_8x_teacher": 1},  # both replicas on one node
        "launched": {"gpu_8x_teacher": 1},  # the first GPU stage: no node is up before it
        "gpu_memory_gb": 80.0,
        "gpu_memory_needed_gb": 58.2,
        "gpu_memory_parts_gb": {"weights": 34.2, "kv_cache": 20.0, "overhead": 4.0},
    }
    finetune = last["stages"]["finetune"]
    assert finetune["workers"] == 8 and finetune["gpus_per_worker"] == 1
    assert finetune["node_type"] == "gpu_8x_train" and finetune["trains"] == "target"
    table = ok.stdout.splitlines()
    assert table[2].split()[-3:] == ["H100", "gpu_8x_teacher", "58.2/80"]  # caption: accelerator, node type, GB
    tiny = json.loads(_plan_cli().stdout.strip().splitlines()[-1])
    assert {e["device"] for e in tiny["stages"].values()} == {"cpu"}
    small = cluster("aws")
    small["available_node_types"]["gpu_8x_teacher"]["resources"]["GPU"] = 2  # fewer than one replica's TP 4
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small))
    bad = _plan_cli("--config", "kvasir-vqa-1pct", "--cluster", str(tmp_path / "small.yaml"))
    assert bad.returncode == 1 and "problem: caption: needs 4 GPUs" in bad.stdout
    assert not json.loads(bad.stdout.strip().splitlines()[-1])["fits"]
    assert "WARNING" not in bad.stderr  # the autoscaler's own warning for what fits no node type stays quiet
    gcp = _plan_cli("--config", "kvasir-vqa-1pct", "--cluster", str(ROOT / "cluster" / "gcp.yaml"), *ON["gcp"])
    assert gcp.returncode == 0, gcp.stdout
    assert json.loads(gcp.stdout.strip().splitlines()[-1])["stages"]["caption"]["node_type"] == "gpu_8x_teacher"
