"""Placement from the config, built on this CPU machine: the exact ray.data.llm, actor-pool, Ray Serve and Ray Train
configs of the paper presets (GPU bundles, two tensor-parallel-4 teacher replicas on one node, accelerator types, no
CPU env, nccl, bf16) and the tiny-cpu preset's CPU configs."""

import pytest
from ray._common.utils import resources_from_ray_options

from leaml_ray.cluster_plan import stage_demands, stage_resources
from leaml_ray.config import ConfigError, load_config
from leaml_ray.inference.engine import engine_args
from leaml_ray.placement import (
    CPU_ENV,
    actor_pool_placement,
    ray_data_llm_backend,
    ray_data_llm_placement,
    serve_placement,
)
from leaml_ray.stages.common import engine, train_job
from leaml_ray.train.core import deepspeed_config
from leaml_ray.train.job import scaling_config
from leaml_ray.train.loop import torch_config

ROLES = ("teacher", "generator", "target")
PAPER = ["kvasir-vqa-1pct", "sportu-1pct"]


@pytest.mark.parametrize("preset", PAPER)
def test_paper_teacher_replica_is_one_actor_holding_its_gpus_and_no_placement_group(preset):
    """The engine stage's remote args are what Ray Data gives every replica actor: the replica's GPUs on the actor
    itself (one node), vLLM's own processes for the ranks, and no `ray_remote_args_fn` (ray.data.llm's "ray" executor
    created a placement group at each of its calls; tests/unit/inference/test_generate.py runs tensor parallel 2 on
    this CPU)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    settings = engine(load_config(preset), "teacher")
    kwargs = engine_args(settings, "/models/teacher")
    assert kwargs["tensor_parallel_size"] == 4 and kwargs["pipeline_parallel_size"] == 1
    assert kwargs["enforce_eager"] is False
    assert kwargs["mm_encoder_tp_mode"] == "data"  # each rank encodes its own images (vLLM's Qwen2.5-VL recipe)
    assert kwargs["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert kwargs["max_model_len"] == 2048 and kwargs["max_num_seqs"] == 128
    assert kwargs["mm_processor_kwargs"]["max_pixels"] == 1003520  # the preset's pixel budget reaches vLLM
    kwargs.pop("model")
    kwargs["distributed_executor_backend"] = ray_data_llm_backend(settings)
    config = vLLMEngineProcessorConfig(
        model_source="/models/teacher",
        engine_kwargs=kwargs,
        batch_size=settings.batch_size,
        tokenize_stage=False,
        detokenize_stage=False,
        **ray_data_llm_placement(settings),
    )
    assert config.concurrency == (2, 2) and config.runtime_env is None  # a fixed pool of 2; no CPU env on GPUs
    # one bundle per replica holding all its GPUs (not one per rank: vLLM's "mp" ranks live inside the actor)
    assert ray_data_llm_placement(settings)["placement_group_config"] == {"bundles": [{"CPU": 8.0, "GPU": 4}]}
    assert config.placement_group_config["bundles"] == [{"CPU": 8.0, "GPU": 4}]
    processor = build_processor(config)
    stage = processor.get_stage_by_name("vLLMEngineStage")
    assert "ray_remote_args_fn" not in stage.map_batches_kwargs
    assert stage.map_batches_kwargs["num_gpus"] == 4 and stage.map_batches_kwargs["num_cpus"] == 8
    assert stage.fn_constructor_kwargs["engine_kwargs"]["distributed_executor_backend"] == "mp"
    # the actor asks for the H100 type: Ray core's resources of those remote args are the plan's demand
    assert stage.map_batches_kwargs["accelerator_type"] == "H100"
    remote = {k: stage.map_batches_kwargs.get(k) for k in ("num_cpus", "num_gpus", "accelerator_type", "resources")}
    resources = resources_from_ray_options(remote)
    assert resources == {"CPU": 8, "GPU": 4, "accelerator_type:H100": 0.001}
    assert stage_demands(stage_resources(load_config(preset))["stages"]["caption"]) == [resources, resources]


@pytest.mark.parametrize("preset", PAPER)
def test_paper_generator_and_target_engines_are_gpu_replicas(preset):
    cfg = load_config(preset)
    for role in ("generator", "target"):
        settings = engine(cfg, role)
        assert settings.device == "gpu" and settings.replicas == 8 and settings.gpus_per_replica == 1
        kwargs = engine_args(settings, "/models/x")
        assert kwargs["tensor_parallel_size"] == 1 and "mm_encoder_tp_mode" not in kwargs  # nothing to shard
        assert kwargs["limit_mm_per_prompt"] == {"image": 1, "video": 0}
        assert kwargs["max_model_len"] == 2048 and kwargs["max_num_seqs"] == 128
        pool = actor_pool_placement(settings)
        assert pool == {"num_cpus": 4.0, "num_gpus": 1, "accelerator_type": "A100-40G"}
        placement = ray_data_llm_placement(settings)
        assert placement["placement_group_config"]["bundles"] == [{"GPU": 1, "CPU": 4.0}]
        assert placement["concurrency"] == (8, 8) and ray_data_llm_backend(settings) == "uni"
        assert placement["accelerator_type"] == "A100-40G"
        # what map_batches asks of each actor pool actor is what the plan gives the autoscaler
        stage = "evaluate" if role == "target" else "pseudo_qa"
        demands = stage_demands(stage_resources(cfg)["stages"][stage])
        assert demands == [resources_from_ray_options(pool)] * 8


def test_serve_configs_follow_the_role_not_the_machine():
    from ray.serve.llm import LLMConfig

    from leaml_ray.inference.deploy import llm_config

    gpu = llm_config("teacher", engine(load_config("kvasir-vqa-1pct"), "teacher").at("/models/teacher"))
    assert isinstance(gpu, LLMConfig) and gpu.accelerator_config.kind == "gpu"
    # Serve keeps a GPU bundle per tensor-parallel rank (its own engine placement), 4 per replica, all on one node
    assert gpu.placement_group_config == {"bundles": [{"GPU": 1, "CPU": 2.0}] * 4, "strategy": "STRICT_PACK"}
    assert gpu.engine_kwargs["tensor_parallel_size"] == 4 and gpu.engine_kwargs["mm_encoder_tp_mode"] == "data"
    # Serve's engine config puts the accelerator type in every bundle; STRICT_PACK: the autoscaler adds them up
    assert gpu.accelerator_type == "H100"
    served = gpu.get_engine_config()
    assert served.placement_strategy == "STRICT_PACK"
    total: dict[str, float] = {}
    for bundle in served.placement_bundles:
        assert bundle["accelerator_type:H100"] == 0.001
        for k, v in bundle.items():
            total[k] = total.get(k, 0) + v
    assert len(served.placement_bundles) == 4
    # one Serve replica's bundles add up to one of the plan's two replica demands
    demand, other = stage_demands(stage_resources(load_config("kvasir-vqa-1pct"))["stages"]["caption"])
    assert demand == other and total == pytest.approx({**demand, "accelerator_type:H100": 4 * 0.001})
    cpu = llm_config("teacher", engine(load_config(), "teacher").at("/models/teacher"))
    assert cpu.accelerator_config.kind == "cpu" and cpu.runtime_env["env_vars"] == CPU_ENV
    assert serve_placement(engine(load_config(), "target"))["placement_group_config"] == {"bundles": [{"CPU": 1.0}]}


@pytest.mark.parametrize("preset", PAPER)
def test_paper_training_is_zero3_on_gpus_over_nccl_in_bf16(preset):
    cfg = load_config(preset)
    generator = train_job(cfg, "generator", cfg.generator.finetune)
    scaling = scaling_config(generator)
    assert scaling.num_workers == 8 and scaling.use_gpu and scaling.resources_per_worker == {"CPU": 8}
    assert scaling.accelerator_type == "A100-40G"  # the training node type, where a whole ZeRO-3 group fits
    worker = {"CPU": 8, "GPU": 1, "accelerator_type:A100-40G": 0.001}
    assert scaling._resources_per_worker_not_none == worker  # each worker's bundle (ray/air/config.py)
    assert stage_demands(stage_resources(cfg)["stages"]["generator"]) == [worker] * 8
    assert torch_config(generator).backend == "nccl"
    for role in ("generator", "target"):
        section = getattr(cfg, role)
        job = train_job(cfg, role, section.finetune)
        assert job.device == "gpu" and job.gradient_checkpointing and job.attention == "sdpa"
        assert job.lr == section.lora_lr == 1e-4  # LoRA runs use lora_lr, which the preset sets
        assert job.spec.max_pixels == section.max_pixels == 1003520  # training sees the engines' pixel budget
        assert job.spec.dtype == "bfloat16"
        ds = deepspeed_config(job, hidden_size=3584)
        assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    full = train_job(cfg, "target", "full")
    assert full.lr == 1e-5 and full.lora_r == 0  # the full-finetuning baseline has its own rate


def test_tiny_cpu_keeps_every_engine_and_worker_on_the_cpu():
    cfg = load_config()
    for role in ("teacher", "generator", "target"):
        settings = engine(cfg, role)
        assert settings.device == "cpu" and engine_args(settings, "/m")["enforce_eager"]
        assert actor_pool_placement(settings) == {"num_cpus": 1.0, "num_gpus": 0, "runtime_env": {"env_vars": CPU_ENV}}
        assert ray_data_llm_placement(settings)["placement_group_config"] == {"bundles": [{"CPU": 1.0}]}
    job = train_job(cfg, "target", "full")
    assert not scaling_config(job).use_gpu and torch_config(job).backend == "gloo"
    assert not deepspeed_config(job)["bf16"]["enabled"] and job.spec.dtype == "float32"


@pytest.mark.parametrize("preset", [*PAPER, None])  # None: the tiny-cpu default
def test_engine_args_of_every_role_are_ones_vllm_accepts(preset, monkeypatch):
    """vLLM's own EngineArgs takes every key (an unknown one is a TypeError), and its multimodal config, which
    `create_engine_config` builds from them, validates their values (mm_encoder_tp_mode, the per-modality limits).
    Neither reads the model folder; create_engine_config would, so it is not called."""
    import huggingface_hub.constants
    from vllm.config.multimodal import MultiModalConfig
    from vllm.engine.arg_utils import EngineArgs

    # offline, EngineArgs resolves the model id through the hub cache: keep it to the arguments
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    cfg = load_config(preset)
    for role in ROLES:
        settings = engine(cfg, role)
        kwargs = engine_args(settings, "/models/x")
        del kwargs["model"]
        kwargs["distributed_executor_backend"] = ray_data_llm_backend(settings)
        args = EngineArgs(model="/models/x", **kwargs)
        assert args.tensor_parallel_size == settings.tensor_parallel_size
        assert args.mm_encoder_tp_mode == ("data" if settings.tensor_parallel_size > 1 else "weights")
        multimodal = MultiModalConfig(
            limit_per_prompt=args.limit_mm_per_prompt,
            mm_processor_kwargs=args.mm_processor_kwargs,
            mm_encoder_tp_mode=args.mm_encoder_tp_mode,
        )
        assert multimodal.get_limit_per_prompt("image") == 1 and multimodal.get_limit_per_prompt("video") == 0
    with pytest.raises(ValueError):  # the values are checked: a mode vLLM does not have is refused
        MultiModalConfig(mm_encoder_tp_mode="sharded")


def test_accelerator_types_need_a_gpu_device():
    for key in ("teacher", "generator", "target", "train"):
        with pytest.raises(ConfigError, match=f"{key}: .*accelerator_type L4 needs device: gpu"):
            load_config(None, [f"{key}.accelerator_type=L4"])
        if key != "train":
            assert engine(load_config(None, [f"{key}.accelerator_type=L4", f"{key}.device=gpu"]), key)
    assert train_job(
        load_config(None, ["train.accelerator_type=L4", "train.device=gpu"]), "target", "full"
    ).accelerator_type
    assert actor_pool_placement(engine(load_config(), "teacher")).get("accelerator_type") is None


def test_every_stage_plan_carries_its_roles_accelerator_type():
    """Each stage's plan holds the engines and training job it places: each with its role's accelerator type."""
    from leaml_ray.stages import caption, evaluate, finetune, generator, pseudo_qa

    cfg = load_config("kvasir-vqa-1pct", ["pseudo_qa.consistency_filter=target"])
    assert caption.plan(cfg).teacher.accelerator_type == "H100"
    answers = pseudo_qa.plan(cfg)
    assert answers.generator.accelerator_type == answers.judge.accelerator_type == "A100-40G"
    assert evaluate.plan(cfg).target.accelerator_type == "A100-40G"
    assert generator.plan(cfg).job.accelerator_type == finetune.plan_for(cfg, "full").job.accelerator_type
