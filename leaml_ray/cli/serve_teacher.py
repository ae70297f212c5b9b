"""Serve the teacher with ray.serve.llm so several runs share it (`teacher.mode=serve` in their configs).

  python jobs/serve_teacher.py [--config PRESET|PATH] [--max-replicas N] [--detach] [key=value ...]

The teacher is served under the id `teacher.model`, at the host and port of `teacher.endpoint`
(http://127.0.0.1:8000 by default), with the config's tensor/pipeline parallelism and dtype.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlsplit

from leaml_ray.config import ConfigError, load_config
from leaml_ray.errors import UserError
from leaml_ray.inference import deploy
from leaml_ray.models.registry import model_source
from leaml_ray.runtime import cluster_address, connect, setup_logging
from leaml_ray.stages.common import engine

PROG = Path(sys.argv[0]).name  # serve_teacher.py, or leaml-serve-teacher as a console script


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve the teacher until stopped; returns the exit code."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="preset name or YAML path")
    parser.add_argument("--max-replicas", type=int, default=None, help="autoscale up to N (default: teacher.replicas)")
    parser.add_argument("--detach", action="store_true", help="return once deployed; the app keeps running")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    local = cluster_address(cfg.cluster) is None
    if args.detach and local:
        print(f"{PROG}: --detach needs a cluster (RAY_ADDRESS or cluster.address)", file=sys.stderr)
        return 2
    where = urlsplit(cfg.teacher.endpoint)
    host, port = where.hostname or "127.0.0.1", where.port or 8000
    try:
        deploy.preflight(model_source(cfg.teacher.model), host, port, local)
    except UserError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.run.log_level)
    connect(cfg.cluster)
    deploy.serve_until_stopped(
        cfg.teacher.model,
        engine(cfg, "teacher"),
        host,
        port,
        max_replicas=args.max_replicas or cfg.teacher.replicas,
        detach=args.detach,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
