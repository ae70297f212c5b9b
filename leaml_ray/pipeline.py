"""The stage runner: stages in order, each skipped when manifest.json says its outputs are current.

A stage writes its outputs into a private work folder; only when it returns are they moved into the run
directory and recorded in the manifest. A crash mid-stage therefore leaves the previous outputs (or none)
and a manifest that says the stage did not finish, and the next run redoes exactly that stage.
On an object store (s3://, gs://) a move is a copy, and AWS refuses to copy an object above 5 GiB in one request
(a 7B model's weights): there a stage writes its outputs in place, after deleting the previous ones, and the
manifest entry alone says whether they are complete. A crash mid-stage then leaves that stage's outputs incomplete
(never the previous ones) under an entry that is not done, and the next run redoes the stage.

Each stage plans, then runs (docs/design.md#plan-then-run): `plan(cfg)` reads the config once into a frozen
dataclass of what the work needs, and `run(plan, ctx)` works only from it. The stage's cache key is the hash of its
plan, less the fields that only place the work (`plan.placement()`), and the fingerprints of its inputs; the manifest
keeps each stage's whole plan as the record of what ran.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from leaml_ray import dashboard, plan, storage, tracking
from leaml_ray.config import Config
from leaml_ray.errors import UserError, did_you_mean
from leaml_ray.plan import stable_hash

log = logging.getLogger("leaml_ray")
MANIFEST = "manifest.json"
CONFIG_YAML = "config.yaml"


class StageError(UserError, RuntimeError):
    """A stage cannot run (missing inputs, unknown name)."""


@dataclass
class StageContext:
    """Where a running stage reads its inputs and writes its outputs (what it computes is in its plan)."""

    run_dir: str
    work_dir: str
    resume_dir: str  # survives a crash; kept only while the stage's plan and inputs are unchanged

    def input(self, rel: str) -> str:
        """Path of a finished earlier stage's output."""
        return storage.join(self.run_dir, rel)

    def output(self, rel: str) -> str:
        """Where this stage writes one of its declared outputs (moved into run_dir on success)."""
        return storage.join(self.work_dir, rel)


@dataclass(frozen=True)
class Stage:
    """One pipeline step and its contract: `plan` (config -> the stage's plan, pure), `run` (plan, context -> counts),
    its run-dir inputs and outputs. `inputs` and `external_inputs` (files outside the run dir, e.g. the data source)
    may be functions of the plan. A name `family:member` (finetune:lora) is also selected by its family name in `only`
    and `force`."""

    name: str
    plan: Callable[[Config], Any]
    run: Callable[[Any, StageContext], dict[str, Any]]
    outputs: tuple[str, ...]
    inputs: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    external_inputs: Callable[[Any], list[str]] = field(default=lambda plan: [])

    def input_paths(self, the_plan: Any) -> tuple[str, ...]:
        """The run-dir paths the stage reads."""
        return self.inputs(the_plan) if callable(self.inputs) else self.inputs


@dataclass
class StageResult:
    name: str
    action: str  # "ran" | "skipped"
    seconds: float
    counts: dict[str, Any]


def load_manifest(run_dir: str) -> dict:
    path = storage.join(run_dir, MANIFEST)
    return storage.read_json(path) if storage.exists(path) else {"version": 1, "stages": {}}


def _save_manifest(run_dir: str, manifest: dict) -> None:
    storage.write_json_atomic(storage.join(run_dir, MANIFEST), manifest)


def stage_key(stage: Stage, the_plan: Any, run_dir: str, producers: dict[str, str] | None = None) -> dict:
    """What decides whether a stage's outputs are current: the hash of its plan (placement left out) and the
    fingerprints of its inputs."""
    producers = producers or {}
    rels = stage.input_paths(the_plan)
    inputs = {rel: storage.fingerprint(storage.join(run_dir, rel)) for rel in rels}
    for rel, fp in inputs.items():
        if fp is None:
            hint = f"; run stage {producers[rel]} first" if rel in producers else ""
            raise StageError(f"stage {stage.name} needs {storage.join(run_dir, rel)}, which does not exist{hint}")
    for ext in stage.external_inputs(the_plan):
        fp = storage.fingerprint(ext)
        if fp is None:
            raise StageError(f"stage {stage.name}: input {ext} does not exist")
        inputs[ext] = fp
    return {"plan_hash": stable_hash(plan.hashed_fields(the_plan)), "input_hashes": inputs}


def resume_path(run_dir: str, stage_name: str, key: dict) -> str:
    """Where an attempt of a stage keeps partial results; a different key (config or inputs) starts afresh."""
    return storage.join(run_dir, "_resume", stage_name, stable_hash(key))


def _is_current(entry: dict | None, key: dict, stage: Stage, run_dir: str) -> bool:
    if not entry or entry.get("status") != "done":
        return False
    if entry.get("plan_hash") != key["plan_hash"] or entry.get("input_hashes") != key["input_hashes"]:
        return False
    outputs = {rel: storage.fingerprint(storage.join(run_dir, rel)) for rel in stage.outputs}
    return outputs == entry.get("output_hashes")


def run_pipeline(
    cfg: Config,
    stages: list[Stage],
    only: list[str] | None = None,
    before_first_run: Callable[[], None] = lambda: None,
    force: list[str] | None = None,
) -> list[StageResult]:
    """Run the given stages in order (or the named subset), skipping those whose outputs are current.

    `force` names stages to rerun even when current, together with every stage downstream of them.
    `before_first_run` (e.g. connecting to Ray) is called only when some stage has work to do.
    """
    only, force = select(stages, only), select(stages, force)
    producers = {out: s.name for s in stages for out in s.outputs}
    plans = {s.name: s.plan(cfg) for s in stages}  # pure: a config a stage cannot run with fails before any work
    run_dir = cfg.run.dir
    try:
        storage.check_reachable(run_dir)  # seconds, not pyarrow's ~100 s of retries, on a wrong endpoint or bucket
        if cfg.tracking.backend != "none":
            tracking.location(cfg)
    except (storage.StorageError, tracking.TrackingError) as e:
        raise StageError(str(e)) from None
    with run_lock(run_dir):
        forced = downstream(stages, plans, force or [])
        return _run_stages(cfg, stages, plans, only, before_first_run, producers, forced)


def select(stages: list[Stage], names: list[str] | None) -> list[str] | None:
    """The stage names that `names` (stage names, or family names like `finetune`) pick; unknown ones are an error."""
    if names is None:
        return None
    picked = {n: [s.name for s in stages if n in (s.name, s.name.split(":")[0])] for n in names}
    unknown = [n for n, found in picked.items() if not found]
    if unknown:
        names = [s.name for s in stages] + sorted({s.name.split(":")[0] for s in stages if ":" in s.name})
        hints = ", ".join(f"{n}{did_you_mean(n, names)}" for n in unknown)
        raise StageError(f"unknown stage(s) {hints}; available: {', '.join(s.name for s in stages)}")
    return [name for found in picked.values() for name in found]


def downstream(stages: list[Stage], plans: dict[str, Any], names: list[str]) -> set[str]:
    """The named stages and every stage that reads, directly or not, what one of them writes."""
    out = set(names)
    for stage in stages:  # in pipeline order, so one pass sees every chain
        rels = stage.input_paths(plans[stage.name])
        writers = {s.name for s in stages for o in s.outputs for rel in rels if rel == o or rel.startswith(o + "/")}
        if writers & out:
            out.add(stage.name)
    return out


def _run_stages(
    cfg: Config,
    stages: list[Stage],
    plans: dict[str, Any],
    only: list[str] | None,
    before_first_run: Callable[[], None],
    producers: dict,
    forced: set[str],
) -> list[StageResult]:
    run_dir = cfg.run.dir
    manifest = load_manifest(run_dir)
    manifest["config"] = cfg.resolved()  # jobs/evaluate.py and jobs/serve.py --run load it back
    # the resolved config of the latest invocation, beside its outputs (the manifest keeps it per stage hash)
    storage.write_bytes_atomic(storage.join(run_dir, CONFIG_YAML), storage.redact(cfg.to_yaml()).encode())
    storage.delete(storage.join(run_dir, "_work"))  # left by a killed run
    results: list[StageResult] = []
    tracker: tracking.Tracker | None = None
    try:
        for stage in stages:
            if only and stage.name not in only:
                continue
            key = stage_key(stage, plans[stage.name], run_dir, producers)
            entry = manifest["stages"].get(stage.name)
            if stage.name not in forced and _is_current(entry, key, stage, run_dir):
                log.info("stage %s: outputs are current, skipped", stage.name)
                entry["last_action"] = "skipped"
                results.append(StageResult(stage.name, "skipped", 0.0, entry.get("counts", {})))
                _save_manifest(run_dir, manifest)
                continue
            if all(r.action == "skipped" for r in results):
                before_first_run()
                tracker = tracking.Tracker(cfg) if cfg.tracking.backend != "none" else None
            results.append(_run_stage(stage, plans[stage.name], run_dir, manifest, key))
            if tracker:
                tracker.stage_done(stage.name, stage.outputs, results[-1].seconds, results[-1].counts)
    except BaseException:
        if tracker:
            tracker.close(ok=False)
        raise
    if tracker:
        tracker.close(ok=True)
    storage.delete(storage.join(run_dir, "_work"))
    return results


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Hold `<run_dir>/.lock` while a run works there: a second run on the same dir is refused with who holds it.
    A lock left by a killed run on this host (its pid is gone) is taken over."""
    path = storage.join(run_dir, ".lock")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    while not storage.create_exclusive(path, json.dumps(me).encode()):
        try:
            other = storage.read_json(path)
        except (OSError, ValueError):
            continue  # released (or half-written) between our create and read: try again
        if other.get("host") == me["host"] and not _alive(int(other.get("pid", 0))):
            log.warning("run dir %s: lock of pid %s (no longer running) taken over", run_dir, other.get("pid"))
            storage.delete(path)
            continue
        raise StageError(
            f"run dir {run_dir} is in use by pid {other.get('pid')} on {other.get('host')} since "
            f"{other.get('started')}; wait for that run to finish (or delete {path} if it is gone)"
        )
    try:
        yield
    finally:
        storage.delete(path)


def _run_stage(stage: Stage, the_plan: Any, run_dir: str, manifest: dict, key: dict) -> StageResult:
    # object stores: outputs are written in place (see the module docstring), the manifest entry is the commit
    in_place = storage.on_object_store(run_dir)
    work_dir = run_dir if in_place else storage.join(run_dir, "_work", f"{stage.name}-{uuid.uuid4().hex[:8]}")
    resume_root = storage.join(run_dir, "_resume", stage.name)
    resume_dir = resume_path(run_dir, stage.name, key)
    entry = {**key, "status": "running", "started": time.time(), "last_action": "ran", "plan": plan.values(the_plan)}
    manifest["stages"][stage.name] = entry
    _save_manifest(run_dir, manifest)
    if in_place:  # the entry no longer vouches for them: a rerun must not mix its files with the last attempt's
        for rel in stage.outputs:
            storage.delete(storage.join(run_dir, rel))
    log.info("stage %s: started", stage.name)
    dashboard.gauge("stage_running", 1, run_dir, stage.name)
    t0 = time.perf_counter()
    try:
        ctx = StageContext(run_dir=run_dir, work_dir=work_dir, resume_dir=resume_dir)
        counts = stage.run(the_plan, ctx) or {}
        for rel in stage.outputs:
            src = storage.join(work_dir, rel)
            if not storage.exists(src):
                raise StageError(f"stage {stage.name} did not write its declared output {rel}")
            if not in_place:
                storage.replace(src, storage.join(run_dir, rel))
    except BaseException as e:
        entry.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000], seconds=time.perf_counter() - t0)
        _save_manifest(run_dir, manifest)
        raise
    finally:
        if not in_place:
            storage.delete(work_dir)
        dashboard.gauge("stage_running", 0, run_dir, stage.name)
    storage.delete(resume_root)  # partial results of this or older attempts are now in the outputs
    seconds = time.perf_counter() - t0
    entry.update(
        status="done",
        finished=time.time(),
        seconds=round(seconds, 3),
        counts=counts,
        output_hashes={rel: storage.fingerprint(storage.join(run_dir, rel)) for rel in stage.outputs},
    )
    entry.pop("error", None)
    _save_manifest(run_dir, manifest)
    log.info("stage %s: done in %.1f s %s", stage.name, seconds, _brief(counts))
    return StageResult(stage.name, "ran", seconds, counts)


def _brief(counts: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in counts.items() if isinstance(v, (int, float, str)))


def summary(results: list[StageResult]) -> str:
    """A small table of what each stage did, for the end of a run."""
    rows = [f"{'stage':<12} {'action':<8} {'seconds':>8}  counts"]
    for r in results:
        rows.append(f"{r.name:<12} {r.action:<8} {r.seconds:>8.1f}  {_brief(r.counts)}")
    return "\n".join(rows)
