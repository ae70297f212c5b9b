"""Every stage's cache key is the hash of its plan (placement left out): walked over every field of the config in
several configurations, each field that is not placement changes some stage's key (else it is dead config), no
placement field changes any, and the cases that once went stale rerun exactly the stages they should. No stage reads
the config outside its plan: `run(plan, ctx)` never receives it, and only plan builders take a `Config`."""

import ast
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from leaml_ray import plan
from leaml_ray.config import Config
from leaml_ray.plan import stable_hash
from leaml_ray.stages import pipeline_stages
from tests.conftest import make_config

# configs whose stages read different things: the consistency filter's model, LoRA vs full training
VARIANTS = {
    "default": [],
    "teacher_filter": ["pseudo_qa.consistency_filter=teacher"],
    "target_filter": ["pseudo_qa.consistency_filter=target"],
    "lora": ["target.finetune=lora", "target.lora_lr=0.001", "generator.finetune=lora", "generator.lora_lr=0.001"],
    "served_teacher": ["teacher.mode=serve"],
}
# the config fields that only say where or how the work runs (or where the run lives, how it talks to Ray, what
# tracks it): the stages' plans hold them as placement() fields or not at all
PLACEMENT = {
    *(f"{role}.{f}" for role in ("teacher", "generator", "target") for f in ("device", "engine", "replicas")),
    *(f"{role}.{f}" for role in ("teacher", "generator", "target") for f in ("cpus_per_replica", "engine_batch_size")),
    *(f"{role}.{f}" for role in ("teacher", "generator", "target") for f in ("max_num_seqs", "accelerator_type")),
    "teacher.mode",
    "teacher.endpoint",
    *(f"train.{f}" for f in ("max_failures", "checkpoint_every", "cpus_per_worker", "accelerator_type")),
    *(f"run.{f}" for f in ("dir", "log_level", "shared_fs")),
    *(f"cluster.{f}" for f in Config.model_fields["cluster"].annotation.model_fields),
    *(f"tracking.{f}" for f in Config.model_fields["tracking"].annotation.model_fields),
}


def fields() -> list[str]:
    return [f"{s}.{f}" for s, info in Config.model_fields.items() for f in info.annotation.model_fields]


def changed(cfg: Config, key: str) -> Config:
    """`cfg` with one field set to a different value (not validated: the key only hashes it)."""
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if isinstance(value, bool):
        new = not value
    elif isinstance(value, (int, float)):
        new = value + 1
    elif isinstance(value, list):
        new = [*value, "zero_shot"] if "zero_shot" not in value else value[:-1]
    elif value is None:  # an optional setting turned on, with a value of its type
        adapter = TypeAdapter(type(getattr(cfg, section)).model_fields[name].annotation)
        new = next(v for v in (1, "other") if _valid(adapter, v))
    else:
        new = f"{value}-other"
    part = getattr(cfg, section).model_copy(update={name: new})
    return cfg.model_copy(update={section: part})


def _valid(adapter: TypeAdapter, value) -> bool:
    try:
        return adapter.validate_python(value) is not None
    except ValidationError:
        return False


def config_hash(stage, cfg: Config) -> str:
    """The config's part of a stage's cache key: the hash of its plan without placement fields."""
    return stable_hash(plan.hashed_fields(stage.plan(cfg)))


def test_every_setting_changes_some_stage_and_placement_changes_none(tmp_path):
    assert PLACEMENT <= set(fields())
    live: set[str] = set()
    for variant, overrides in VARIANTS.items():
        cfg = make_config(tmp_path, *overrides)
        stages = pipeline_stages(cfg)
        assert [s.name for s in stages] == [
            *("prepare", "caption", "generator", "pseudo_qa"),
            *("finetune:leaml", "finetune:lora", "finetune:full", "evaluate"),
        ]
        before = {s.name: config_hash(s, cfg) for s in stages}
        for key in fields():
            rerun = [s.name for s in stages if config_hash(s, changed(cfg, key)) != before[s.name]]
            if key in PLACEMENT:
                assert rerun == [], (variant, key, rerun)  # moving the work never reruns it
            live |= {key} if rerun else set()
    dead = set(fields()) - PLACEMENT - live
    assert dead == set(), f"settings no stage's plan holds (dead config): {sorted(dead)}"


def test_placement_fields_are_in_the_manifest_record_but_not_in_the_key(tmp_path):
    cfg = make_config(tmp_path)
    caption = next(s for s in pipeline_stages(cfg) if s.name == "caption")
    recorded = plan.values(caption.plan(cfg))
    assert recorded["teacher"]["replicas"] == cfg.teacher.replicas and recorded["teacher"]["spec"]["model"]
    hashed = plan.hashed_fields(caption.plan(cfg))
    assert "replicas" not in hashed["teacher"] and "endpoint" not in hashed["teacher"]
    assert hashed["teacher"]["spec"]["zoo_recipe"]  # a zoo model is hashed with its recipe, never its folder


def test_only_plan_builders_take_the_config():
    builders = {"plan", "plan_for", "finetune_stages", "pipeline_stages", "train_job", "model_spec", "engine"}
    stages = Path(__file__).resolve().parents[2] / "leaml_ray" / "stages"
    for path in stages.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                takes_config = any(ast.unparse(a.annotation or ast.Constant(None)) == "Config" for a in node.args.args)
                assert not takes_config or node.name in builders, f"{path.name}: {node.name} reads the config"


# (stage, field): once missing from hand-written key lists (stale outputs), or read only in some configurations
RERUNS = [
    ("default", "caption", "teacher.max_new_tokens"),
    ("default", "pseudo_qa", "generator.max_model_len"),
    ("default", "pseudo_qa", "generator.model"),
    ("teacher_filter", "pseudo_qa", "teacher.model"),
    ("teacher_filter", "pseudo_qa", "eval.max_new_tokens"),
    ("target_filter", "pseudo_qa", "target.model"),
    ("default", "evaluate", "target.max_model_len"),
    ("default", "finetune:full", "target.lr"),
    ("default", "finetune:lora", "target.lora_lr"),
    ("default", "finetune:leaml", "target.finetune"),
    ("lora", "finetune:leaml", "target.lora_r"),
    ("default", "generator", "generator.distill_scope"),
    # a prompt is read by every stage that asks or trains with it: the generator learns both with the same words
    ("default", "caption", "teacher.caption_prompt"),
    ("default", "generator", "teacher.caption_prompt"),
    ("default", "pseudo_qa", "teacher.caption_prompt"),
    ("default", "generator", "pseudo_qa.qa_prompt"),
    ("default", "pseudo_qa", "pseudo_qa.qa_prompt"),
]
# what only places the work, or is not read in that configuration
SKIPS = [
    ("default", "caption", "teacher.replicas"),
    ("default", "caption", "teacher.mode"),
    ("default", "caption", "teacher.endpoint"),
    ("default", "generator", "generator.replicas"),
    ("default", "generator", "generator.max_model_len"),
    ("default", "generator", "train.max_failures"),
    ("default", "pseudo_qa", "teacher.model"),
    ("default", "pseudo_qa", "eval.max_new_tokens"),
    ("default", "finetune:lora", "target.lr"),
    ("default", "finetune:lora", "target.finetune"),
    ("default", "finetune:lora", "eval.methods"),  # adding a method trains only that one
    ("default", "finetune:full", "target.lora_r"),
    ("default", "finetune:leaml", "target.lora_r"),
    ("default", "evaluate", "target.replicas"),
    ("default", "evaluate", "target.lr"),
]


@pytest.mark.parametrize("variant,name,key,reruns", [(*r, True) for r in RERUNS] + [(*s, False) for s in SKIPS])
def test_known_cases(tmp_path, variant, name, key, reruns):
    cfg = make_config(tmp_path, *VARIANTS[variant])
    stage = next(s for s in pipeline_stages(cfg) if s.name == name)
    assert (config_hash(stage, changed(cfg, key)) != config_hash(stage, cfg)) == reruns
