"""PNG figures for the report (matplotlib, no display)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def neuron_scores(scores: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> bytes:
    """Sorted neuron scores per layer, selected neurons highlighted."""
    fig, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 2.8), squeeze=False)
    for ax, (layer, s) in zip(axes[0], sorted(scores.items()), strict=True):
        order = np.argsort(-s)
        ax.bar(np.arange(len(s)), s[order], width=1.0, color=np.where(masks[layer][order], "C3", "C7"))
        ax.set_title(layer.rsplit(".", 2)[-2] + " " + layer.rsplit(".", 1)[-1], fontsize=9)
        ax.set_xlabel("neuron (sorted)")
    axes[0][0].set_ylabel("importance for L_QA")
    return _png(fig)


def loss_curves(curves: dict[str, list[tuple[int, float]]]) -> bytes:
    """Training loss per logged step, one line per run."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, points in sorted(curves.items()):
        if points:
            ax.plot(*zip(*points, strict=True), label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return _png(fig)


def accuracy_bars(methods: dict[str, dict]) -> bytes:
    """Accuracy per method and category (grouped bars) plus the macro average."""
    names = list(methods)
    categories = sorted({c for m in methods.values() for c in m["per_category"]}) + ["macro"]
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(categories) + 2), 3.4))
    x = np.arange(len(categories))
    for k, name in enumerate(names):
        m = methods[name]
        values = [m["per_category"].get(c, np.nan) for c in categories[:-1]] + [m["accuracy"]]
        ax.bar(x + k * width, values, width, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, categories, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    return _png(fig)


def label_efficiency(cells: dict[str, dict[str, dict]]) -> bytes:
    """Accuracy vs label ratio per method (mean, error bars one standard deviation), log-scaled ratios."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    methods = sorted({m for row in cells.values() for m, cell in row.items() if "mean" in cell})
    for k, method in enumerate(methods):
        points = sorted(((float(r), row[method]) for r, row in cells.items() if method in row), key=lambda p: p[0])
        ratios, means, stds = [r for r, _ in points], [c["mean"] for _, c in points], [c["std"] for _, c in points]
        style = "-" if method in ("leaml", "lora", "full", "zero_shot") else ":"
        ax.errorbar(ratios, means, yerr=stds, fmt=style + "o", capsize=3, label=method, color=f"C{k}", markersize=4)
    ax.set_xscale("log")
    ax.set_xlabel("label ratio")
    ax.set_ylabel("accuracy (macro)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)
