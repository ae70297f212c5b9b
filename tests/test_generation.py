"""The generation engine (both in-job backends, vLLM on this CPU) against transformers, image by image."""

import threading
import time

import pytest
import ray.data

from leaml_ray.inference.generate import generate
from tests.helpers import local_engine

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ray_data_llm", "actor_pool"])
def test_engine_generates_what_transformers_does_for_every_image(greedy_reference, backend):
    spec, rows, expected = greedy_reference
    engine = local_engine(spec.model, backend=backend)
    sampling = {"temperature": 0.0, "max_tokens": 5}
    # all rows in one input block, as a stage reads one parquet file
    out = generate(ray.data.from_items(rows, override_num_blocks=1), engine, sampling)
    out = out.materialize()
    assert out.num_blocks() >= len(rows) // 2  # results stream out per engine batch, not once the input block is done
    got = out.take_all()
    assert sorted(r["image_id"] for r in got) == sorted(expected)  # every image exactly once
    assert {r["image_id"]: r["tokens"] for r in got} == expected  # different per image: the image reached the model


@pytest.mark.slow
def test_a_tensor_parallel_engine_reserves_nothing_that_outlives_its_stage(greedy_reference):
    """Tensor parallel 2 on this CPU through the production ray.data.llm path, with Ray Data's memory issue detector
    calling the stage's remote-args function every 0.2 s (every 30 s by default; ray.data.llm's "ray" executor
    minted a placement group per call, so a GPU cluster kept whole nodes reserved after captioning and the next Ray
    Train run never placed its workers): it generates what transformers does, leaves no placement group behind, and
    every CPU it held can be reserved again by a group like Ray Train's."""
    from ray.util import placement_group, placement_group_table, remove_placement_group

    def live_groups() -> set[str]:
        return {pg_id for pg_id, g in placement_group_table().items() if g["state"] != "REMOVED"}

    spec, rows, expected = greedy_reference
    detector = ray.data.DataContext.get_current().issue_detectors_config.high_memory_detector_config
    was, detector.detection_time_interval_s = detector.detection_time_interval_s, 0.2
    before = live_groups()
    try:
        engine = local_engine(spec.model, tensor_parallel_size=2)
        data = ray.data.from_items(rows, override_num_blocks=2)
        got = generate(data, engine, {"temperature": 0.0, "max_tokens": 5}).take_all()
    finally:
        detector.detection_time_interval_s = was
    assert {r["image_id"]: r["tokens"] for r in got} == expected
    assert live_groups() - before == set()
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < total:  # the engine actor's CPU comes back when it exits
        assert time.monotonic() < deadline, f"CPUs held after the stage: {ray.available_resources()}"
        time.sleep(0.5)
    group = placement_group([{"CPU": 1}] * int(total), strategy="PACK")  # every CPU, as a training group asks
    try:
        assert group.wait(timeout_seconds=30)
    finally:
        remove_placement_group(group)


@pytest.mark.slow
def test_a_killed_engine_actor_is_restarted_and_every_image_comes_out_once(greedy_reference):
    """Fault tolerance: SIGKILL the engine actor mid-run; Ray Data restarts it and retries its batches."""
    import psutil

    def engine_actors() -> list:  # our Ray instance's processes are this process's descendants
        return [p for p in psutil.Process().children(recursive=True) if "_EngineActor" in " ".join(p.cmdline())]

    spec, rows, expected = greedy_reference
    many = [{**r, "image_id": f"{r['image_id']}-{k}"} for k in range(8) for r in rows]  # 48 images
    engine = local_engine(spec.model, backend="actor_pool")
    data = ray.data.from_items(many, override_num_blocks=4)  # as a parquet read gives them: a task per block
    out = generate(data, engine, {"temperature": 0.0, "max_tokens": 5})
    got, killed = [], None
    for row in out.iter_rows():
        got.append(row)
        if killed is None:  # the engine has answered once: kill it while the rest is in flight
            actors = engine_actors()
            assert len(actors) == 1
            killed, at_kill = actors[0].pid, len(got)
            actors[0].kill()  # SIGKILL
    assert at_kill < len(many)  # the kill came while images were still to be generated
    ids = [r["image_id"] for r in got]
    assert sorted(ids) == sorted(r["image_id"] for r in many)  # every image exactly once
    assert all(r["tokens"] == expected[r["image_id"].rsplit("-", 1)[0]] for r in got)
    assert killed not in [p.pid for p in engine_actors()]


def test_in_blocks_of_cuts_blocks_with_less_than_a_cpu_free():
    """A stage's input is cut into engine-batch blocks even while engine actors or a Serve replica hold the CPUs
    (Dataset.repartition's whole-CPU tasks would wait forever there)."""
    from leaml_ray.data.blocks import in_blocks_of

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    def free() -> float:
        return ray.available_resources().get("CPU", 0.0)

    seen = [free()]
    while len(seen) < 3 or len(set(seen[-3:])) > 1:  # the last test's actors give their CPUs back a bit later
        time.sleep(0.5)
        seen.append(free())
        assert len(seen) < 60, f"CPUs never settled: {seen}"
    holders = []
    try:
        while free() >= 1:
            assert len(holders) < 5, f"cannot hold the CPUs: {free()} free"
            holders.append(Holder.options(num_cpus=free() - 0.5).remote())
            ray.get(holders[-1].ready.remote(), timeout=60)
        rows = [{"k": k} for k in range(12)]
        done = {}
        cut = lambda: done.update(out=in_blocks_of(ray.data.from_items(rows, override_num_blocks=1), 4).materialize())  # noqa: E731
        worker = threading.Thread(target=cut, daemon=True)
        worker.start()
        worker.join(120)  # a whole-CPU task never gets scheduled: fail instead of hanging the suite
        assert "out" in done, "in_blocks_of did not finish with less than a CPU free"
        out = done["out"]
        assert out.num_blocks() == 3
        assert sorted(r["k"] for r in out.take_all()) == list(range(12))
    finally:
        for holder in holders:
            ray.kill(holder)


def test_engine_stats_are_on_and_their_log_line_passes_once_per_interval(monkeypatch):
    import logging

    from leaml_ray.inference import engine

    # stats on: the log line, and the metrics that ray.data.llm (log_engine_metrics) and Serve export to Ray
    assert engine.engine_args(local_engine("m"), "m")["disable_log_stats"] is False
    clock = [100.0]
    monkeypatch.setattr(engine.time, "monotonic", lambda: clock[0])
    every = engine._StatsEvery(10.0)

    def passes(message: str) -> bool:
        return every.filter(logging.LogRecord("vllm.v1.metrics.loggers", logging.INFO, "", 0, message, (), None))

    stats = "Engine 000: Avg prompt throughput: 678.5 tokens/s, Avg generation throughput: 301.6 tokens/s, ..."
    assert passes(stats)  # the first one
    clock[0] += 4.0
    assert not passes(stats) and passes("Engine 000: another line")  # ray.data.llm's next batch; others pass
    clock[0] += 6.0
    assert passes(stats) and not passes(stats)  # 10 s after the last one let through
