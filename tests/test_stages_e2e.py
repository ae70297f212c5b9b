"""The whole pipeline through the real engines (Ray Data + vLLM, Ray Train + DeepSpeed) on random-init tiny
models: contracts between stages, counts, the report schema, resume of the caption stage from a crashed
attempt's parts, and skip on rerun.
(Model quality is the zoo's business: bench/ and the demo measure it.)"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaml_ray import storage
from leaml_ray.pipeline import resume_path, run_pipeline, stage_key
from leaml_ray.stages import ALL_STAGES, CAPTION
from tests.conftest import make_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def _config(tmp_path, model):
    return make_config(
        tmp_path,
        "data.num_images=48",
        "data.label_ratio=0.05",  # 2 labeled images, 8 QA pairs: fewer than the neuron scoring's batches
        "data.test_ratio=0.25",
        f"teacher.model={model}",
        f"generator.model={model}",
        f"target.model={model}",
        "teacher.max_new_tokens=12",
        "teacher.max_model_len=256",
        "pseudo_qa.samples_per_image=2",
        "pseudo_qa.max_new_tokens=12",
        "generator.epochs=1",
        "target.epochs=1",
        "train.batch_size=4",
        "train.cpus_per_worker=0.5",
        "eval.max_new_tokens=4",
        "eval.methods=[leaml,zero_shot]",
    )


def test_pipeline_end_to_end(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir)
    run = cfg.run.dir

    # 1. a crashed caption attempt left 5 captions in its resume parts: the run keeps them and captions the rest
    run_pipeline(cfg, ALL_STAGES, ["prepare"])
    images = pq.read_table(storage.join(run, "prepared/images.parquet")).to_pylist()
    key = stage_key(CAPTION, cfg, run)
    leftover = pa.table(
        {
            "image_id": [i["image_id"] for i in images if i["split"] == "unlabeled"][:5],
            "caption": ["left by the crashed attempt"] * 5,
            "teacher": [tiny_model_dir] * 5,
            "prompt_version": ["x"] * 5,
        }
    )
    fs, parts = storage.resolve(storage.join(resume_path(run, "caption", key), "parts", "part-0.parquet"))
    fs.create_dir(parts.rsplit("/", 1)[0], recursive=True)
    pq.write_table(leftover, parts, filesystem=fs)

    results = {r.name: r for r in run_pipeline(cfg, ALL_STAGES)}
    assert [r.action for r in results.values()] == ["skipped"] + ["ran"] * 5

    images = pq.read_table(storage.join(run, "prepared/images.parquet")).to_pylist()
    to_caption = {i["image_id"] for i in images if i["split"] in ("labeled", "unlabeled")}
    unlabeled = {i["image_id"] for i in images if i["split"] == "unlabeled"}
    captions = pq.read_table(storage.join(run, "captions.parquet"))
    assert sorted(captions["image_id"].to_pylist()) == sorted(to_caption)  # each exactly once
    assert results["caption"].counts["resumed"] == 5
    kept = dict(zip(captions["image_id"].to_pylist(), captions["caption"].to_pylist(), strict=True))
    assert [kept[i] for i in leftover["image_id"].to_pylist()] == ["left by the crashed attempt"] * 5  # not redone
    assert set(captions["teacher"].to_pylist()) == {tiny_model_dir}
    assert not storage.exists(storage.join(run, "_resume", "caption"))  # partial results cleaned up on success

    assert storage.exists(storage.join(run, "generator/config.json"))
    assert storage.exists(storage.join(run, "generator/neurons/neurons.safetensors"))
    assert results["generator"].counts["neurons_selected"] > 0
    # fewer labeled pairs than `score_batches` batches per worker (as at 1% labels): scoring cycles them
    assert results["generator"].counts["labeled_qa"] < 4 * 2 * cfg.generator.score_batches

    pseudo = results["pseudo_qa"].counts
    assert pseudo["generated"] == 2 * len(unlabeled)
    assert pseudo["kept"] + pseudo["rejected"] == pseudo["generated"]
    assert sum(pseudo["rejected_by_reason"].values()) == pseudo["rejected"]
    kept = pq.read_table(storage.join(run, "pseudo_qa.parquet"))
    rejects = pq.read_table(storage.join(run, "pseudo_qa_rejects.parquet"))
    assert kept.num_rows == pseudo["kept"] and rejects.num_rows == pseudo["rejected"]
    lines = storage.read_bytes(storage.join(run, "pseudo_qa.jsonl")).decode().splitlines()
    assert len(lines) == kept.num_rows
    for line in lines:
        record = json.loads(line)
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert storage.exists(storage.join(run, record["images"][0]))

    assert storage.exists(storage.join(run, "target/leaml/model.safetensors"))
    report = storage.read_json(storage.join(run, "report.json"))
    assert set(report) >= {"methods", "stages", "pseudo_qa", "config"}
    test_qa = pq.read_table(storage.join(run, "prepared/qa.parquet"), filters=[("split", "=", "test")])
    for name in ("leaml", "zero_shot"):
        m = report["methods"][name]
        assert 0.0 <= m["accuracy"] <= 1.0 and m["n"] == test_qa.num_rows
        assert set(m["per_category"]) == set(test_qa["category"].to_pylist())
    assert {"prepare", "caption", "generator", "pseudo_qa", "finetune"} <= set(report["stages"])
    assert report["pseudo_qa"]["kept"] == pseudo["kept"]
    assert report["config"]["run"]["dir"] == run
    assert storage.exists(storage.join(run, "plots/accuracy.png"))
    assert "| leaml |" in storage.read_bytes(storage.join(run, "report.md")).decode()

    # 2. a rerun of the finished run recomputes nothing
    assert {r.action for r in run_pipeline(cfg, ALL_STAGES)} == {"skipped"}
