"""The tiny model zoo of the embedded default: built offline, pretrained on the synthetic world, cached.

- teacher: the larger tiny model, pretrained on captions of the `wide` domain (textures, all colours, sizes),
  like a 72B model that has seen more of the world; never on target-domain QA.
- base: the QA generator's and the target's starting point, pretrained on the `general` domain only
  (captions, answering questions, asking and answering questions), plus text-only sentences in the words of the
  whole world (the target's colours, sizes and backgrounds included) with a blank image: like a production base,
  it knows a domain's words from text without knowing its look.
Pretraining runs on the shared train loop (Ray Train + DeepSpeed) from a fixed seed, but it is not bit-reproducible
(not even twice on one machine), so the project ships the zoo it measured (`leaml_ray/zoo_shipped/`, 6.4 MB of
safetensors with the recipe's hash in `zoo.json`): every machine then starts from the same models.
When the recipe in code changes, the shipped zoo no longer matches and `zoo:` models are pretrained into
~/.cache/leaml-ray/zoo/<hash of the recipe> instead (once); `make zoo` rebuilds from scratch and re-ships.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from leaml_ray import CACHE, storage
from leaml_ray.config import stable_hash
from leaml_ray.data import synthetic
from leaml_ray.formats import CAPTION_PROMPT, QA_GEN_PROMPT, qa_target

log = logging.getLogger("leaml_ray")
ZOO_VERSION = 2  # 2: the base's text-only vocabulary sentences
ROLE_FOLDERS = {"teacher": "teacher", "generator": "base", "target": "base"}
PRETRAIN_SEED = 1000  # the zoo never sees images of the seeds runs use for their data
SHIPPED = Path(__file__).resolve().parent / "zoo_shipped"
TEXT_PROMPT = "Write a sentence about shapes."


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


def pretrain_rows(batch: dict, recipe: Recipe, seed: int) -> pa.Table:
    """Training rows for a batch of sample indices: caption, text-only, answer, or ask-and-answer examples."""
    rows = []
    for index in batch["id"].tolist():
        scene, image = synthetic.sample(recipe.domain, seed, index, recipe.image_size)
        rng = np.random.default_rng([seed, index, 11])
        draw = rng.random()
        seen = recipe.caption_share + recipe.text_share
        if draw < recipe.caption_share:
            instruction, response = CAPTION_PROMPT, synthetic.caption(scene)
        elif draw < seen:
            image = synthetic.blank(recipe.image_size)
            instruction, response = TEXT_PROMPT, synthetic.vocabulary_sentence(seed, index)
        else:
            qas = synthetic.questions(scene, seed, index)
            _, question, answer = qas[int(rng.integers(len(qas)))]
            if draw < seen + (1 - seen) * 0.6:
                instruction, response = question, answer
            else:
                instruction, response = QA_GEN_PROMPT, qa_target(question, answer)
        rows.append({"image": synthetic.png_bytes(image), "instruction": instruction, "response": response})
    return pa.Table.from_pylist(rows)


def recipe_key() -> str:
    """The hash of the zoo recipe in code: names the cache folder and is recorded beside the shipped zoo."""
    return stable_hash({"version": ZOO_VERSION, "recipes": {k: asdict(v) for k, v in RECIPES.items()}})


def zoo_dir() -> Path:
    """The cache folder a zoo built on this machine from the recipe in code goes to."""
    return CACHE / "zoo" / recipe_key()


def shipped_key() -> str | None:
    """The recipe hash the shipped zoo was built from (None when the package has no shipped zoo)."""
    path = SHIPPED / "zoo.json"
    return json.loads(path.read_text())["recipe_key"] if path.exists() else None


def pretrain(name: str, recipe: Recipe, out: Path, num_workers: int = 2) -> dict:
    """Pretrain one zoo model from a random init through the shared train loop."""
    # here, not at the top: looking the zoo up (`resolve`, every CLI) must not import torch, Ray Train, DeepSpeed
    import ray.data

    from leaml_ray.models.tiny import build_random
    from leaml_ray.placement import TrainPlacement
    from leaml_ray.train.core import TrainJob
    from leaml_ray.train.loop import run_training

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


def build(root: Path) -> None:
    """Pretrain every zoo model missing from `root` (needs Ray)."""
    for name, recipe in RECIPES.items():
        if (root / name / "config.json").exists():
            continue
        log.info("zoo: pretraining the tiny %s (%d samples of the %s domain)", name, recipe.samples, recipe.domain)
        result = pretrain(name, recipe, root / name)
        storage.write_json_atomic(str(root / f"{name}.train.json"), result["history"])
        log.info("zoo: %s done, final loss %.3f", name, result["history"][-1]["loss"])


class ZooMissing(FileNotFoundError):
    """The tiny zoo of the code's recipe is not built (one line for the user)."""


def zoo_root() -> Path:
    """Where the zoo of the code's recipe lives: the shipped folders when they were built from it, else this
    machine's cache."""
    return SHIPPED if shipped_key() == recipe_key() else zoo_dir()


def ensure_zoo() -> dict[str, str]:
    """Local folders of the zoo models by role, pretraining on this machine what the code's recipe lacks (needs
    Ray; `python -m leaml_ray.zoo build`). Stages only look the zoo up (`resolve`)."""
    root, shipped = zoo_root(), shipped_key()
    if root != SHIPPED and shipped is not None and not (root / "base" / "config.json").exists():
        log.warning(
            "zoo: the shipped zoo was built from recipe %s, the code's recipe is %s: pretraining it on this machine "
            "(numbers will differ from the README's; `make zoo` rebuilds and re-ships)",
            shipped,
            recipe_key(),
        )
    build(root)
    return {role: str(root / folder) for role, folder in ROLE_FOLDERS.items()}


def ship(root: Path) -> None:
    """Replace the shipped zoo with the one built in `root` (copied beside it, then renamed into place)."""
    staging = SHIPPED.with_name(SHIPPED.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(root, staging)
    record = {"recipe_key": recipe_key(), "version": ZOO_VERSION, "recipes": {k: asdict(v) for k, v in RECIPES.items()}}
    storage.write_json_atomic(str(staging / "zoo.json"), record)
    shutil.rmtree(SHIPPED, ignore_errors=True)
    staging.rename(SHIPPED)


def resolve(name_or_path: str) -> str:
    """A model reference as a local folder or hub id; `zoo:<role>` looks the tiny zoo up and never trains: a zoo
    missing for the code's recipe is one line telling how to build it."""
    if name_or_path.startswith("zoo:"):
        role = name_or_path.split(":", 1)[1]
        if role not in ROLE_FOLDERS:
            raise ValueError(f"unknown zoo model {name_or_path!r}; available: zoo:{', zoo:'.join(ROLE_FOLDERS)}")
        root = zoo_root()
        if not all((root / name / "config.json").exists() for name in RECIPES):
            raise ZooMissing(
                f"zoo: no tiny zoo for recipe {recipe_key()} (the shipped one is {shipped_key()}): build it with "
                "`python -m leaml_ray.zoo build` (~8 min on 2 cores; `make zoo` also re-ships it)"
            )
        return str(root / ROLE_FOLDERS[role])
    return os.path.expanduser(name_or_path)


def main() -> None:
    """`python -m leaml_ray.zoo build [--ship]`: pretrain the zoo from scratch on this machine."""
    from leaml_ray.config import ClusterSection
    from leaml_ray.runtime import connect, setup_logging

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--ship", action="store_true", help="then replace the shipped zoo in the package with it")
    args = parser.parse_args()
    setup_logging()
    root = zoo_dir()
    shutil.rmtree(root, ignore_errors=True)  # from scratch, not from an earlier build
    connect(ClusterSection())
    build(root)
    if args.ship:
        ship(root)
    print(SHIPPED if args.ship else root)


if __name__ == "__main__":
    main()
