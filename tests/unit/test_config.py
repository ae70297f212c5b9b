"""The one typed config: presets, typed overrides, one-line errors, settings a run would ignore, the README's
reference."""

from pathlib import Path

import pytest

from leaml_ray.config import PRESET_DIR, Config, ConfigError, load_config
from leaml_ray.plan import stable_hash


def test_default_is_the_tiny_cpu_preset():
    cfg = load_config()
    assert cfg.data.source == "synthetic"
    assert cfg.teacher.model == "zoo:teacher"
    assert cfg.run.dir == "runs/tiny-cpu"


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_validates(preset):
    assert isinstance(load_config(preset), Config)


@pytest.mark.parametrize("preset", ["kvasir-vqa-1pct", "sportu-1pct"])
def test_production_presets_describe_the_paper_setup(preset):
    cfg = load_config(preset)
    # the 72B teacher from the cluster's object-store mirror (each node copies it once), not from the hub
    assert cfg.teacher.model == "s3://YOUR-BUCKET/models/Qwen2.5-VL-72B-Instruct"
    # two tensor-parallel-4 replicas: one 8-GPU node
    assert (cfg.teacher.tensor_parallel_size, cfg.teacher.pipeline_parallel_size, cfg.teacher.replicas) == (4, 1, 2)
    for role in ("teacher", "generator", "target"):
        section = getattr(cfg, role)
        assert (section.max_model_len, section.max_num_seqs) == (2048, 128), role
    assert cfg.data.label_ratio == 0.01 and cfg.train.device == "gpu" and cfg.train.zero_stage == 3
    assert cfg.data.source == {"kvasir-vqa-1pct": "kvasir_vqa", "sportu-1pct": "sportu"}[preset]


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        None,
        [
            "data.label_ratio=0.05",
            "train.zero_stage=3",
            "eval.methods=[zero_shot, lora]",
            "generator.caption_distill=false",
            "data.path=s3://bucket/x",
        ],
    )
    assert cfg.data.label_ratio == 0.05
    assert cfg.train.zero_stage == 3
    assert cfg.eval.methods == ["zero_shot", "lora"]
    assert cfg.generator.caption_distill is False
    assert cfg.data.path == "s3://bucket/x"


def test_yaml_file_layers_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  label_ratio: 0.5\n")
    cfg = load_config(str(f), ["run.seed=3"])
    assert cfg.data.label_ratio == 0.5 and cfg.run.seed == 3 and cfg.data.source == "synthetic"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.labl_ratio=0.1"], "data.labl_ratio: unknown key (did you mean 'label_ratio'?) (allowed: source, path"),
        (["dat.label_ratio=0.1"], "dat: unknown key (did you mean 'data'?) (allowed: run, data, teacher"),
        (["teacher.modle=x"], "teacher.modle: unknown key (did you mean 'mode' or 'model'?)"),
        (["data.xyz=1"], "data.xyz: unknown key (allowed: source"),  # nothing close: no guess
        (["data.label_ratio=2"], "data.label_ratio: Input should be less than or equal to 1"),
        (["data.label_ratio=0"], "data.label_ratio: Input should be greater than 0"),
        (["train.zero_stage=1"], "train.zero_stage: Input should be 2 or 3"),
        (["data.num_images=many"], "data.num_images: Input should be a valid integer"),
        (["data.image_size=50"], "data.image_size: Input should be a multiple of 28"),
        (["eval.methods=[magic]"], "eval.methods.0: Input should be"),
        (["label_ratio"], "expected section.key=value"),
        (["data.source.x=1"], "source is a value, not a section"),
        # a malformed value was a 30-line PyYAML traceback
        (["eval.methods=[lora"], "override 'eval.methods=[lora': the value is not valid YAML (expected ','"),
        # a served teacher at no URL failed only at the first caption request
        (["teacher.endpoint=notaurl"], "teacher.endpoint: Value error, not a base URL http(s)://host[:port]"),
        (["teacher.endpoint=http://teacher:8000/v1"], "not a base URL"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a preset .*tiny-cpu"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match=r"'tiny_cpu' is neither a file nor a preset \(did you mean 'tiny-cpu'\?\)"):
        load_config("tiny_cpu")
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(str(f))
    f.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(f))


def test_stable_hash_follows_values_not_key_order():
    a = load_config(None, ["data.label_ratio=0.1"]).model_dump(mode="json")
    b = load_config(None, ["data.label_ratio=0.2"]).model_dump(mode="json")
    assert stable_hash(a) != stable_hash(b)
    assert stable_hash(a) == stable_hash(dict(reversed(list(a.items()))))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # generator trains with LoRA: its `lr` would never be used
        (["generator.finetune=lora", "generator.lr=1e-4"], "generator.lr is the learning rate of full finetuning"),
        (["generator.lora_lr=1e-4"], "generator.lora_lr is the learning rate of lora finetuning"),
        # the target's lora_lr trains the lora baseline, its lr the full one: unused only without either
        (["eval.methods=[leaml]", "target.lora_lr=1e-4"], "target.lora_lr is the learning rate of lora finetuning"),
        (["target.tensor_parallel_size=2"], "tensor x pipeline parallel 2 needs device: gpu"),
        (["target.device=gpu", "target.tensor_parallel_size=2", "target.engine=actor_pool"], "one device per replica"),
        # not installed here nor in the cluster image: every training worker would fail minutes into the run
        (["train.device=gpu", "train.attention=flash_attention_2"], "needs the flash-attn package"),
        (["train.attention=flash_attention_2"], "attention flash_attention_2 needs device: gpu"),
    ],
)
def test_settings_that_would_be_silently_ignored_are_errors(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, overrides)


def test_a_learning_rate_is_accepted_where_a_run_uses_it():
    cfg = load_config(None, ["generator.finetune=lora", "generator.lora_lr=1e-4", "target.lora_lr=1e-3"])
    assert cfg.generator.lora_lr == 1e-4 and cfg.target.lora_lr == 1e-3  # target: the lora baseline uses it


def test_the_readme_config_reference_is_the_config_model():
    from leaml_ray.config import reference

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert reference().strip() in readme, "README's configuration table is stale: paste config.reference() there"
