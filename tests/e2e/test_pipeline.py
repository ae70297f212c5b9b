"""The whole pipeline through the real engines (Ray Data + vLLM, Ray Train + DeepSpeed) on random-init tiny
models, with its run dir on a local S3-compatible server (moto, through AWS_ENDPOINT_URL): contracts between
stages, counts, the report schema, resume of the caption stage from a crashed attempt's parts, and skip on rerun.
(Model quality is the zoo's business: bench/ and the demo measure it.)"""

import json
import math
import re
import threading
import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from leaml_ray import storage
from leaml_ray.pipeline import load_manifest, resume_path, run_pipeline, stage_key
from leaml_ray.stages import CAPTION, pipeline_stages
from tests.conftest import make_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def _config(tmp_path, model, run_dir):
    return make_config(
        tmp_path,
        f"run.dir={run_dir}",
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
        "generator.caption_epochs=1",
        # the selective-neuron path (the default distils into every parameter): its masks go to the S3 run dir too
        "generator.distill_scope=lm_mlp",
        "target.epochs=1",
        "target.labeled_upsample={leaml: 3, full: 5}",  # a factor per method
        "train.batch_size=4",
        "train.cpus_per_worker=0.5",
        "eval.max_new_tokens=4",
        "eval.methods=[leaml,zero_shot]",
    )


class MetricsScraper(threading.Thread):
    """Polls this Ray node's Prometheus endpoint; keeps every leaml series seen, with its last value (a worker's
    gauges vanish from the endpoint some seconds after the worker exits, so they are caught while it runs)."""

    LINE = re.compile(r"^ray_leaml_(\w+)\{(.*)\} (\S+)$")

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"
        self.series: dict[tuple, float] = {}
        self.highest: dict[tuple, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.scrape()

    def scrape(self) -> None:
        text = urllib.request.urlopen(self.url, timeout=10).read().decode()
        for name, labels, value in (m.groups() for m in map(self.LINE.match, text.splitlines()) if m):
            tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            key = (name, tags.get("run"), tags.get("stage"), tags.get("reason"), tags.get("WorkerId"))
            self.series[key] = float(value)
            self.highest[key] = max(float(value), self.highest.get(key, float("-inf")))

    def settle(self, quiet: float = 5.0, limit: float = 90.0) -> None:
        """Scrape until nothing changed for `quiet` s: the test's Ray exports a process's metrics every 2 s."""
        start = last_change = time.monotonic()
        while time.monotonic() - last_change < quiet and time.monotonic() - start < limit:
            before = dict(self.series)
            time.sleep(2.0)
            self.scrape()
            if self.series != before:
                last_change = time.monotonic()

    def total(self, name: str, run: str, stage: str) -> float:
        return sum(v for k, v in self.series.items() if k[:3] == (name, run, stage))


def test_pipeline_end_to_end(tmp_path, tiny_model_dir, s3_run_dir):
    cfg = _config(tmp_path, tiny_model_dir, s3_run_dir)
    run = cfg.run.dir
    assert run.startswith("s3://")

    # 1. a crashed caption attempt left 5 captions in its resume parts: the run keeps them and captions the rest
    run_pipeline(cfg, pipeline_stages(cfg), ["prepare"])
    images = pq.read_table(storage.join(run, "prepared/images.parquet")).to_pylist()
    key = stage_key(CAPTION, CAPTION.plan(cfg), run)
    leftover = pa.table(
        {
            "image_id": [i["image_id"] for i in images if i["split"] == "unlabeled"][:5],
            "caption": ["left by the crashed attempt"] * 5,
            "teacher": [tiny_model_dir] * 5,
            "prompt_version": ["x"] * 5,
        }
    )
    fs, parts = storage.filesystem(storage.join(resume_path(run, "caption", key), "parts", "part-0.parquet"))
    fs.create_dir(parts.rsplit("/", 1)[0], recursive=True)
    pq.write_table(leftover, parts, filesystem=fs)

    scraper = MetricsScraper()
    scraper.start()
    try:
        results = {r.name: r for r in run_pipeline(cfg, pipeline_stages(cfg))}
    finally:
        scraper.done.set()
        scraper.join()
    scraper.settle()  # the driver's last counts reach the endpoint a few seconds after the last stage
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
    recorded = load_manifest(run)["stages"]["caption"]["plan"]  # what ran, placement included
    assert recorded["teacher"]["spec"]["model"] == tiny_model_dir and recorded["teacher"]["replicas"] == 1
    assert not storage.exists(storage.join(run, "_resume", "caption"))  # partial results cleaned up on success

    assert storage.exists(storage.join(run, "generator/config.json"))
    assert storage.exists(storage.join(run, "generator/neurons/neurons.safetensors"))
    assert results["generator"].counts["neurons_selected"] > 0
    gen = results["generator"].counts
    # fewer labeled pairs than `score_batches` batches per worker (as at 1% labels): scoring cycles them
    assert gen["labeled_qa"] < 4 * 2 * cfg.generator.score_batches
    # the labeled pairs are scheduled apart from the captions: each one trained on equally often
    assert gen["pair_views_max"] - gen["pair_views_min"] <= 1 and gen["pair_views_min"] >= 1
    assert gen["heldout_captions"] == len(unlabeled) // 10  # kept out for the caption-fidelity diagnostic

    pseudo = results["pseudo_qa"].counts
    assert pseudo["generated"] == 2 * len(unlabeled)  # every request answered once, then kept or rejected
    assert sum(pseudo["rejected_by_reason"].values()) == pseudo["rejected"]
    kept = pq.read_table(storage.join(run, "pseudo_qa.parquet"))
    rejects = pq.read_table(storage.join(run, "pseudo_qa_rejects.parquet"))
    assert kept.num_rows == pseudo["kept"] and rejects.num_rows == pseudo["rejected"]
    # each pair scored in the same engine pass: answer confidence and the question's PMI with its image
    assert all(0 < c <= 1 for c in kept["answer_confidence"].to_pylist())
    assert any(p is not None for p in kept["question_pmi"].to_pylist()) or kept.num_rows < 5
    diag = storage.read_json(storage.join(run, "pseudo_qa_diagnostics.json"))
    assert diag["caption_fidelity"]["n"] == gen["heldout_captions"]  # the held-out images, captioned
    assert 0 <= diag["precondition"]["generator"] <= 1  # the hidden questions, answered
    assert diag["pairs"]["audited"] > 0 and pseudo["audited"] == diag["pairs"]["audited"]
    lines = storage.read_bytes(storage.join(run, "pseudo_qa.jsonl")).decode().splitlines()
    assert len(lines) == kept.num_rows
    for line in lines:
        record = json.loads(line)
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert storage.exists(storage.join(run, record["images"][0]))
    _exports_load_as_trainers_load_them(run, tmp_path / "exports", kept.num_rows, tiny_model_dir)

    assert storage.exists(storage.join(run, "target/leaml/model.safetensors"))
    tuned = results["finetune:leaml"].counts  # leaml's own factor: its labeled pairs x 3, then every kept pair
    assert (tuned["labeled_rows"], tuned["pseudo_rows"]) == (3 * gen["labeled_qa"], pseudo["kept"])
    report = storage.read_json(storage.join(run, "report.json"))
    assert set(report) >= {"methods", "stages", "pseudo_qa", "config"}
    test_qa = pq.read_table(storage.join(run, "prepared/qa.parquet"), filters=[("split", "=", "test")])
    predictions = pq.read_table(storage.join(run, "predictions.parquet")).to_pylist()
    for name in ("leaml", "zero_shot"):
        m = report["methods"][name]
        assert m["n"] == test_qa.num_rows and set(m["per_category"]) == set(test_qa["category"].to_pylist())
        mine = [p for p in predictions if p["method"] == name]
        assert sorted(p["qa_id"] for p in mine) == sorted(test_qa["qa_id"].to_pylist())  # each question once
        for category, value in m["per_category"].items():  # the report's figures are the predictions' own
            scored = [p["correct"] for p in mine if p["category"] == category]
            assert value == pytest.approx(sum(scored) / len(scored))
        assert m["accuracy"] == pytest.approx(sum(m["per_category"].values()) / len(m["per_category"]))  # macro
    assert {"prepare", "caption", "generator", "pseudo_qa", "finetune:leaml"} <= set(report["stages"])
    assert report["pseudo_qa"]["kept"] == pseudo["kept"]
    assert report["config"]["run"]["dir"] == run
    assert storage.exists(storage.join(run, "plots/accuracy.png"))
    assert "| leaml |" in storage.read_bytes(storage.join(run, "report.md")).decode()
    # jobs/evaluate.py on the same run and model folder: the evaluate stage's own figures (greedy, the same engine)
    from leaml_ray.cli import evaluate as evaluate_cli

    again = storage.join(run, "evaluations", "again")
    argv = ["--run", run, "--model", storage.join(run, "target/leaml"), "--name", "again", "--out", again]
    assert evaluate_cli.main(argv) == 0
    assert storage.read_json(storage.join(again, "report.json"))["methods"]["again"]["accuracy"] == pytest.approx(
        report["methods"]["leaml"]["accuracy"]
    )

    # the dashboard's metrics (Ray's Prometheus endpoint), tagged with this run
    assert scraper.total("images_captioned_total", run, "caption") == len(to_caption) - 5
    assert scraper.total("pseudo_qa_kept_total", run, "pseudo_qa") == pseudo["kept"]
    assert scraper.total("pseudo_qa_rejected_total", run, "pseudo_qa") == pseudo["rejected"]
    assert scraper.total("answers_generated_total", run, "evaluate") == 2 * test_qa.num_rows
    for stage in ("caption", "generator", "pseudo_qa", "finetune:leaml", "evaluate"):
        assert scraper.total("stage_running", run, stage) == 0  # finished
    assert any(v == 1 for k, v in scraper.highest.items() if k[:3] == ("stage_running", run, "caption"))
    for name, stage in (("generator", "generator"), ("target-leaml", "finetune:leaml")):
        # rank 0 sets these while it trains; the driver sets the final values once its workers are gone, so they
        # are on the endpoint after the run however short the training was
        steps = [v for k, v in scraper.series.items() if k[:3] == ("train_step", run, name)]
        losses = [v for k, v in scraper.series.items() if k[:3] == ("train_loss", run, name)]
        rates = [v for k, v in scraper.series.items() if k[:3] == ("train_samples_per_s", run, name)]
        assert steps and max(steps) == results[stage].counts["steps"], (name, sorted({k[0] for k in scraper.series}))
        assert losses and all(0 < v < 100 for v in losses) and rates and all(v > 0 for v in rates)

    # 2. a rerun of the finished run recomputes nothing
    assert {r.action for r in run_pipeline(cfg, pipeline_stages(cfg))} == {"skipped"}


def _exports_load_as_trainers_load_them(run: str, local, rows: int, model: str) -> None:
    """pseudo_qa_trl.jsonl through HF datasets (structured content, images decoded) into two steps of TRL's
    SFTTrainer; pseudo_qa.jsonl through the dataset_info.json entry LLaMA-Factory reads (sharegpt: its columns and
    role tags, one <image> per image; LLaMA-Factory itself pins transformers <= 4.52, so it cannot be installed)."""
    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    for rel in ("pseudo_qa_trl.jsonl", "pseudo_qa.jsonl", "dataset_info.json"):
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(storage.read_bytes(storage.join(run, rel)))
    trl = datasets.load_dataset("json", data_files=str(local / "pseudo_qa_trl.jsonl"), split="train")
    assert trl.num_rows == rows
    user, assistant = trl[0]["messages"]
    assert [c["type"] for c in user["content"]] == ["image", "text"] and assistant["content"][0]["type"] == "text"
    for rel in {p for r in trl["images"] for p in r}:
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(storage.read_bytes(storage.join(run, rel)))
    trl = trl.map(lambda r: {"images": [str(local / p) for p in r["images"]]})
    trl = trl.cast_column("images", datasets.List(datasets.Image()))
    assert trl[0]["images"][0].size == (56, 56)  # the synthetic scene, decoded
    args = SFTConfig(
        output_dir=str(local / "trl"),
        max_steps=2,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        max_length=None,
        logging_steps=1,
    )
    trainer = SFTTrainer(
        model=AutoModelForImageTextToText.from_pretrained(model),
        args=args,
        train_dataset=trl,
        processing_class=AutoProcessor.from_pretrained(model, use_fast=False),
    )
    assert trainer.train().global_step == 2 and math.isfinite(trainer.state.log_history[-1]["train_loss"])

    info = json.loads((local / "dataset_info.json").read_text())["leaml_pseudo_qa"]
    assert info["formatting"] == "sharegpt"
    sharegpt = datasets.load_dataset("json", data_files=str(local / info["file_name"]), split="train")
    assert set(info["columns"].values()) <= set(sharegpt.column_names) and sharegpt.num_rows == rows
    tags = info["tags"]
    for record in sharegpt.select(range(min(rows, 20))):
        turns = record[info["columns"]["messages"]]
        assert [t[tags["role_tag"]] for t in turns] == [tags["user_tag"], tags["assistant_tag"]]
        assert turns[0][tags["content_tag"]].count("<image>") == len(record[info["columns"]["images"]]) == 1
