"""Ray Data actors that each own an in-process `vllm.LLM` (one device per replica): the engine path of
`engine: actor_pool` (bench/caption_throughput.py compares it with ray.data.llm)."""

from __future__ import annotations

from typing import Any

import ray
import ray.data

from leaml_ray.errors import UserError
from leaml_ray.inference.engine import engine_args
from leaml_ray.inference.requests import prefix_tokens, prompt_template, request, scored, sequence_scores
from leaml_ray.models.registry import load_processor, model_folder, model_source
from leaml_ray.models.spec import Engine
from leaml_ray.placement import actor_pool_placement


class _EngineActor:
    """A Ray Data actor owning one in-process `vllm.LLM`: whole batches go to the engine in one call."""

    def __init__(self, kwargs: dict[str, Any], template: str, sampling: dict[str, Any], keep: tuple[str, ...]):
        from vllm import LLM

        # a model folder on an object store: copied to this node's disk once (vLLM reads local folders)
        self.llm = LLM(**{**kwargs, "model": model_folder(kwargs["model"])})
        self.template, self.sampling, self.keep = template, sampling, keep

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams

        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        prompts, params = [], []
        for row in rows:
            prompt, image, p = request(self.template, row, self.sampling)
            prompts.append({"prompt": prompt, "multi_modal_data": {"image": image}})
            params.append(SamplingParams(**p))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        out = {
            **{k: batch[k] for k in self.keep},
            "text": [o.outputs[0].text for o in outputs],
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        }
        if scored(self.sampling):
            tokenizer = self.llm.get_tokenizer()
            scores = [
                sequence_scores(
                    o.prompt_token_ids,
                    o.prompt_logprobs,
                    o.outputs[0].token_ids,
                    o.outputs[0].logprobs,
                    prefix_tokens(tokenizer, row),
                )
                for o, row in zip(outputs, rows, strict=True)
            ]
            out.update({k: [s[k] for s in scores] for k in ("logprob", "prefix_logprob")})
        return out


def generate_on_actors(
    ds: ray.data.Dataset, engine: Engine, sampling: dict[str, Any], keep: tuple[str, ...]
) -> ray.data.Dataset:
    """`generate` on `engine.replicas` actors that each own an in-process vLLM engine (one device each)."""
    if engine.tensor_parallel_size * engine.pipeline_parallel_size > 1:
        raise UserError("engine actor_pool runs one device per replica; use ray_data_llm for parallelism")
    kwargs = engine_args(engine, model_source(engine.spec.model))
    return ds.map_batches(
        _EngineActor,
        fn_constructor_kwargs={
            "kwargs": kwargs,
            "template": prompt_template(load_processor(engine.spec)),
            "sampling": sampling,
            "keep": keep,
        },
        batch_size=engine.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=engine.replicas),
        **actor_pool_placement(engine),
    )
