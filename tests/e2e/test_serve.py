"""ray.serve.llm: the served model (jobs/serve.py, jobs/serve_teacher.py) answers what transformers does."""

import socket
from dataclasses import replace

import pytest
import ray.data

from leaml_ray.inference import client, deploy
from leaml_ray.inference.generate import generate
from tests.helpers import local_engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_local, greedy_reference):
    """The reference model served on 127.0.0.1 under the id "zoo:tiny" for this module."""
    from ray import serve as ray_serve

    spec, _, _ = greedy_reference
    url = deploy.start("zoo:tiny", local_engine(spec.model, batch_size=4), port=free_port())
    yield url
    ray_serve.shutdown()


@pytest.mark.slow
def test_chat_completion_round_trip_matches_transformers(served, greedy_reference):
    _, rows, expected = greedy_reference
    assert client.served_models(served) == ["zoo_tiny"]  # no colon: ray.serve.llm reads it as a LoRA adapter
    assert served.startswith("http://127.0.0.1:")  # bound to loopback by default
    for row in rows[:3]:
        body = client.chat_request("zoo:tiny", row["image"], row["instruction"], {"temperature": 0.0, "max_tokens": 5})
        choice = client.ask(served, body)["choices"][0]
        assert choice["token_ids"] == expected[row["image_id"]]
        assert choice["message"]["role"] == "assistant"


@pytest.mark.slow
def test_generate_through_the_served_teacher_matches_offline_greedy(served, greedy_reference):
    spec, rows, expected = greedy_reference
    # the id it is served under, at its endpoint
    teacher = local_engine(spec.model, batch_size=4, endpoint=served)
    teacher = replace(teacher, spec=replace(spec, model="zoo:tiny"))
    got = generate(ray.data.from_items(rows), teacher, {"temperature": 0.0, "max_tokens": 5}).take_all()
    assert sorted(r["image_id"] for r in got) == sorted(expected)  # every image exactly once
    # test_generation proves the offline engine gives transformers' tokens: so both modes caption alike
    assert {r["image_id"]: r["tokens"] for r in got} == expected
