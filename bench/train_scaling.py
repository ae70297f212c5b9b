"""Training scaling of the shared loop (Ray Train + DeepSpeed, CPU workers with one thread each), in one run:

- two_vs_one: steady-state samples/s (from the end of the first optimizer step: the data pipeline's start-up and
  first batch excluded) with 2 workers vs 1 (plain objective, ZeRO-2); two_vs_one_end_to_end includes them;
- masked_vs_plain: seconds per step of the selective-distillation step with its gradient masks vs the same
  two-pass step without masks (>1 means the masked step is slower);
- scoring_vs_epoch: the neuron-scoring pass vs one epoch of training over the labeled rows it scores;
- zero3_peak_mib / zero2_peak_mib: peak RSS per worker for a larger tiny model (hidden 1024, 8 layers, ~150 M
  parameters), same data and steps; zero*_init_peak_mib: the same peak right after deepspeed.initialize
  (`--only-zero`: just these; `--only-scaling`: all but these);
- data_share: the share of the steady window rank 0 waited for its next batch (Ray Data shard + encoding).
Last line: {"two_vs_one", "masked_vs_plain", "scoring_vs_epoch", "zero3_peak_mib", "zero2_peak_mib"}.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import ray.data  # noqa: E402

from leaml_ray.data import synthetic  # noqa: E402
from leaml_ray.formats import CAPTION_PROMPT, QA_GEN_PROMPT, qa_target  # noqa: E402
from leaml_ray.models import tiny  # noqa: E402
from leaml_ray.models.spec import ModelSpec  # noqa: E402

# noqa: E402
from leaml_ray.runtime import local_ray_env  # noqa: E402
from leaml_ray.train.core import Objective  # noqa: E402
from leaml_ray.train.job import TrainJob, TrainRun  # noqa: E402
from leaml_ray.train.loop import run_training  # noqa: E402
from leaml_ray.train.neurons import NeuronDistillation  # noqa: E402


class UnmaskedDistillation(NeuronDistillation):
    """The same two backward passes, without the gradient masks (the reference for the masks' cost)."""

    def _install_hooks(self, model, layers) -> None:
        pass


def rows(n: int) -> list[dict]:
    """Caption rows (image, instruction, response: the generator's train rows) with a labeled QA pair each
    (qa_image, qa_response: the generator's labeled table)."""
    out = []
    for k in range(n):
        scene, image = synthetic.sample("general", 5, k, 56)
        cap_scene, cap_image = synthetic.sample("target", 5, 50_000 + k, 56)
        _, q, a = synthetic.questions(scene, 5, k)[0]
        out.append(
            {
                "image": synthetic.png_bytes(cap_image),
                "instruction": CAPTION_PROMPT,
                "response": synthetic.caption(cap_scene),
                "qa_image": synthetic.png_bytes(image),
                "qa_response": qa_target(q, a),
            }
        )
    return out


def train(model: str, data: list[dict], tmp: str, name: str, workers: int, objective=None, zero=2, cols=None):
    keep = cols or list(data[0])
    ds = ray.data.from_items([{k: r[k] for k in keep} for r in data])
    labeled = ray.data.from_items(
        [{"image": r["qa_image"], "instruction": QA_GEN_PROMPT, "response": r["qa_response"]} for r in data]
    )
    job = TrainJob(
        spec=ModelSpec("train", model, False, "float32", 256 * 28 * 28, None),
        finetune="full",
        lora_r=0,
        lora_alpha=0,
        lr=1e-3,
        weight_decay=0.0,
        warmup_ratio=0.0,
        batch_size=16,
        grad_accum=1,
        zero_stage=zero,
        seed=0,
        device="cpu",
        workers=workers,
        gradient_checkpointing=False,
        attention="sdpa",
        cpus_per_worker=1.0,
        accelerator_type=None,
        max_failures=0,
        checkpoint_every=10**6,
    )
    run = TrainRun(num_rows=len(data), epochs=1.0, output=f"{tmp}/{name}", run_dir="")
    pairs = labeled if isinstance(objective, NeuronDistillation) else None
    result = run_training(job, run, ds, name, f"{tmp}/ckpt", objective, pairs)
    history = [r for r in result["history"] if "seconds" in r]
    first, last = history[0], history[-1]
    # steady state: from the end of the first optimizer step (data pipeline start-up and the first batch excluded)
    seconds = last["seconds"] - first["seconds"]
    steady = (last["step"] - first["step"]) * job.batch_size * workers / seconds
    data_share = (last["data_seconds"] - first["data_seconds"]) / seconds  # rank 0's wait for input batches
    return {**last, "steady_samples_per_s": steady, "data_share": data_share}


def zero_memory(data: list[dict], tmp: str, cols: list[str]) -> dict:
    """Peak RSS per worker under ZeRO-3 and ZeRO-2 for a larger tiny model (model states dominate)."""
    big = tiny.SIZES["base"]
    tiny.SIZES["bench"] = (1024, 8, 8, 4, 4096, big[5], big[6])  # ~150 M parameters
    large = str(tiny.build_random(Path(tmp) / "large", "bench", seed=0))
    z2 = train(large, data, tmp, "z2", 2, Objective(), zero=2, cols=cols)
    z3 = train(large, data, tmp, "z3", 2, Objective(), zero=3, cols=cols)
    return {
        "zero3_peak_mib": round(z3["peak_rss_mib"]),
        "zero2_peak_mib": round(z2["peak_rss_mib"]),
        # the peak before the first step: model load and deepspeed.initialize
        "zero3_init_peak_mib": round(z3["init_peak_rss_mib"]),
        "zero2_init_peak_mib": round(z2["init_peak_rss_mib"]),
    }


def scaling(data: list[dict], tmp: str, cols: list[str]) -> dict:
    """1 vs 2 workers, masked vs unmasked distillation step, scoring pass vs an epoch, on the tiny base model."""
    model = str(tiny.build_random(Path(tmp) / "base", "base", seed=0))
    one = train(model, data, tmp, "one", 1, Objective(), cols=cols)
    two = train(model, data, tmp, "two", 2, Objective(), cols=cols)
    distill = NeuronDistillation(
        score="gradient", ratio=0.1, caption_weight=1.0, score_batches=4, seed=0, scope="lm_mlp", caption_distill=True
    )
    masked = train(model, data, tmp, "masked", 2, distill)
    unmasked = train(model, data, tmp, "unmasked", 2, UnmaskedDistillation(score_batches=4))
    # the scoring pass covered 4 batches x 16 rows x 2 workers; one epoch over those rows at the plain rate
    epoch_seconds = 4 * 16 * 2 / two["steady_samples_per_s"]
    return {
        "two_vs_one": round(two["steady_samples_per_s"] / one["steady_samples_per_s"], 3),
        "two_vs_one_end_to_end": round(two["samples_per_s"] / one["samples_per_s"], 3),
        "masked_vs_plain": round(unmasked["steady_samples_per_s"] / masked["steady_samples_per_s"], 3),
        "scoring_vs_epoch": round(masked["scoring_seconds"] / epoch_seconds, 3),
        "samples_per_s": {
            "one": round(one["steady_samples_per_s"], 1),
            "two": round(two["steady_samples_per_s"], 1),
            "masked": round(masked["steady_samples_per_s"], 1),
            "unmasked": round(unmasked["steady_samples_per_s"], 1),
        },
        # share of the steady window rank 0 waited for input batches (Ray Data shard + encoding)
        "data_share": {"one": round(one["data_share"], 3), "two": round(two["data_share"], 3)},
        "scoring_seconds": round(masked["scoring_seconds"], 2),
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--only-zero", action="store_true", help="only the ZeRO-3 vs ZeRO-2 memory figures")
    parser.add_argument("--only-scaling", action="store_true", help="only the 1 vs 2 worker figures")
    args = parser.parse_args()
    local_ray_env()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="lr-bench-"),
    )
    data = rows(1024)  # 512 rows (15 steady steps at 2 workers) left the ratio within noise
    plain_cols = ["image", "instruction", "response"]
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.only_scaling:
            result.update(zero_memory(data[:64], tmp, plain_cols))
        if not args.only_zero:
            result.update(scaling(data, tmp, plain_cols))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
