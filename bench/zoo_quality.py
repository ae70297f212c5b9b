"""Measure the tiny zoo on held-out synthetic images: the shipped one and, with --rebuild, one pretrained from
scratch on this machine (side by side: pretraining is not bit-reproducible across machines).

Prints the build time and, as the last line, {"shipped": {...}, "rebuilt": {...}} with "teacher_general",
"teacher_target", "target_base_general", "target_base_target": the teacher's captions naming every shape and
colour at its position, and the target base model's exact-match QA accuracy, on the general and the target domains.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402

from leaml_ray import zoo  # noqa: E402
from leaml_ray.models import quality  # noqa: E402
from leaml_ray.models import zoo as lookup  # noqa: E402
from leaml_ray.runtime import local_ray_env  # noqa: E402


def measure(paths: dict[str, str], n: int) -> dict[str, float]:
    """The four quality figures of one zoo."""
    figures = {
        "teacher_general": quality.caption_score(paths["teacher"], "general", n),
        "teacher_target": quality.caption_score(paths["teacher"], "target", n),
        "target_base_general": quality.qa_score(paths["target"], "general", n),
        "target_base_target": quality.qa_score(paths["target"], "target", n),
    }
    return {k: round(v, 4) for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="also pretrain a zoo from scratch and measure it")
    parser.add_argument("-n", type=int, default=200, help="held-out images per domain")
    args = parser.parse_args()
    torch.set_num_threads(2)
    zoos = {}
    if lookup.shipped_key() == lookup.recipe_key():
        zoos["shipped"] = zoo.ensure_zoo()
    else:
        print(
            f"the shipped zoo ({lookup.shipped_key()}) is not the recipe in code ({lookup.recipe_key()}):"
            " run `make zoo`"
        )
    if args.rebuild or not zoos:
        local_ray_env()
        ray.init(
            address="local",
            include_dashboard=False,
            _temp_dir=tempfile.mkdtemp(prefix="lr-zoo-"),
            log_to_driver=False,
        )
        shutil.rmtree(lookup.zoo_dir(), ignore_errors=True)
        t0 = time.perf_counter()
        zoo.build(lookup.zoo_dir())
        print(f"rebuilt at {lookup.zoo_dir()} in {time.perf_counter() - t0:.0f} s")
        ray.shutdown()
        zoos["rebuilt"] = {role: str(lookup.zoo_dir() / folder) for role, folder in lookup.ROLE_FOLDERS.items()}
    results = {name: measure(paths, args.n) for name, paths in zoos.items()}
    for name, figures in results.items():
        for k, v in figures.items():
            print(f"{name:>8} {k:>22}: {v:.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
