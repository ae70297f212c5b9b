"""GPU smoke test of the training core, in one process without Ray (torch.distributed world size 1).

Ray's wheel cannot travel to the one-GPU check machine, so this exercises what runs inside a Ray Train worker:
`leaml_ray.train.core` (model + DeepSpeed engine + Objective) on a random-init Qwen2.5-VL-architecture model built
from a config (no download): bf16 on the GPU, ZeRO-2 and ZeRO-3 over NCCL, full and LoRA target finetune steps, and
the generator objective (neuron scoring, masks, the two-pass step) with a check that the caption gradient left every
unselected neuron bit-identical. Prints tokens/s, model FLOPs utilisation and peak memory per run; the last line is
one JSON object.

    python bench/gpu_smoke.py                  # a GPU if there is one: the ~1.3 B "smoke-1b" model
    python bench/gpu_smoke.py --device cpu     # the tiny model over gloo (CI runs this: tests/repo/test_gpu_smoke.py)

Needs torch, transformers, peft, deepspeed (+ its pure-Python deps), safetensors, tokenizers, pillow, numpy,
pydantic, pyyaml and torchvision (transformers' Qwen2-VL image/video processors import it); not ray, vllm or pyarrow.
On the GPU check machine (Python 3.12, torch 2.11 CUDA 13, transformers 5.17, peft, accelerate; no downloads, at most
64 MiB carried per call), build the rest as a wheelhouse here, then carry `.gpu-wheels` and run there, from the repo
root (torchvision from if-missing/ only where the machine has none):

    bash tools/gpu_wheelhouse.sh       # or `make gpu-wheelhouse`: .gpu-wheels/, ~19 MiB
    python -m pip install -q -U --no-index --no-deps --target /tmp/gpu-deps .gpu-wheels/*.whl $(python -c 'import torchvision' 2>/dev/null || echo .gpu-wheels/if-missing/*.whl) && PYTHONPATH=/tmp/gpu-deps python bench/gpu_smoke.py
"""  # noqa: E501 (the install + run line stays one line, to paste as it is)

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world(device: str) -> None:
    """A one-process torch.distributed group: nccl on the GPU, gloo on the CPU."""
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1"})
    os.environ["LOCAL_RANK"] = "0"
    if device == "gpu":
        torch.cuda.set_device(0)
    dist.init_process_group(backend="nccl" if device == "gpu" else "gloo")


def rows(n: int, image_size: int, seed: int = 0) -> list[dict]:
    """Synthetic images with a QA pair and a caption each (the generator's row layout)."""
    from leaml_ray.data import synthetic
    from leaml_ray.formats import qa_target

    out = []
    for i in range(n):
        scene, image = synthetic.sample("target", seed, i, image_size)
        _, question, answer = synthetic.questions(scene, seed, i)[0]
        out.append(
            {
                "image": synthetic.png_bytes(image),
                "instruction": question,
                "response": answer,
                "qa_response": qa_target(question, answer),
                "caption": synthetic.caption(scene),
            }
        )
    return out


def _batch(trainee, objective, data: list[dict], k: int, size: int, generator: bool) -> dict:
    """Micro batch k as the train loop's data path builds it (`encode_batch`): QA rows for a plain objective;
    for the generator, caption rows of other images (the generator stage's captions come from unlabeled images),
    to which its objective adds the scheduled labeled pairs."""
    from leaml_ray.formats import CAPTION_PROMPT
    from leaml_ray.train.core import encode_batch

    if generator:
        chunk = [data[(k * size + j + len(data) // 2) % len(data)] for j in range(size)]
        rows = {"instruction": [CAPTION_PROMPT] * size, "response": [r["caption"] for r in chunk]}
    else:
        chunk = [data[(k * size + j) % len(data)] for j in range(size)]
        rows = {"instruction": [r["instruction"] for r in chunk], "response": [r["response"] for r in chunk]}
    rows["image"] = [r["image"] for r in chunk]
    return encode_batch(objective, trainee.processor, rows, k, trainee.engine.device)


def labeled_table(data: list[dict]) -> dict[str, list]:
    """The generator's labeled pairs (image, ask-and-answer instruction, "Question: ...\nAnswer: ..."), by column."""
    from leaml_ray.formats import QA_GEN_PROMPT

    return {
        "image": [r["image"] for r in data],
        "instruction": [QA_GEN_PROMPT] * len(data),
        "response": [r["qa_response"] for r in data],
    }


def _param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(language model + head, vision tower) parameters, counting ZeRO-3's partitioned ones at full size."""
    text = vision = 0
    for name, p in model.named_parameters():
        n = getattr(p, "ds_numel", p.numel())
        if ".visual." in f".{name}":
            vision += n
        else:
            text += n
    return text, vision


def _memory_mib(device: str) -> float:
    if device == "gpu":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_run(name: str, job, run, objective, data: list[dict], steps: int, device: str, generator: bool) -> dict:
    """`steps` optimizer steps of one job through the training core; throughput, MFU, memory, losses."""
    from leaml_ray.train.core import build_trainee

    if device == "gpu":
        torch.cuda.reset_peak_memory_stats()
    trainee = build_trainee(job, run, objective, world=1)
    engine = trainee.engine
    if generator:
        objective.setup(engine, job, trainee.processor, lambda: labeled_table(data))
    text_params, vision_params = _param_counts(engine.module)
    losses, tokens, patches, seconds = [], 0, 0, 0.0
    for k in range(steps + 1):  # step 0 warms up kernels and allocators; not timed
        batch = _batch(trainee, objective, data, k, job.batch_size, generator)
        if device == "gpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = objective.step(engine, batch)
        engine.step()
        if device == "gpu":
            torch.cuda.synchronize()
        if k:
            seconds += time.perf_counter() - t0
            encoded = [v for name, v in batch.items() if name != "micro"]  # the generator's: QA and caption rows
            tokens += sum(int(v["attention_mask"].sum()) for v in encoded)
            patches += sum(int(v["pixel_values"].shape[0]) for v in encoded)
        losses.append(metrics["loss_cap"] if generator else metrics["loss"])
    # model FLOPs: forward + backward = 6 per parameter per token (4 with frozen base weights: no weight gradients)
    per = 4 if job.finetune == "lora" else 6
    flops = per * (text_params * tokens + vision_params * patches)
    name_of = torch.cuda.get_device_name(0) if device == "gpu" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name_of), None)
    result = {
        "run": name,
        "tokens_per_s": round(tokens / seconds, 1),
        "mfu": round(flops / seconds / peak, 4) if peak else None,
        "peak_memory_mib": round(_memory_mib(device), 1),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "params": text_params + vision_params,
    }
    return result, trainee


def neurons_confined(before: dict, after: dict, masks: dict) -> dict:
    """Whether the caption gradient moved selected neurons and left every unselected one bit-identical."""
    from leaml_ray.train.neurons import LAYER

    moved_selected = untouched_unselected = 0
    broken = []
    for key, w0 in before.items():
        m = LAYER.match(key)
        if not m or "language_model" not in key or m.group(3):
            continue
        mask = masks[m.group(1)]
        axis = 1 if m.group(2) == "down_proj" else 0
        w1 = after[key]
        sel = (w0 != w1).any(dim=1 - axis)
        untouched_unselected += int((~sel[~mask]).sum())
        moved_selected += int(sel[mask].sum())
        if sel[~mask].any():
            broken.append(key)
    return {
        "unselected_unchanged": not broken,
        "selected_moved": moved_selected,
        "unselected_checked": untouched_unselected,
        "broken": broken[:5],
    }


def main(argv: list[str] | None = None) -> int:
    """Run every smoke case; exit 1 when a check fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto")
    parser.add_argument("--size", default=None, help="model size of leaml_ray.models.tiny.SIZES (default by device)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--runs", default=None, help="comma-separated subset of the run names (default: all)")
    args = parser.parse_args(argv)
    device = args.device if args.device != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    size = args.size or ("smoke-1b" if device == "gpu" else "base")
    steps = args.steps or (5 if device == "gpu" else 2)
    batch_size = args.batch_size or 4
    image_size = 448 if device == "gpu" else 56
    wanted = lambda run: not args.runs or run in args.runs.split(",")  # noqa: E731
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from dataclasses import replace

    from leaml_ray.models.spec import ModelSpec
    from leaml_ray.models.tiny import build_random
    from leaml_ray.train.core import Objective, build_trainee, full_state_dict, prepare_environment
    from leaml_ray.train.job import TrainJob, TrainRun
    from leaml_ray.train.neurons import NeuronDistillation

    data = rows(4 * batch_size, image_size)
    results, checks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model_dir = str(build_random(Path(tmp) / "model", size, seed=0))
        print(f"built {size} in {time.perf_counter() - t0:.1f} s", flush=True)
        dtype = "bfloat16" if device == "gpu" else "float32"
        base = TrainJob(
            spec=ModelSpec("train", model_dir, False, dtype, image_size * image_size, None),
            finetune="full",
            lora_r=0,
            lora_alpha=0,
            lr=1e-4,
            weight_decay=0.0,
            warmup_ratio=0.0,
            batch_size=batch_size,
            grad_accum=1,
            zero_stage=2,
            seed=0,
            device=device,
            workers=1,
            gradient_checkpointing=True,  # as in the paper presets (LoRA + ZeRO-3 + it needs DeepSpeed >= 0.19.8)
            attention="sdpa",
            cpus_per_worker=1.0,
            accelerator_type=None,
            max_failures=0,
            checkpoint_every=10**6,
        )
        run = TrainRun(num_rows=10**6, epochs=1.0, output=str(Path(tmp) / "out"), run_dir="")
        prepare_environment(base)
        init_world(device)
        for zero in (2, 3):
            for finetune in ("full", "lora"):
                if not wanted(f"target_{finetune}_zero{zero}"):
                    continue
                lora = {"lora_r": 16, "lora_alpha": 32} if finetune == "lora" else {}
                job = replace(base, zero_stage=zero, finetune=finetune, **lora)
                result, trainee = train_run(
                    f"target_{finetune}_zero{zero}", job, run, Objective(), data, steps, device, False
                )
                print(json.dumps(result), flush=True)
                results.append(result)
                del trainee
        # the generator objective: caption loss only (qa_weight 0), so any moved unselected neuron is the masks' fault
        for zero in (2, 3):
            if not wanted(f"generator_zero{zero}"):
                continue
            job = replace(base, zero_stage=zero)
            objective = NeuronDistillation(
                score="gradient",
                ratio=0.1,
                caption_weight=1.0,
                score_batches=2,
                seed=0,
                scope="lm_mlp",
                caption_distill=True,
                qa_weight=0.0,
            )
            # the starting weights, gathered the same way as the trained ones (ZeRO-3 partitions them)
            probe = build_trainee(job, run, Objective(), world=1)
            before = full_state_dict(probe.engine, job, rank=0)
            del probe
            result, trainee = train_run(f"generator_zero{zero}", job, run, objective, data, steps, device, True)
            after = full_state_dict(trainee.engine, job, rank=0)
            check = neurons_confined(before, after, objective.masks)
            result.update({k: v for k, v in check.items() if k != "broken"})
            print(json.dumps(result), flush=True)
            results.append(result)
            checks[f"generator_zero{zero}"] = check
            del trainee
    ok = all(c["unselected_unchanged"] and c["selected_moved"] > 0 for c in checks.values())
    ok = ok and all(r["loss_last"] == r["loss_last"] for r in results)  # no NaN
    name = torch.cuda.get_device_name(0) if device == "gpu" else "cpu"
    print(json.dumps({"device": name, "size": size, "ok": ok, "runs": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
