"""Run the leaml-ray pipeline: python jobs/adapt.py [--config PRESET|PATH] [--stages a,b] [key=value ...]

Without arguments it runs the embedded default (the tiny-cpu preset) on a private local Ray instance;
under `ray job submit` it runs on the cluster it was submitted to.
"""

from __future__ import annotations

import argparse
import logging
import sys

from leaml_ray.config import ConfigError, load_config
from leaml_ray.data.sources import SourceError
from leaml_ray.pipeline import StageError, run_pipeline, summary
from leaml_ray.runtime import connect, setup_logging
from leaml_ray.stages import ALL_STAGES

log = logging.getLogger("leaml_ray")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the selected stages, print the summary; returns the exit code."""
    parser = argparse.ArgumentParser(prog="adapt.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="preset name (tiny-cpu, kvasir-vqa-1pct, ...) or YAML path")
    parser.add_argument(
        "--stages", default=None, help="comma-separated subset of: " + ",".join(s.name for s in ALL_STAGES)
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.label_ratio=0.05"
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"adapt.py: {e}", file=sys.stderr)
        return 2
    only = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    setup_logging(cfg.run.log_level)
    log.info("run dir %s, stages %s", cfg.run.dir, ",".join(only or [s.name for s in ALL_STAGES]))
    try:
        results = run_pipeline(cfg, ALL_STAGES, only, before_first_run=lambda: connect(cfg.cluster))
    except (StageError, SourceError) as e:
        print(f"adapt.py: {e}", file=sys.stderr)
        return 1
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
