"""Build (or reuse) the tiny zoo and measure it on held-out synthetic images.

Prints the build time and, as the last line, {"teacher_general", "teacher_target", "target_base_general",
"target_base_target"}: the teacher's captions naming every shape and colour at its position, and the target
base model's exact-match QA accuracy, on the general and the target domains.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402

from leaml_ray.models import quality, zoo  # noqa: E402


def main(n: int = 200) -> None:
    ray.init(
        address="local", include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="lr-zoo-"), log_to_driver=False
    )
    t0 = time.perf_counter()
    cached = (zoo.zoo_dir() / "base" / "config.json").exists()
    paths = zoo.ensure_zoo()
    print(f"zoo at {zoo.zoo_dir()}: {'cached' if cached else f'built in {time.perf_counter() - t0:.0f} s'}")
    ray.shutdown()
    torch.set_num_threads(2)
    figures = {
        "teacher_general": quality.caption_score(paths["teacher"], "general", n),
        "teacher_target": quality.caption_score(paths["teacher"], "target", n),
        "target_base_general": quality.qa_score(paths["target"], "general", n),
        "target_base_target": quality.qa_score(paths["target"], "target", n),
    }
    for k, v in figures.items():
        print(f"{k:>22}: {v:.3f}")
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
