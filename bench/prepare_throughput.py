"""Prepare-stage throughput (images/s) and driver peak memory for 1k and 10k synthetic images.

Each size runs in a fresh process with its own local Ray instance, so peak RSS is that run's alone.
The last line is one JSON object: {"images_per_s_1k", "images_per_s_10k", "peak_rss_mib_1k",
"peak_rss_mib_10k", "memory_ratio_10k_vs_1k"}.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(n: int) -> None:
    import ray

    from leaml_ray.config import load_config
    from leaml_ray.pipeline import run_pipeline
    from leaml_ray.runtime import local_ray_env
    from leaml_ray.stages.prepare import PREPARE

    tmp = tempfile.mkdtemp(prefix="bench-prepare-")
    local_ray_env()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="lr-bench-"),
        log_to_driver=False,
    )
    cfg = load_config(None, [f"run.dir={tmp}/run", f"data.num_images={n}"])
    t0 = time.perf_counter()
    result = run_pipeline(cfg, [PREPARE])[0]
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": result.counts["images"], "seconds": seconds, "peak_rss_mib": peak}))
    ray.shutdown()


def main() -> None:
    runs = {}
    for n in (1000, 10000):
        proc = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True)
        runs[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = runs[n]
        print(
            f"{n:>6} images: {r['seconds']:.1f} s, {r['images'] / r['seconds']:.0f} images/s, "
            f"driver peak RSS {r['peak_rss_mib']:.0f} MiB"
        )
    out = {
        "images_per_s_1k": runs[1000]["images"] / runs[1000]["seconds"],
        "images_per_s_10k": runs[10000]["images"] / runs[10000]["seconds"],
        "peak_rss_mib_1k": runs[1000]["peak_rss_mib"],
        "peak_rss_mib_10k": runs[10000]["peak_rss_mib"],
        "memory_ratio_10k_vs_1k": runs[10000]["peak_rss_mib"] / runs[1000]["peak_rss_mib"],
    }
    print(json.dumps({k: round(v, 3) for k, v in out.items()}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
    else:
        main()
