"""Run the leaml-ray pipeline: python jobs/adapt.py [--config PRESET|PATH] [--stages a,b] [--force a,b] [--plan]
[--rehearse --cluster YAML] [--print-config] [key=value ...]

Without arguments it runs the embedded default (the tiny-cpu preset) on a private local Ray instance;
under `ray job submit` it runs on the cluster it was submitted to. `--plan [--cluster YAML]` starts nothing: it
prints where every stage would run (with a cluster YAML: the node type Ray's autoscaler would launch for it, and whether
it fits there, GPU memory included) and exits. `--rehearse --cluster YAML` places every stage's reservations on a fake
cluster of this machine whose node types mirror the YAML's, through Ray's own autoscaler (no model, no GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from leaml_ray.cluster_plan import format_plan, place_on_cluster, stage_resources
from leaml_ray.config import DEFAULT_PRESET, PRESET_DIR, Config, ConfigError, load_config
from leaml_ray.errors import UserError
from leaml_ray.storage import redact

PROG = Path(sys.argv[0]).name  # adapt.py under `python jobs/adapt.py`, leaml-adapt as a console script

log = logging.getLogger("leaml_ray")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the selected stages, print the summary; returns the exit code."""
    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=f"presets: {presets} (default {DEFAULT_PRESET}). Every key=value key and its default: "
        "`python -m leaml_ray.config` (the README's configuration reference); the resolved config of a run: "
        "--print-config, and config.yaml in its run dir.",
    )
    parser.add_argument("--config", default=None, help="preset name (tiny-cpu, kvasir-vqa-1pct, ...) or YAML path")
    parser.add_argument(
        "--stages",
        default=None,
        help="comma-separated subset of: prepare, caption, generator, pseudo_qa, finetune (finetune:<method> for"
        " one), evaluate",
    )
    parser.add_argument(
        "--force", default=None, help="comma-separated stages to rerun even if current, with every stage after them"
    )
    parser.add_argument("--plan", action="store_true", help="print where each stage runs and exit (starts no Ray)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--cluster", default=None, help="with --plan: check against this cluster launcher YAML")
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="with --cluster: place every stage on a fake autoscaling cluster mirroring the YAML, then exit",
    )
    parser.add_argument(
        "--rehearse-timeout", type=float, default=120, help="seconds a stage may wait for its nodes (default 120)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.label_ratio=0.05"
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    only, force = names(args.stages), names(args.force)
    if only or force:  # a typo is one line here, before anything starts (and under --plan / --print-config too)
        from leaml_ray.pipeline import StageError, select
        from leaml_ray.stages import pipeline_stages

        try:
            select(pipeline_stages(cfg), [*(only or []), *(force or [])])
        except StageError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2
    if args.print_config:
        print(redact(cfg.to_yaml()), end="")
        return 0
    if args.rehearse and not args.cluster:
        print(
            f"{PROG}: --rehearse needs --cluster YAML (the launcher config whose node types it mirrors)",
            file=sys.stderr,
        )
        return 2
    if args.plan or args.cluster:
        return print_plan(cfg, args.cluster, rehearse_timeout=args.rehearse_timeout if args.rehearse else None)
    return run(cfg, only, force)


def run(cfg: Config, only: list[str] | None, force: list[str] | None) -> int:
    """Run the pipeline's stages (all, or `only`) and print the summary; returns the exit code."""
    # imported here: --help, --print-config, --plan and config errors answer without loading torch or vLLM (and
    # without Ray, but for its autoscaler's scheduling code under --plan --cluster)
    from leaml_ray.pipeline import run_pipeline, summary
    from leaml_ray.runtime import setup_logging
    from leaml_ray.stages import pipeline_stages

    setup_logging(cfg.run.log_level)
    stages = pipeline_stages(cfg)
    log.info("run dir %s, stages %s", cfg.run.dir, ",".join(only or [s.name for s in stages]))
    try:
        results = run_pipeline(cfg, stages, only, before_first_run=lambda: start_ray(cfg), force=force)
    except UserError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    print(summary(results))
    return 0


def names(arg: str | None) -> list[str] | None:
    """Stage names of a comma-separated option."""
    return [s.strip() for s in arg.split(",") if s.strip()] if arg else None


def start_ray(cfg: Config) -> None:
    """Join (or start) Ray, then check that every node can reach the run dir."""
    from leaml_ray.runtime import check_run_dir_for_cluster, connect

    connect(cfg.cluster)
    check_run_dir_for_cluster(cfg)


def print_plan(cfg, cluster_yaml: str | None, rehearse_timeout: float | None = None) -> int:
    """The dry run: the plan table, its problems against the cluster YAML, then one JSON line; 1 if it does not fit.
    With `rehearse_timeout`, each stage is also placed on a fake cluster mirroring the YAML (`rehearsal.py`)."""
    the_plan = stage_resources(cfg)  # starts no Ray: placing it on the YAML's node types runs the autoscaler's code
    problems: list[str] = []
    if cluster_yaml:
        try:
            cluster = yaml.safe_load(Path(cluster_yaml).read_text())
        except (OSError, yaml.YAMLError) as e:
            print(f"{PROG}: --cluster {cluster_yaml}: {e}", file=sys.stderr)
            return 2
        the_plan, problems = place_on_cluster(the_plan, cluster)
    extra: dict = {}
    if rehearse_timeout is not None:
        from leaml_ray.rehearsal import format_rehearsal, rehearse

        the_plan, rehearsed = rehearse(cfg, cluster, timeout_s=rehearse_timeout)
        problems = [*problems, *(p for p in rehearsed if p not in problems)]
        extra["launched"] = {s: e["rehearsal"]["launched"] for s, e in the_plan["stages"].items() if "rehearsal" in e}
    print(format_plan(the_plan))
    if rehearse_timeout is not None:
        print(f"rehearsed on a fake cluster mirroring {cluster_yaml}:")
        print(format_rehearsal(the_plan))
    for problem in problems:
        print(f"problem: {problem}")
    if cluster_yaml and not problems:
        print(f"fits {cluster_yaml}")
    print(json.dumps({**the_plan, "fits": not problems, "problems": problems, **extra}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
