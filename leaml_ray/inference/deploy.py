"""Serving a model folder with `ray.serve.llm`: an OpenAI-compatible app (chat completions with images).

One function serves both the teacher that several runs share (`jobs/serve_teacher.py`, `teacher.mode: serve`) and an
adapted target (`jobs/serve.py`). HTTP binds to 127.0.0.1 unless the caller passes another host.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from leaml_ray.errors import UserError
from leaml_ray.inference.client import served_id
from leaml_ray.inference.engine import engine_args
from leaml_ray.models.registry import model_source
from leaml_ray.models.spec import Engine
from leaml_ray.placement import serve_placement

APP_NAME = "leaml"


class ServeError(UserError):
    """Serving cannot start (missing model folder, port in use)."""


def preflight(path: str, host: str, port: int, local: bool) -> None:
    """Fail in seconds, before Ray starts, on what would otherwise fail inside Serve's replicas (tracebacks, retries,
    then a hang): a model folder that is missing or holds no model, and, on a local Ray instance, a port in use."""
    if "://" not in path:
        folder = Path(path)
        if folder.is_dir():
            try:
                json.loads((folder / "config.json").read_text())
            except (OSError, ValueError) as e:
                raise ServeError(f"model {path}: no readable config.json there ({type(e).__name__})") from None
            if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
                raise ServeError(f"model {path}: no weights there (*.safetensors or *.bin)")
        elif folder.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise ServeError(f"model {path}: no such model folder (and not a hub id of the form org/name)")
    if local:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Serve's proxy binds
            try:
                probe.bind((host, port))
            except OSError as e:
                raise ServeError(f"cannot serve on {host}:{port}: {e.strerror}; pick another port") from None


def llm_config(model_id: str, engine: Engine, min_replicas: int = 1, max_replicas: int = 1) -> Any:
    """The `LLMConfig` of one served model (`engine.spec.model`, served under `model_id`): engine args as the offline
    engine uses them, autoscaling replicas."""
    from ray.serve.llm import LLMConfig

    source = model_source(engine.spec.model)
    kwargs = engine_args(engine, source)
    kwargs.pop("model")
    return LLMConfig(
        model_loading_config={"model_id": served_id(model_id), "model_source": source},
        engine_kwargs=kwargs,
        deployment_config={"autoscaling_config": {"min_replicas": min_replicas, "max_replicas": max_replicas}},
        **serve_placement(engine),
    )


def start(
    model_id: str,
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    min_replicas: int = 1,
    max_replicas: int = 1,
) -> str:
    """Deploy the model on the connected Ray cluster; returns the base URL once it answers (minutes on CPU)."""
    from ray import serve
    from ray.serve.llm import build_openai_app

    serve.start(http_options={"host": host, "port": port})
    config = llm_config(model_id, engine, min_replicas, max_replicas)
    serve.run(build_openai_app({"llm_configs": [config]}), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def stop() -> None:
    """Delete the app `start` deployed (other Serve apps on the cluster stay)."""
    from ray import serve

    serve.delete(APP_NAME)


def serve_until_stopped(
    model_id: str,
    engine: Engine,
    host: str,
    port: int,
    min_replicas: int = 1,
    max_replicas: int = 1,
    detach: bool = False,
) -> None:
    """Deploy, print the URL, then serve until Ctrl-C / SIGTERM; with `detach` return at once and leave the app on
    the cluster (until `serve shutdown`)."""
    import signal
    import threading

    url = start(model_id, engine, host, port, min_replicas, max_replicas)
    print(f"serving {served_id(model_id)} ({engine.spec.model}) at {url}/v1 (OpenAI-compatible)", flush=True)
    print(f"  curl {url}/v1/models", flush=True)
    if detach:
        return
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop()
