"""Where the tiny zoo of the embedded default lives, and which recipe it was built from (lookup only: pretraining it
is `leaml_ray/zoo.py`, a tool above the train loop).

The project ships the zoo it measured (`leaml_ray/zoo_shipped/`, with the recipe's hash in `zoo.json`); when the
recipe in code changes, the shipped zoo no longer matches and `zoo:` models live in
~/.cache/leaml-ray/zoo/<hash of the recipe> once `python -m leaml_ray.zoo build` has pretrained them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from leaml_ray import CACHE
from leaml_ray.errors import UserError
from leaml_ray.plan import stable_hash

ZOO_VERSION = 2  # 2: the base's text-only vocabulary sentences
ROLE_FOLDERS = {"teacher": "teacher", "generator": "base", "target": "base"}
SHIPPED = Path(__file__).resolve().parent.parent / "zoo_shipped"


@dataclass(frozen=True)
class Recipe:
    """How one zoo model is pretrained (its hash names the cache folder)."""

    size: str
    domain: str
    samples: int  # training samples seen (epochs over a pool of `images` rendered once)
    images: int
    caption_share: float  # the rest: text-only sentences, then answering and asking questions
    text_share: float = 0.0
    lr: float = 1e-3
    batch_size: int = 16
    image_size: int = 56


RECIPES = {
    "teacher": Recipe(size="teacher", domain="wide", samples=36_000, images=8_000, caption_share=1.0),
    "base": Recipe(size="base", domain="general", samples=48_000, images=8_000, caption_share=0.4, text_share=0.1),
}
# World 3's zoo (docs/world3.md; a `w3-` domain is world3.py's): built beside world 2's until world 3 is the
# embedded default. The teacher captions and answers general questions of the `wide` domain; the QA generator and
# the target share the `general` recipe at two sizes (4x apart).
_W3_BASES = Recipe(
    size="w3-generator",
    domain="w3-general",
    samples=48_000,
    images=12_000,
    caption_share=0.3,
    text_share=0.1,
    image_size=84,
)
WORLD3_RECIPES = {
    "teacher": Recipe(
        size="w3-teacher", domain="w3-wide", samples=48_000, images=12_000, caption_share=0.5, image_size=84
    ),
    "generator": _W3_BASES,
    "target": replace(_W3_BASES, size="base"),
}


class ZooMissing(UserError, FileNotFoundError):
    """The tiny zoo of the code's recipe is not built."""


def recipe_key(recipes: dict[str, Recipe] | None = None) -> str:
    """The hash of a zoo recipe in code (the embedded default's unless told): names the cache folder, is recorded
    beside the shipped zoo and goes into the cache key of every stage that uses a `zoo:` model."""
    recipes = RECIPES if recipes is None else recipes  # looked up at each call, not bound at import
    return stable_hash({"version": ZOO_VERSION, "recipes": {k: asdict(v) for k, v in recipes.items()}})


def zoo_dir(recipes: dict[str, Recipe] | None = None) -> Path:
    """The cache folder a zoo built on this machine from a recipe in code (the embedded default's unless told)
    goes to."""
    return CACHE / "zoo" / recipe_key(recipes)


def shipped_key() -> str | None:
    """The recipe hash the shipped zoo was built from (None when the package has no shipped zoo)."""
    path = SHIPPED / "zoo.json"
    return json.loads(path.read_text())["recipe_key"] if path.exists() else None


def zoo_root() -> Path:
    """Where the zoo of the code's recipe lives: the shipped folders when they were built from it, else this
    machine's cache."""
    return SHIPPED if shipped_key() == recipe_key() else zoo_dir()


def zoo_role(reference: str) -> str:
    """The role of a `zoo:<role>` reference (a one-line error for an unknown one)."""
    role = reference.split(":", 1)[1]
    if role not in ROLE_FOLDERS:
        raise UserError(f"unknown zoo model {reference!r}; available: zoo:{', zoo:'.join(ROLE_FOLDERS)}")
    return role


def zoo_folder(reference: str) -> str:
    """The local folder of a `zoo:<role>` model; never trains: a zoo missing for the code's recipe is one line telling
    how to build it."""
    role, root = zoo_role(reference), zoo_root()
    if not all((root / name / "config.json").exists() for name in RECIPES):
        raise ZooMissing(
            f"zoo: no tiny zoo for recipe {recipe_key()} (the shipped one is {shipped_key()}): build it with "
            "`python -m leaml_ray.zoo build` (~8 min on 2 cores; `make zoo` also re-ships it)"
        )
    return str(root / ROLE_FOLDERS[role])
