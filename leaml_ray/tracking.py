"""Experiment tracking: each pipeline invocation that runs a stage becomes one MLflow run, one TensorBoard log
folder or one W&B run (`tracking.backend`; default none). Logged from the driver as each stage finishes: the resolved
config (once), the stage's seconds and counts, the training curves of what it trained (its `train_log.json`: losses,
QA and caption loss apart, learning rate, samples/s per optimizer step), and from evaluate the accuracies with
report.md, the plots and config.yaml as artifacts. Works offline: an MLflow SQLite store `<run.dir>/mlflow.db` with
artifacts in `<run.dir>/mlartifacts`, unless `tracking.uri` or the standard MLFLOW_TRACKING_URI say otherwise;
TensorBoard event files under `<run.dir>/tensorboard`; a W&B offline run under `<run.dir>/wandb` (`wandb sync` uploads
it; WANDB_MODE=online logs live).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from leaml_ray import storage
from leaml_ray.config import Config
from leaml_ray.errors import UserError

PLOTS = ("accuracy.png", "loss.png", "neuron_scores.png")  # evaluate's plots/ (those a run has)
CURVES = ("loss", "loss_qa", "loss_cap", "lr", "samples_per_s")  # per optimizer step, from train_log.json


class TrackingError(UserError, ValueError):
    """A tracking setting that cannot work."""


def location(cfg: Config) -> str:
    """Where the backend writes: tracking.uri, MLFLOW_TRACKING_URI (mlflow), or a folder under a local run dir."""
    t = cfg.tracking
    uri = t.uri or (os.environ.get("MLFLOW_TRACKING_URI") if t.backend == "mlflow" else None)
    allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1")  # as MLflow reads it
    if uri and t.backend == "mlflow" and _file_store(uri) and not allowed:
        # MLflow 3 refuses a folder store with a page-long exception, minutes into a run (file_store.py)
        raise TrackingError(
            f"tracking: MLflow 3 no longer writes a folder store ({uri}): use"
            " sqlite:///PATH/mlflow.db or an http(s):// tracking server, or set MLFLOW_ALLOW_FILE_STORE=true"
        )
    if uri:
        return uri
    if "://" in cfg.run.dir:
        raise TrackingError(
            f"tracking.backend={t.backend} with run.dir on {cfg.run.dir.split('://')[0]}://: set tracking.uri"
            + (" (or MLFLOW_TRACKING_URI)" if t.backend == "mlflow" else " to a local folder")
        )
    run_dir = Path(cfg.run.dir).resolve()
    if t.backend == "mlflow":
        return f"sqlite:///{run_dir / 'mlflow.db'}"
    return str(run_dir / "tensorboard") if t.backend == "tensorboard" else str(run_dir)


def _file_store(uri: str) -> bool:
    """A URI MLflow reads as a folder store: file://, or a plain path."""
    return uri.startswith("file:") or ("://" not in uri and not uri.startswith(("databricks", "uc")))


class Tracker:
    """One invocation's record in a tracking backend (see the module docstring)."""

    def __init__(self, cfg: Config) -> None:
        self.run_dir, self.backend = cfg.run.dir, cfg.tracking.backend
        where = location(cfg)
        name = f"{Path(self.run_dir.rstrip('/')).name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if self.backend == "mlflow":
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=where)
            experiment = self.client.get_experiment_by_name(cfg.tracking.experiment)
            if experiment:
                experiment_id = experiment.experiment_id
            else:  # artifacts beside our own store (MLflow's default is relative to the working dir)
                own = where.endswith("/mlflow.db") and not cfg.tracking.uri
                artifacts = (Path(cfg.run.dir).resolve() / "mlartifacts").as_uri() if own else None
                experiment_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
            run = self.client.create_run(experiment_id, run_name=name, tags={"leaml.run_dir": self.run_dir})
            self.run_id = run.info.run_id
            self._params(_flat(yaml.safe_load(storage.redact(cfg.to_yaml()))))
        elif self.backend == "wandb":
            import wandb

            Path(where).mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(
                project=cfg.tracking.experiment,
                name=name,
                dir=where,
                mode=os.environ.get("WANDB_MODE", "offline"),
                config=_flat(yaml.safe_load(storage.redact(cfg.to_yaml()))),
                tags=["leaml-ray"],
                notes=f"run dir {self.run_dir}",
                reinit="create_new",
                settings=wandb.Settings(silent=True, x_disable_stats=True),  # no machine stats sampler thread
            )
            self.step_metrics: set[str] = set()
        else:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(logdir=str(Path(where) / name))
            self.writer.add_text("config", "```yaml\n" + storage.redact(cfg.to_yaml()) + "\n```", 0)

    def stage_done(self, stage: str, outputs: tuple[str, ...], seconds: float, counts: dict[str, Any]) -> None:
        """Log a finished stage: seconds and numeric counts, the curves of what it trained, the report's figures."""
        scalars = {f"{stage}/seconds": seconds, **{f"{stage}/{k}": v for k, v in _flat(counts).items() if _num(v)}}
        self._scalars(scalars, 0)
        for rel in outputs:
            log_path = storage.join(self.run_dir, rel, "train_log.json")
            if storage.exists(log_path):
                for record in storage.read_json(log_path):
                    curve = {f"{stage}/{k}": record[k] for k in CURVES if _num(record.get(k))}
                    self._scalars(curve, int(record["step"]))
        if "report.json" in outputs:
            self._report()

    def close(self, ok: bool) -> None:
        """End the record (MLflow run status FINISHED or FAILED; W&B exit code 0 or 1; TensorBoard events flushed)."""
        if self.backend == "mlflow":
            self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")
        elif self.backend == "wandb":
            self.wandb.finish(exit_code=0 if ok else 1)
        else:
            self.writer.close()

    def _report(self) -> None:
        report = storage.read_json(storage.join(self.run_dir, "report.json"))
        accuracy = {}
        for method, m in report["methods"].items():
            accuracy[f"accuracy/{method}"] = m["accuracy"]
            accuracy.update({f"accuracy/{method}/{c}": v for c, v in m["per_category"].items() if _num(v)})
        accuracy.update({f"precondition/{k}": v for k, v in report.get("precondition", {}).items() if _num(v)})
        self._scalars(accuracy, 0)
        for rel in ("report.md", "config.yaml", "report.json", *(f"plots/{p}" for p in PLOTS)):
            path = storage.join(self.run_dir, rel)
            if storage.exists(path):
                self._artifact(rel, storage.read_bytes(path))

    def _params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if not values:
            return
        if self.backend == "mlflow":
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        elif self.backend == "wandb":
            # a W&B run's own step must only grow, and each training stage counts from 1: one x-axis per
            # prefix ("generator/step", "accuracy/step"), as W&B's define_metric documents
            groups: dict[str, dict[str, float]] = {}
            for k, v in values.items():
                groups.setdefault(k.split("/", 1)[0], {})[k] = float(v)
            for prefix, group in groups.items():
                if prefix not in self.step_metrics:
                    self.wandb.define_metric(f"{prefix}/step")
                    self.wandb.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
                    self.step_metrics.add(prefix)
                self.wandb.log({**group, f"{prefix}/step": step})
        else:
            for k, v in values.items():
                self.writer.add_scalar(k, float(v), step)

    def _artifact(self, rel: str, data: bytes) -> None:
        if self.backend == "mlflow":
            with tempfile.TemporaryDirectory() as d:
                path = Path(d, Path(rel).name)
                path.write_bytes(data)
                folder = str(Path(rel).parent)
                self.client.log_artifact(self.run_id, str(path), None if folder == "." else folder)
        elif self.backend == "wandb":
            # files in the run's folder are the run's files (uploaded by `wandb sync`); plots also as images; the
            # config is the run's config already, and config.yaml is a name W&B reserves for it there
            if rel == "config.yaml":
                return
            path = Path(self.wandb.dir, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if rel.endswith(".png"):
                import wandb
                from PIL import Image

                self.wandb.log({rel: wandb.Image(Image.open(io.BytesIO(data)).convert("RGB"))})
        elif rel.endswith(".png"):
            import numpy as np
            from PIL import Image

            image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            self.writer.add_image(rel, image, 0, dataformats="HWC")
        elif rel.endswith(".md"):
            self.writer.add_text(rel, data.decode(), 0)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
