"""The generation engine (both in-job backends, vLLM on this CPU) against transformers, image by image."""

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
