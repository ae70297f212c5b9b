"""Serve an adapted target with ray.serve.llm (OpenAI-compatible chat completions with images).

  python jobs/serve.py --model runs/tiny-cpu/target/leaml [--run runs/tiny-cpu] [--id leaml] [--port 8000]

Binds to 127.0.0.1 unless --host says otherwise. Under `ray job submit` (or with RAY_ADDRESS) it deploys onto that
cluster; --detach then leaves the app running after the command returns. The README has an example request.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leaml_ray.config import ConfigError, load_config
from leaml_ray.errors import UserError
from leaml_ray.inference import deploy
from leaml_ray.models.registry import model_source
from leaml_ray.pipeline import load_manifest
from leaml_ray.runtime import cluster_address, connect, setup_logging
from leaml_ray.stages.common import engine

PROG = Path(sys.argv[0]).name  # serve.py under `python jobs/serve.py`, leaml-serve as a console script


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve until stopped; returns the exit code."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder (target/<method>), hub id or zoo:<role>")
    parser.add_argument("--run", default=None, help="run dir whose config supplies engine settings")
    parser.add_argument("--id", default=None, help="model id clients send (default: the folder name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=1)
    parser.add_argument("--detach", action="store_true", help="return once deployed; the app keeps running")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        base = None
        if args.run:
            base = {k: v for k, v in load_manifest(args.run).get("config", {}).items() if k != "run"}
        cfg = load_config(None, args.overrides, base=base)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    local = cluster_address(cfg.cluster) is None
    if args.detach and local:
        print(f"{PROG}: --detach needs a cluster (RAY_ADDRESS or cluster.address)", file=sys.stderr)
        return 2
    try:
        deploy.preflight(model_source(args.model), args.host, args.port, local)
    except UserError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.run.log_level)
    connect(cfg.cluster)
    model_id = args.id or args.model.rstrip("/").rsplit("/", 1)[-1]
    target = engine(cfg, "target").at(args.model)
    deploy.serve_until_stopped(
        model_id, target, args.host, args.port, args.min_replicas, args.max_replicas, args.detach
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
