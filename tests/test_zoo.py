"""The zoo's pretraining path (real train loop, miniature recipes), its cache, and `zoo:` resolution."""

import json

import numpy as np
import pytest

from leaml_ray.models import zoo
from leaml_ray.models.registry import ModelSpec, load_model

pytestmark = pytest.mark.usefixtures("ray_local")


def test_pretrain_rows_mix_captions_answers_and_questions():
    recipe = zoo.Recipe(size="base", domain="general", samples=600, images=600, caption_share=0.4)
    rows = zoo.pretrain_rows({"id": np.arange(600)}, recipe, seed=5).to_pylist()
    kinds = [r["instruction"] for r in rows]
    captions = kinds.count("Describe this image.") / 600
    asks = kinds.count("Ask a question about this image and answer it.") / 600
    assert 0.33 < captions < 0.47 and 0.17 < asks < 0.31
    assert all(r["response"].startswith("Question: ") for r in rows if r["instruction"].startswith("Ask"))
    assert zoo.pretrain_rows({"id": np.arange(3)}, recipe, seed=5).to_pylist() == rows[:3]


def test_unknown_zoo_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown zoo model 'zoo:nope'; available: zoo:teacher"):
        zoo.resolve("zoo:nope")
    assert zoo.resolve("/models/x") == "/models/x"


@pytest.mark.slow
def test_zoo_builds_through_the_train_loop_once_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "CACHE", tmp_path)
    monkeypatch.setattr(
        zoo,
        "RECIPES",
        {
            "teacher": zoo.Recipe(size="teacher", domain="wide", samples=128, images=64, caption_share=1.0),
            "base": zoo.Recipe(size="base", domain="general", samples=128, images=64, caption_share=0.4),
        },
    )
    paths = zoo.ensure_zoo()
    assert paths["generator"] == paths["target"] != paths["teacher"]
    assert str(zoo.zoo_dir()).startswith(str(tmp_path))
    for name in ("teacher", "base"):
        history = json.loads((zoo.zoo_dir() / f"{name}.train.json").read_text())
        assert [h["step"] for h in history] == [1, 2, 3, 4]  # 128 samples / (2 workers x 16)
    teacher = load_model(ModelSpec("teacher", paths["teacher"], dtype="float32"), paths["teacher"])
    assert teacher.config.text_config.num_hidden_layers == 3

    monkeypatch.setattr(zoo, "pretrain", lambda *a, **k: pytest.fail("the cached zoo was rebuilt"))
    assert zoo.ensure_zoo() == paths
    assert zoo.resolve("zoo:teacher") == paths["teacher"]
