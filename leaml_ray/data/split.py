"""The label split: by image (or by group), seeded, stratified by category, every category labeled at least once."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field


@dataclass
class ImageInfo:
    """What the split needs to know about one image."""

    categories: set[str] = field(default_factory=set)
    hint: str | None = None  # "train" | "test" | "val" | "unlabeled" from the source
    has_qa: bool = False
    group: str | None = None  # images of one group (a patient, a video) always share a split


def unit_hash(seed: int, salt: str, key: str) -> float:
    """A deterministic number in [0, 1) per (seed, salt, key)."""
    return int(hashlib.sha256(f"{seed}:{salt}:{key}".encode()).hexdigest()[:15], 16) / 16**15


def _units(ids: set[str], images: dict[str, ImageInfo]) -> dict[str, set[str]]:
    """The split's units among `ids`: a group's images together, an image without a group alone."""
    out: dict[str, set[str]] = {}
    for i in ids:
        out.setdefault(f"group:{images[i].group}" if images[i].group else i, set()).add(i)
    return out


def _strata(units: dict[str, set[str]], images: dict[str, ImageInfo]) -> dict[str, list[str]]:
    """Unit ids by the categories their images hold."""
    out: dict[str, list[str]] = {}
    for u, ids in units.items():
        out.setdefault("|".join(sorted(set().union(*(images[i].categories for i in ids)))), []).append(u)
    return out


def _pick(ids: set[str], images: dict[str, ImageInfo], ratio: float, seed: int, salt: str) -> set[str]:
    """A stratified `ratio` of the units among `ids`, as the images they hold."""
    units = _units(ids, images)
    return set().union(*(units[u] for u in stratified_pick(_strata(units, images), ratio, seed, salt)))


def stratified_pick(strata: dict[str, list[str]], ratio: float, seed: int, salt: str) -> set[str]:
    """round(ratio * total) ids (at least one), allotted to strata by largest remainder, lowest hashes first."""
    total = sum(len(v) for v in strata.values())
    if total == 0 or ratio <= 0:
        return set()
    target = min(total, max(1, round(ratio * total)))
    quota = {s: ratio * len(v) for s, v in strata.items()}
    counts = {s: math.floor(q) for s, q in quota.items()}
    by_remainder = sorted(strata, key=lambda s: (-(quota[s] - counts[s]), unit_hash(seed, salt, s)))
    for s in by_remainder[: target - sum(counts.values())]:
        counts[s] += 1
    picked = set()
    for s, ids in strata.items():
        picked.update(sorted(ids, key=lambda i: unit_hash(seed, salt, i))[: counts[s]])
    return picked


def assign_splits(images: dict[str, ImageInfo], label_ratio: float, test_ratio: float, seed: int) -> dict[str, str]:
    """image_id -> "labeled" | "unlabeled" | "test" | "val".

    The test split is the source's own where it has one, else a seeded stratified hold-out of `test_ratio`.
    Validation images (for choosing settings, never trained on) are only ever the source's own ("val" rows).
    `label_ratio` of the remaining images with QA keep their labels; every category present in training keeps
    at least one labeled image. Images without QA (image-only rows) are always unlabeled. Images of one group go
    to the held-out test split together and are labeled together (the unit picked is the group).
    """
    val = {i for i, info in images.items() if info.has_qa and info.hint == "val"}
    with_qa = {i for i, info in images.items() if info.has_qa and info.hint not in ("unlabeled", "val")}
    source_test = {i for i in with_qa if images[i].hint == "test"}
    test = source_test or _pick(with_qa, images, test_ratio, seed, "test")
    train = with_qa - test
    labeled = _pick(train, images, label_ratio, seed, "label")
    units = _units(train, images)
    for category in sorted(set().union(set(), *(images[i].categories for i in train))):
        if not any(category in images[i].categories for i in labeled):
            with_category = (u for u, ids in units.items() if any(category in images[i].categories for i in ids))
            labeled |= units[min(with_category, key=lambda u: unit_hash(seed, "label", u))]
    return {
        i: "val" if i in val else "test" if i in test else "labeled" if i in labeled else "unlabeled" for i in images
    }
