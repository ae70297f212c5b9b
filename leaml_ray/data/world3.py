"""World 3 (docs/world3.md): "scope" images with domain labels, nine question categories, the paper's proportions.

Not wired into the pipeline yet: the zoo that understands it comes first (issue 30's order). Deterministic from
(domain, seed, index), like world 2 (`synthetic.py`), whose renderer conventions it follows.
Three domains:
- `general`: what the QA generator's and the target's bases are pretrained on (4 colours, plain or striped
  backgrounds, no rings; every object `normal`, every image `none`).
- `wide`: what the teacher is pretrained on (every colour, background, size and surface; general questions only).
- `scope`: the domain a run adapts to (the target colours, textured backgrounds, rings, and the domain labels).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from leaml_ray.data.synthetic import COLORS, PATTERNS, SHAPES, background, parse_id

SLOTS = ("left", "middle", "right")
WHERE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
SIZES = {"small": 0.18, "large": 0.3}  # diameter, as a fraction of the image side (a slot is a third of it)
SURFACES = ("plain", "ringed")
BACKGROUNDS = PATTERNS  # world 2's textures
GENERAL = ("shape", "color", "size", "count", "presence", "background", "colors")
DOMAIN_LABELS = ("finding", "findings")


@dataclass(frozen=True)
class Domain:
    colors: tuple[str, ...]
    backgrounds: tuple[str, ...]
    surfaces: tuple[str, ...]
    categories: tuple[str, ...]


DOMAINS = {
    "general": Domain(("red", "green", "blue", "yellow"), ("plain", "striped"), ("plain",), GENERAL + DOMAIN_LABELS),
    "wide": Domain(tuple(COLORS), BACKGROUNDS, SURFACES, GENERAL),
    "scope": Domain(("red", "orange", "purple", "blue", "black"), BACKGROUNDS[1:], SURFACES, GENERAL + DOMAIN_LABELS),
}
DOMAIN_IDS = {"general": 10, "wide": 11, "scope": 12}  # not world 2's ids: other scenes for the same seeds

# three paraphrases per category; {slot} is a slot's name, {where} its phrase ("in the middle")
TEMPLATES = {
    "shape": ("what shape is {where}?", "which shape is {where}?", "name the shape {where}."),
    "color": (
        "what color is the object {where}?",
        "which color does the {slot} object have?",
        "name its color {where}.",
    ),
    "size": (
        "how big is the object {where}?",
        "what size is the {slot} object?",
        "is the {slot} object small or large?",
    ),
    "count": ("how many objects are there?", "how many objects can you see?", "count the objects."),
    "presence": ("is there an object {where}?", "is the {slot} occupied?", "does the {slot} hold an object?"),
    "background": ("what is the background pattern?", "which pattern is in the background?", "name the background."),
    "colors": ("which colors appear?", "what colors are in the image?", "list the colors you see."),
    "finding": (
        "what is the finding {where}?",
        "which finding does the {slot} object show?",
        "name the finding {where}.",
    ),
    "findings": ("which findings are in the image?", "what findings are present?", "list the findings."),
}


@dataclass(frozen=True)
class Item:
    slot: str
    shape: str
    color: str
    size: str
    surface: str


@dataclass(frozen=True)
class Scene:
    domain: str
    background: str
    items: tuple[Item, ...]  # in slot order


def make_scene(domain: str, seed: int, index: int) -> Scene:
    """Image `index` of a domain: 1-3 objects in distinct slots, each attribute drawn uniformly."""
    d = DOMAINS[domain]
    rng = np.random.default_rng([seed, DOMAIN_IDS[domain], index])
    count = int(rng.integers(1, 4))
    slots = sorted(rng.choice(len(SLOTS), size=count, replace=False).tolist())
    items = tuple(
        Item(
            SLOTS[s],
            SHAPES[int(rng.integers(len(SHAPES)))],
            d.colors[int(rng.integers(len(d.colors)))],
            tuple(SIZES)[int(rng.integers(len(SIZES)))],
            d.surfaces[int(rng.integers(len(d.surfaces)))],
        )
        for s in slots
    )
    return Scene(domain, d.backgrounds[int(rng.integers(len(d.backgrounds)))], items)


def render(scene: Scene, size: int = 84, index: int = 0) -> Image.Image:
    """Draw a scene as an RGB image of size x size pixels (84: 9 image tokens, one column of three per slot)."""
    rng = np.random.default_rng([zlib.crc32(repr(scene).encode()), index])
    img = background(scene.background, size, max(4, size // 10), rng)
    draw = ImageDraw.Draw(img)
    for item in scene.items:
        cx = size * (SLOTS.index(item.slot) + 0.5) / 3 + rng.uniform(-0.02, 0.02) * size
        cy = size * 0.5 + rng.uniform(-0.2, 0.2) * size
        r = SIZES[item.size] * size / 2
        fill = COLORS[item.color]
        _shape(draw, item.shape, cx, cy, r, fill, (255, 255, 255))
        if item.surface == "ringed":  # a white ring inside the shape
            _shape(draw, item.shape, cx, cy + (r * 0.15 if item.shape == "triangle" else 0), r * 0.5, None, "white")
    return img


def _shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, outline) -> None:  # noqa: ANN001
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=1 if fill else 2)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=1 if fill else 2)
    else:
        draw.polygon(
            [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill, outline=outline, width=1 if fill else 2
        )


def finding(item: Item) -> str:
    """The domain label of one object: the first rule that holds (docs/world3.md)."""
    if item.size == "large" and item.shape == "circle":
        return "polyp"
    if item.shape == "triangle" and item.color in ("black", "purple"):
        return "ulcer"
    if item.size == "small" and item.surface == "ringed":
        return "erosion"
    return "normal"


def findings(scene: Scene) -> str:
    """The image's distinct non-normal findings, sorted and "; "-joined, or "none"."""
    found = sorted({finding(i) for i in scene.items} - {"normal"})
    return "; ".join(found) or "none"


def caption(scene: Scene) -> str:
    """What the teacher should say: every object in general words (never a finding), then the background."""
    parts = []
    for item in scene.items:
        surface = "ringed " if item.surface == "ringed" else ""
        parts.append(f"a {item.size} {surface}{item.color} {item.shape} {WHERE[item.slot]}")
    return " and ".join(parts) + f" on a {scene.background} background."


def answer(scene: Scene, category: str, slot: str | None) -> str:
    """The true answer of a category's question about a scene (and a slot, where the category names one)."""
    item = next((i for i in scene.items if i.slot == slot), None)
    if category == "presence":
        return "yes" if item else "no"
    if category in ("shape", "color", "size"):
        return getattr(item, category)
    if category == "finding":
        return finding(item) if scene.domain == "scope" else "normal"
    if category == "count":
        return str(len(scene.items))
    if category == "background":
        return scene.background
    if category == "colors":
        return "; ".join(sorted({i.color for i in scene.items}))
    return findings(scene) if scene.domain == "scope" else "none"


SLOTTED = ("shape", "color", "size", "presence", "finding")


def questions(scene: Scene, seed: int, index: int) -> list[tuple[str, str, str]]:
    """(category, question, answer): one question per category of the domain, a template and a slot drawn per image
    (an occupied slot, except for presence: see below)."""
    rng = np.random.default_rng([seed, DOMAIN_IDS[scene.domain], index, 7])
    out = []
    for category in DOMAINS[scene.domain].categories:
        template = TEMPLATES[category][int(rng.integers(len(TEMPLATES[category])))]
        slot = None
        if category in SLOTTED:
            occupied = tuple(i.slot for i in scene.items)
            empty = tuple(s for s in SLOTS if s not in occupied)
            # presence asks about an empty slot 3 times in 4 where there is one: a third of the images have
            # none, so "yes" and "no" come out even
            asks_empty = category == "presence" and empty and rng.random() < 0.75
            pool = empty if asks_empty else occupied
            slot = pool[int(rng.integers(len(pool)))]
        question = template.format(slot=slot, where=WHERE.get(slot, ""))
        out.append((category, question, answer(scene, category, slot)))
    return out


def answer_sets(domain: str, images: int = 3000, seed: int = 999) -> dict[str, set[str]]:
    """Every answer each category of a domain takes (from a sample of its scenes; seed 999 is no run's seed)."""
    seen: dict[str, set[str]] = {}
    for index in range(images):
        for category, _, ans in questions(make_scene(domain, seed, index), seed, index):
            seen.setdefault(category, set()).add(ans)
    return seen


def sample(domain: str, seed: int, index: int, size: int = 84) -> tuple[Scene, Image.Image]:
    """Scene and rendered image of one sample of a domain."""
    scene = make_scene(domain, seed, index)
    return scene, render(scene, size, index)


FINDINGS = ("polyp", "ulcer", "erosion")


def vocabulary_sentence(seed: int, index: int) -> str:
    """A sentence in the words of the whole world, domain labels included, about no image in particular: the
    text-only exposure a production base gets to a domain's words. It never ties a finding to what it looks like."""
    rng = np.random.default_rng([seed, DOMAIN_IDS["scope"], index, 13])
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    item = Item(pick(SLOTS), pick(SHAPES), pick(tuple(COLORS)), pick(tuple(SIZES)), pick(SURFACES))
    surface = "ringed " if item.surface == "ringed" else ""
    found = sorted({pick(FINDINGS) for _ in range(int(rng.integers(1, 3)))})
    forms = (
        f"a {item.size} {surface}{item.color} {item.shape} {WHERE[item.slot]} on a {pick(BACKGROUNDS)} background.",
        f"the finding is {pick(FINDINGS + ('normal',))}.",
        f"the findings are {'; '.join(found)}.",
        f"the {item.shape} is {item.color}.",
        f"the background is {pick(BACKGROUNDS)}.",
    )
    return pick(forms)


def image_id(domain: str, seed: int, index: int) -> str:
    """The id of a world-3 image (world 2's are `syn-...`)."""
    return f"w3-{domain}-{seed}-{index:07d}"


def parse_image_id(image_id: str) -> tuple[str, int, int] | None:
    """(domain, seed, index) of a world-3 image id; None for any other id."""
    return parse_id(image_id, "w3", DOMAINS)


def askable(domain: str) -> dict[str, str]:
    """Every question the domain's templates can ask (about any slot), with its category."""
    out = {}
    for category in DOMAINS[domain].categories:
        for template in TEMPLATES[category]:
            for slot in SLOTS if category in SLOTTED else (None,):
                out[template.format(slot=slot, where=WHERE.get(slot, ""))] = category
    return out


def facts(image_id: str) -> tuple[Scene, dict[str, tuple[str, str]]] | None:
    """The scene of a world-3 image and every question it can answer -> (category, answer); None when the id is not
    world 3's. A question of `askable` missing here asks about an empty slot (presence excepted)."""
    parsed = parse_image_id(image_id)
    if parsed is None:
        return None
    scene = make_scene(*parsed)
    occupied = {i.slot for i in scene.items}
    out: dict[str, tuple[str, str]] = {}
    for category in DOMAINS[scene.domain].categories:
        for template in TEMPLATES[category]:
            for slot in SLOTS if category in SLOTTED else (None,):
                if slot is None or slot in occupied or category == "presence":
                    question = template.format(slot=slot, where=WHERE.get(slot, ""))
                    out[question] = (category, answer(scene, category, slot))
    return scene, out
