"""Shared fixtures: one private local Ray instance for the whole session."""

from __future__ import annotations

import tempfile

import pytest
import ray

from leaml_ray.config import Config, load_config


@pytest.fixture(scope="session")
def ray_local():
    """A Ray instance in its own temp dir on 127.0.0.1; only this one is shut down afterwards."""
    if ray.is_initialized():
        yield
        return
    temp_dir = tempfile.mkdtemp(prefix="lr-test-")
    # more logical CPUs than cores so actor pools and read tasks never starve each other on 2 cores
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=temp_dir,
        configure_logging=False,
        log_to_driver=False,
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
