"""Answer scoring (docs/design.md#scoring): normalised exact match, option letters, "; "-joined answers as sets."""

from __future__ import annotations

import re
import string
import unicodedata
from collections import defaultdict

from leaml_ray.formats import LETTERS

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: str | None) -> str:
    """Case, unicode form, punctuation, articles and whitespace folded away."""
    words = unicodedata.normalize("NFKC", text or "").lower().translate(PUNCT).split()
    if len(words) > 1:  # a lone "a" is an answer (option A), not an article
        words = ARTICLES.sub(" ", " ".join(words)).split()
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
    """Rows {category, correct} -> {"accuracy": macro average over categories, "per_category", "micro", "n"}."""
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_cat[r["category"] or "all"].append(bool(r["correct"]))
    per_category = {c: sum(v) / len(v) for c, v in sorted(by_cat.items())}
    n = sum(len(v) for v in by_cat.values())
    return {
        "accuracy": sum(per_category.values()) / len(per_category) if per_category else 0.0,
        "micro": sum(sum(v) for v in by_cat.values()) / n if n else 0.0,
        "per_category": per_category,
        "n": n,
    }
