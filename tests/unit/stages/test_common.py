"""The plan builders of a model role's handles: references, zoo recipes, trained folders, training jobs."""

from leaml_ray.models.zoo import recipe_key
from leaml_ray.stages.common import model_spec
from tests.conftest import make_config


def test_specs_follow_the_config_and_name_zoo_models_by_their_recipe(tmp_path):
    cfg = make_config(tmp_path, "target.model=/models/x", "target.trust_remote_code=true", "teacher.dtype=bfloat16")
    target, teacher = model_spec(cfg, "target"), model_spec(cfg, "teacher")
    assert target.model == "/models/x" and target.trust_remote_code and target.zoo_recipe is None
    assert teacher.model == "zoo:teacher" and teacher.zoo_recipe == recipe_key()  # a rebuilt zoo is another model
    assert teacher.dtype == "bfloat16" and not teacher.trust_remote_code
    assert model_spec(cfg, "generator").max_pixels == cfg.generator.max_pixels
    trained = teacher.at("/run/generator")  # a trained model of the role: its folder, no zoo recipe
    assert trained.model == "/run/generator" and trained.zoo_recipe is None and trained.dtype == "bfloat16"
