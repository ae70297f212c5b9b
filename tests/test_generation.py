"""The generation engine (both in-job backends, vLLM on this CPU) against transformers, image by image."""

import pytest
import ray.data

from leaml_ray.generation import EngineSettings, generate

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ray_data_llm", "actor_pool"])
def test_engine_generates_what_transformers_does_for_every_image(greedy_reference, backend):
    spec, rows, expected = greedy_reference
    settings = EngineSettings(dtype="float32", max_model_len=256, max_num_seqs=8, batch_size=4, backend=backend)
    sampling = {"temperature": 0.0, "max_tokens": 5}
    got = generate(ray.data.from_items(rows), spec, spec.name_or_path, sampling, settings).take_all()
    assert sorted(r["image_id"] for r in got) == sorted(expected)  # every image exactly once
    assert {r["image_id"]: r["tokens"] for r in got} == expected  # different per image: the image reached the model
