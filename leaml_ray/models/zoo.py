"""The tiny model zoo of the embedded default: built offline, pretrained on the synthetic world, cached.

- teacher: the larger tiny model, pretrained on captions of the `wide` domain (textures, all colours, sizes),
  like a 72B model that has seen more of the world; never on target-domain QA.
- base: the QA generator's and the target's starting point, pretrained on the `general` domain only
  (captions, answering questions, asking and answering questions).
Pretraining runs on the shared train loop (Ray Train + DeepSpeed), is deterministic from its seed, and is cached
under ~/.cache/leaml-ray/zoo/<hash of the recipe>, so the demo builds it once.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data

from leaml_ray import storage
from leaml_ray.config import stable_hash
from leaml_ray.data import synthetic
from leaml_ray.models import chat
from leaml_ray.models.registry import CAPTION_PROMPT, QA_GEN_PROMPT
from leaml_ray.models.tiny import build_random
from leaml_ray.placement import TrainPlacement
from leaml_ray.train.core import CACHE, TrainJob
from leaml_ray.train.loop import run_training

log = logging.getLogger("leaml_ray")
ZOO_VERSION = 1
ROLE_FOLDERS = {"teacher": "teacher", "generator": "base", "target": "base"}
PRETRAIN_SEED = 1000  # the zoo never sees images of the seeds runs use for their data


@dataclass(frozen=True)
class Recipe:
    """How one zoo model is pretrained (its hash names the cache folder)."""

    size: str
    domain: str
    samples: int  # training samples seen (epochs over a pool of `images` rendered once)
    images: int
    caption_share: float  # the rest: answering and asking questions
    lr: float = 1e-3
    batch_size: int = 16
    image_size: int = 56


RECIPES = {
    "teacher": Recipe(size="teacher", domain="wide", samples=36_000, images=8_000, caption_share=1.0),
    "base": Recipe(size="base", domain="general", samples=48_000, images=8_000, caption_share=0.4),
}


def pretrain_rows(batch: dict, recipe: Recipe, seed: int) -> pa.Table:
    """Training rows for a batch of sample indices: caption, answer, or ask-and-answer examples."""
    rows = []
    for index in batch["id"].tolist():
        scene, image = synthetic.sample(recipe.domain, seed, index, recipe.image_size)
        rng = np.random.default_rng([seed, index, 11])
        draw = rng.random()
        if draw < recipe.caption_share:
            instruction, response = CAPTION_PROMPT, synthetic.caption(scene)
        else:
            qas = synthetic.questions(scene, seed, index)
            _, question, answer = qas[int(rng.integers(len(qas)))]
            if draw < recipe.caption_share + (1 - recipe.caption_share) * 0.6:
                instruction, response = question, answer
            else:
                instruction, response = QA_GEN_PROMPT, chat.qa_target(question, answer)
        rows.append({"image": synthetic.png_bytes(image), "instruction": instruction, "response": response})
    return pa.Table.from_pylist(rows)


def zoo_dir() -> Path:
    key = stable_hash({"version": ZOO_VERSION, "recipes": {k: asdict(v) for k, v in RECIPES.items()}})
    return CACHE / "zoo" / key


def pretrain(name: str, recipe: Recipe, out: Path, num_workers: int = 2) -> dict:
    """Pretrain one zoo model from a random init through the shared train loop."""
    with tempfile.TemporaryDirectory() as tmp:
        init = build_random(Path(tmp) / "init", recipe.size, seed=PRETRAIN_SEED)
        # rendered once and kept in the object store: epochs then cost no image work
        data = (
            ray.data.range(recipe.images)
            .map_batches(
                pretrain_rows,
                batch_size=256,
                batch_format="numpy",
                num_cpus=0.25,
                fn_kwargs={"recipe": recipe, "seed": PRETRAIN_SEED},
            )
            .materialize()
        )
        job = TrainJob(
            model_path=str(init),
            output=str(out),
            num_rows=recipe.images,
            epochs=recipe.samples / recipe.images,
            lr=recipe.lr,
            batch_size=recipe.batch_size,
            warmup_ratio=0.07,
            checkpoint_every=10**6,
            seed=PRETRAIN_SEED,
        )
        return run_training(
            job,
            data,
            f"zoo-{name}",
            str(Path(tmp) / "ckpt"),
            # fractional CPUs: the data tasks need CPUs too
            TrainPlacement(workers=num_workers, cpus_per_worker=0.5),
            max_failures=1,
        )


def ensure_zoo() -> dict[str, str]:
    """Local folders of the zoo models by role, pretraining whatever is not cached yet (needs Ray)."""
    root = zoo_dir()
    for name, recipe in RECIPES.items():
        if (root / name / "config.json").exists():
            continue
        log.info("zoo: pretraining the tiny %s (%d samples of the %s domain)", name, recipe.samples, recipe.domain)
        result = pretrain(name, recipe, root / name)
        storage.write_json_atomic(str(root / f"{name}.train.json"), result["history"])
        log.info("zoo: %s done, final loss %.3f", name, result["history"][-1]["loss"])
    return {role: str(root / folder) for role, folder in ROLE_FOLDERS.items()}


def resolve(name_or_path: str) -> str:
    """A model reference as a local folder or hub id: `zoo:<role>` builds or reuses the tiny zoo."""
    if name_or_path.startswith("zoo:"):
        role = name_or_path.split(":", 1)[1]
        if role not in ROLE_FOLDERS:
            raise ValueError(f"unknown zoo model {name_or_path!r}; available: zoo:{', zoo:'.join(ROLE_FOLDERS)}")
        return ensure_zoo()[role]
    return os.path.expanduser(name_or_path)
