"""The stage runner: skip when current, resume after a crash, rerun on changes (toy stages, no Ray)."""

import json
from dataclasses import dataclass

import pytest

from leaml_ray import storage
from leaml_ray.config import load_config
from leaml_ray.pipeline import Stage, StageError, load_manifest, run_pipeline
from leaml_ray.plan import placement
from tests.conftest import make_config


@dataclass(frozen=True)
class Value:
    """A toy stage's plan: one setting."""

    value: object


def no_settings(cfg) -> Value:
    return Value(None)


class Calls:
    def __init__(self):
        self.names = []
        self.fail_in = None


def toy_stages(calls: Calls) -> list[Stage]:
    def first(plan, ctx):
        calls.names.append("first")
        storage.write_bytes_atomic(ctx.output("a/data.txt"), f"seed={plan.value}".encode())
        return {"rows": 3}

    def second(plan, ctx):
        calls.names.append("second")
        text = storage.read_bytes(ctx.input("a/data.txt")).decode()
        storage.write_bytes_atomic(ctx.output("b.txt"), b"partial")
        if calls.fail_in == "second":
            raise RuntimeError("boom")
        storage.write_bytes_atomic(ctx.output("b.txt"), (text + "|ratio=" + str(plan.value)).encode())
        return {}

    return [
        Stage("first", lambda cfg: Value(cfg.run.seed), first, outputs=("a",)),
        Stage("second", lambda cfg: Value(cfg.data.label_ratio), second, outputs=("b.txt",), inputs=("a",)),
    ]


def test_rerun_of_a_finished_run_does_no_work(tmp_path):
    calls, cfg = Calls(), make_config(tmp_path)
    results = run_pipeline(cfg, toy_stages(calls))
    assert [r.action for r in results] == ["ran", "ran"] and calls.names == ["first", "second"]
    results = run_pipeline(cfg, toy_stages(calls))
    assert [r.action for r in results] == ["skipped", "skipped"] and calls.names == ["first", "second"]
    manifest = load_manifest(cfg.run.dir)
    assert manifest["stages"]["first"]["status"] == "done" and manifest["stages"]["first"]["counts"] == {"rows": 3}
    assert manifest["stages"]["second"]["last_action"] == "skipped"
    assert not (tmp_path / "run" / "_work").exists()


def test_crash_keeps_disk_clean_and_rerun_resumes_at_the_failed_stage(tmp_path):
    calls, cfg = Calls(), make_config(tmp_path)
    calls.fail_in = "second"
    with pytest.raises(RuntimeError, match="boom"):
        run_pipeline(cfg, toy_stages(calls))
    entry = load_manifest(cfg.run.dir)["stages"]["second"]
    assert entry["status"] == "failed" and "boom" in entry["error"]
    assert not (tmp_path / "run" / "b.txt").exists()  # the partial output never reached the run dir
    calls.fail_in, calls.names = None, []
    results = run_pipeline(cfg, toy_stages(calls))
    assert [r.action for r in results] == ["skipped", "ran"] and calls.names == ["second"]
    assert (tmp_path / "run" / "b.txt").read_text() == "seed=0|ratio=0.05"


def test_killed_run_left_running_status_and_work_dir_then_resumes(tmp_path):
    calls, cfg = Calls(), make_config(tmp_path)
    run_pipeline(cfg, toy_stages(calls))
    manifest = load_manifest(cfg.run.dir)
    manifest["stages"]["second"]["status"] = "running"  # as if the driver was killed mid-stage
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "run" / "_work" / "second-dead").mkdir(parents=True)
    calls.names = []
    results = run_pipeline(cfg, toy_stages(calls))
    assert [r.action for r in results] == ["skipped", "ran"]
    assert not (tmp_path / "run" / "_work").exists()


def test_config_change_reruns_the_dependent_stage_only(tmp_path):
    calls = Calls()
    run_pipeline(make_config(tmp_path), toy_stages(calls))
    calls.names = []
    run_pipeline(make_config(tmp_path, "data.label_ratio=0.5", "teacher.max_new_tokens=3"), toy_stages(calls))
    assert calls.names == ["second"]
    calls.names = []
    run_pipeline(make_config(tmp_path, "data.label_ratio=0.5", "run.seed=4"), toy_stages(calls))
    assert calls.names == ["first", "second"]  # new upstream output -> downstream input hash changed
    assert (tmp_path / "run" / "b.txt").read_text() == "seed=4|ratio=0.5"


def test_force_reruns_the_named_stage_and_every_stage_that_reads_it(tmp_path):
    calls, cfg = Calls(), make_config(tmp_path)

    def apart(name):  # reads nothing the others write
        def run(plan, ctx):
            calls.names.append(name)
            storage.write_bytes_atomic(ctx.output(f"{name}.txt"), b"c")
            return {}

        return Stage(name, no_settings, run, outputs=(f"{name}.txt",))

    stages = [*toy_stages(calls), apart("apart:x"), apart("apart:y")]
    run_pipeline(cfg, stages)
    calls.names = []
    results = run_pipeline(cfg, stages, force=["first"])
    assert calls.names == ["first", "second"] and [r.action for r in results] == ["ran", "ran", "skipped", "skipped"]
    calls.names = []
    run_pipeline(cfg, stages, force=["second", "apart"])  # a family name picks each of its members
    assert calls.names == ["second", "apart:x", "apart:y"]
    calls.names = []
    run_pipeline(cfg, stages, force=["apart:y"])
    assert calls.names == ["apart:y"]
    calls.names = []
    run_pipeline(cfg, stages)  # forcing is one invocation's: the next run skips again
    assert calls.names == []
    with pytest.raises(StageError, match="unknown stage\\(s\\) nope; available"):
        run_pipeline(cfg, stages, force=["nope"])
    with pytest.raises(StageError, match="unknown stage\\(s\\) apar \\(did you mean 'apart'\\?\\)"):
        run_pipeline(cfg, stages, force=["apar"])


def test_the_manifest_records_each_plan_and_placement_never_reruns_a_stage(tmp_path):
    @dataclass(frozen=True)
    class Placed:
        ratio: float
        replicas: int = placement()

    seen = []

    def run(plan, ctx):
        seen.append(plan)
        return {"ratio": plan.ratio}

    stage = Stage("placed", lambda cfg: Placed(cfg.data.label_ratio, cfg.teacher.replicas), run, outputs=())
    cfg = make_config(tmp_path)
    assert run_pipeline(cfg, [stage])[0].counts == {"ratio": 0.05}
    assert load_manifest(cfg.run.dir)["stages"]["placed"]["plan"] == {"ratio": 0.05, "replicas": 1}  # what ran
    assert run_pipeline(make_config(tmp_path, "teacher.replicas=3"), [stage])[0].action == "skipped"
    assert run_pipeline(make_config(tmp_path, "data.label_ratio=0.5"), [stage])[0].action == "ran"
    assert seen == [Placed(0.05, 1), Placed(0.5, 1)]
    assert load_manifest(cfg.run.dir)["stages"]["placed"]["plan"] == {"ratio": 0.5, "replicas": 1}


def test_a_config_no_stage_can_run_with_fails_before_any_work(tmp_path):
    def refuse(cfg):
        raise StageError("evaluate: nothing to evaluate")

    calls = Calls()
    with pytest.raises(StageError, match="nothing to evaluate"):
        run_pipeline(make_config(tmp_path), [*toy_stages(calls), Stage("last", refuse, lambda p, c: {}, outputs=())])
    assert calls.names == []  # every plan is made before the first stage runs


def test_the_resolved_config_is_saved_in_the_run_dir_and_loads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_123")
    cfg = make_config(tmp_path, "data.label_ratio=0.2", "cluster.address=ray://u:hf_not_a_real_token_123@head:1")
    run_pipeline(cfg, toy_stages(Calls()))
    saved = tmp_path / "run" / "config.yaml"
    assert "hf_not_a_real_token" not in saved.read_text()
    again = load_config(str(saved))
    assert again.data.label_ratio == 0.2 and again.model_dump(exclude={"cluster"}) == cfg.model_dump(
        exclude={"cluster"}
    )
    # the manifest's config loads back as jobs/evaluate.py and jobs/serve.py --run load it (a config that names a
    # learning rate its runs never use refuses itself: the manifest leaves those out, as config.yaml does)
    base = {k: v for k, v in load_manifest(cfg.run.dir)["config"].items() if k != "run"}
    again = load_config(None, [f"run.dir={cfg.run.dir}"], base=base)
    assert again.model_dump(exclude={"cluster"}) == cfg.model_dump(exclude={"cluster"})  # cluster: its secret redacted


def test_deleted_output_is_rebuilt(tmp_path):
    calls, cfg = Calls(), make_config(tmp_path)
    run_pipeline(cfg, toy_stages(calls))
    (tmp_path / "run" / "b.txt").unlink()
    calls.names = []
    run_pipeline(cfg, toy_stages(calls))
    assert calls.names == ["second"]


def test_stage_subset_and_missing_input(tmp_path):
    calls, cfg = Calls(), make_config(tmp_path)
    with pytest.raises(StageError, match=r"stage second needs .*a, which does not exist; run stage first first"):
        run_pipeline(cfg, toy_stages(calls), only=["second"])
    run_pipeline(cfg, toy_stages(calls), only=["first"])
    assert calls.names == ["first"]
    with pytest.raises(StageError, match="unknown stage"):
        run_pipeline(cfg, toy_stages(calls), only=["third"])


def test_stage_that_does_not_write_its_output_fails(tmp_path):
    cfg = make_config(tmp_path)
    stage = Stage("lazy", no_settings, lambda plan, ctx: {}, outputs=("x.parquet",))
    with pytest.raises(StageError, match="did not write its declared output x.parquet"):
        run_pipeline(cfg, [stage])
    assert load_manifest(cfg.run.dir)["stages"]["lazy"]["status"] == "failed"


def test_run_dir_as_uri(tmp_path):
    calls = Calls()
    cfg = make_config(tmp_path, f"run.dir=file://{tmp_path}/uri-run")
    run_pipeline(cfg, toy_stages(calls))
    assert (tmp_path / "uri-run" / "b.txt").exists() and (tmp_path / "uri-run" / "manifest.json").exists()
    assert [r.action for r in run_pipeline(cfg, toy_stages(calls))] == ["skipped", "skipped"]


def test_on_an_object_store_stages_commit_in_place_and_the_manifest_says_what_is_complete(tmp_path, s3_run_dir):
    """S3 has no rename and AWS refuses to copy an object above 5 GiB in one request (the test store: above 1 MiB):
    a stage's large outputs are written once, in place. A crash leaves them incomplete under an entry that is not
    done; the rerun deletes them first, so no file of the failed attempt survives into the finished output."""
    from tests.conftest import S3_COPY_LIMIT

    weights = b"w" * (3 * S3_COPY_LIMIT)
    crash = [True]

    def train(plan, ctx):
        storage.write_bytes_atomic(ctx.output("model/model-00001-of-00002.safetensors"), weights)
        if crash[0]:
            storage.write_bytes_atomic(ctx.output("model/stale-from-the-crash"), b"x")
            raise RuntimeError("node lost")
        storage.write_bytes_atomic(ctx.output("model/model-00002-of-00002.safetensors"), weights)
        return {}

    stages = [Stage("train", no_settings, train, outputs=("model",))]
    cfg = make_config(tmp_path, f"run.dir={s3_run_dir}")
    with pytest.raises(RuntimeError, match="node lost"):
        run_pipeline(cfg, stages)
    assert load_manifest(s3_run_dir)["stages"]["train"]["status"] == "failed"
    crash[0] = False
    assert [r.action for r in run_pipeline(cfg, stages)] == ["ran"]
    model = storage.join(s3_run_dir, "model")
    assert not storage.exists(storage.join(model, "stale-from-the-crash"))
    assert storage.read_bytes(storage.join(model, "model-00002-of-00002.safetensors")) == weights
    assert not storage.exists(storage.join(s3_run_dir, "_work"))
    assert [r.action for r in run_pipeline(cfg, stages)] == ["skipped"]


def test_before_first_run_only_when_work_is_needed(tmp_path):
    calls, cfg, hooks = Calls(), make_config(tmp_path), []
    run_pipeline(cfg, toy_stages(calls), before_first_run=lambda: hooks.append(1))
    run_pipeline(cfg, toy_stages(calls), before_first_run=lambda: hooks.append(1))
    assert hooks == [1]


def test_a_second_run_on_the_same_dir_is_refused_while_one_runs(tmp_path):
    cfg = make_config(tmp_path)
    seen = []

    def nested(plan, ctx):
        # a second pipeline on the same run dir while this one holds it
        with pytest.raises(StageError, match=r"run dir .* is in use by pid \d+ on .* since"):
            run_pipeline(cfg, toy_stages(Calls()))
        seen.append("refused")
        storage.write_bytes_atomic(ctx.output("x.txt"), b"x")
        return {}

    run_pipeline(cfg, [Stage("outer", no_settings, nested, outputs=("x.txt",))])
    assert seen == ["refused"]
    assert not (tmp_path / "run" / ".lock").exists()  # released at the end
    assert [r.action for r in run_pipeline(cfg, toy_stages(Calls()))] == ["ran", "ran"]  # free again


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    import socket
    import subprocess

    cfg = make_config(tmp_path)
    proc = subprocess.Popen(["true"])
    proc.wait()
    (tmp_path / "run").mkdir(parents=True)
    lock = {"pid": proc.pid, "host": socket.gethostname(), "started": "earlier"}
    (tmp_path / "run" / ".lock").write_text(json.dumps(lock))
    assert [r.action for r in run_pipeline(cfg, toy_stages(Calls()))] == ["ran", "ran"]
    lock["host"] = "another-host"  # a live run elsewhere (we cannot tell): refused
    (tmp_path / "run" / ".lock").write_text(json.dumps(lock))
    with pytest.raises(StageError, match="in use by pid .* on another-host"):
        run_pipeline(cfg, toy_stages(Calls()))


def test_secrets_from_the_environment_never_reach_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "abc/not+real/secret0987")
    cfg = make_config(tmp_path, "cluster.address=ray://user:hf_not_a_real_token_123@head:10001")

    def leaky(plan, ctx):
        raise RuntimeError("could not reach s3 with key abc/not+real/secret0987")

    with pytest.raises(RuntimeError):
        run_pipeline(cfg, [Stage("leaky", no_settings, leaky, outputs=("y.txt",))])
    text = (tmp_path / "run" / "manifest.json").read_text()
    assert "could not reach s3 with key ***" in text and "ray://user:***@head" in text
    assert "hf_not_a_real_token" not in text and "secret0987" not in text
