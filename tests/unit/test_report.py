"""report.md from report.json: the table, the precondition's verdict, the plots shown inline (report.json against
the predictions: tests/e2e/test_fake_cluster.py)."""

from leaml_ray.report import render_markdown


def _report(precondition: dict) -> dict:
    methods = {"leaml": {"accuracy": 0.5, "per_category": {"color": 0.75, "shape": 0.25}, "n": 8, "model": "m"}}
    return {
        "methods": methods,
        "stages": {"prepare": {"seconds": 1.5}},
        "pseudo_qa": {"generated": 4, "kept": 3, "rejected_by_reason": {"absent": 1}},
        "config": {
            "data": {"source": "csv", "path": "https://h/x.csv?sig=s3cr3t-token-value", "label_ratio": 1.0},
            "run": {"seed": 0},
        },
        "precondition": precondition,
    }


def test_the_report_says_whether_the_precondition_holds_and_shows_its_plots(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "s3cr3t-token-value")  # secrets come from the environment: never in a report
    text = render_markdown(_report({"generator": 0.62, "labeled_only": 0.48}))
    assert "| leaml | 75.0 | 25.0 | **50.0** | 8 |" in text
    assert "QA generator 62.0%, labeled-only target (`full`) 48.0%. Precondition met" in text
    assert "![accuracy](plots/accuracy.png)" in text and "![loss](plots/loss.png)" in text
    assert "s3cr3t" not in text and "sig=***" in text
    assert "Precondition not met" in render_markdown(_report({"generator": 0.4, "labeled_only": 0.48}))
    assert "## Precondition" not in render_markdown(_report({"generator": 0.4}))  # no labeled-only run to compare
