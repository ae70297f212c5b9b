"""The generation engine (ray.data.llm + vLLM on this CPU) against transformers, image by image."""

import pytest
import ray.data
import torch

from leaml_ray.data import synthetic
from leaml_ray.generation import EngineSettings, generate
from leaml_ray.models import chat
from leaml_ray.models.registry import ModelSpec, load_model, load_processor
from leaml_ray.models.tiny import build_random

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.mark.slow
def test_ray_data_llm_generates_what_transformers_does_for_every_image(tmp_path):
    path = str(build_random(tmp_path / "m", "base", seed=1, init_std=0.5))
    spec = ModelSpec("teacher", path, dtype="float32")
    model, processor = load_model(spec, path), load_processor(spec, path)
    eos = processor.tokenizer.eos_token_id
    rows, expected = [], {}
    for k in range(6):
        _, image = synthetic.sample("target", 0, k, 56)
        rows.append({"image_id": f"img{k}", "image": synthetic.png_bytes(image), "instruction": "Describe this image."})
        enc = processor(text=[chat.prompt(processor, "Describe this image.")], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=5, do_sample=False)[0, enc["input_ids"].shape[1] :].tolist()
        expected[f"img{k}"] = out[: out.index(eos) + 1] if eos in out else out
    settings = EngineSettings(dtype="float32", max_model_len=256, max_num_seqs=8, batch_size=4)
    got = generate(ray.data.from_items(rows), spec, path, {"temperature": 0.0, "max_tokens": 5}, settings).take_all()
    assert sorted(r["image_id"] for r in got) == sorted(expected)  # every image exactly once
    assert {r["image_id"]: r["tokens"] for r in got} == expected
    assert len({tuple(t) for t in expected.values()}) > 1  # outputs depend on the image: it reached the model
