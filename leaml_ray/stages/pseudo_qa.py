"""pseudo_qa: the trained QA generator writes `samples_per_image` question/answer pairs per unlabeled image.

Generations stream from the engine into resumable parts (keyed image_id#sample), then one pass over the parts
parses and filters them (DESIGN.md section 4) into pseudo_qa.parquet, the exports (images in pseudo_qa_images/):
pseudo_qa.jsonl (ShareGPT messages with an <image> token, registered for LLaMA-Factory in dataset_info.json; ms-swift
reads it too) and pseudo_qa_trl.jsonl (structured image/text content, as TRL and HF datasets take it), and
pseudo_qa_rejects.parquet with the reason of every rejected generation.

With labeled questions each pair also gets the generator's answer confidence and the question's pointwise mutual
information with its image (log p(question | image) - log p(question | average image)): a question about something
the image lacks is unlikely given that image. `min_answer_confidence` and `min_question_pmi` filter on them.
The same engine pass answers diagnostic requests (diagnostics.py): captions of the images the generator held out
and the unlabeled images' hidden questions -> pseudo_qa_diagnostics.json.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from leaml_ray import dashboard, diagnostics, storage
from leaml_ray.config import Config
from leaml_ray.data import examples
from leaml_ray.data.parts import done_keys, read_parts, skip_done, stream_to_parts
from leaml_ray.formats import CAPTION_PROMPT, QA_GEN_PROMPT, qa_target
from leaml_ray.inference.client import teacher_endpoint
from leaml_ray.inference.offline import generate
from leaml_ray.models.registry import spec_for
from leaml_ray.pipeline import Stage, StageContext, StageError
from leaml_ray.placement import engine_keys, engine_settings, engine_unhashed_keys
from leaml_ray.scoring import normalize
from leaml_ray.stages.generator import heldout_caption_ids, unlabeled_captions
from leaml_ray.zoo import resolve

log = logging.getLogger("leaml_ray")
QA_PATTERN = re.compile(r"^\s*Question:\s*(?P<q>.*?)\s*\n\s*Answer:\s*(?P<a>[^\n]*)", re.DOTALL)
CONTROL = {"Cc", "Cf", "Cs", "Co", "Cn"}
PSEUDO_SCHEMA = pa.schema(
    [
        ("pseudo_id", pa.string()),
        ("image_id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("answer_confidence", pa.float64()),  # null when the engine gave no logprobs
        ("question_pmi", pa.float64()),  # null unless the question came from the labeled bank
    ]
)
DIAGNOSTIC = "diagnostic:"  # key prefix of the diagnostic requests riding along in the same engine pass
MIN_PMI_IMAGES = 5  # a question asked of fewer images has no usable average
REJECT_SCHEMA = pa.schema(
    [("pseudo_id", pa.string()), ("image_id", pa.string()), ("text", pa.string()), ("reason", pa.string())]
)


@dataclass(frozen=True)
class AnswerRules:
    """What the labeled data says an answer looks like."""

    max_answer_words: int
    max_question_words: int
    vocabulary: frozenset[str] | None  # normalised labeled answers, when the task is closed-vocabulary


def answer_rules(qa: pa.Table, closed_vocabulary: str) -> AnswerRules:
    """Limits from the labeled QA (question text includes its options, as the generator learned it)."""
    pairs = [r.split("\nAnswer:", 1) for r in qa["response"].to_pylist()]
    questions = [p[0].removeprefix("Question:") for p in pairs]
    answers = [normalize(p[-1]) for p in pairs]
    distinct = set(answers)
    closed = closed_vocabulary == "on" or (
        closed_vocabulary == "auto" and len(answers) >= 20 and len(distinct) <= 0.25 * len(answers)
    )
    return AnswerRules(
        max_answer_words=max((len(a.split()) for a in answers), default=32),
        max_question_words=3 * max((len(q.split()) for q in questions), default=32),
        vocabulary=frozenset(distinct) if closed else None,
    )


def clean_text(text: str) -> str:
    """NFC, control characters dropped."""
    text = unicodedata.normalize("NFC", text)
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in CONTROL)


def parse_qa(text: str) -> tuple[str, str] | str:
    """Generator output -> (question, answer), or the reason it is unusable."""
    if "\ufffd" in text:
        return "bad_unicode"
    m = QA_PATTERN.match(clean_text(text))
    if not m:
        return "unparsable"
    # keep the line structure of multiple-choice questions (question, then one option per line)
    question = "\n".join(" ".join(line.split()) for line in m["q"].splitlines() if line.strip())
    answer = " ".join(m["a"].split())
    if not question:
        return "empty_question"
    if not answer:
        return "empty_answer"
    return question, answer


def check_pair(question: str, answer: str, rules: AnswerRules, seen_questions: set[str]) -> str | None:
    """The reason a parsed pair is rejected, or None to keep it (adds the question to `seen_questions`)."""
    nq = normalize(question)
    if nq == normalize(QA_GEN_PROMPT) or "ask a question about this image" in nq:
        return "prompt_echo"
    if len(question.split()) > rules.max_question_words:
        return "question_too_long"
    if len(normalize(answer).split()) > rules.max_answer_words:
        return "answer_too_long"
    if rules.vocabulary is not None and normalize(answer) not in rules.vocabulary:
        return "outside_vocabulary"
    if nq in seen_questions:
        return "duplicate_question"
    seen_questions.add(nq)
    return None


def _requests(batch: pa.Table, samples: int, seed: int, questions: dict[str, int] | None = None) -> pa.Table:
    """`samples` generation requests per image; with a question bank, each opens the answer with one of its
    questions ("Question: ...\nAnswer:") for the generator to continue."""
    ids, images = batch["image_id"].to_pylist(), batch["image"]
    n = len(ids)
    table = {
        "image_id": [i for i in ids for _ in range(samples)],
        "key": [f"{i}#{k}" for i in ids for k in range(samples)],
        "image": images.take(pa.array([r for r in range(n) for _ in range(samples)])),
        "instruction": [QA_GEN_PROMPT] * (n * samples),
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


def _answer_requests(batch: pa.Table) -> pa.Table:
    """Sampled "Question: ...\nAnswer:" prefixes -> requests to continue them (unfinished ones stay as they are,
    the parser rejects them)."""
    return pa.table(
        {
            "image_id": batch["image_id"],
            "key": batch["key"],
            "image": batch["image"],
            "instruction": [QA_GEN_PROMPT] * batch.num_rows,
            "response_prefix": batch["text"],
        }
    )


def _join_reply(batch: pa.Table) -> pa.Table:
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


def _image_file(image_id: str, data: bytes) -> str:
    ext = "jpg" if data[:2] == b"\xff\xd8" else "png"
    return f"pseudo_qa_images/{re.sub(r'[^A-Za-z0-9._-]', '_', image_id)}.{ext}"


def pseudo_qa_stage(ctx: StageContext) -> dict[str, Any]:
    """Run the pseudo_qa stage (see the module docstring)."""
    cfg, pq_cfg = ctx.cfg, ctx.cfg.pseudo_qa
    images_path = ctx.input("prepared/images.parquet")
    labeled_qa = examples.read_table(ctx.input("prepared/qa.parquet"), split="labeled")
    rules = answer_rules(examples.generator_examples(labeled_qa), pq_cfg.closed_vocabulary)
    bank = question_bank(labeled_qa) if pq_cfg.questions == "labeled" else None
    if bank is not None and not bank:
        raise StageError("pseudo_qa: questions=labeled needs labeled QA pairs to draw the questions from")
    samples = min(pq_cfg.samples_per_image, len(bank)) if bank else pq_cfg.samples_per_image
    parts = storage.join(ctx.resume_dir, "parts")
    done = done_keys(parts, "key")
    requests = examples.images_of(images_path, ["unlabeled"]).map_batches(
        _requests,
        batch_format="pyarrow",
        fn_kwargs={"samples": samples, "seed": cfg.run.seed, "questions": bank},
        num_cpus=0.25,
    )
    requests = skip_done(requests, "key", done)
    spec = spec_for(cfg, "generator")
    path = ctx.input("generator")
    sampling = {"temperature": pq_cfg.temperature, "top_p": pq_cfg.top_p, "max_tokens": pq_cfg.max_new_tokens}
    greedy_answer = {"temperature": 0.0, "max_tokens": pq_cfg.max_new_tokens, "stop": ["\n"]}
    settings = engine_settings(cfg, "generator")
    diagnostic = diagnostic_requests(ctx, images_path)
    diagnostic_keys = set(diagnostic["key"].to_pylist()) if diagnostic is not None else set()
    if bank is not None:
        # the question is given: the generator writes the answer line only; logprobs score answer and question
        answer = greedy_answer if pq_cfg.answer_decoding == "greedy" else {**sampling, "stop": ["\n"]}
        answer = {**answer, "logprobs": 0, "prompt_logprobs": 0}
        if pq_cfg.answer_decoding == "greedy" and diagnostic is not None:
            # greedy to the end of the line serves the diagnostic requests too: one engine start, resumable
            answer["max_tokens"] = max(answer["max_tokens"], cfg.teacher.max_new_tokens)
            columns = ["image_id", "key", "image", "instruction", "sampling_seed", "response_prefix"]
            extra = examples.with_images(images_path, diagnostic).select_columns(columns)
            requests = requests.select_columns(columns).union(skip_done(extra, "key", done))
            diagnostic = None
        answered = generate(requests, spec, path, answer, settings, keep=("image_id", "key", "response_prefix"))
        stream_to_parts(
            answered.map_batches(_join_reply, batch_format="pyarrow", num_cpus=0.25), parts, settings.rows_per_part
        )
    elif pq_cfg.answer_decoding == "greedy":
        # sample the question only, then let the generator answer it with its most likely answer
        ask = {**sampling, "stop": ["\nAnswer:"], "include_stop_str_in_output": True}
        asked = generate(requests, spec, path, ask, settings, keep=("image_id", "key"))
        # question texts come back to the driver (small), so the two engines never run at the same time:
        # two engine replicas at once starve a small machine
        questions = pa.Table.from_pylist(list(asked.select_columns(["image_id", "key", "text"]).iter_rows()))
        if questions.num_rows:  # zero when an interrupted attempt already finished every request
            answer_rows = examples.with_images(images_path, questions).map_batches(
                _answer_requests, batch_format="pyarrow", num_cpus=0.25
            )
            keep = ("image_id", "key", "response_prefix")
            answered = generate(answer_rows, spec, path, greedy_answer, settings, keep=keep)
            joined = answered.map_batches(_join_reply, batch_format="pyarrow", num_cpus=0.25)
            stream_to_parts(joined, parts, settings.rows_per_part)
    else:
        out = generate(requests, spec, path, sampling, settings, keep=("image_id", "key"))
        stream_to_parts(out.select_columns(["image_id", "key", "text"]), parts, settings.rows_per_part)

    if diagnostic is not None:  # not answered in the main pass (other decoding modes)
        rows = skip_done(examples.with_images(images_path, diagnostic), "key", done)
        diag_sampling = {"temperature": 0.0, "max_tokens": cfg.teacher.max_new_tokens, "stop": ["\n"]}
        answered = generate(rows, spec, path, diag_sampling, settings, keep=("image_id", "key", "response_prefix"))
        stream_to_parts(
            answered.map_batches(_join_reply, batch_format="pyarrow", num_cpus=0.25), parts, settings.rows_per_part
        )

    kept, rejects = _filter_parts(parts, rules, diagnostic_keys, pq_cfg.min_question_pmi, pq_cfg.min_answer_confidence)
    if pq_cfg.consistency_filter == "caption" and kept.num_rows:
        kept, ungrounded = caption_filter(kept, examples.read_table(ctx.input("captions.parquet")))
        rejects = pa.concat_tables([rejects, ungrounded])
    elif pq_cfg.consistency_filter != "off" and kept.num_rows:
        kept, inconsistent = consistency_filter(kept, images_path, cfg)
        rejects = pa.concat_tables([rejects, inconsistent])
    _write_outputs(ctx, kept, rejects, images_path)
    report = generator_diagnostics(ctx, parts, diagnostic_keys, kept)
    storage.write_json_atomic(ctx.output("pseudo_qa_diagnostics.json"), report)
    audit = {k: report["pairs"][k] for k in ("audited", "audited_correct", "absent")}
    by_reason = dict(Counter(rejects["reason"].to_pylist()))
    for reason, n in by_reason.items():
        dashboard.count("pseudo_qa_rejected", n, cfg.run.dir, "pseudo_qa", reason)
    dashboard.count("pseudo_qa_kept", kept.num_rows, cfg.run.dir, "pseudo_qa")
    return {
        "generated": kept.num_rows + rejects.num_rows,
        "kept": kept.num_rows,
        "rejected": rejects.num_rows,
        "rejected_by_reason": by_reason,
        "images_with_pairs": len(set(kept["image_id"].to_pylist())),
        "closed_vocabulary": rules.vocabulary is not None,
        "resumed": len(done),
        **audit,
        "generator_hidden_accuracy": report["precondition"].get("generator"),
        "caption_fidelity": report["caption_fidelity"].get("share_of_teacher"),
    }


def diagnostic_requests(ctx: StageContext, images_path: str) -> pa.Table | None:
    """Requests the generator answers for the diagnostics only: captions of the images its training held out and
    (a sample of) the unlabeled images' hidden questions; None when there are neither."""
    cfg = ctx.cfg
    captions = unlabeled_captions(images_path, ctx.input("captions.parquet"))
    heldout = sorted(heldout_caption_ids(captions["image_id"].to_pylist(), cfg))
    rows = [
        {"image_id": i, "key": f"{DIAGNOSTIC}caption:{i}", "instruction": CAPTION_PROMPT, "response_prefix": ""}
        for i in heldout
    ]
    hidden_path = ctx.input("prepared/hidden/unlabeled_qa.parquet")
    if storage.exists(hidden_path):
        hidden = diagnostics.hidden_sample(examples.read_table(hidden_path), cfg.run.seed)
        for r in hidden.select(["image_id", "qa_id", "question", "choices"]).to_pylist():
            rows.append(
                {
                    "image_id": r["image_id"],
                    "key": f"{DIAGNOSTIC}qa:{r['qa_id']}",
                    "instruction": QA_GEN_PROMPT,
                    "response_prefix": diagnostics.hidden_prefix(r["question"], r["choices"]),
                }
            )
    if not rows:
        return None
    return pa.Table.from_pylist(rows).append_column("sampling_seed", pa.array([0] * len(rows), pa.int64()))


def generator_diagnostics(ctx: StageContext, parts: str, keys: set[str], kept: pa.Table) -> dict[str, Any]:
    """pseudo_qa_diagnostics.json: caption fidelity, the generator's precondition accuracy, pair precision."""
    replies: dict[str, str] = {}
    for table in read_parts(parts, ["key", "text"]):
        for key, text in zip(table["key"].to_pylist(), table["text"].to_pylist(), strict=True):
            if key in keys:
                replies[key[len(DIAGNOSTIC) :]] = text
    captions = examples.read_table(ctx.input("captions.parquet"), ["image_id", "caption"])
    teacher = dict(zip(captions["image_id"].to_pylist(), captions["caption"].to_pylist(), strict=True))
    own = {k.split(":", 1)[1]: v.strip() for k, v in replies.items() if k.startswith("caption:")}
    fidelity = diagnostics.caption_fidelity(own, teacher)
    hidden_path = ctx.input("prepared/hidden/unlabeled_qa.parquet")
    hidden = examples.read_table(hidden_path) if storage.exists(hidden_path) else None
    precondition: dict[str, Any] = {}
    if hidden is not None:
        sample = diagnostics.hidden_sample(hidden, ctx.cfg.run.seed)
        answers = {}
        for k, text in replies.items():
            if k.startswith("qa:"):
                parsed = parse_qa(text)
                answers[k[3:]] = parsed[1] if isinstance(parsed, tuple) else ""
        result = diagnostics.hidden_accuracy(sample, answers)
        precondition = {"generator": result["accuracy"], "generator_per_category": result["per_category"]}
    pairs = diagnostics.pair_precision(kept, hidden)
    log.info(
        "pseudo_qa diagnostics: caption fidelity %s, generator on hidden questions %s, kept-pair precision %s "
        "(%s asking about something absent)",
        _pct(fidelity.get("share_of_teacher", fidelity.get("generator_vs_teacher"))),
        _pct(precondition.get("generator")),
        _pct(pairs["precision"]),
        _pct(pairs["absent_share"]),
    )
    return {"caption_fidelity": fidelity, "precondition": precondition, "pairs": pairs}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def question_pmi(rows: list[dict]) -> dict[str, float]:
    """Pointwise mutual information of each row's question with its image, by key: log p(q | image) minus the
    log of p(q | image') averaged over the images asked the same question (rows need "question",
    "prefix_logprob"); questions asked of fewer than MIN_PMI_IMAGES images get none."""
    by_question: dict[str, list[tuple[str, float]]] = {}
    for r in rows:
        lp = r.get("prefix_logprob")
        if lp is not None and not math.isnan(lp):
            by_question.setdefault(normalize(r["question"]), []).append((r["key"], lp))
    out = {}
    for scored in by_question.values():
        if len(scored) < MIN_PMI_IMAGES:
            continue
        top = max(lp for _, lp in scored)
        marginal = top + math.log(sum(math.exp(lp - top) for _, lp in scored) / len(scored))
        out.update({key: lp - marginal for key, lp in scored})
    return out


def _filter_parts(
    parts: str,
    rules: AnswerRules,
    skip: set[str] = frozenset(),
    min_question_pmi: float | None = None,
    min_answer_confidence: float = 0.0,
) -> tuple[pa.Table, pa.Table]:
    """Parse and filter every generation (but the `skip` keys), in key order so the result does not depend on
    arrival order."""
    rows = [r for t in read_parts(parts) for r in t.to_pylist() if r["key"] not in skip]
    rows.sort(key=lambda r: (r["image_id"], int(r["key"].rsplit("#", 1)[1])))
    parsed_rows, rejected = [], []
    seen: dict[str, set[str]] = {}
    for r in rows:
        parsed = parse_qa(r["text"])
        if isinstance(parsed, str):
            reason = parsed
        else:
            reason = check_pair(*parsed, rules, seen.setdefault(r["image_id"], set()))
        if reason:
            rejected.append({"pseudo_id": r["key"], "image_id": r["image_id"], "text": r["text"], "reason": reason})
        else:
            parsed_rows.append({**r, "question": parsed[0], "answer": parsed[1]})
    # the question's likelihood is scored on every well-formed pair asking it (labeled questions only)
    pmi = question_pmi([r for r in parsed_rows if r.get("response_prefix")])
    kept = []
    for r in parsed_rows:
        lp = r.get("logprob")
        confidence = math.exp(lp) if lp is not None and not math.isnan(lp) else None
        row = {
            "pseudo_id": r["key"],
            "image_id": r["image_id"],
            "question": r["question"],
            "answer": r["answer"],
            "answer_confidence": confidence,
            "question_pmi": pmi.get(r["key"]),
        }
        if min_question_pmi is not None and row["question_pmi"] is not None and row["question_pmi"] < min_question_pmi:
            reason = "implausible_question"
        elif min_answer_confidence > 0 and confidence is not None and confidence < min_answer_confidence:
            reason = "low_confidence"
        else:
            kept.append(row)
            continue
        rejected.append({"pseudo_id": r["key"], "image_id": r["image_id"], "text": r["text"], "reason": reason})
    return pa.Table.from_pylist(kept, PSEUDO_SCHEMA), pa.Table.from_pylist(rejected, REJECT_SCHEMA)


def _rejects(dropped: pa.Table, reason: str) -> pa.Table:
    """Dropped kept-schema pairs as reject rows with one reason."""
    return pa.table(
        {
            "pseudo_id": dropped["pseudo_id"],
            "image_id": dropped["image_id"],
            "text": [
                f"Question: {q}\nAnswer: {a}"
                for q, a in zip(dropped["question"].to_pylist(), dropped["answer"].to_pylist(), strict=True)
            ],
            "reason": [reason] * dropped.num_rows,
        },
        schema=REJECT_SCHEMA,
    )


def caption_filter(kept: pa.Table, captions: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Keep a pair unless its answer is a caption concept (all its words occur in some caption) that this image's
    caption does not name. Answers the captions never use ("yes", "2") cannot be checked and are kept."""
    ids, texts = captions["image_id"].to_pylist(), captions["caption"].to_pylist()
    by_image = {i: f" {normalize(c)} " for i, c in zip(ids, texts, strict=True)}
    vocabulary = {w for text in by_image.values() for w in text.split()}
    grounded = []
    for image_id, answer in zip(kept["image_id"].to_pylist(), kept["answer"].to_pylist(), strict=True):
        words = normalize(answer).split()
        checkable = bool(words) and set(words) <= vocabulary
        grounded.append(not checkable or f" {' '.join(words)} " in by_image.get(image_id, ""))
    mask = pa.array(grounded, pa.bool_())
    return kept.filter(mask), _rejects(kept.filter(pc.invert(mask)), "not_in_caption")


def consistency_filter(kept: pa.Table, images_path: str, cfg: Config) -> tuple[pa.Table, pa.Table]:
    """Keep pairs whose answer the teacher (or the base target) gives too when asked the pseudo question."""
    role = cfg.pseudo_qa.consistency_filter
    spec = spec_for(cfg, role)
    rows = examples.with_images(images_path, kept.rename_columns({"question": "instruction"}))
    answers = generate(
        rows,
        spec,
        resolve(spec.name_or_path),
        {"temperature": 0.0, "max_tokens": cfg.eval.max_new_tokens},
        engine_settings(cfg, role),  # the settings of the model that answers (72B teacher: its tensor parallel)
        keep=("pseudo_id",),
        endpoint=teacher_endpoint(cfg) if role == "teacher" else None,
    )
    by_id = {r["pseudo_id"]: r["text"] for r in answers.select_columns(["pseudo_id", "text"]).iter_rows()}
    agree = [
        normalize(by_id.get(i, "")) == normalize(a)
        for i, a in zip(kept["pseudo_id"].to_pylist(), kept["answer"].to_pylist(), strict=True)
    ]
    mask = pa.array(agree, pa.bool_())
    return kept.filter(mask), _rejects(kept.filter(pc.invert(mask)), f"inconsistent_with_{role}")


# LLaMA-Factory's dataset registry entry for pseudo_qa.jsonl (dataset_dir: the run dir; its docs: data/README.md)
DATASET_INFO = {
    "leaml_pseudo_qa": {
        "file_name": "pseudo_qa.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }
}


def _write_outputs(ctx: StageContext, kept: pa.Table, rejects: pa.Table, images_path: str) -> None:
    for name, table in (("pseudo_qa.parquet", kept), ("pseudo_qa_rejects.parquet", rejects)):
        fs, p = storage.resolve(ctx.output(name))
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, p, filesystem=fs)
    # images of the kept pairs as files, so the JSONL is usable by other trainers as is
    ids = pa.table({"image_id": pc.unique(kept["image_id"])}) if kept.num_rows else None
    files: dict[str, str] = {}
    if ids is not None:
        out_root = ctx.work_dir

        def write_images(batch: pa.Table) -> pa.Table:
            names = []
            for image_id, data in zip(batch["image_id"].to_pylist(), batch["image"].to_pylist(), strict=True):
                rel = _image_file(image_id, data)
                storage.write_bytes_atomic(storage.join(out_root, rel), data)
                names.append(rel)
            return pa.table({"image_id": batch["image_id"], "file": names})

        written = examples.with_images(images_path, ids).map_batches(
            write_images, batch_format="pyarrow", num_cpus=0.25
        )
        files = {r["image_id"]: r["file"] for r in written.iter_rows()}
    else:
        fs, p = storage.resolve(ctx.output("pseudo_qa_images"))
        fs.create_dir(p, recursive=True)
    # the same pairs in the two layouts trainers read (image paths relative to the run dir):
    # ShareGPT with an <image> token (LLaMA-Factory, ms-swift) and structured content (TRL, HF datasets)
    sharegpt, structured = [], []
    for r in kept.to_pylist():
        images, question, answer = [files[r["image_id"]]], r["question"], r["answer"]
        sharegpt.append(
            {
                "messages": [
                    {"role": "user", "content": "<image>" + question},
                    {"role": "assistant", "content": answer},
                ],
                "images": images,
                "id": r["pseudo_id"],
            }
        )
        structured.append(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ],
                "images": images,
                "id": r["pseudo_id"],
            }
        )
    for name, records in (("pseudo_qa.jsonl", sharegpt), ("pseudo_qa_trl.jsonl", structured)):
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        storage.write_bytes_atomic(ctx.output(name), text.encode())
    storage.write_json_atomic(ctx.output("dataset_info.json"), DATASET_INFO)


PSEUDO_QA = Stage(
    name="pseudo_qa",
    run=pseudo_qa_stage,
    inputs=("prepared", "generator", "captions.parquet"),  # captions: the caption filter and the diagnostics
    outputs=(
        "pseudo_qa.parquet",
        "pseudo_qa.jsonl",
        "pseudo_qa_trl.jsonl",
        "dataset_info.json",
        "pseudo_qa_rejects.parquet",
        "pseudo_qa_images",
        "pseudo_qa_diagnostics.json",
    ),
    config_keys=lambda cfg: (
        "pseudo_qa",
        *engine_keys("generator"),
        "generator.heldout_captions",  # which held-out images the diagnostics caption
        "teacher.max_new_tokens",  # how long those captions may be
        *(
            (*engine_keys(role), "eval.max_new_tokens")  # the model that answers in the consistency filter
            if (role := cfg.pseudo_qa.consistency_filter) in ("teacher", "target")
            else ()
        ),
    ),
    unhashed_keys=lambda cfg: (
        *engine_unhashed_keys("generator"),
        *(engine_unhashed_keys(role) if (role := cfg.pseudo_qa.consistency_filter) in ("teacher", "target") else ()),
    ),
)
