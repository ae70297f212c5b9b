"""Shared fixtures: one private local Ray instance and one local S3 server for the whole session."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import ray

from leaml_ray.config import Config, load_config
from leaml_ray.runtime import local_ray_env

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
S3_COPY_LIMIT = 2**20  # AWS: 5 GiB; the tiny models' weights are 2-3 MB


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1, exported through AWS_ENDPOINT_URL and test credentials; yields the endpoint.

    In its own process: inside the test process its request handling would share the GIL with the Ray driver. It
    refuses copies inside the store of objects above S3_COPY_LIMIT (tests/s3_server.py: AWS's 5 GiB, scaled down)."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("s3_server.py")), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "S3_COPY_LIMIT": str(S3_COPY_LIMIT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.2)
    endpoint = f"http://127.0.0.1:{port}"
    env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {name: os.environ.get(name) for name in [*env, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(env)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)  # it would win over AWS_ENDPOINT_URL and send tests elsewhere
    yield endpoint
    server.terminate()
    server.wait(timeout=30)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def s3_run_dir(s3_server) -> str:
    """A run dir in a fresh bucket of the session's S3 server."""
    import uuid

    import pyarrow.fs as pafs

    bucket = f"run-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server, region="us-east-1", allow_bucket_creation=True).create_dir(bucket)
    return f"s3://{bucket}/run"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A Ray instance in its own temp dir on 127.0.0.1; only this one is shut down afterwards. Workers inherit the
    environment at ray.init, so the S3 server's endpoint and credentials are set first."""
    if ray.is_initialized():
        yield
        return
    temp_dir = tempfile.mkdtemp(prefix="lr-test-")
    # more logical CPUs than cores so actor pools and read tasks never starve each other on 2 cores
    local_ray_env()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=temp_dir,
        configure_logging=False,
        log_to_driver=False,
        # metrics reach the Prometheus endpoint every 2 s (default 10 s): the e2e test waits for the last of them
        _system_config={"metrics_report_interval_ms": 2000},
    )
    yield
    ray.shutdown()


def make_config(tmp_path, *overrides: str) -> Config:
    """The embedded default pointed at a test's run dir, with overrides."""
    return load_config(None, [f"run.dir={tmp_path / 'run'}", *overrides])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init tiny Qwen2.5-VL folder (seconds to build), shared by the session."""
    from leaml_ray.models.tiny import build_random

    return str(build_random(tmp_path_factory.mktemp("tiny") / "base", size="base", seed=0))


@pytest.fixture(scope="session")
def greedy_reference(tmp_path_factory):
    """A tiny random model whose outputs depend on the image, 6 image rows, and transformers' greedy tokens for
    each: what every engine path (offline, served) must reproduce."""
    import torch

    from leaml_ray.data import synthetic
    from leaml_ray.models import chat
    from leaml_ray.models.registry import load_model, load_processor
    from leaml_ray.models.tiny import build_random
    from tests.helpers import local_spec

    path = str(build_random(tmp_path_factory.mktemp("greedy") / "m", "base", seed=1, init_std=0.5))
    spec = local_spec(path, "teacher")
    model, processor = load_model(spec), load_processor(spec)
    eos = processor.tokenizer.eos_token_id
    rows, expected = [], {}
    for k in range(6):
        _, image = synthetic.sample("target", 0, k, 56)
        rows.append({"image_id": f"img{k}", "image": synthetic.png_bytes(image), "instruction": "Describe this image."})
        enc = processor(text=[chat.prompt(processor, "Describe this image.")], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=5, do_sample=False)[0, enc["input_ids"].shape[1] :].tolist()
        expected[f"img{k}"] = out[: out.index(eos) + 1] if eos in out else out
    assert len({tuple(t) for t in expected.values()}) > 1  # outputs depend on the image, or the checks prove nothing
    return spec, rows, expected
