"""Resumable results: a stage that generates streams its small result rows (text, no images) into parquet parts
as they arrive; a rerun after a crash reads which keys are done and skips them."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from leaml_ray import storage


def skip_done(ds: ray.data.Dataset, column: str, done: set[str]) -> ray.data.Dataset:
    """Drop rows whose `column` is in `done` (results a crashed attempt already wrote)."""
    if not done:
        return ds
    refs = [ray.put(pa.array(sorted(done), pa.string()))]  # in a list: Ray Data does not resolve bare refs

    def keep_new(batch: pa.Table, refs: list) -> pa.Table:
        return batch.filter(pc.invert(pc.is_in(batch[column], value_set=ray.get(refs[0]))))

    return ds.map_batches(keep_new, batch_format="pyarrow", fn_kwargs={"refs": refs}, num_cpus=0.25)


def done_keys(parts_dir: str, column: str) -> set[str]:
    """Keys already written to `parts_dir` by an earlier attempt of the same stage."""
    return {key for table in read_parts(parts_dir, [column]) for key in table[column].to_pylist()}


def read_parts(parts_dir: str, columns: list[str] | None = None):
    """The part files of `parts_dir` one table at a time (the driver never holds more than one part)."""
    if not storage.exists(parts_dir):
        return
    fs, p = storage.filesystem(parts_dir)
    for info in sorted(fs.get_file_info(pafs.FileSelector(p)), key=lambda i: i.path):
        if info.path.endswith(".parquet"):
            yield pq.read_table(info.path, columns=columns, filesystem=fs)


def stream_to_parts(
    ds: ray.data.Dataset, parts_dir: str, rows_per_part: int, on_part: Callable[[pa.Table], None] | None = None
) -> int:
    """Write a dataset of small rows (text, no images) as parquet parts, each atomically, as results arrive.

    A crash loses at most the rows not yet in a part; `done_keys` then tells the rerun what to skip.
    The stages write a part every 4 engine batches (`Engine.rows_per_part`).
    """
    written = 0
    for batch in ds.iter_batches(batch_size=rows_per_part, batch_format="pyarrow"):
        if batch.num_rows == 0:
            continue
        sink = pa.BufferOutputStream()
        pq.write_table(batch, sink)
        storage.write_bytes_atomic(storage.join(parts_dir, f"part-{uuid.uuid4().hex}.parquet"), sink.getvalue())
        written += batch.num_rows
        if on_part:
            on_part(batch)
    return written
