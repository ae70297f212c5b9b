"""Pretraining the tiny model zoo of the embedded default: built offline on the synthetic world, cached (where it
lives and which recipe: `models/zoo.py`; this tool sits above the train loop it pretrains with).

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
import logging
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa

from leaml_ray import storage
from leaml_ray.data import synthetic, world3
from leaml_ray.formats import CAPTION_PROMPT, QA_GEN_PROMPT, qa_target
from leaml_ray.models import zoo as lookup
from leaml_ray.models.zoo import Recipe

log = logging.getLogger("leaml_ray")
PRETRAIN_SEED = 1000  # the zoo never sees images of the seeds runs use for their data
TEXT_PROMPT = "Write a sentence about shapes."


def _world(recipe: Recipe) -> tuple[ModuleType, str]:
    """The data module of a recipe's domain and the domain's name in it (`w3-general`: world3.py's `general`)."""
    if recipe.domain.startswith("w3-"):
        return world3, recipe.domain.removeprefix("w3-")
    return synthetic, recipe.domain


def pretrain_rows(batch: dict, recipe: Recipe, seed: int) -> pa.Table:
    """Training rows for a batch of sample indices: caption, text-only, answer, or ask-and-answer examples."""
    world, domain = _world(recipe)
    rows = []
    for index in batch["id"].tolist():
        scene, image = world.sample(domain, seed, index, recipe.image_size)
        rng = np.random.default_rng([seed, index, 11])
        draw = rng.random()
        seen = recipe.caption_share + recipe.text_share
        if draw < recipe.caption_share:
            instruction, response = CAPTION_PROMPT, world.caption(scene)
        elif draw < seen:
            image = synthetic.blank(recipe.image_size)
            instruction, response = TEXT_PROMPT, world.vocabulary_sentence(seed, index)
        else:
            qas = world.questions(scene, seed, index)
            _, question, answer = qas[int(rng.integers(len(qas)))]
            if draw < seen + (1 - seen) * 0.6:
                instruction, response = question, answer
            else:
                instruction, response = QA_GEN_PROMPT, qa_target(question, answer)
        rows.append({"image": synthetic.png_bytes(image), "instruction": instruction, "response": response})
    return pa.Table.from_pylist(rows)


def pretrain(name: str, recipe: Recipe, out: Path, num_workers: int = 2) -> dict:
    """Pretrain one zoo model from a random init through the shared train loop."""
    # here, not at the top: `python -m leaml_ray.zoo --help` and the zoo's lookups import no torch or Ray Train
    import ray.data

    from leaml_ray.models.spec import ModelSpec
    from leaml_ray.models.tiny import build_random
    from leaml_ray.train.job import TrainJob, TrainRun
    from leaml_ray.train.loop import run_training

    with tempfile.TemporaryDirectory() as tmp:
        world = 3 if _world(recipe)[0] is world3 else 2
        init = build_random(Path(tmp) / "init", recipe.size, seed=PRETRAIN_SEED, world=world)
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
            spec=ModelSpec(name, str(init), False, "float32", 256 * 28 * 28, None),
            finetune="full",
            lora_r=0,
            lora_alpha=0,
            lr=recipe.lr,
            weight_decay=0.0,
            warmup_ratio=0.07,
            batch_size=recipe.batch_size,
            grad_accum=1,
            zero_stage=2,
            seed=PRETRAIN_SEED,
            device="cpu",
            workers=num_workers,
            gradient_checkpointing=False,
            attention="sdpa",
            cpus_per_worker=0.5,  # fractional CPUs: the data tasks need CPUs too
            accelerator_type=None,
            max_failures=1,
            checkpoint_every=10**6,
        )
        run = TrainRun(num_rows=recipe.images, epochs=recipe.samples / recipe.images, output=str(out), run_dir="")
        return run_training(job, run, data, f"zoo-{name}", str(Path(tmp) / "ckpt"))


def build(root: Path, recipes: dict[str, Recipe] | None = None) -> None:
    """Pretrain every zoo model of `recipes` (the embedded default's unless told) missing from `root` (needs Ray)."""
    for name, recipe in (lookup.RECIPES if recipes is None else recipes).items():
        if (root / name / "config.json").exists():
            continue
        log.info("zoo: pretraining the tiny %s (%d samples of the %s domain)", name, recipe.samples, recipe.domain)
        result = pretrain(name, recipe, root / name)
        storage.write_json_atomic(str(root / f"{name}.train.json"), result["history"])
        log.info("zoo: %s done, final loss %.3f", name, result["history"][-1]["loss"])


def ensure_zoo() -> dict[str, str]:
    """Local folders of the zoo models by role, pretraining on this machine what the code's recipe lacks (needs
    Ray; `python -m leaml_ray.zoo build`). Stages only look the zoo up (`models.registry.model_source`)."""
    root, shipped = lookup.zoo_root(), lookup.shipped_key()
    if root != lookup.SHIPPED and shipped is not None and not (root / "base" / "config.json").exists():
        log.warning(
            "zoo: the shipped zoo was built from recipe %s, the code's recipe is %s: pretraining it on this machine "
            "(numbers will differ from the README's; `make zoo` rebuilds and re-ships)",
            shipped,
            lookup.recipe_key(),
        )
    build(root)
    return {role: str(root / folder) for role, folder in lookup.ROLE_FOLDERS.items()}


def ship(root: Path) -> None:
    """Replace the shipped zoo with the one built in `root` (copied beside it, then renamed into place)."""
    staging = lookup.SHIPPED.with_name(lookup.SHIPPED.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(root, staging)
    recipes = {k: asdict(v) for k, v in lookup.RECIPES.items()}
    record = {"recipe_key": lookup.recipe_key(), "version": lookup.ZOO_VERSION, "recipes": recipes}
    storage.write_json_atomic(str(staging / "zoo.json"), record)
    shutil.rmtree(lookup.SHIPPED, ignore_errors=True)
    staging.rename(lookup.SHIPPED)


def main() -> None:
    """`python -m leaml_ray.zoo build [--ship]`: pretrain the zoo from scratch on this machine."""
    from leaml_ray.config import ClusterSection
    from leaml_ray.runtime import connect, setup_logging

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--ship", action="store_true", help="then replace the shipped zoo in the package with it")
    parser.add_argument("--world", type=int, choices=[2, 3], default=2, help="3: world 3's zoo (not shipped yet)")
    args = parser.parse_args()
    if args.ship and args.world != 2:
        parser.error("--ship: only the embedded default's zoo (world 2) is shipped")
    setup_logging()
    recipes = lookup.WORLD3_RECIPES if args.world == 3 else lookup.RECIPES
    root = lookup.zoo_dir(recipes)
    shutil.rmtree(root, ignore_errors=True)  # from scratch, not from an earlier build
    connect(ClusterSection())
    build(root, recipes)
    if args.ship:
        ship(root)
    print(lookup.SHIPPED if args.ship else root)


if __name__ == "__main__":
    main()
