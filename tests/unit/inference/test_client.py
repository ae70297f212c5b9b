"""The served teacher's client: `teacher.mode: serve` without a server is one line (serving itself:
tests/e2e/test_serve.py)."""

import socket

import pytest

from leaml_ray.config import load_config
from leaml_ray.errors import UserError
from leaml_ray.inference.client import check_served
from leaml_ray.stages.common import engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_mode_without_a_server_is_a_clear_error(tmp_path):
    cfg = load_config(
        None, [f"run.dir={tmp_path}", "teacher.mode=serve", f"teacher.endpoint=http://127.0.0.1:{free_port()}"]
    )
    with pytest.raises(UserError, match="no OpenAI-compatible server at .*jobs/serve_teacher.py"):
        check_served(engine(cfg, "teacher"))
    offline = engine(load_config(None, [f"run.dir={tmp_path}"]), "teacher")
    assert offline.endpoint is None
    check_served(offline)  # nothing to check: the job's own engine replicas caption
