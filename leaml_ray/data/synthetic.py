"""The synthetic world: procedural images of shapes with a true caption and templated QA, deterministic from a seed.

Three domains share one renderer:
- `general`: plain pale backgrounds, 4 colours, one size. What the tiny bases are pretrained on.
- `wide`: everything the world has (textures, 7 colours, three sizes) described in captions only. What the tiny
  teacher is pretrained on: like a 72B model it has seen more of the world, but never target-domain QA.
- `target`: textured backgrounds, colours the general domain lacks, small/large sizes, and question categories
  (size, background) the general domain never asks. The domain the pipeline adapts to.
Questions are position-indexed ("... on the left?"): the tiny models learn those (see ENVIRONMENT.md).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from leaml_ray.data.images import encode_png as png_bytes  # noqa: F401  (re-exported for callers)

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
    "black": (25, 25, 25),
}
BASE_COLORS = ("red", "green", "blue", "yellow")
TARGET_COLORS = ("purple", "orange", "black", "red", "blue")
PATTERNS = ("plain", "striped", "checkered", "dotted")
SLOTS = ("left", "right")
SIZES = {"small": 0.22, "medium": 0.32, "large": 0.42}  # fraction of the image side

DOMAINS = {
    # colours, background patterns, sizes, QA categories
    "general": (BASE_COLORS, ("plain",), ("medium",), ("shape", "color", "count")),
    "wide": (tuple(COLORS), PATTERNS, tuple(SIZES), ("shape", "color", "count", "size", "background")),
    "target": (
        TARGET_COLORS,
        ("striped", "checkered", "dotted"),
        ("small", "large"),
        ("shape", "color", "size", "background"),
    ),
}
DOMAIN_IDS = {name: i for i, name in enumerate(DOMAINS)}


@dataclass(frozen=True)
class Item:
    slot: str
    shape: str
    color: str
    size: str


@dataclass(frozen=True)
class Scene:
    domain: str
    pattern: str
    items: tuple[Item, ...]


def make_scene(domain: str, seed: int, index: int) -> Scene:
    """The scene of image `index` of a domain: 1-2 shapes in the left/right slots."""
    colors, patterns, sizes, _ = DOMAINS[domain]
    rng = np.random.default_rng([seed, DOMAIN_IDS[domain], index])
    slots = list(SLOTS) if rng.random() < 0.5 else [SLOTS[int(rng.integers(2))]]
    items = tuple(
        Item(
            slot,
            SHAPES[int(rng.integers(len(SHAPES)))],
            colors[int(rng.integers(len(colors)))],
            sizes[int(rng.integers(len(sizes)))],
        )
        for slot in slots
    )
    return Scene(domain, patterns[int(rng.integers(len(patterns)))], items)


def render(scene: Scene, size: int, index: int = 0) -> Image.Image:
    """Draw a scene as an RGB image of size x size pixels."""
    rng = np.random.default_rng([zlib.crc32(repr(scene).encode()), index])
    img = background(scene.pattern, size, max(4, size // 7), rng)
    draw = ImageDraw.Draw(img)
    for item in scene.items:
        cx = size * (0.27 if item.slot == "left" else 0.73) + rng.uniform(-0.04, 0.04) * size
        cy = size * 0.5 + rng.uniform(-0.12, 0.12) * size
        r = SIZES[item.size] * size / 2
        box = (cx - r, cy - r, cx + r, cy + r)
        fill, outline = COLORS[item.color], (255, 255, 255)
        if item.shape == "circle":
            draw.ellipse(box, fill=fill, outline=outline)
        elif item.shape == "square":
            draw.rectangle(box, fill=fill, outline=outline)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill, outline=outline)
    return img


def background(pattern: str, size: int, period: int, rng: np.random.Generator) -> Image.Image:
    """A pale background of a random tint (drawn from `rng`) with a darker pattern of `period` pixels."""
    base = np.broadcast_to(rng.integers(215, 250, size=3), (size, size, 3)).astype(np.int16).copy()
    yy, xx = np.mgrid[0:size, 0:size]
    if pattern == "striped":
        mask = ((xx + yy) // (period // 2)) % 2 == 0
    elif pattern == "checkered":
        mask = ((xx // period) + (yy // period)) % 2 == 0
    elif pattern == "dotted":
        mask = ((xx % period - period // 2) ** 2 + (yy % period - period // 2) ** 2) <= (period // 4) ** 2
    else:
        mask = np.zeros((size, size), bool)
    base[mask] -= 70
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def caption(scene: Scene) -> str:
    """The ground-truth caption; sizes and backgrounds are named only in domains where they vary."""
    _, patterns, sizes, _ = DOMAINS[scene.domain]
    parts = []
    for item in scene.items:
        size = f"{item.size} " if len(sizes) > 1 else ""
        parts.append(f"a {size}{item.color} {item.shape} on the {item.slot}")
    text = " and ".join(parts)
    if len(patterns) > 1:
        text += f" on a {scene.pattern} background"
    return text + "."


def questions(scene: Scene, seed: int, index: int) -> list[tuple[str, str, str]]:
    """(category, question, answer) triples, one per category of the domain."""
    rng = np.random.default_rng([seed, DOMAIN_IDS[scene.domain], index, 7])
    out = []
    for category in DOMAINS[scene.domain][3]:
        item = scene.items[int(rng.integers(len(scene.items)))]
        if category == "shape":
            out.append((category, f"what shape is on the {item.slot}?", item.shape))
        elif category == "color":
            out.append((category, f"what color is the shape on the {item.slot}?", item.color))
        elif category == "size":
            out.append((category, f"what size is the shape on the {item.slot}?", item.size))
        elif category == "count":
            out.append((category, "how many shapes are there?", str(len(scene.items))))
        elif category == "background":
            out.append((category, "what pattern is the background?", scene.pattern))
    return out


def vocabulary_sentence(seed: int, index: int) -> str:
    """A sentence in the words of the whole world (every colour, size and background) about no image in particular:
    the text-only exposure a production base gets to a domain's words without seeing its look."""
    rng = np.random.default_rng([seed, index, 13])
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = tuple(COLORS)[int(rng.integers(len(COLORS)))]
    size = tuple(SIZES)[int(rng.integers(len(SIZES)))]
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    forms = (
        f"a {size} {color} {shape} on a {pattern} background.",
        f"the {shape} is {size}.",
        f"the {shape} is {color}.",
        f"the background is {pattern}.",
    )
    return forms[int(rng.integers(len(forms)))]


def blank(size: int) -> Image.Image:
    """An image with nothing on it, for text-only examples (every training row carries one image)."""
    return Image.new("RGB", (size, size), (235, 235, 235))


def image_id(domain: str, seed: int, index: int) -> str:
    return f"syn-{domain}-{seed}-{index:07d}"


def sample(domain: str, seed: int, index: int, size: int) -> tuple[Scene, Image.Image]:
    """Scene and rendered image of one synthetic sample."""
    scene = make_scene(domain, seed, index)
    return scene, render(scene, size, index)


def parse_id(image_id: str, prefix: str, domains: Iterable[str]) -> tuple[str, int, int] | None:
    """(domain, seed, index) of an id `<prefix>-<domain>-<seed>-<index>` of one of `domains`; None otherwise."""
    parts = image_id.split("-")
    if len(parts) != 4 or parts[0] != prefix or parts[1] not in domains:
        return None
    try:
        return parts[1], int(parts[2]), int(parts[3])
    except ValueError:
        return None


def parse_image_id(image_id: str) -> tuple[str, int, int] | None:
    """(domain, seed, index) of a synthetic image id; None for any other id."""
    return parse_id(image_id, "syn", DOMAINS)


def askable(domain: str) -> dict[str, str]:
    """Every question the domain's templates can ask (about either slot), with its category."""
    out = {}
    for category in DOMAINS[domain][3]:
        for slot in SLOTS:
            if category == "shape":
                out[f"what shape is on the {slot}?"] = category
            elif category == "color":
                out[f"what color is the shape on the {slot}?"] = category
            elif category == "size":
                out[f"what size is the shape on the {slot}?"] = category
        if category == "count":
            out["how many shapes are there?"] = category
        elif category == "background":
            out["what pattern is the background?"] = category
    return out


def facts(image_id: str) -> tuple[Scene, dict[str, tuple[str, str]]] | None:
    """The scene of a synthetic image and every question it can answer -> (category, answer); None when the id
    is not synthetic. A question of `askable` missing here asks about something the image does not have."""
    parsed = parse_image_id(image_id)
    if parsed is None:
        return None
    scene = make_scene(*parsed)
    out: dict[str, tuple[str, str]] = {}
    for question, category in askable(scene.domain).items():
        if category == "count":
            out[question] = (category, str(len(scene.items)))
        elif category == "background":
            out[question] = (category, scene.pattern)
        else:
            item = next((i for i in scene.items if f" on the {i.slot}?" in question), None)
            if item is not None:
                out[question] = (category, getattr(item, category))
    return scene, out
