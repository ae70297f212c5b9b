"""Answer scoring (docs/design.md#scoring): normalised exact match, option letters, "; "-joined answers as sets.

The normalisation follows the VQAv2 evaluation's steps (github.com/GT-Vision-Lab/VQA, vqaEval.py): number words to
digits, articles dropped, contractions written one way, punctuation to spaces, except that a thousands separator
is dropped ("1,000" = "1000") and a decimal point kept ("2.5").
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter, defaultdict

from leaml_ray.formats import LETTERS

ARTICLES = frozenset({"a", "an", "the"})
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBERS["none"] = "0"  # as VQAv2's evaluation maps it
# apostrophes are dropped ("don't" = "dont"); commas and periods are decided after (DIGIT_COMMA, STRAY_...)
PUNCT = str.maketrans({c: "" if c == "'" else " " for c in string.punctuation if c not in ",."})
DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
STRAY_PERIOD_OR_COMMA = re.compile(r"\.(?!\d)|,(?!\d)|(?<!\d),")


def normalize(text: str | None) -> str:
    """Case, unicode form, punctuation, articles, number words and whitespace folded away (VQAv2's steps)."""
    text = unicodedata.normalize("NFKC", text or "").lower().replace("\u2019", "'")
    text = STRAY_PERIOD_OR_COMMA.sub(" ", DIGIT_COMMA.sub("", text.translate(PUNCT)))
    words = [NUMBERS.get(w, w) for w in text.split()]
    if len(words) > 1:  # a lone "a" is an answer (option A), not an article
        words = [w for w in words if w not in ARTICLES]
    return " ".join(words)


def answer_set(text: str | None) -> frozenset[str]:
    """A "; "-joined multi-label answer as a set of normalised parts."""
    return frozenset(p for p in (normalize(part) for part in (text or "").split(";")) if p)


def option_letter(prediction: str, choices: list[str]) -> str | None:
    """The option a prediction names: a leading letter ("B", "(b)", "B. tennis") or the option's text."""
    letters = LETTERS[: len(choices)]
    m = re.match(r"^\s*\(?([A-Za-z])\)?(?:[.):\s]|$)", prediction or "")
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    norm = normalize(prediction)
    for letter, choice in zip(letters, choices, strict=False):
        if norm and norm == normalize(choice):
            return letter
    return None


def is_correct(prediction: str | None, answer: str, choices: list[str] | None = None) -> bool:
    """Normalised exact match; for multiple choice, the named option against the answer letter."""
    if choices:
        return option_letter(prediction or "", choices) == answer.strip().upper()
    return answer_set(prediction) == answer_set(answer) and bool(answer_set(answer))


def accuracy(rows: list[dict]) -> dict:
    """Rows {category, correct} -> {"accuracy": macro average over categories, "per_category", "micro", "n"};
    `correct` is a bool, or an expected value in [0, 1] (a random guess)."""
    by_cat: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by_cat[r["category"] or "all"].append(float(r["correct"]))
    per_category = {c: sum(v) / len(v) for c, v in sorted(by_cat.items())}
    n = sum(len(v) for v in by_cat.values())
    return {
        "accuracy": sum(per_category.values()) / len(per_category) if per_category else 0.0,
        "micro": sum(sum(v) for v in by_cat.values()) / n if n else 0.0,
        "per_category": per_category,
        "n": n,
    }


def prior_baselines(labeled: list[dict], test: list[dict]) -> dict[str, dict]:
    """The two image-blind references every table shows beside the methods, scored as they are (`accuracy`):
    `chance`, a uniform guess among the answers the labeled pairs give in the test question's category (an expected
    accuracy), and `blind`, the labeled pairs' most frequent answer to the same question text, else to its category.
    Rows: {category, question, answer}."""
    by_category: dict[str, Counter] = defaultdict(Counter)
    by_question: dict[str, Counter] = defaultdict(Counter)
    for r in labeled:
        key = answer_set(r["answer"])
        by_category[r["category"]][key] += 1
        by_question[normalize(r["question"])][key] += 1
    chance, blind = [], []
    for r in test:
        key, seen = answer_set(r["answer"]), by_category.get(r["category"])
        chance.append({"category": r["category"], "correct": (key in seen) / len(seen) if seen else 0.0})
        votes = by_question.get(normalize(r["question"])) or seen
        guess = votes.most_common(1)[0][0] if votes else None
        blind.append({"category": r["category"], "correct": bool(key) and guess == key})
    return {"chance": accuracy(chance), "blind": accuracy(blind)}
