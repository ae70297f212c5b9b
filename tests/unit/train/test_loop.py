"""The shared train loop on Ray Train + DeepSpeed ZeRO with 2 CPU workers, a tiny random model and real data, run
with the QA generator's objective (its most demanding client: scoring, masks, two passes per step)."""

import pytest
import ray
import ray.data
import torch

from leaml_ray.data import synthetic
from leaml_ray.formats import CAPTION_PROMPT
from leaml_ray.models import chat
from leaml_ray.models.registry import load_model, load_processor
from leaml_ray.train.job import TrainRun
from leaml_ray.train.loop import run_training
from tests.faults import DiesOnce
from tests.helpers import distillation, local_job, local_spec
from tests.unit.train.test_neurons import assert_only_selected_neurons_moved, masked_caption_job, masked_rows, weights

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def zero_runs(tiny_model_dir, tmp_path_factory):
    """The generator's objective (caption loss only, confined to 25% of every MLP block's neurons, vision tower
    included) under ZeRO-3, and under ZeRO-2 in a run that dies at step 7 and is rerun: the rerun resumes from the
    step-4 checkpoint, masks included. Every weight change is the masked caption gradient's."""
    tmp = tmp_path_factory.mktemp("zero")
    captions, labeled = masked_rows(128)

    def train(stage: int, objective) -> dict:
        run = TrainRun(num_rows=len(captions), epochs=1.0, output=str(tmp / f"out{stage}"), run_dir="")
        ds = ray.data.from_items(captions, override_num_blocks=4)
        pairs = ray.data.from_items(labeled, override_num_blocks=1)
        job = masked_caption_job(tiny_model_dir, 8, stage, max_failures=0, checkpoint_every=4)
        return run_training(job, run, ds, f"z{stage}", str(tmp / "ckpt"), objective=objective, labeled_dataset=pairs)

    distill = distillation(ratio=0.25, qa_weight=0.0, scope="all_mlp")
    with pytest.raises(Exception, match="injected fault at micro batch 6"):
        train(2, DiesOnce(distill, micro=6, marker=str(tmp / "failed-once")))  # in optimizer step 7
    failed_left_output = (tmp / "out2").exists()
    runs = {stage: {**train(stage, distill), "output": tmp / f"out{stage}"} for stage in (2, 3)}
    runs[2]["failed_left_output"] = failed_left_output
    return runs


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_training_lowers_the_loss_and_saves_an_hf_folder(zero_runs, stage, tiny_model_dir):
    run = zero_runs[stage]
    losses = [h["loss_cap"] for h in run["history"]]
    assert [h["step"] for h in run["history"]] == list(range(1, 9))  # 128 rows / (2 workers * 8) = 8 steps
    assert losses[-1] < 0.8 * losses[0]
    spec = local_spec(str(run["output"]))
    trained, base = load_model(spec), load_model(spec.at(tiny_model_dir))
    processor = load_processor(spec)
    scene, image = synthetic.sample("target", 0, 3, 56)
    batch = chat.collate(
        [chat.encode(processor, image, CAPTION_PROMPT, synthetic.caption(scene))], processor.tokenizer.pad_token_id
    )
    with torch.no_grad():
        assert trained(**batch).loss < base(**batch).loss


@pytest.mark.parametrize("stage", [2, 3])
def test_the_caption_gradient_moves_only_selected_neurons_vision_tower_included(zero_runs, stage, tiny_model_dir):
    # ZeRO-3 partitions the parameters the masks index; the ZeRO-2 run took its masks from the checkpoint
    output = zero_runs[stage]["output"]
    masks = assert_only_selected_neurons_moved(weights(tiny_model_dir), weights(output), output)
    assert any(".visual." in layer for layer in masks) and any(".language_model." in layer for layer in masks)


def test_zero2_and_zero3_take_the_same_steps(zero_runs):
    # ZeRO-3 partitions parameters across the 2 workers; the math must not change (scores, masks, updates), and the
    # ZeRO-2 run (resumed at step 4 after a failure) must continue exactly where its checkpoint left off
    a, b = zero_runs[2]["history"], zero_runs[3]["history"]
    assert [round(h["loss"], 3) for h in a] == [round(h["loss"], 3) for h in b]


def test_rerun_after_a_failed_run_resumes_at_the_checkpointed_step(zero_runs):
    run = zero_runs[2]
    assert not run["failed_left_output"]  # the model folder is written only by a finished run
    assert [h["step"] for h in run["history"]] == list(range(1, 9))
    assert [h["resumed_from"] for h in run["history"]] == [0] * 4 + [4] * 4  # steps 1-4 come from the checkpoint
    assert [h["masks_restored"] for h in run["history"]] == [0.0] * 4 + [1.0] * 4  # not re-scored
    assert [h["resumed_from"] for h in zero_runs[3]["history"]] == [0] * 8
    assert (run["output"] / "model.safetensors").exists()


def test_the_driver_reads_the_step_log_without_downloading_the_checkpoint(zero_runs, monkeypatch):
    from ray.train import Checkpoint

    from leaml_ray.train.loop import train_log

    def refuse(*args, **kwargs):
        raise AssertionError("the whole checkpoint was downloaded")

    checkpoint = Checkpoint(zero_runs[3]["checkpoint"])  # the ZeRO-3 run's last checkpoint, with its model states
    monkeypatch.setattr(Checkpoint, "as_directory", refuse)
    monkeypatch.setattr(Checkpoint, "to_directory", refuse)
    assert train_log(checkpoint) == zero_runs[3]["history"]


def test_batches_are_shuffled_by_the_seed_alone():
    # the same rows give the same batches whatever the windows' arrival timing; each row at most once per epoch
    import numpy as np

    from leaml_ray.train.loop import shuffled_batches

    job = local_job("m", batch_size=4, seed=3)
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
