"""report.json / report.md / plots/ of a run (docs/design.md#the-stage-line gives the JSON shape)."""

from __future__ import annotations

from typing import Any

from leaml_ray import plots, storage
from leaml_ray.pipeline import load_manifest


def build_report(
    run_dir: str, methods: dict[str, dict], elapsed: dict[str, float], config: dict | None = None
) -> dict[str, Any]:
    """The machine-readable result: methods, stage timings and counts, pseudo-QA counts, and the config (default:
    that of the invocation that ran the run's stages, as its manifest and config.yaml record it)."""
    manifest = load_manifest(run_dir)
    stages = {
        name: {"seconds": entry.get("seconds", 0.0), **_flat(entry.get("counts", {}))}
        for name, entry in manifest["stages"].items()
        if entry.get("status") == "done"
    }
    stages.update({name: {"seconds": round(s, 3)} for name, s in elapsed.items()})
    pq = manifest["stages"].get("pseudo_qa", {}).get("counts", {})
    return {
        "methods": methods,
        "stages": stages,
        "pseudo_qa": {
            "generated": pq.get("generated", 0),
            "kept": pq.get("kept", 0),
            "rejected_by_reason": pq.get("rejected_by_reason", {}),
        },
        "config": config if config is not None else manifest.get("config", {}),
    }


def _flat(counts: dict) -> dict:
    return {k: v for k, v in counts.items() if isinstance(v, (int, float, str, bool))}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable summary of report.json."""
    methods = report["methods"]
    categories = sorted({c for m in methods.values() for c in m["per_category"]})
    lines = ["# leaml-ray report", "", "## Accuracy (%) on the test split", ""]
    lines.append("| method | " + " | ".join(categories) + " | macro | n |")
    lines.append("|---" * (len(categories) + 3) + "|")
    for name, m in methods.items():
        cells = [_pct(m["per_category"].get(c)) for c in categories]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{_pct(m['accuracy'])}** | {m['n']} |")
    lines += ["", "Models and data:", ""]
    for name, m in methods.items():
        lines.append(f"- `{name}`: model `{m.get('model', '?')}`")
    data = report["config"].get("data", {})
    lines.append(
        f"- data: source `{data.get('source')}` {data.get('path') or ''}, label_ratio {data.get('label_ratio')}, "
        f"seed {report['config'].get('run', {}).get('seed')}"
    )
    pq = report["pseudo_qa"]
    lines += ["", "## Pseudo QA", "", f"generated {pq['generated']}, kept {pq['kept']}", ""]
    if pq["rejected_by_reason"]:
        lines += ["| reject reason | count |", "|---|---|"]
        lines += [f"| {r} | {n} |" for r, n in sorted(pq["rejected_by_reason"].items(), key=lambda kv: -kv[1])]
    lines += precondition_lines(report.get("precondition", {}))
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {s['seconds']:.1f} |" for name, s in report["stages"].items()]
    lines += ["", "## Plots", ""]
    lines += [f"![{name}](plots/{name}.png)" for name in ("accuracy", "loss", "neuron_scores")]
    lines.append("")
    return storage.redact("\n".join(lines))  # data.path may be a URL with credentials in it


def precondition_lines(found: dict[str, Any]) -> list[str]:
    """The precondition as a verdict: LEAML can only help where the QA generator answers the unlabeled images'
    hidden questions better than a target trained on the labels alone."""
    if "generator" not in found or "labeled_only" not in found:
        return []
    generator, labeled = found["generator"], found["labeled_only"]
    verdict = (
        "met: the generator is ahead, so its pseudo pairs can teach the target something"
        if generator > labeled
        else "not met: the generator is not ahead of the labeled-only target, so its pseudo pairs cannot be expected"
        " to help (distil the generator longer, or give it more labeled pairs)"
    )
    return [
        "",
        "## Precondition",
        "",
        f"On the unlabeled images' hidden questions: QA generator {_pct(generator)}%, labeled-only target (`full`)"
        f" {_pct(labeled)}%. Precondition {verdict}.",
    ]


def write_plots(run_dir: str, out_dir: str, methods: dict[str, dict]) -> list[str]:
    """Accuracy bars, loss curves of every trained model, and the generator's neuron scores."""
    written = []
    storage.write_bytes_atomic(storage.join(out_dir, "accuracy.png"), plots.accuracy_bars(methods))
    written.append("accuracy.png")
    curves = {}
    logs = {"generator": storage.join(run_dir, "generator", "train_log.json")}
    logs.update({m: storage.join(run_dir, "target", m, "train_log.json") for m in methods})
    for name, path in logs.items():
        if storage.exists(path):
            curves[name] = [(r["step"], r["loss"]) for r in storage.read_json(path) if "loss" in r]
    if curves:
        storage.write_bytes_atomic(storage.join(out_dir, "loss.png"), plots.loss_curves(curves))
        written.append("loss.png")
    neurons = storage.join(run_dir, "generator", "neurons", "neuron_scores.png")
    if storage.exists(neurons):
        storage.write_bytes_atomic(storage.join(out_dir, "neuron_scores.png"), storage.read_bytes(neurons))
        written.append("neuron_scores.png")
    return written
