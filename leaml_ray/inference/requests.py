"""What every engine path shares: the prompt around an image (the model's own chat template), per-row sampling,
and the scores of a generation (log-probabilities of the answer and of a given reply prefix)."""

from __future__ import annotations

import io
from typing import Any

PLACEHOLDER = "\x00INSTRUCTION\x00"


def prompt_template(processor: Any) -> str:
    """A model's chat prompt (its processor's template) around one image, with a placeholder for the instruction."""
    from leaml_ray.models import chat  # torch: on the driver only when an engine is built

    return chat.prompt(processor, PLACEHOLDER)


def request(template: str, row: dict, sampling: dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
    """The prompt, image and sampling parameters of one row (the same for every in-job engine)."""
    from PIL import Image

    image = Image.open(io.BytesIO(row["image"])).convert("RGB")
    # an optional start of the reply the model continues (e.g. "Question: ...\nAnswer:")
    prompt = template.replace(PLACEHOLDER, row["instruction"]) + (row.get("response_prefix") or "")
    return prompt, image, row_sampling(row, sampling)


def scored(sampling: dict[str, Any]) -> bool:
    return sampling.get("logprobs") is not None or sampling.get("prompt_logprobs") is not None


def prefix_tokens(tokenizer: Any, row: dict) -> int:
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


def row_sampling(row: dict, sampling: dict[str, Any]) -> dict[str, Any]:
    """A per-row seed makes sampled generations reproducible and distinct across samples of one image."""
    return {**sampling, "seed": int(row["sampling_seed"])} if row.get("sampling_seed") is not None else sampling
