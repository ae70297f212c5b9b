"""The shared train loop on Ray Train + DeepSpeed ZeRO with 2 CPU workers, a tiny random model and real data."""

from pathlib import Path

import pytest
import ray
import ray.data
import torch

from leaml_ray.data import synthetic
from leaml_ray.models import chat
from leaml_ray.models.registry import ModelSpec, load_model, load_processor
from leaml_ray.train.loop import TrainJob, run_training

pytestmark = pytest.mark.usefixtures("ray_local")


def caption_rows(n: int) -> ray.data.Dataset:
    rows = []
    for i in range(n):
        scene, image = synthetic.sample("general", 0, i, 56)
        rows.append(
            {
                "image": synthetic.png_bytes(image),
                "instruction": "Describe this image.",
                "response": synthetic.caption(scene),
            }
        )
    return ray.data.from_items(rows)


def job(model_dir: str, out: Path, **kw) -> TrainJob:
    args = {
        "model_path": model_dir,
        "output": str(out),
        "num_rows": 256,
        "lr": 3e-3,
        "batch_size": 16,
        "epochs": 1.0,
        "checkpoint_every": 4,
    }
    return TrainJob(**{**args, **kw})


@pytest.fixture(scope="module")
def zero_runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero")
    runs = {}
    for stage in (2, 3):
        runs[stage] = run_training(
            job(tiny_model_dir, tmp / f"out{stage}", zero_stage=stage),
            caption_rows(256),
            f"z{stage}",
            str(tmp / "ckpt"),
            num_workers=2,
            cpus_per_worker=1,
            max_failures=0,
        )
        runs[stage]["output"] = tmp / f"out{stage}"
    return runs


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_training_lowers_the_loss_and_saves_an_hf_folder(zero_runs, stage, tiny_model_dir):
    run = zero_runs[stage]
    losses = [h["loss"] for h in run["history"]]
    assert [h["step"] for h in run["history"]] == list(range(1, 9))  # 256 rows / (2 workers * 16) = 8 steps
    assert losses[-1] < 0.6 * losses[0]
    spec = ModelSpec("target", str(run["output"]), dtype="float32")
    trained, base = load_model(spec, str(run["output"])), load_model(spec, tiny_model_dir)
    processor = load_processor(spec, str(run["output"]))
    scene, image = synthetic.sample("general", 0, 3, 56)
    batch = chat.collate(
        [chat.encode(processor, image, "Describe this image.", synthetic.caption(scene))],
        processor.tokenizer.pad_token_id,
    )
    with torch.no_grad():
        assert trained(**batch).loss < base(**batch).loss


def test_zero2_and_zero3_take_the_same_steps(zero_runs):
    # ZeRO-3 partitions parameters across the 2 workers; the math must not change
    a, b = zero_runs[2]["history"], zero_runs[3]["history"]
    assert [round(h["loss"], 3) for h in a] == [round(h["loss"], 3) for h in b]


@pytest.mark.slow
def test_rerun_after_a_failed_run_resumes_at_the_checkpointed_step(tiny_model_dir, tmp_path):
    marker = tmp_path / "failed-once"
    args = (caption_rows(256), "resume", str(tmp_path / "ckpt"))
    with pytest.raises(Exception, match="injected fault at step 7"):
        run_training(
            job(tiny_model_dir, tmp_path / "out", fault={"step": 7, "marker": str(marker)}),
            *args,
            num_workers=2,
            cpus_per_worker=1,
            max_failures=0,
        )
    assert not (tmp_path / "out").exists()
    run = run_training(job(tiny_model_dir, tmp_path / "out"), *args, num_workers=2, cpus_per_worker=1, max_failures=0)
    assert [h["step"] for h in run["history"]] == list(range(1, 9))
    assert [h["resumed_from"] for h in run["history"]] == [0] * 4 + [4] * 4  # steps 1-4 come from the checkpoint
    assert (tmp_path / "out" / "model.safetensors").exists()
