"""Experiment tracking through the stage runner (toy stages, no Ray): what a run logs is read back with MLflow's own
client from its file store and with TensorBoard's own event reader."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from leaml_ray import storage, tracking
from leaml_ray.pipeline import Stage, StageError, run_pipeline
from tests.conftest import make_config

HISTORY = [
    {"step": s, "loss": 2.0 / s, "loss_qa": 1.0 / s, "loss_cap": 1.0 / s, "lr": 1e-3, "epoch": 0} for s in (1, 2, 3)
]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def toy_stages(fail: bool = False) -> list[Stage]:
    def train(plan, ctx):
        storage.write_json_atomic(ctx.output("generator/train_log.json"), HISTORY)
        return {"steps": 3, "final_loss": 0.667, "scope": "full"}

    def evaluate(plan, ctx):
        if fail:
            raise RuntimeError("evaluate broke")
        report = {
            "methods": {"leaml": {"accuracy": 0.5, "per_category": {"color": 0.75, "count": 0.25}, "n": 8}},
            "precondition": {"generator": 0.4, "labeled_only": 0.3},
        }
        storage.write_json_atomic(ctx.output("report.json"), report)
        storage.write_bytes_atomic(ctx.output("report.md"), b"# leaml-ray report\n")
        storage.write_bytes_atomic(ctx.output("plots/accuracy.png"), _png())
        return {"leaml": 0.5}

    return [
        Stage("generator", lambda cfg: cfg.generator.epochs, train, outputs=("generator",)),
        Stage(
            "evaluate", lambda cfg: None, evaluate, outputs=("report.json", "report.md", "plots"), inputs=("generator",)
        ),
    ]


def test_mlflow_run_holds_config_stage_figures_curves_accuracies_and_artifacts(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_config(tmp_path, "tracking.backend=mlflow", "generator.epochs=3")
    run_pipeline(cfg, toy_stages())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("leaml-ray").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["leaml.run_dir"] == cfg.run.dir
    assert run.data.params["generator.epochs"] == "3.0" and run.data.params["run.dir"] == cfg.run.dir
    metrics = run.data.metrics
    assert metrics["generator/steps"] == 3 and metrics["accuracy/leaml"] == 0.5
    assert metrics["accuracy/leaml/color"] == 0.75 and metrics["precondition/generator"] == 0.4
    curve = client.get_metric_history(run.info.run_id, "generator/loss_cap")
    assert sorted((m.step, m.value) for m in curve) == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report.json", "config.yaml", "plots"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/accuracy.png"]
    (tmp_path / "dl").mkdir()
    local = client.download_artifacts(run.info.run_id, "report.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == json.loads((tmp_path / "run" / "report.json").read_text())

    run_pipeline(cfg, toy_stages())  # nothing to do: no second, empty run
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_failed_stage_ends_its_mlflow_run_failed_and_honours_the_tracking_uri(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    cfg = make_config(tmp_path, "tracking.backend=mlflow", "tracking.experiment=mine")
    with pytest.raises(RuntimeError, match="evaluate broke"):
        run_pipeline(cfg, toy_stages(fail=True))
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert run.info.status == "FAILED" and run.data.metrics["generator/final_loss"] == 0.667
    assert not (tmp_path / "run" / "mlflow.db").exists()


def test_tensorboard_events_hold_curves_accuracies_and_plots(tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    cfg = make_config(tmp_path, "tracking.backend=tensorboard")
    run_pipeline(cfg, toy_stages())
    events = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    (name,) = events.Runs()
    scalars = events.Runs()[name]["scalars"]
    assert {"generator/loss", "generator/loss_qa", "generator/lr", "accuracy/leaml", "evaluate/seconds"} <= set(scalars)
    assert [(e.step, e.value) for e in events.Scalars(name, "generator/loss")] == [
        (1, 2.0),
        (2, 1.0),
        (3, pytest.approx(2 / 3)),
    ]
    assert events.Scalars(name, "accuracy/leaml")[0].value == 0.5
    assert events.Images(name, "plots/accuracy.png")[0].width == 8


def read_wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (`run-<id>.wandb`): W&B's LevelDB-style log, a 7-byte file
    header (":W&B", magic, version), then 32 KiB blocks of chunks with a 7-byte header (crc32, length, type: 1 whole,
    2 first, 3 middle, 4 last). wandb 0.31 reads it only in its Go core, so the test walks the format itself."""
    import struct
    import zlib

    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue  # zero padding
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_holds_config_curves_on_their_own_axes_accuracies_and_files(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_config(tmp_path, "tracking.backend=wandb", "generator.epochs=3")
    run_pipeline(cfg, toy_stages())
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds and "exit" in kinds and records[kinds.index("exit")].exit.exit_code == 0
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = r.run.config.update if kind == "run" else r.config.update
            config.update({item.key: json.loads(item.value_json) for item in items})
    assert config["generator.epochs"] == 3.0 and config["run.dir"] == cfg.run.dir
    rows = [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    curve = [(row["generator/step"], row["generator/loss_cap"]) for row in rows if "generator/loss_cap" in row]
    assert curve == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]  # each stage on its own x-axis
    accuracy = next(row for row in rows if "accuracy/leaml" in row)
    assert accuracy["accuracy/leaml"] == 0.5 and accuracy["accuracy/leaml/color"] == 0.75
    assert any(row.get("generator/steps") == 3 for row in rows)
    assert any(row.get("plots/accuracy.png/_type") == "image-file" for row in rows)
    files = run_file.parent / "files"
    assert (files / "report.md").read_bytes() == b"# leaml-ray report\n" and (files / "plots" / "accuracy.png").exists()
    assert json.loads((files / "report.json").read_text())["methods"]["leaml"]["accuracy"] == 0.5


def test_tracking_that_cannot_work_is_one_line_before_any_stage(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_config(tmp_path, "tracking.backend=tensorboard", "run.dir=s3://bucket/run")
    monkeypatch.setattr(storage, "check_reachable", lambda path: None)
    with pytest.raises(StageError, match="tracking.backend=tensorboard with run.dir on s3://: set tracking.uri"):
        run_pipeline(cfg, toy_stages())


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "./mlruns"])
def test_an_mlflow_folder_store_is_one_line_before_any_stage(tmp_path, monkeypatch, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = make_config(tmp_path, "tracking.backend=mlflow")
    with pytest.raises(StageError, match=r"no longer writes a folder store .*: use sqlite:///PATH/mlflow.db") as e:
        run_pipeline(cfg, toy_stages())
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()  # nothing ran
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-out is honoured
    assert tracking.location(cfg) == uri
