"""The client of a served model (an OpenAI-compatible endpoint: deploy.py, or any vLLM server): the teacher that
several runs share in `teacher.mode: serve`, request bodies, and `generate` rows through ray.data.llm's HTTP stage."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from typing import Any

import ray.data

from leaml_ray.errors import UserError
from leaml_ray.inference.requests import row_sampling
from leaml_ray.models.spec import Engine


def served_id(model: str) -> str:
    """The id a model is served under: ray.serve.llm reads "base:adapter" as a LoRA adapter, so no colons."""
    return model.replace(":", "_")


def check_served(engine: Engine) -> None:
    """Raise a one-line error unless `engine.endpoint` answers and serves the engine's model (the shared teacher of
    `teacher.mode: serve`); nothing to check for an offline engine."""
    if not engine.endpoint:
        return
    model, url = engine.spec.model, engine.endpoint
    start = f"start it with: python jobs/serve_teacher.py teacher.model={model} teacher.endpoint={url}"
    try:
        models = served_models(url)
    except ConnectionError as e:
        raise UserError(f"teacher.mode=serve: {e}; {start}") from None
    if served_id(model) not in models:
        raise UserError(f"teacher.mode=serve: {url} serves {models}, not teacher.model={model}; {start}")


def served_models(endpoint: str, timeout: float = 10.0) -> list[str]:
    """Model ids an OpenAI-compatible endpoint serves; raises ConnectionError with the reason if it does not answer."""
    try:
        with urllib.request.urlopen(f"{endpoint.rstrip('/')}/v1/models", timeout=timeout) as r:
            return [m["id"] for m in json.load(r)["data"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        raise ConnectionError(f"no OpenAI-compatible server at {endpoint}: {e}") from e


def image_url(data: bytes) -> str:
    """An image file's bytes as a data URL (the file is sent as is: the server decodes the same pixels)."""
    from PIL import Image

    kind = (Image.open(io.BytesIO(data)).format or "png").lower()
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def chat_request(model_id: str, image: bytes, instruction: str, sampling: dict[str, Any]) -> dict[str, Any]:
    """A chat-completions body: one user turn with the image, then the instruction (the offline prompt's order)."""
    content = [{"type": "image_url", "image_url": {"url": image_url(image)}}, {"type": "text", "text": instruction}]
    body = {"model": served_id(model_id), "messages": [{"role": "user", "content": content}], "return_token_ids": True}
    return body | sampling  # vLLM sampling names (temperature, top_p, max_tokens, seed) are the API's names


def ask(endpoint: str, body: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """POST one chat completion and return the parsed response."""
    request = urllib.request.Request(
        f"{endpoint.rstrip('/')}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.load(r)


def generate_served(
    ds: ray.data.Dataset, engine: Engine, sampling: dict[str, Any], keep: tuple[str, ...]
) -> ray.data.Dataset:
    """`generate` against the OpenAI-compatible server at `engine.endpoint` (`jobs/serve_teacher.py`), through
    ray.data.llm's HTTP stage."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    model_id, endpoint = engine.spec.model, engine.endpoint

    config = HttpRequestProcessorConfig(
        url=f"{endpoint.rstrip('/')}/v1/chat/completions",
        batch_size=engine.batch_size,
        max_retries=3,  # a replica restarting or scaling answers 503 for a moment
        # one request in flight per actor: several actors keep the server's batches full
        http_request_stage={"concurrency": 4 * engine.replicas, "num_cpus": 0.1},
    )

    def preprocess(row: dict) -> dict:
        if row.get("response_prefix"):
            raise ValueError("a served model cannot continue a reply prefix; use the offline engine")
        payload = chat_request(model_id, row["image"], row["instruction"], row_sampling(row, sampling))
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
