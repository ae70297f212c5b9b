"""How good a tiny zoo model is on a synthetic world: caption naming and QA accuracy (greedy, transformers)."""

from __future__ import annotations

import re

import torch

from leaml_ray.data import synthetic, world3
from leaml_ray.formats import CAPTION_PROMPT
from leaml_ray.models import chat
from leaml_ray.models.registry import ModelSpec, load_model, load_processor
from leaml_ray.scoring import is_correct


def generate(
    model_dir: str, items: list[tuple], max_new_tokens: int, batch_size: int = 32, min_new_tokens: int = 0
) -> list[str]:
    """Greedy answers for (image, instruction) pairs, batched with left padding."""
    spec = ModelSpec("eval", model_dir, False, "float32", 256 * 28 * 28, None)
    model, processor = load_model(spec).eval(), load_processor(spec)
    processor.tokenizer.padding_side = "left"
    out = []
    for k in range(0, len(items), batch_size):
        chunk = items[k : k + batch_size]
        enc = processor(
            text=[chat.prompt(processor, ins) for _, ins in chunk],
            images=[im for im, _ in chunk],
            return_tensors="pt",
            padding=True,
        )
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False)
        out += processor.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in out]


def names_every_item(caption: str, scene: synthetic.Scene) -> bool:
    """The caption names the right colour and shape at each occupied position."""
    return all(f"{it.color} {it.shape} on the {it.slot}" in caption for it in scene.items)


def caption_score(model_dir: str, domain: str, n: int, seed: int = 0) -> float:
    scenes = [synthetic.sample(domain, seed, i, 56) for i in range(n)]
    captions = generate(model_dir, [(im, CAPTION_PROMPT) for _, im in scenes], max_new_tokens=32)
    return sum(names_every_item(c, s) for c, (s, _) in zip(captions, scenes, strict=True)) / n


def qa_score(model_dir: str, domain: str, n: int, seed: int = 0) -> float:
    items, answers = [], []
    for i in range(n):
        scene, image = synthetic.sample(domain, seed, i, 56)
        for _, question, answer in synthetic.questions(scene, seed, i):
            items.append((image, question))
            answers.append(answer)
    got = generate(model_dir, items, max_new_tokens=6)
    return sum(g.strip(" .").lower() == a for g, a in zip(got, answers, strict=True)) / len(answers)


OBJECT = re.compile(r"a (small|large) (ringed )?(\w+) (\w+) (on the left|in the middle|on the right)")
BACKGROUND = re.compile(r"on a (\w+) background")


def world3_caption_right(caption: str, scene: world3.Scene) -> dict[str, list[bool]]:
    """Which attributes a caption of a world-3 scene gets right: per object (shape, color, size, surface, matched by
    slot; an object the caption misses is wrong on all four), per image (the count of objects described, the
    background)."""
    described = OBJECT.findall(caption)
    said = {
        where: (size, "ringed" if ringed else "plain", color, shape) for size, ringed, color, shape, where in described
    }
    right: dict[str, list[bool]] = {k: [] for k in ("shape", "color", "size", "surface")}
    for item in scene.items:
        size, surface, color, shape = said.get(world3.WHERE[item.slot], (None,) * 4)
        right["shape"].append(shape == item.shape)
        right["color"].append(color == item.color)
        right["size"].append(size == item.size)
        right["surface"].append(surface == item.surface)
    right["count"] = [len(described) == len(scene.items)]
    background = BACKGROUND.search(caption)
    right["background"] = [background is not None and background.group(1) == scene.background]
    return right


def world3_caption_accuracy(model_dir: str, domain: str, n: int, seed: int) -> dict[str, float]:
    """Per attribute (`world3_caption_right`), how often a model's greedy captions of `n` world-3 images get it
    right."""
    samples = [world3.sample(domain, seed, i) for i in range(n)]
    captions = generate(model_dir, [(image, CAPTION_PROMPT) for _, image in samples], max_new_tokens=48)
    right: dict[str, list[bool]] = {}
    for caption, (scene, _) in zip(captions, samples, strict=True):
        for attribute, marks in world3_caption_right(caption, scene).items():
            right.setdefault(attribute, []).extend(marks)
    return {k: sum(v) / len(v) for k, v in right.items()}


def world3_qa_accuracy(model_dir: str, domain: str, n: int, seed: int) -> dict[str, float]:
    """A model's greedy answers to every question of `n` world-3 images, scored as the evaluate stage scores them;
    accuracy per category."""
    items, asked = [], []
    for i in range(n):
        scene, image = world3.sample(domain, seed, i)
        for category, question, answer in world3.questions(scene, seed, i):
            items.append((image, question))
            asked.append((category, answer))
    got = generate(model_dir, items, max_new_tokens=12)
    right: dict[str, list[bool]] = {}
    for prediction, (category, answer) in zip(got, asked, strict=True):
        right.setdefault(category, []).append(is_correct(prediction, answer))
    return {k: sum(v) / len(v) for k, v in right.items()}
