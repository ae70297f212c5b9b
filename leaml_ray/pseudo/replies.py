"""Generation requests for the unlabeled images and the decoding modes that answer them into resumable parts.

With labeled questions (`questions: labeled`) each request opens the reply with a question drawn from the labeled
bank and the generator writes the answer line, scored with logprobs (answer confidence, question likelihood); with
generated questions it samples the question too, then answers it greedily or samples both in one pass. Replies
stream into parts keyed image_id#sample, so an interrupted stage resumes where it stopped.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import ray.data

from leaml_ray.data import examples
from leaml_ray.data.parts import skip_done, stream_to_parts
from leaml_ray.formats import qa_target
from leaml_ray.inference.generate import generate
from leaml_ray.models.spec import Engine


@dataclass(frozen=True)
class Decoding:
    """How the generator writes pseudo pairs (pseudo_qa's sampling settings)."""

    prompt: str  # the instruction the generator writes pairs with
    questions: str  # "labeled": given from the labeled bank | "generated": the generator writes them
    answer_decoding: str  # "greedy" | "sampled"
    samples_per_image: int
    temperature: float
    top_p: float
    max_new_tokens: int
    caption_tokens: int  # the length of the diagnostic captions (the teacher's caption budget)


REQUEST_COLUMNS = ["image_id", "key", "image", "instruction", "sampling_seed", "response_prefix"]


def requests_for(
    batch: pa.Table, samples: int, seed: int, prompt: str, questions: dict[str, int] | None = None
) -> pa.Table:
    """`samples` generation requests per image; with a question bank, each opens the answer with one of its
    questions ("Question: ...\nAnswer:") for the generator to continue."""
    ids, images = batch["image_id"].to_pylist(), batch["image"]
    n = len(ids)
    table = {
        "image_id": [i for i in ids for _ in range(samples)],
        "key": [f"{i}#{k}" for i in ids for k in range(samples)],
        "image": images.take(pa.array([r for r in range(n) for _ in range(samples)])),
        "instruction": [prompt] * (n * samples),
        "sampling_seed": [(examples.stable_int(i, seed) + k) % 2**31 for i in ids for k in range(samples)],
    }
    if questions is not None:
        asked = [q for i in ids for q in draw_questions(questions, samples, examples.stable_int(i, seed))]
        table["response_prefix"] = [qa_target(q, "").rstrip() for q in asked]
    return pa.table(table)


def question_bank(qa: pa.Table) -> dict[str, int]:
    """The labeled questions (as the generator was trained to write them) and how often the labeled data asks each."""
    return dict(Counter(examples.answer_examples(qa)["instruction"].to_pylist()))


def draw_questions(bank: dict[str, int], k: int, seed: int) -> list[str]:
    """k distinct questions (all of them when there are fewer), each drawn in proportion to its count (seeded)."""
    rng = random.Random(seed)
    # weighted sampling without replacement: the k largest u^(1/w) (Efraimidis and Spirakis)
    keys = sorted(bank, key=lambda q: rng.random() ** (1.0 / bank[q]), reverse=True)
    return keys[: min(k, len(keys))]


def answer_requests(batch: pa.Table, prompt: str) -> pa.Table:
    """Sampled "Question: ...\nAnswer:" prefixes -> requests to continue them (unfinished ones stay as they are,
    the parser rejects them)."""
    return pa.table(
        {
            "image_id": batch["image_id"],
            "key": batch["key"],
            "image": batch["image"],
            "instruction": [prompt] * batch.num_rows,
            "response_prefix": batch["text"],
        }
    )


def join_reply(batch: pa.Table) -> pa.Table:
    """Prefix + continuation as one reply; the prefix and the logprob scores (when scored) are kept."""
    texts = [p + t for p, t in zip(batch["response_prefix"].to_pylist(), batch["text"].to_pylist(), strict=True)]
    out = {
        "image_id": batch["image_id"],
        "key": batch["key"],
        "text": texts,
        "response_prefix": batch["response_prefix"],
    }
    for name in ("logprob", "prefix_logprob"):
        if name in batch.column_names:
            out[name] = batch[name]
    return pa.table(out)


def generate_replies(
    generator: Engine,
    decoding: Decoding,
    images_path: str,
    requests: ray.data.Dataset,
    diagnostic: pa.Table | None,
    done: set[str],
    parts: str,
) -> None:
    """The generator's reply to every request (and to the `diagnostic` requests, greedily) into the resumable
    `parts`, in the `decoding` mode; `done` keys are already there."""
    sampling = {"temperature": decoding.temperature, "top_p": decoding.top_p, "max_tokens": decoding.max_new_tokens}
    greedy_answer = {"temperature": 0.0, "max_tokens": decoding.max_new_tokens, "stop": ["\n"]}

    def to_parts(answered: ray.data.Dataset) -> None:
        joined = answered.map_batches(join_reply, batch_format="pyarrow", num_cpus=0.25)
        stream_to_parts(joined, parts, generator.rows_per_part)

    if decoding.questions == "labeled":
        # the question is given: the generator writes the answer line only; logprobs score answer and question
        answer = greedy_answer if decoding.answer_decoding == "greedy" else {**sampling, "stop": ["\n"]}
        answer = {**answer, "logprobs": 0, "prompt_logprobs": 0}
        if decoding.answer_decoding == "greedy" and diagnostic is not None:
            # greedy to the end of the line serves the diagnostic requests too: one engine start, resumable
            answer["max_tokens"] = max(answer["max_tokens"], decoding.caption_tokens)
            extra = examples.with_images(images_path, diagnostic).select_columns(REQUEST_COLUMNS)
            requests = requests.select_columns(REQUEST_COLUMNS).union(skip_done(extra, "key", done))
            diagnostic = None
        to_parts(generate(requests, generator, answer, keep=("image_id", "key", "response_prefix")))
    elif decoding.answer_decoding == "greedy":
        # sample the question only, then let the generator answer it with its most likely answer
        ask = {**sampling, "stop": ["\nAnswer:"], "include_stop_str_in_output": True}
        asked = generate(requests, generator, ask, keep=("image_id", "key"))
        # question texts come back to the driver (small), so the two engines never run at the same time:
        # two engine replicas at once starve a small machine
        questions = pa.Table.from_pylist(list(asked.select_columns(["image_id", "key", "text"]).iter_rows()))
        if questions.num_rows:  # zero when an interrupted attempt already finished every request
            answer_rows = examples.with_images(images_path, questions).map_batches(
                answer_requests, batch_format="pyarrow", num_cpus=0.25, fn_kwargs={"prompt": decoding.prompt}
            )
            keep = ("image_id", "key", "response_prefix")
            to_parts(generate(answer_rows, generator, greedy_answer, keep=keep))
    else:
        out = generate(requests, generator, sampling, keep=("image_id", "key"))
        stream_to_parts(out.select_columns(["image_id", "key", "text"]), parts, generator.rows_per_part)

    if diagnostic is not None:  # not answered in the main pass (other decoding modes)
        rows = skip_done(examples.with_images(images_path, diagnostic), "key", done)
        diag_sampling = {"temperature": 0.0, "max_tokens": decoding.caption_tokens, "stop": ["\n"]}
        to_parts(generate(rows, generator, diag_sampling, keep=("image_id", "key", "response_prefix")))
