"""World 3's measured properties (docs/world3.md), before any method runs in it: sizes, labeled images and pairs per
label ratio, the two image-blind references per ratio (`scoring.prior_baselines`: chance and blind), means over the
test seeds; and, given the world-3 zoo (`python -m leaml_ray.zoo build --world 3`), its models: the teacher's
caption accuracy per attribute, each model's zero-shot accuracy per category (greedy, scored as the evaluate stage
scores), parameter counts. Models are measured on scope images of validation seed 100, never on test images.

Splits as docs/world3.md fixes them: 4,800 train images, 300 test images of their own; at a ratio, a seeded
permutation of the train images picks the labeled ones. (The pipeline's synthetic source will draw them the same
way once world 3 is wired in; this file's figures are then re-measured through it.)

    python bench/world.py [--seeds 3] [--zoo DIR] [--images 100]   # prints the JSON, writes bench/results/world.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leaml_ray.data import world3  # noqa: E402
from leaml_ray.models import quality  # noqa: E402
from leaml_ray.scoring import prior_baselines  # noqa: E402

TRAIN, TEST = 4800, 300
TEST_OFFSET = 1_000_000  # test images are other indices of the domain: no test image is a train image
RATIOS = (0.01, 0.05, 0.1)
VALIDATION_SEED = 100  # docs/world3.md: validation seeds 100-102, test seeds 0-2
OUT = Path(__file__).resolve().parent / "results" / "world.json"


def rows(seed: int, indices: range | list[int]) -> list[dict]:
    """{image, category, question, answer} for every question of the given scope images."""
    out = []
    for index in indices:
        scene = world3.make_scene("scope", seed, index)
        for category, question, answer in world3.questions(scene, seed, index):
            out.append({"image": index, "category": category, "question": question, "answer": answer})
    return out


def measure(seeds: int) -> dict:
    """The world's data-only properties, means over `seeds` test seeds (0, 1, ...)."""
    per_ratio: dict[float, dict[str, list[float]]] = {r: {"chance": [], "blind": [], "pairs": []} for r in RATIOS}
    test_questions = []
    for seed in range(seeds):
        train = rows(seed, range(TRAIN))
        test = rows(seed, range(TEST_OFFSET, TEST_OFFSET + TEST))
        test_questions.append(len(test))
        order = np.random.default_rng([seed, 7]).permutation(TRAIN)
        for ratio in RATIOS:
            chosen = set(order[: round(ratio * TRAIN)].tolist())
            labeled = [r for r in train if r["image"] in chosen]
            got = prior_baselines(labeled, test)
            per_ratio[ratio]["chance"].append(got["chance"]["accuracy"])
            per_ratio[ratio]["blind"].append(got["blind"]["accuracy"])
            per_ratio[ratio]["pairs"].append(len(labeled))
    mean = lambda v: round(statistics.fmean(v), 4)  # noqa: E731
    return {
        "world": 3,
        "train_images": TRAIN,
        "test_questions": int(statistics.fmean(test_questions)),
        "categories": len(world3.DOMAINS["scope"].categories),
        "category_names": list(world3.DOMAINS["scope"].categories),
        "labeled": {f"{r:g}": {"images": round(r * TRAIN), "pairs": mean(per_ratio[r]["pairs"])} for r in RATIOS},
        "chance": {f"{r:g}": mean(per_ratio[r]["chance"]) for r in RATIOS},
        "blind": {f"{r:g}": mean(per_ratio[r]["blind"]) for r in RATIOS},
        "seeds": seeds,
    }


def params(folder: Path) -> int:
    """Parameters of a saved model (the elements of its safetensors)."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "np") as f:
            total += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    return total


def measure_models(zoo: Path, images: int) -> dict:
    """The zoo's figures on `images` scope images of the validation seed."""
    r4 = lambda d: {k: round(v, 4) for k, v in d.items()}  # noqa: E731
    caption = quality.world3_caption_accuracy(str(zoo / "teacher"), "scope", images, VALIDATION_SEED)
    out = {
        "teacher_caption_accuracy": round(statistics.fmean(caption.values()), 4),
        "teacher_caption_accuracy_per_attribute": r4(caption),
        "teacher_caption_accuracy_wide": r4(
            quality.world3_caption_accuracy(str(zoo / "teacher"), "wide", images, VALIDATION_SEED)
        ),
    }
    for role in ("teacher", "generator", "target"):
        out[f"{role}_zero_shot"] = r4(quality.world3_qa_accuracy(str(zoo / role), "scope", images, VALIDATION_SEED))
    out["params"] = {role: params(zoo / role) for role in ("teacher", "generator", "target")}
    out["model_images"] = images
    out["zoo_recipe_key"] = zoo.name  # a zoo folder is named by its recipe's hash (models/zoo.py zoo_dir)
    return out


def main() -> None:
    """Measure, print, write bench/results/world.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--zoo", type=Path, help="the world-3 zoo's folder (default: the model figures are pending)")
    parser.add_argument("--images", type=int, default=100, help="validation images the models are measured on")
    args = parser.parse_args()
    result = measure(args.seeds)
    if args.zoo:
        result.update(measure_models(args.zoo, args.images))
    else:
        result["pending"] = ["teacher_caption_accuracy", "teacher_zero_shot", "target_zero_shot", "params"]
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
