"""Model references resolved in one place, and a model folder saved and loaded back."""

from pathlib import Path

import torch

from leaml_ray.data import synthetic
from leaml_ray.models import chat
from leaml_ray.models.registry import load_model, load_processor, model_folder, model_source
from leaml_ray.models.zoo import zoo_folder
from tests.helpers import local_spec


def test_model_references_resolve_in_one_place():
    assert model_source("zoo:target") == zoo_folder("zoo:target")  # the tiny zoo, looked up
    assert model_source("~/m") == str(Path.home() / "m")
    assert model_source("s3://bucket/m") == "s3://bucket/m"  # ray.data.llm and Serve download it where it loads
    assert model_source("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"  # a hub id, as named
    assert model_folder("zoo:generator") == zoo_folder("zoo:target")  # generator and target start from one base


def test_save_load_round_trip_gives_identical_logits(tiny_model_dir, tmp_path):
    spec = local_spec(tiny_model_dir)
    model, processor = load_model(spec), load_processor(spec)
    _, image = synthetic.sample("general", 0, 3, 56)
    batch = chat.collate(
        [chat.encode(processor, image, "what shape is on the left?", "circle")], processor.tokenizer.pad_token_id
    )
    batch.pop("labels")
    model.save_pretrained(tmp_path / "copy")
    processor.save_pretrained(tmp_path / "copy")
    again = load_model(spec.at(str(tmp_path / "copy")))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
