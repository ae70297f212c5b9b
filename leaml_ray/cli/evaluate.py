"""Evaluate any saved model folder on the test split of any prepared run, in the pipeline's report format.

  python jobs/evaluate.py --run runs/tiny-cpu --model runs/tiny-cpu/target/leaml [--name leaml] [--out DIR]

The run's own config (manifest.json) supplies the engine settings; `key=value` overrides apply on top.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leaml_ray import storage
from leaml_ray.config import ConfigError, load_config
from leaml_ray.errors import UserError
from leaml_ray.pipeline import load_manifest

PROG = Path(sys.argv[0]).name  # evaluate.py under `python jobs/evaluate.py`, leaml-evaluate as a console script


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, evaluate, write the report; returns the exit code."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory with a finished prepare stage")
    parser.add_argument("--model", required=True, help="model folder, hub id or zoo:<role>")
    parser.add_argument("--name", default=None, help="method name in the report (default: the folder name)")
    parser.add_argument("--out", default=None, help="report folder (default: <run>/evaluations/<name>)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    manifest = load_manifest(args.run)
    if "prepare" not in manifest["stages"] or manifest["stages"]["prepare"].get("status") != "done":
        print(f"{PROG}: {args.run} has no finished prepare stage", file=sys.stderr)
        return 1
    try:
        base = {k: v for k, v in manifest.get("config", {}).items() if k != "run"}
        cfg = load_config(None, [f"run.dir={args.run}", *args.overrides], base=base)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    # imported here: --help and bad arguments answer without loading torch or vLLM
    from leaml_ray.report import build_report, render_markdown, write_plots
    from leaml_ray.runtime import connect, setup_logging
    from leaml_ray.stages import evaluate

    setup_logging(cfg.run.log_level)
    name = args.name or args.model.rstrip("/").rsplit("/", 1)[-1].replace("zoo:", "zoo_")
    out = args.out or storage.join(args.run, "evaluations", name)
    plan = evaluate.plan(cfg)
    connect(cfg.cluster)
    try:
        prepared, target = storage.join(args.run, "prepared"), plan.target.at(args.model)
        metrics, _ = evaluate.evaluate_model(prepared, target, plan.split, plan.max_new_tokens, name, args.run)
    except UserError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    metrics["model"] = args.model
    report = build_report(args.run, {name: metrics}, {}, cfg.resolved())  # as the evaluate stage records it
    storage.write_json_atomic(storage.join(out, "report.json"), report)
    storage.write_bytes_atomic(storage.join(out, "report.md"), render_markdown(report).encode())
    write_plots(args.run, storage.join(out, "plots"), {name: metrics})
    print(evaluate.method_table({name: metrics}))
    print(f"report: {out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
