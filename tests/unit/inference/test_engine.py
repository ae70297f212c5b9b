"""vLLM's engine arguments and its log filter (`inference/engine.py`; the engine itself: test_generate.py)."""

from tests.helpers import local_engine


def test_engine_stats_are_on_and_their_log_line_passes_once_per_interval(monkeypatch):
    import logging

    from leaml_ray.inference import engine

    # stats on: the log line, and the metrics that ray.data.llm (log_engine_metrics) and Serve export to Ray
    assert engine.engine_args(local_engine("m"), "m")["disable_log_stats"] is False
    clock = [100.0]
    monkeypatch.setattr(engine.time, "monotonic", lambda: clock[0])
    every = engine._StatsEvery(10.0)

    def passes(message: str) -> bool:
        return every.filter(logging.LogRecord("vllm.v1.metrics.loggers", logging.INFO, "", 0, message, (), None))

    stats = "Engine 000: Avg prompt throughput: 678.5 tokens/s, Avg generation throughput: 301.6 tokens/s, ..."
    assert passes(stats)  # the first one
    clock[0] += 4.0
    assert not passes(stats) and passes("Engine 000: another line")  # ray.data.llm's next batch; others pass
    clock[0] += 6.0
    assert passes(stats) and not passes(stats)  # 10 s after the last one let through
