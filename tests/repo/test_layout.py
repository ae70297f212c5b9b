"""The tests mirror the package: each module of leaml_ray has tests/unit/<package>/test_<module>.py, or says here
which tests cover it and why it has no file of its own."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# module -> where it is tested instead (and why not alone)
COVERED_ELSEWHERE = {
    "cli/evaluate.py": "tests/e2e/test_fake_cluster.py runs it on the finished run "
    "(--help: tests/unit/cli/test_adapt.py)",
    "cli/serve_teacher.py": "tests/unit/cli/test_serve.py (fail-fast) and tests/e2e/test_serve.py (what it deploys)",
    "dashboard.py": "tests/e2e/test_fake_cluster.py scrapes the metrics from Ray's Prometheus endpoint",
    "data/parts.py": "the resume scenarios: tests/e2e/test_driver_kill.py and test_fake_cluster.py (a lost node)",
    "data/sources.py": "tests/unit/stages/test_prepare.py reads every adapter (synthetic, Kvasir-VQA, SportU, files)",
    "fake_cluster.py": "tests/unit/test_rehearsal.py (through --rehearse) and the fake-cluster scenarios in tests/e2e",
    "errors.py": "one base class; every one-line error test raises a subclass of it",
    "inference/actor_pool.py": "tests/unit/inference/test_generate.py runs the actor_pool backend; "
    "tests/e2e/test_fake_cluster.py loses the node of one of its actors",
    "inference/deploy.py": "tests/e2e/test_serve.py deploys with it; tests/unit/test_placement.py checks its LLMConfig",
    "inference/requests.py": "every engine path's tests (test_generate.py, tests/e2e/test_serve.py) and the logprob "
    "scores in tests/e2e/test_fake_cluster.py",
    "models/spec.py": "plain dataclasses: tests/unit/stages/test_common.py builds them, test_plan.py hashes them",
    "models/zoo.py": "tests/unit/test_zoo.py (the lookup and the pretraining tool together)",
    "plots.py": "tests/unit/test_tracking.py (plots logged as images) and tests/e2e/test_fake_cluster.py",
    "pseudo/export.py": "tests/e2e/test_fake_cluster.py loads the exports as LLaMA-Factory's and TRL's loaders do",
    "stages/caption.py": "tests/e2e/test_driver_kill.py (resumed captions) and tests/e2e/test_fake_cluster.py",
    "stages/evaluate.py": "tests/e2e/test_fake_cluster.py",
    "stages/generator.py": "tests/e2e/test_fake_cluster.py; its objective: tests/unit/train/test_neurons.py",
    "stages/pseudo_qa.py": "tests/e2e/test_fake_cluster.py; its parts: tests/unit/pseudo/",
    "train/core.py": "tests/unit/train/test_loop.py (under Ray Train) and tests/repo/test_gpu_smoke.py (one process)",
    "train/job.py": "plain values: tests/unit/train/test_loop.py and tests/unit/test_placement.py",
}


def test_every_module_has_a_test_file_or_says_where_it_is_tested():
    package = ROOT / "leaml_ray"
    modules = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "__init__.py")
    for module in modules:
        path = Path(module)
        test = ROOT / "tests" / "unit" / path.parent / f"test_{path.stem}.py"
        assert test.exists() or module in COVERED_ELSEWHERE, f"leaml_ray/{module}: no {test.relative_to(ROOT)}"
        assert not (test.exists() and module in COVERED_ELSEWHERE), f"{module} has a test file now: drop its entry"
    assert set(COVERED_ELSEWHERE) <= set(modules), set(COVERED_ELSEWHERE) - set(modules)
    # unit tests mirror modules; scenarios live in tests/e2e, checks of the repository's files in tests/repo
    for test in (ROOT / "tests" / "unit").rglob("test_*.py"):
        module = test.relative_to(ROOT / "tests" / "unit").with_name(test.name.removeprefix("test_"))
        assert (package / module).exists(), f"{test.relative_to(ROOT)} mirrors no module"
