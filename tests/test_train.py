"""The shared train loop on Ray Train + DeepSpeed ZeRO with 2 CPU workers, a tiny random model and real data."""

from pathlib import Path

import pytest
import ray
import ray.data
import torch

from leaml_ray.data import synthetic
from leaml_ray.models import chat
from leaml_ray.models.registry import ModelSpec, load_model, load_processor
from leaml_ray.placement import TrainPlacement
from leaml_ray.train.core import Objective, TrainJob
from leaml_ray.train.loop import run_training
from tests.faults import DiesOnce

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
    return ray.data.from_items(rows, override_num_blocks=4)  # as a parquet read gives them: a task per block


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
    """A ZeRO-3 run, and a ZeRO-2 run that dies at step 7 and is rerun: the rerun resumes from the step-4 checkpoint."""
    tmp = tmp_path_factory.mktemp("zero")
    workers = {"placement": TrainPlacement(workers=2, cpus_per_worker=1), "max_failures": 0}
    marker = tmp / "failed-once"
    with pytest.raises(Exception, match="injected fault at micro batch 6"):
        dies = DiesOnce(Objective(), micro=6, marker=str(marker))  # in optimizer step 7
        run_training(
            job(tiny_model_dir, tmp / "out2"), caption_rows(256), "z2", str(tmp / "ckpt"), objective=dies, **workers
        )
    failed_left_output = (tmp / "out2").exists()
    runs = {}
    for stage in (2, 3):
        out = tmp / f"out{stage}"
        runs[stage] = run_training(
            job(tiny_model_dir, out, zero_stage=stage), caption_rows(256), f"z{stage}", str(tmp / "ckpt"), **workers
        )
        runs[stage]["output"] = out
    runs[2]["failed_left_output"] = failed_left_output
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
    # ZeRO-3 partitions parameters across the 2 workers; the math must not change, and the ZeRO-2 run (resumed at
    # step 4 after a failure) must continue exactly where its checkpoint left off
    a, b = zero_runs[2]["history"], zero_runs[3]["history"]
    assert [round(h["loss"], 3) for h in a] == [round(h["loss"], 3) for h in b]


def test_rerun_after_a_failed_run_resumes_at_the_checkpointed_step(zero_runs):
    run = zero_runs[2]
    assert not run["failed_left_output"]  # the model folder is written only by a finished run
    assert [h["step"] for h in run["history"]] == list(range(1, 9))
    assert [h["resumed_from"] for h in run["history"]] == [0] * 4 + [4] * 4  # steps 1-4 come from the checkpoint
    assert [h["resumed_from"] for h in zero_runs[3]["history"]] == [0] * 8
    assert (run["output"] / "model.safetensors").exists()


def test_batches_are_shuffled_by_the_seed_alone():
    # the same rows give the same batches whatever the windows' arrival timing; each row at most once per epoch
    import numpy as np

    from leaml_ray.train.loop import shuffled_batches

    job = TrainJob(model_path="m", output="o", num_rows=70, batch_size=4, seed=3)
    rows = np.arange(70)
    windows = lambda: ({"n": rows[i : i + 16]} for i in range(0, 70, 16))  # noqa: E731 (as iter_batches gives them)
    first = [b["n"].tolist() for b in shuffled_batches(windows(), job, epoch=0)]
    assert first == [b["n"].tolist() for b in shuffled_batches(windows(), job, epoch=0)]
    assert len(first) == 4 * 4 + 1 and all(len(b) == 4 for b in first)  # the last window's 6 rows: one batch
    seen = [n for b in first for n in b]
    assert len(set(seen)) == len(seen) and set(seen) <= set(range(70))
    assert sorted(seen[:16]) == list(range(16))  # shuffled within a window, not across
    assert first != [b["n"].tolist() for b in shuffled_batches(windows(), job, epoch=1)]


def test_each_worker_gets_a_fixed_equal_shard_in_order_every_epoch():
    from leaml_ray.train.loop import FixedShards

    train = ray.data.range(103, override_num_blocks=7).materialize()
    labeled = ray.data.range(5)
    shards = FixedShards(datasets_to_split=["train"]).configure({"train": train, "labeled": labeled}, 2, None, None)

    def ids(iterator) -> list[int]:
        return [i for b in iterator.iter_batches(batch_size=16, batch_format="numpy") for i in b["id"].tolist()]

    first = [ids(s["train"]) for s in shards]
    assert len(first[0]) == len(first[1]) == 51  # equal: one row dropped
    assert not set(first[0]) & set(first[1]) and all(r == sorted(r) for r in first)  # disjoint, in dataset order
    assert [ids(s["train"]) for s in shards] == first  # the next epoch: the same rows in the same order
    again = FixedShards(datasets_to_split=["train"]).configure({"train": train}, 2, None, None)
    assert [ids(s["train"]) for s in again] == first  # another run: the same shards
    assert [sorted(ids(s["labeled"])) for s in shards] == [list(range(5))] * 2  # not split: whole on each worker
    # no progress bars on the workers (each refresh became a driver log line), and the driver's own are untouched
    assert labeled.context.enable_progress_bars is False and ray.data.DataContext.get_current().enable_progress_bars
