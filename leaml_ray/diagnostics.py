"""Why LEAML helps or not, measured in every run; diagnostics only, never used to train or filter.

- caption fidelity: the generator's own captions of held-back captioned images, word-level F1 against the
  teacher's captions, and (synthetic) both against the true captions: can the generator describe what it sees?
- precondition: accuracy on the unlabeled images' hidden questions of the generator (pseudo_qa) and of the
  labeled-only target (evaluate): LEAML can only help if the generator answers them better.
- pseudo-pair precision over the kept pairs, per category, and the share that asks about something the image
  lacks (synthetic: from the scene; other sources: pairs whose question matches a hidden one of the same image).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa

from leaml_ray.data import examples, synthetic, world3
from leaml_ray.formats import qa_target, question_text
from leaml_ray.scoring import accuracy, is_correct, normalize

MAX_HIDDEN = 2000  # hidden questions answered for the precondition (a seeded sample beyond that)
FUNCTION_WORDS = frozenset({"a", "an", "the", "on", "and", "is", "of", "in", "with"})


def synthetic_truth(image_id: str) -> tuple[str, dict[str, tuple[str, str]], dict[str, str]] | None:
    """For an image of a synthetic world: its true caption, every question it answers -> (category, answer), and
    every question its domain can ask -> category; None for any other image."""
    for world in (synthetic, world3):
        found = world.facts(image_id)
        if found is not None:
            scene, facts = found
            return world.caption(scene), facts, world.askable(scene.domain)
    return None


def word_f1(predicted: str, reference: str) -> float:
    """F1 of the content words (multisets, function words left out) of two texts."""
    p = Counter(w for w in normalize(predicted).split() if w not in FUNCTION_WORDS)
    r = Counter(w for w in normalize(reference).split() if w not in FUNCTION_WORDS)
    common = sum((p & r).values())
    if not p or not r or not common:
        return float(not p and not r)
    precision, recall = common / sum(p.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def caption_fidelity(generated: dict[str, str], teacher: dict[str, str]) -> dict[str, Any]:
    """Mean word F1 of the generator's captions vs the teacher's; on synthetic images also both vs the truth and
    the generator's share of the teacher's fidelity."""
    ids = sorted(set(generated) & set(teacher))
    if not ids:
        return {"n": 0}
    out: dict[str, Any] = {
        "n": len(ids),
        "generator_vs_teacher": sum(word_f1(generated[i], teacher[i]) for i in ids) / len(ids),
    }
    truth = {i: known[0] for i in ids if (known := synthetic_truth(i)) is not None}
    if truth:
        known = sorted(truth)
        gen = sum(word_f1(generated[i], truth[i]) for i in known) / len(known)
        tea = sum(word_f1(teacher[i], truth[i]) for i in known) / len(known)
        out.update(generator_vs_truth=gen, teacher_vs_truth=tea, share_of_teacher=gen / tea if tea else 0.0)
    return out


def hidden_sample(hidden: pa.Table, seed: int) -> pa.Table:
    """At most MAX_HIDDEN hidden questions, a seeded choice (the same for every model a run compares)."""
    if hidden.num_rows <= MAX_HIDDEN:
        return hidden
    order = sorted(range(hidden.num_rows), key=lambda k: examples.stable_int(hidden["qa_id"][k].as_py(), seed))
    return hidden.take(pa.array(sorted(order[:MAX_HIDDEN])))


def hidden_accuracy(hidden: pa.Table, answers: dict[str, str]) -> dict[str, Any]:
    """Macro accuracy (over categories) of answers keyed by qa_id on hidden questions; missing answers count wrong."""
    records = [
        {
            "category": r["category"],
            "correct": r["qa_id"] in answers and is_correct(answers[r["qa_id"]], r["answer"], r["choices"]),
        }
        for r in hidden.select(["qa_id", "category", "answer", "choices"]).to_pylist()
    ]
    return accuracy(records)


def hidden_prefix(question: str, choices: list[str] | None) -> str:
    """The generator's reply opening for a question: "Question: ...\\nAnswer:" (it writes the answer)."""
    return qa_target(question_text(question, choices), "").rstrip()


def pair_precision(kept: pa.Table, hidden: pa.Table | None) -> dict[str, Any]:
    """Precision of kept pseudo pairs per category; `absent`: pairs asking about something the image lacks."""
    truth: dict[tuple[str, str], tuple[str, str]] = {}
    if hidden is not None:
        columns = (hidden[k].to_pylist() for k in ("image_id", "question", "answer", "category"))
        for i, q, a, c in zip(*columns, strict=True):
            truth[(i, normalize(q))] = (c, a)
    by_category: dict[str, list[int]] = {}
    absent = judged = 0
    for image_id, question, answer in zip(
        *(kept[k].to_pylist() for k in ("image_id", "question", "answer")), strict=True
    ):
        known = synthetic_truth(image_id)
        if known is not None:
            _, facts, askable = known
            fact = {normalize(q): v for q, v in facts.items()}.get(normalize(question))
            if fact is None:
                category = {normalize(q): c for q, c in askable.items()}.get(normalize(question))
                if category is None:
                    continue  # a question the synthetic templates never ask: cannot be judged
                absent += 1
                fact = (category, "")  # nothing is the right answer: counted wrong
        else:
            fact = truth.get((image_id, normalize(question)))
            if fact is None:
                continue
        judged += 1
        cell = by_category.setdefault(fact[0], [0, 0])
        cell[0] += 1
        cell[1] += bool(fact[1]) and normalize(answer) == normalize(fact[1])
    correct = sum(c for _, c in by_category.values())
    return {
        "audited": judged,
        "audited_correct": correct,
        "precision": correct / judged if judged else None,
        "absent": absent,
        "absent_share": absent / judged if judged else None,
        "precision_by_category": {k: {"n": n, "precision": c / n} for k, (n, c) in sorted(by_category.items())},
    }
