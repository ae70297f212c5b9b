"""Caption stage scaling: the stage over N and 2N unlabeled images, same run config otherwise.

Runs prepare + caption for both sizes in one process (one Ray instance), reports the caption stage's seconds,
the ratio T(2N)/T(N) (at most 2 when the engine scales linearly plus a constant), the fitted slope (seconds per
extra image) and the driver's peak RSS after each size (flat in the number of images).
Last line: {"time_ratio_2x", "seconds_per_image", "constant_s", "driver_peak_mib_n", "driver_peak_mib_2n"}.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leaml_ray.config import load_config  # noqa: E402
from leaml_ray.pipeline import run_pipeline  # noqa: E402
from leaml_ray.runtime import connect  # noqa: E402
from leaml_ray.stages import CAPTION, PREPARE  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def caption_seconds(root: str, n: int) -> float:
    # every image unlabeled except the minimum the split needs: the stage captions ~n images
    cfg = load_config(
        None,
        [
            f"run.dir={root}/n{n}",
            f"data.num_images={n}",
            "data.label_ratio=0.02",
            "data.test_ratio=0.05",
            "teacher.caption_labeled=false",
        ],
    )
    connect(cfg.cluster)
    t0 = time.perf_counter()
    results = {r.name: r for r in run_pipeline(cfg, [PREPARE, CAPTION])}
    assert results["caption"].action == "ran"
    return results["caption"].seconds, results["caption"].counts["captioned"], time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        caption_seconds(root, 64)  # warm caches (imports, DeepSpeed-free; the engine's first load)
        t1, c1, _ = caption_seconds(root, args.images)
        peak1 = peak_mib()
        t2, c2, _ = caption_seconds(root, 2 * args.images)
        peak2 = peak_mib()
    slope = (t2 - t1) / max(1, c2 - c1)
    result = {
        "time_ratio_2x": round(t2 / t1, 3),
        "seconds_per_image": round(slope, 5),
        "constant_s": round(t1 - slope * c1, 1),
        "captioned": [c1, c2],
        "seconds": [round(t1, 1), round(t2, 1)],
        "driver_peak_mib_n": round(peak1),
        "driver_peak_mib_2n": round(peak2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
