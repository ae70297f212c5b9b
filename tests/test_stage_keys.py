"""Every stage's cache key comes from the config it declares: walked over every field of the config, a change of a
field the stage hashes changes its key (the stage reruns) and a change of any other field does not (it is skipped).
That a stage reads nothing it does not declare is enforced where it runs (pipeline.Config.restricted; the end-to-end
tests run every stage under it); here: the declarations name real fields, and the cases that once went stale."""

import pytest
from pydantic import TypeAdapter, ValidationError

from leaml_ray.config import Config, stable_hash
from leaml_ray.pipeline import EVERY_STAGE
from leaml_ray.stages import pipeline_stages
from tests.conftest import make_config

# configs whose stages read different things: the consistency filter's model, LoRA vs full training
VARIANTS = {
    "default": [],
    "teacher_filter": ["pseudo_qa.consistency_filter=teacher"],
    "target_filter": ["pseudo_qa.consistency_filter=target"],
    "lora": ["target.finetune=lora", "target.lora_lr=0.001", "generator.finetune=lora", "generator.lora_lr=0.001"],
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
    return stable_hash(cfg.subset(stage.hashed(cfg)))


def covered(key: str, declared: tuple[str, ...]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_field_reruns_exactly_the_stages_that_hash_it(tmp_path, variant):
    cfg = make_config(tmp_path, *VARIANTS[variant])
    stages = pipeline_stages(cfg)
    assert [s.name for s in stages] == [
        *("prepare", "caption", "generator", "pseudo_qa"),
        *("finetune:leaml", "finetune:lora", "finetune:full", "evaluate"),
    ]
    for stage in stages:
        hashed, readable = stage.hashed(cfg), stage.readable(cfg)
        cfg.subset(readable)  # every declared key is a real section or field
        assert not set(hashed) & set(EVERY_STAGE), stage.name
        before = config_hash(stage, cfg)
        for key in fields():
            reruns = config_hash(stage, changed(cfg, key)) != before
            assert reruns == covered(key, hashed), (stage.name, key)


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


def test_restricted_config_hides_exactly_what_is_not_declared():
    cfg = Config().restricted(("run.seed", "teacher", "eval.methods"))
    assert (cfg.run.seed, cfg.teacher.replicas, cfg.eval.methods) == (0, 1, ["leaml", "lora", "full", "zero_shot"])
    for read in (lambda: cfg.run.dir, lambda: cfg.eval.split, lambda: cfg.generator):
        with pytest.raises(AttributeError, match="is not among the keys the running stage declares"):
            read()
    assert Config().run.dir == "runs/tiny-cpu"  # the original is untouched
