"""The shipped zoo, the zoo's pretraining path (real train loop, miniature recipes), its cache, and `zoo:`
resolution."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from leaml_ray import zoo
from leaml_ray.data import synthetic, world3
from leaml_ray.errors import UserError
from leaml_ray.models import zoo as lookup
from leaml_ray.models.registry import load_model, model_source
from tests.helpers import local_spec

pytestmark = pytest.mark.usefixtures("ray_local")


def test_pretrain_rows_mix_captions_answers_and_questions():
    recipe = lookup.Recipe(size="base", domain="general", samples=600, images=600, caption_share=0.4)
    rows = zoo.pretrain_rows({"id": np.arange(600)}, recipe, seed=5).to_pylist()
    kinds = [r["instruction"] for r in rows]
    captions = kinds.count("Describe this image.") / 600
    asks = kinds.count("Ask a question about this image and answer it.") / 600
    assert 0.33 < captions < 0.47 and 0.17 < asks < 0.31
    assert all(r["response"].startswith("Question: ") for r in rows if r["instruction"].startswith("Ask"))
    assert zoo.pretrain_rows({"id": np.arange(3)}, recipe, seed=5).to_pylist() == rows[:3]


def test_the_base_reads_the_whole_worlds_words_in_text_with_no_image_to_match():
    recipe = lookup.Recipe(size="base", domain="general", samples=600, images=600, caption_share=0.4, text_share=0.1)
    rows = zoo.pretrain_rows({"id": np.arange(600)}, recipe, seed=5).to_pylist()
    text = [r for r in rows if r["instruction"] == zoo.TEXT_PROMPT]
    assert 0.06 < len(text) / 600 < 0.14
    assert all(r["response"] == synthetic.vocabulary_sentence(5, i) for i, r in enumerate(rows) if r in text)
    words = {w.strip(".") for i in range(300) for w in synthetic.vocabulary_sentence(5, i).split()}
    # the target domain's words the general domain's images never show
    assert {"small", "large", "striped", "checkered", "dotted", "purple", "orange", "black"} <= words
    blank = synthetic.png_bytes(synthetic.blank(recipe.image_size))
    assert all(r["image"] == blank for r in text)
    captions = [r for r in rows if r["instruction"] == "Describe this image."]
    assert 0.33 < len(captions) / 600 < 0.47 and all(r["image"] != blank for r in captions)


def test_world_3_recipes_draw_world_3_rows():
    """A `w3-` domain is world3.py's: its scenes at 84 px, its captions, its questions and vocabulary sentences."""
    describe, ask = "Describe this image.", "Ask a question about this image and answer it."
    rows = zoo.pretrain_rows({"id": np.arange(200)}, lookup.WORLD3_RECIPES["teacher"], seed=5).to_pylist()
    captions = {i: r["response"] for i, r in enumerate(rows) if r["instruction"] == describe}
    assert 0.4 < len(captions) / 200 < 0.6
    assert captions == {i: world3.caption(world3.make_scene("wide", 5, i)) for i in captions}
    assert Image.open(io.BytesIO(rows[0]["image"])).size == (84, 84)
    asked = {r["instruction"] for r in rows} - {describe, ask}
    assert asked and asked <= set(world3.askable("wide"))  # general questions only: never a finding
    rows = zoo.pretrain_rows({"id": np.arange(400)}, lookup.WORLD3_RECIPES["generator"], seed=5).to_pylist()
    text = {i: r["response"] for i, r in enumerate(rows) if r["instruction"] == zoo.TEXT_PROMPT}
    assert text and text == {i: world3.vocabulary_sentence(5, i) for i in text}
    assert lookup.recipe_key(lookup.WORLD3_RECIPES) != lookup.recipe_key()  # a zoo of its own


def test_unknown_zoo_name_is_a_clear_error():
    with pytest.raises(UserError, match="unknown zoo model 'zoo:nope'; available: zoo:teacher"):
        model_source("zoo:nope")
    assert model_source("/models/x") == "/models/x"


def test_the_shipped_zoo_is_the_recipe_in_code_and_is_used_as_is(monkeypatch):
    # a recipe change fails here until `make zoo` rebuilds the zoo and the new folders are committed
    changed = "zoo recipe changed: run `make zoo`, commit leaml_ray/zoo_shipped"
    assert lookup.shipped_key() == lookup.recipe_key(), changed
    monkeypatch.setattr(zoo, "pretrain", lambda *a, **k: pytest.fail("pretrained although a matching zoo ships"))
    paths = zoo.ensure_zoo()
    for role, folder in lookup.ROLE_FOLDERS.items():
        assert paths[role] == str(lookup.SHIPPED / folder)
        assert (lookup.SHIPPED / folder / "model.safetensors").stat().st_size > 100_000
    teacher = load_model(local_spec(paths["teacher"], "teacher"))
    assert teacher.config.text_config.num_hidden_layers == 3


@pytest.mark.slow
def test_zoo_builds_through_the_train_loop_once_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(lookup, "CACHE", tmp_path)
    monkeypatch.setattr(
        lookup,
        "RECIPES",
        {
            "teacher": lookup.Recipe(size="teacher", domain="wide", samples=128, images=64, caption_share=1.0),
            "base": lookup.Recipe(size="base", domain="general", samples=128, images=64, caption_share=0.4),
        },
    )
    assert lookup.shipped_key() != lookup.recipe_key()  # the shipped zoo is another recipe's: built here instead
    with pytest.raises(lookup.ZooMissing, match="build it with `python -m leaml_ray.zoo build`"):
        model_source("zoo:teacher")  # stages look the zoo up; they never start minutes of pretraining
    paths = zoo.ensure_zoo()
    assert paths["generator"] == paths["target"] != paths["teacher"]
    assert str(lookup.zoo_dir()).startswith(str(tmp_path)) and paths["teacher"].startswith(str(lookup.zoo_dir()))
    for name in ("teacher", "base"):
        history = json.loads((lookup.zoo_dir() / f"{name}.train.json").read_text())
        assert [h["step"] for h in history] == [1, 2, 3, 4]  # 128 samples / (2 workers x 16)
    teacher = load_model(local_spec(paths["teacher"], "teacher"))
    assert teacher.config.text_config.num_hidden_layers == 3

    monkeypatch.setattr(zoo, "pretrain", lambda *a, **k: pytest.fail("the cached zoo was rebuilt"))
    assert zoo.ensure_zoo() == paths
    assert model_source("zoo:teacher") == paths["teacher"]

    # shipping it: the package then holds this recipe's zoo and uses it in place of the cache
    monkeypatch.setattr(lookup, "SHIPPED", tmp_path / "shipped")
    zoo.ship(lookup.zoo_dir())
    assert lookup.shipped_key() == lookup.recipe_key()
    expected = {role: str(tmp_path / "shipped" / folder) for role, folder in lookup.ROLE_FOLDERS.items()}
    assert zoo.ensure_zoo() == expected
