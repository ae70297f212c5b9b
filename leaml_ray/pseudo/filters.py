"""Parsing and filtering the generator's replies (docs/design.md#pseudo-qa-generation-and-filters): every reply
becomes a kept pair or a reject row with its reason.

Rules come from the labeled data (answer length, a closed vocabulary); with labeled questions each pair also gets
the generator's answer confidence and the question's pointwise mutual information with its image
(log p(question | image) - log p(question | average image)): a question about something the image lacks is unlikely
given that image. Optional consistency filters check the answer against the teacher's caption or another model.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from leaml_ray.data import examples
from leaml_ray.data.parts import read_parts
from leaml_ray.inference.client import check_served
from leaml_ray.inference.generate import generate
from leaml_ray.models.spec import Engine
from leaml_ray.scoring import normalize

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
    prompt: str  # the generator's instruction: a question that repeats it is an echo


def answer_rules(qa: pa.Table, closed_vocabulary: str, prompt: str) -> AnswerRules:
    """Limits from the generator's labeled examples (`generator_examples`: question text includes its options, as
    the generator learned it), and the `prompt` it writes pairs with."""
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
        prompt=prompt,
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
    if nq == normalize(rules.prompt) or "ask a question about this image" in nq:
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


def filter_replies(
    parts: str,
    rules: AnswerRules,
    skip: set[str] = frozenset(),
    min_question_pmi: float | None = None,
    min_answer_confidence: float = 0.0,
) -> tuple[pa.Table, pa.Table]:
    """Every reply in the resumable parts (but the `skip` keys) -> (kept pairs, rejects), parsed and filtered in key
    order so the result does not depend on arrival order."""
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


def as_rejects(dropped: pa.Table, reason: str) -> pa.Table:
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
    return kept.filter(mask), as_rejects(kept.filter(pc.invert(mask)), "not_in_caption")


def consistency_filter(
    kept: pa.Table, images_path: str, judge: Engine, max_new_tokens: int
) -> tuple[pa.Table, pa.Table]:
    """Keep pairs whose answer the `judge` (the teacher, or the base target) gives too when asked the pseudo question
    (greedy, at most `max_new_tokens`)."""
    role = judge.spec.role
    check_served(judge)
    rows = examples.with_images(images_path, kept.rename_columns({"question": "instruction"}))
    answers = generate(rows, judge, {"temperature": 0.0, "max_tokens": max_new_tokens}, keep=("pseudo_id",))
    by_id = {r["pseudo_id"]: r["text"] for r in answers.select_columns(["pseudo_id", "text"]).iter_rows()}
    agree = [
        normalize(by_id.get(i, "")) == normalize(a)
        for i, a in zip(kept["pseudo_id"].to_pylist(), kept["answer"].to_pylist(), strict=True)
    ]
    mask = pa.array(agree, pa.bool_())
    return kept.filter(mask), as_rejects(kept.filter(pc.invert(mask)), f"inconsistent_with_{role}")
