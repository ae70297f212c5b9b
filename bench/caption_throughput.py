"""Captioning throughput: the generation engine (ray.data.llm + vLLM) vs transformers `generate`, same teacher.

One run measures, side by side on fresh synthetic target-domain images with the tiny zoo teacher:
  - each in-job engine (ray.data.llm processor; actor pool owning vllm.LLM) over N images end to end, and over a
    small warm-up set (mostly engine start-up); steady state is (N - n_small) / (T_N - T_small);
  - a plain sequential `generate` loop (one image at a time) and a batched one (batch 16), one thread each.
Last line: {"engine_images_per_s", "naive_images_per_s", "ratio", "batched_images_per_s", "ratio_vs_batched",
"engine_startup_s", "end_to_end_ratio"}, and the same figures for the actor_pool engine (`teacher.engine`).

At 0.8 M parameters per-step overheads dominate both sides, which says little about the sizes users run, so the same
run also measures a random-init Qwen2.5-VL-architecture model of ~29 M parameters (built from a config, no download;
`--large-images`, 64 new tokens; `--only-large`: just these): the ray.data.llm engine's steady state at its best
max_num_seqs (64 or 128) vs a sequential loop and vs the best batched `generate` over batch sizes 8-128 ->
"large_model_params", "large_engine_images_per_s", "large_engine_best_seqs", "ratio_large",
"large_batched_images_per_s", "large_best_batch", "ratio_batched_large".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import ray.data  # noqa: E402
import torch  # noqa: E402

from leaml_ray.data import synthetic  # noqa: E402
from leaml_ray.formats import CAPTION_PROMPT  # noqa: E402
from leaml_ray.inference.generate import generate  # noqa: E402
from leaml_ray.models import chat, quality  # noqa: E402
from leaml_ray.models.registry import model_source  # noqa: E402
from leaml_ray.models.spec import Engine, ModelSpec  # noqa: E402
from leaml_ray.models.tiny import build_random  # noqa: E402
from leaml_ray.runtime import local_ray_env  # noqa: E402

MAX_TOKENS = 32
LARGE_TOKENS = 64
BATCHES = (8, 16, 32, 64, 128)  # batched generate's batch sizes for the large model; the best is taken
SEQS = (64, 128)  # the engine's max_num_seqs (and Ray Data batch) for the large model; the best is taken


def rows(start: int, n: int) -> list[dict]:
    out = []
    for k in range(start, start + n):
        _, image = synthetic.sample("target", 77, k, 56)
        out.append({"image_id": f"b{k}", "image": synthetic.png_bytes(image), "instruction": CAPTION_PROMPT})
    return out


def bench_engine(path: str, backend: str, seqs: int) -> Engine:
    """One CPU engine replica on a model folder, `seqs` sequences per batch."""
    spec = ModelSpec("teacher", path, False, "auto", 256 * 28 * 28, None)
    return Engine(spec, 256, 1, 1, 0, "cpu", backend, 1, 1.0, seqs, seqs, None, None)


def engine_seconds(path: str, items: list[dict], backend: str, tokens: int = MAX_TOKENS, seqs: int = 64) -> float:
    t0 = time.perf_counter()
    # min_tokens = max_tokens: every image costs the same number of tokens on both sides
    sampling = {"temperature": 0.0, "max_tokens": tokens, "min_tokens": tokens}
    out = generate(ray.data.from_items(items), bench_engine(path, backend, seqs), sampling).take_all()
    assert len(out) == len(items)
    return time.perf_counter() - t0


def steady_state(
    path: str, small: int, full: int, backend: str, tokens: int = MAX_TOKENS, seqs: int = 64
) -> tuple[float, ...]:
    """(images/s from the end of a small run to the end of a full one, start-up seconds, full run's seconds)."""
    t_small = engine_seconds(path, rows(0, small), backend, tokens, seqs)
    t_full = engine_seconds(path, rows(10_000, full), backend, tokens, seqs)
    steady = (full - small) / max(1e-9, t_full - t_small)
    name = f"{backend} ({Path(path).name}, {seqs} sequences)"
    print(f"{name}: {small} images in {t_small:.1f} s, {full} in {t_full:.1f} s", flush=True)
    return steady, max(0.0, t_small - small / steady), t_full


def hf_images_per_s(path: str, items: list[dict], batch_size: int, tokens: int = MAX_TOKENS) -> float:
    pairs = [(chat.open_image(r["image"]), r["instruction"]) for r in items]
    quality.generate(path, pairs[:batch_size], tokens, batch_size=batch_size)  # warm-up
    t0 = time.perf_counter()
    quality.generate(path, pairs, tokens, batch_size=batch_size, min_new_tokens=tokens)
    return len(pairs) / (time.perf_counter() - t0)


def parameters(path: str) -> int:
    """Parameters of a model folder (from its safetensors header)."""
    import math

    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--small", type=int, default=32)
    parser.add_argument("--naive", type=int, default=48, help="images for the sequential loop")
    parser.add_argument("--large-images", type=int, default=1024, help="images for the ~29 M-parameter model")
    parser.add_argument("--only-large", action="store_true", help="only the ~29 M-parameter model's figures")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per side: stable ratios on a shared 2-core box
    torch.set_num_threads(1)
    local_ray_env()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="lr-bench-"),
        log_to_driver=False,
    )
    path = model_source("zoo:teacher")
    large = str(build_random(Path(tempfile.mkdtemp(prefix="lr-large-")) / "large", size="bench-29m", seed=0))
    backends = () if args.only_large else ("ray_data_llm", "actor_pool")
    engines = {backend: steady_state(path, args.small, args.images, backend) for backend in backends}
    # the engine's batch (max_num_seqs) is swept like generate's: the same tuning budget on both sides
    by_seqs = {n: steady_state(large, args.small, args.large_images, "ray_data_llm", LARGE_TOKENS, n) for n in SEQS}
    seqs = max(by_seqs, key=lambda n: by_seqs[n][0])
    large_steady, large_startup, _ = by_seqs[seqs]
    ray.shutdown()
    large_naive = hf_images_per_s(large, rows(20_000, 16), batch_size=1, tokens=LARGE_TOKENS)
    sweep = {b: hf_images_per_s(large, rows(30_000, 2 * b), batch_size=b, tokens=LARGE_TOKENS) for b in BATCHES}
    best = max(sweep, key=sweep.get)
    print("large model, batched generate images/s by batch size:", {b: round(v, 2) for b, v in sweep.items()})
    result = {
        "large_model_params": parameters(large),
        "large_engine_images_per_s": round(large_steady, 2),
        "large_engine_startup_s": round(large_startup, 1),
        "large_engine_best_seqs": seqs,
        "large_naive_images_per_s": round(large_naive, 2),
        "ratio_large": round(large_steady / large_naive, 2),
        "large_batched_images_per_s": round(sweep[best], 2),
        "large_best_batch": best,
        "ratio_batched_large": round(large_steady / sweep[best], 2),
    }
    if args.only_large:
        print(json.dumps(result))
        return
    steady, startup, t_full = engines["ray_data_llm"]
    pool, pool_startup, pool_full = engines["actor_pool"]
    naive = hf_images_per_s(path, rows(20_000, args.naive), batch_size=1)
    batched = hf_images_per_s(path, rows(30_000, 256), batch_size=16)
    result = {
        "engine_images_per_s": round(steady, 2),
        "naive_images_per_s": round(naive, 2),
        "ratio": round(steady / naive, 2),
        "batched_images_per_s": round(batched, 2),
        "ratio_vs_batched": round(steady / batched, 2),
        "engine_startup_s": round(startup, 1),
        "engine_end_to_end_images_per_s": round(args.images / t_full, 2),
        "end_to_end_ratio": round(args.images / t_full / naive, 2),
        "actor_pool_images_per_s": round(pool, 2),
        "actor_pool_ratio": round(pool / naive, 2),
        "actor_pool_ratio_vs_batched": round(pool / batched, 2),
        "actor_pool_startup_s": round(pool_startup, 1),
        "actor_pool_end_to_end_ratio": round(args.images / pool_full / naive, 2),
        "images": args.images,
        **result,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
