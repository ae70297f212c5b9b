"""The embedded pipeline submitted with `ray job submit` (the README's command and runtime env) to a fake autoscaling
cluster on this machine: a head with no CPUs for work, 1-CPU worker nodes that Ray's autoscaler launches for the
work and removes when idle (leaml_ray/fake_cluster.py, started in its own temp dir and stopped by pid, never
`ray stop`), the run dir on the local S3 server. The suite's one run of the whole pipeline through the real engines
(Ray Data + vLLM, Ray Train + DeepSpeed) on random-init tiny models: it also checks the contracts between stages,
counts, the report schema, the exports, the dashboard's metrics and skip on rerun. (Model quality is the zoo's
business: bench/ and the demo measure it; resuming a stage from a killed driver's parts is test_driver_kill's.)

One job, two lost nodes (SIGKILL of a node's raylet and every process under it, as a spot instance goes): the node of
a caption engine replica once its engine is up, and the node of a generator training worker once Ray Train has
registered a checkpoint of a step. The job finishes without a person: Ray Data restarts the replica elsewhere and
retries its batches (every image captioned once), Ray Train restarts the worker group from that checkpoint, neuron
masks included (every step once in the step log). What a single-node run of the same config makes before training
(its splits, its greedy captions) comes out identical; the trained weights and the report are not compared: a
restarted group re-seeds its RNG and redoes the lost steps, so they are not promised bit-identical."""

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from leaml_ray import storage
from leaml_ray.fake_cluster import FakeCluster

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MIB = 2**20
ENGINE = "_EngineActor"  # an engine replica of the embedded default (actor_pool: MapWorker(MapBatches(_EngineActor)))


def _overrides(run_dir: str, model: str, teacher: str) -> list[str]:
    return [
        f"run.dir={run_dir}",
        "data.num_images=32",
        "data.label_ratio=0.1",
        "data.test_ratio=0.25",
        f"teacher.model={teacher}",  # its greedy captions differ from image to image
        f"generator.model={model}",
        f"target.model={model}",
        "teacher.max_new_tokens=8",
        "teacher.max_model_len=256",
        "teacher.replicas=2",  # one per 1-CPU node
        "teacher.engine_batch_size=2",  # a part every 8 captions
        "pseudo_qa.samples_per_image=1",
        "pseudo_qa.max_new_tokens=8",
        "generator.epochs=1",
        "generator.caption_epochs=2",  # 4 steps: a node is lost after the first step's checkpoint, before the last
        "generator.distill_scope=lm_mlp",  # neuron masks: a restarted worker must get them back from the checkpoint
        "target.epochs=1",
        "target.labeled_upsample={leaml: 3, full: 5}",  # a factor per method
        "train.batch_size=4",
        "train.checkpoint_every=1",
        "train.cpus_per_worker=1",  # one worker per 1-CPU node
        "eval.max_new_tokens=4",
        "eval.methods=[leaml]",  # a second method is one more engine on one more node: the CLI below evaluates again
    ]


class MetricsScraper(threading.Thread):
    """Polls a Ray node's Prometheus endpoint; keeps every leaml series seen, with its last value (a process's
    series vanish from the endpoint some seconds after it exits, so they are caught while it runs)."""

    LINE = re.compile(r"^ray_leaml_(\w+)\{(.*)\} (\S+)$")

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.series: dict[tuple, float] = {}
        self.highest: dict[tuple, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            try:
                self.scrape()
            except OSError:  # the endpoint is not up yet
                continue

    def scrape(self) -> None:
        text = urllib.request.urlopen(self.url, timeout=10).read().decode()
        for name, labels, value in (m.groups() for m in map(self.LINE.match, text.splitlines()) if m):
            tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            key = (name, tags.get("run"), tags.get("stage"), tags.get("reason"), tags.get("WorkerId"))
            self.series[key] = float(value)
            self.highest[key] = max(float(value), self.highest.get(key, float("-inf")))

    def settle(self, quiet: float = 5.0, limit: float = 90.0) -> None:
        """Scrape until nothing changed for `quiet` s (the suite's Ray exports a process's metrics every 2 s)."""
        start = last_change = time.monotonic()
        while time.monotonic() - last_change < quiet and time.monotonic() - start < limit:
            before = dict(self.series)
            time.sleep(2.0)
            self.scrape()
            if self.series != before:
                last_change = time.monotonic()

    def total(self, name: str, run: str, stage: str) -> float:
        return sum(v for k, v in self.series.items() if k[:3] == (name, run, stage))


def _files(uri: str, prefix: str) -> list[str]:
    """Paths under `uri` (recursively) whose file name starts with `prefix`."""
    fs, path = storage.filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError:
        return []
    return [i.path for i in infos if i.base_name.startswith(prefix)]


def _checkpointed_step(uri: str) -> int:
    """The step of the latest checkpoint Ray Train registered under `uri` (-1: none yet). Files of a checkpoint
    still being reported do not count: a worker lost before its report is registered resumes from the one before."""
    snapshots = _files(uri, "checkpoint_manager_snapshot.json")
    if not snapshots:
        return -1
    fs, _ = storage.filesystem(uri)
    with fs.open_input_stream(snapshots[0]) as f:
        latest = json.loads(f.read()).get("latest_checkpoint_result") or {}
    return latest.get("metrics", {}).get("step", -1)


def _stage_done(run_dir: str, stage: str) -> bool:
    manifest = storage.join(run_dir, "manifest.json")
    entry = json.loads(storage.read_bytes(manifest))["stages"].get(stage, {}) if storage.exists(manifest) else {}
    return entry.get("status") == "done"


def _lose_a_node(cluster: FakeCluster, actor_class: str, ready, job_running) -> str:
    """Once `ready()` and an actor whose class name holds `actor_class` is alive, kill its node; returns the node id."""
    from ray.util.state import list_actors

    while True:
        assert job_running(), f"the job ended before a node running {actor_class} could be lost"
        if ready():
            actors = list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")], limit=10000)
            nodes = [a.node_id for a in actors if actor_class in a.class_name]
            if nodes:
                cluster.kill_node(nodes[0])
                return nodes[0]
        time.sleep(0.25)


def _submit(cluster: FakeCluster, job_id: str, args: list[str]) -> None:
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={cluster.dashboard_url}", f"--submission-id={job_id}"]
    cmd += ["--no-wait", "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml")]
    cmd += ["--", "python", "jobs/adapt.py", *args]
    for _ in range(30):  # the head's job agent comes up a little after the head
        proc = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env, timeout=300)
        if "No available agent to submit job" not in proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pipeline_on_a_fake_autoscaling_cluster_that_loses_two_nodes(
    tiny_model_dir, greedy_reference, s3_run_dir, tmp_path
):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    run_dir, teacher = s3_run_dir, greedy_reference[0].model
    overrides = _overrides(run_dir, tiny_model_dir, teacher)
    node = {"resources": {"CPU": 1, "object_store_memory": 400 * MIB}, "max_workers": 6}
    cluster = FakeCluster(
        {"cpu_1": node},
        {"CPU": 0, "object_store_memory": 400 * MIB},  # the driver only, as on the launcher YAMLs' head
        max_workers=6,
        # long enough that a stage's nodes outlive the few seconds to the next stage (at 15 s the autoscaler removed
        # them as the next stage asked for nodes, and launched new ones: each stage paid a cold start)
        idle_timeout_minutes=0.5,
        env={"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},  # the job's `python`: this environment's
        # the driver's metrics reach the head's endpoint every second (default 10 s): its last ones before it exits
        system_config={"metrics_report_interval_ms": 1000},
    )
    with cluster:
        job_id = f"fake-cluster-{uuid.uuid4().hex[:8]}"
        _submit(cluster, job_id, overrides)
        jobs = JobSubmissionClient(cluster.dashboard_url)
        running = lambda: not jobs.get_job_status(job_id).is_terminal()  # noqa: E731
        resume = storage.join(run_dir, "_resume")
        scraper = MetricsScraper(f"http://127.0.0.1:{cluster.metrics_port}/metrics")  # the head's: the driver's
        scraper.start()
        try:
            # mid-caption: as soon as a caption replica has its engine up (the whole stage takes seconds here)
            caption_node = _lose_a_node(cluster, ENGINE, lambda: True, running)
            assert not _stage_done(run_dir, "caption"), "the caption stage ended before its node was lost"
            # mid-training: Ray Train registered a checkpoint of the generator's first step (its masks with it)
            generator = storage.join(resume, "generator")
            train_node = _lose_a_node(cluster, "RayTrainWorker", lambda: _checkpointed_step(generator) >= 1, running)
            assert not _stage_done(run_dir, "generator"), "the generator stage ended before its node was lost"

            deadline = time.monotonic() + 1500
            while running() and time.monotonic() < deadline:
                time.sleep(2)
        finally:
            scraper.done.set()
            scraper.join()
        logs = jobs.get_job_logs(job_id)[-4000:]
        assert jobs.get_job_status(job_id) == JobStatus.SUCCEEDED, logs

        actors = list_actors(address=cluster.dashboard_url, detail=True, limit=10000, raise_on_missing_output=False)
        engines = {a.node_id for a in actors if ENGINE in a.class_name}
        runs: dict[str, list[str]] = {}  # a worker group's workers share its placement group
        for a in actors:
            if a.class_name == "RayTrainWorker":
                runs.setdefault(a.placement_group_id, []).append(a.node_id)
        nodes = list_nodes(address=cluster.dashboard_url, detail=True, limit=1000)
        head = next(n.node_id for n in nodes if n.is_head_node)
        # caption, pseudo_qa and evaluate replicas on 1-CPU nodes, not the head; the caption replica on the lost node
        # was restarted elsewhere (an actor keeps its id: its node is the new one)
        assert len(engines) >= 2 and head not in engines and caption_node not in engines, engines
        assert any(a.num_restarts >= 1 for a in actors if ENGINE in a.class_name)
        # the generator (restarted: a second worker group, a third when the autoscaler removed a node the new group
        # was being placed on, as CI saw once) and the target; each group's two workers on two nodes, not the head
        groups = [sorted(ns) for ns in runs.values()]
        assert len(groups) >= 3 and any(train_node in ns for ns in groups), groups
        for ns in groups:
            assert len(ns) == len(set(ns)) == 2 and head not in ns, groups

        # the autoscaler launched worker nodes for the work (and for the lost ones), then removed every one once idle
        deadline = time.monotonic() + 150
        while True:
            workers = [
                n for n in list_nodes(address=cluster.dashboard_url, detail=True, limit=1000) if not n.is_head_node
            ]
            if all(n.state == "DEAD" for n in workers) or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert len(workers) >= 4 and all(n.state == "DEAD" for n in workers), [(n.node_id, n.state) for n in workers]

    manifest = storage.read_json(storage.join(run_dir, "manifest.json"))
    print("stage seconds", {name: entry.get("seconds") for name, entry in manifest["stages"].items()})
    done = {name for name, entry in manifest["stages"].items() if entry.get("status") == "done"}
    assert done >= {"prepare", "caption", "generator", "pseudo_qa", "finetune:leaml", "evaluate"}, manifest["stages"]
    # no batch a lost replica had delivered came out again (the stage would have dropped and counted it)
    assert manifest["stages"]["caption"]["counts"]["duplicates_dropped"] == 0, manifest["stages"]["caption"]

    # the generator resumed from its last checkpoint, masks included: every step once, in order
    history = storage.read_json(storage.join(run_dir, "generator", "train_log.json"))
    print("generator history", [(h["step"], h["resumed_from"], h.get("masks_restored")) for h in history])
    assert [h["step"] for h in history] == list(range(1, len(history) + 1))
    resumed = [h for h in history if h["resumed_from"] > 0]
    assert resumed and all(h["masks_restored"] == 1.0 for h in resumed), history

    # the same config on one node (the test session's Ray): the same splits, the same greedy captions, each once
    from leaml_ray.config import load_config
    from leaml_ray.pipeline import run_pipeline
    from leaml_ray.stages import pipeline_stages

    local = load_config(None, [*_overrides(str(tmp_path / "run"), tiny_model_dir, teacher), "teacher.replicas=1"])
    run_pipeline(local, pipeline_stages(local), ["prepare", "caption"])

    def table(run: str, rel: str, columns: list[str]) -> list[tuple]:
        fs, path = storage.filesystem(storage.join(run, rel))
        rows = pq.read_table(path, columns=columns, filesystem=fs).to_pylist()
        return sorted(tuple(r[c] for c in columns) for r in rows)

    split = ["image_id", "split"]
    assert table(run_dir, "prepared/images.parquet", split) == table(
        str(tmp_path / "run"), "prepared/images.parquet", split
    )
    captions = table(run_dir, "captions.parquet", ["image_id", "caption"])
    assert len({i for i, _ in captions}) == len(captions) and len({c for _, c in captions}) > 1
    assert captions == table(str(tmp_path / "run"), "captions.parquet", ["image_id", "caption"])

    cfg = load_config(None, overrides)
    _outputs_keep_the_contracts_between_stages(cfg, manifest["stages"], scraper, tmp_path, tiny_model_dir, teacher)
    # a rerun of the finished run (from the test's own Ray, as a second driver would) recomputes nothing
    assert {r.action for r in run_pipeline(cfg, pipeline_stages(cfg))} == {"skipped"}


def _outputs_keep_the_contracts_between_stages(cfg, stages: dict, scraper, tmp_path, model: str, teacher: str) -> None:
    """Each stage's outputs, counts and metrics as the next stage and the report rely on them."""
    run = cfg.run.dir
    counts = {name: entry["counts"] for name, entry in stages.items()}
    images = pq.read_table(storage.join(run, "prepared/images.parquet")).to_pylist()
    to_caption = {i["image_id"] for i in images if i["split"] in ("labeled", "unlabeled")}
    unlabeled = {i["image_id"] for i in images if i["split"] == "unlabeled"}
    captions = pq.read_table(storage.join(run, "captions.parquet"))
    assert sorted(captions["image_id"].to_pylist()) == sorted(to_caption)  # each exactly once
    assert set(captions["teacher"].to_pylist()) == {teacher}
    recorded = stages["caption"]["plan"]  # what ran, placement included
    assert recorded["teacher"]["spec"]["model"] == teacher and recorded["teacher"]["replicas"] == 2
    assert not storage.exists(storage.join(run, "_resume", "caption"))  # partial results cleaned up on success

    assert storage.exists(storage.join(run, "generator/config.json"))
    assert storage.exists(storage.join(run, "generator/neurons/neurons.safetensors"))
    gen = counts["generator"]
    assert gen["neurons_selected"] > 0
    # fewer labeled pairs than `score_batches` batches per worker (as at 1% labels): scoring cycles them
    assert gen["labeled_qa"] < 4 * 2 * cfg.generator.score_batches
    # the labeled pairs are scheduled apart from the captions: each one trained on equally often
    assert gen["pair_views_max"] - gen["pair_views_min"] <= 1 and gen["pair_views_min"] >= 1
    assert gen["heldout_captions"] == len(unlabeled) // 10  # kept out for the caption-fidelity diagnostic

    pseudo = counts["pseudo_qa"]
    assert pseudo["generated"] == len(unlabeled)  # every request answered once, then kept or rejected
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
    _exports_load_as_trainers_load_them(run, tmp_path / "exports", kept.num_rows, model)

    assert storage.exists(storage.join(run, "target/leaml/model.safetensors"))
    tuned = counts["finetune:leaml"]  # leaml's own factor: its labeled pairs x 3, then every kept pair
    assert (tuned["labeled_rows"], tuned["pseudo_rows"]) == (3 * gen["labeled_qa"], pseudo["kept"])
    report = storage.read_json(storage.join(run, "report.json"))
    assert set(report) >= {"methods", "stages", "pseudo_qa", "config"}
    test_qa = pq.read_table(storage.join(run, "prepared/qa.parquet"), filters=[("split", "=", "test")])
    predictions = pq.read_table(storage.join(run, "predictions.parquet")).to_pylist()
    assert set(report["methods"]) == {"leaml"}
    for name in report["methods"]:
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

    # the dashboard's metrics (the head's Prometheus endpoint: the job's driver), tagged with this run
    assert scraper.total("images_captioned_total", run, "caption") == len(to_caption)
    assert scraper.total("pseudo_qa_kept_total", run, "pseudo_qa") == pseudo["kept"]
    assert scraper.total("pseudo_qa_rejected_total", run, "pseudo_qa") == pseudo["rejected"]
    assert scraper.total("answers_generated_total", run, "evaluate") == test_qa.num_rows
    for stage in ("caption", "generator", "pseudo_qa", "finetune:leaml"):
        assert scraper.total("stage_running", run, stage) == 0  # finished
    assert any(v == 1 for k, v in scraper.highest.items() if k[:3] == ("stage_running", run, "caption"))
    for name, stage in (("generator", "generator"), ("target-leaml", "finetune:leaml")):
        # rank 0 sets these while it trains (on its own node); the driver sets the final values once its workers
        # are gone, so they are on the head's endpoint however short the training was
        steps = [v for k, v in scraper.series.items() if k[:3] == ("train_step", run, name)]
        losses = [v for k, v in scraper.series.items() if k[:3] == ("train_loss", run, name)]
        rates = [v for k, v in scraper.series.items() if k[:3] == ("train_samples_per_s", run, name)]
        assert steps and max(steps) == counts[stage]["steps"], (name, sorted({k[0] for k in scraper.series}))
        assert losses and all(0 < v < 100 for v in losses) and rates and all(v > 0 for v in rates)

    # jobs/evaluate.py on the same run and model folder, from the test's own Ray: the evaluate stage's own figures
    # (greedy, the same engine)
    import ray

    from leaml_ray.cli import evaluate as evaluate_cli

    again = storage.join(run, "evaluations", "again")
    argv = ["--run", run, "--model", storage.join(run, "target/leaml"), "--name", "again", "--out", again]
    assert evaluate_cli.main(argv) == 0
    assert storage.read_json(storage.join(again, "report.json"))["methods"]["again"]["accuracy"] == pytest.approx(
        report["methods"]["leaml"]["accuracy"]
    )
    local = MetricsScraper(f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics")
    local.settle()
    assert local.total("answers_generated_total", run, "evaluate") == test_qa.num_rows


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
