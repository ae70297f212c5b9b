"""How good a tiny zoo model is on the synthetic world: caption naming and QA accuracy (greedy, transformers)."""

from __future__ import annotations

import torch

from leaml_ray.data import synthetic
from leaml_ray.formats import CAPTION_PROMPT
from leaml_ray.models import chat
from leaml_ray.models.registry import ModelSpec, load_model, load_processor


def generate(
    model_dir: str, items: list[tuple], max_new_tokens: int, batch_size: int = 32, min_new_tokens: int = 0
) -> list[str]:
    """Greedy answers for (image, instruction) pairs, batched with left padding."""
    spec = ModelSpec("eval", model_dir, dtype="float32")
    model, processor = load_model(spec, model_dir).eval(), load_processor(spec, model_dir)
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
