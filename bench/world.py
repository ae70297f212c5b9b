"""World 3's properties that need no model (docs/world3.md), measured before any method runs in it: sizes, labeled
images and pairs per label ratio, and the two image-blind references per ratio (`scoring.prior_baselines`: chance
and blind), means over the test seeds. The model properties (teacher caption accuracy, zero-shot per category,
parameter counts) join them once the world-3 zoo exists; until then they are listed under "pending".

Splits as docs/world3.md fixes them: 4,800 train images, 300 test images of their own; at a ratio, a seeded
permutation of the train images picks the labeled ones. (The pipeline's synthetic source will draw them the same
way once world 3 is wired in; this file's figures are then re-measured through it.)

    python bench/world.py [--seeds 3]   # prints the JSON, writes bench/results/world.json
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
from leaml_ray.scoring import prior_baselines  # noqa: E402

TRAIN, TEST = 4800, 300
TEST_OFFSET = 1_000_000  # test images are other indices of the domain: no test image is a train image
RATIOS = (0.01, 0.05, 0.1)
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
        "labeled": {f"{r:g}": {"images": round(r * TRAIN), "pairs": mean(per_ratio[r]["pairs"])} for r in RATIOS},
        "chance": {f"{r:g}": mean(per_ratio[r]["chance"]) for r in RATIOS},
        "blind": {f"{r:g}": mean(per_ratio[r]["blind"]) for r in RATIOS},
        "seeds": seeds,
        "pending": ["teacher_caption_accuracy", "teacher_zero_shot", "target_zero_shot", "params"],
    }


def main() -> None:
    """Measure, print, write bench/results/world.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    result = measure(args.seeds)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
