"""Training examples from a run directory: text tables joined with their images, as Ray Datasets.

Text (QA pairs, captions) is small and read on the driver; images stay in prepared/images.parquet and are
attached inside Ray Data tasks, so the driver never holds an image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from leaml_ray import storage
from leaml_ray.formats import qa_target, question_text

EXAMPLE_COLUMNS = ["image", "instruction", "response"]


def read_table(path: str, columns: list[str] | None = None, split: str | None = None) -> pa.Table:
    """A parquet file or folder of the run dir, optionally only one split, in key order (qa_id, else image_id):
    Ray Data writes rows in the order its blocks finish, and training and sampling order follow these tables."""
    fs, p = storage.filesystem(path)
    table = pq.read_table(p, columns=columns, filesystem=fs, filters=[("split", "=", split)] if split else None)
    key = next((k for k in ("qa_id", "image_id") if k in table.column_names), None)
    return table.sort_by(key) if key else table


def answer_examples(qa: pa.Table) -> pa.Table:
    """QA rows -> (instruction, response) for answering: the question (with options) -> the answer."""
    choices = qa["choices"].to_pylist() if "choices" in qa.column_names else [None] * qa.num_rows
    instructions = [question_text(q, c) for q, c in zip(qa["question"].to_pylist(), choices, strict=True)]
    return pa.table({"image_id": qa["image_id"], "instruction": instructions, "response": qa["answer"]})


def generator_examples(qa: pa.Table, prompt: str) -> pa.Table:
    """QA rows -> (instruction, response) for the QA generator: `prompt` -> "Question: ...\\nAnswer: ..."."""
    answers = answer_examples(qa)
    responses = [
        qa_target(q, a)
        for q, a in zip(answers["instruction"].to_pylist(), answers["response"].to_pylist(), strict=True)
    ]
    return pa.table({"image_id": qa["image_id"], "instruction": [prompt] * qa.num_rows, "response": responses})


def caption_examples(captions: pa.Table, prompt: str) -> pa.Table:
    """Caption rows -> (instruction, response) for caption distillation: `prompt` (the teacher's) -> the caption."""
    return pa.table(
        {
            "image_id": captions["image_id"],
            "instruction": [prompt] * captions.num_rows,
            "response": captions["caption"],
        }
    )


# at most this many bytes of images per output table: one array of binary values holds at most 2 GiB
MAX_BLOCK_BYTES = 256 << 20


def _attach(images: pa.Table, rows: pa.Table, every_row: bool = False) -> Iterator[pa.Table]:
    """`rows` with their image's bytes, in the order of `rows`, as tables of at most MAX_BLOCK_BYTES of images (and
    at least one row). Rows whose image is not in `images` are dropped, or an error with `every_row`.

    A lookup by index and slices of the image column, never a join on the bytes: Arrow's hash join crashes (SIGSEGV)
    once its output passes 2 GiB (apache/arrow#39332), which a few labeled pairs repeated over MB-sized images
    reach; a take on the whole column would first concatenate it, with the same 2 GiB limit."""
    index = pc.index_in(rows["image_id"], value_set=images["image_id"])
    if every_row and index.null_count:
        missing = rows["image_id"].filter(pc.is_null(index))
        raise ValueError(f"{len(missing)} rows have no image in prepared/images.parquet (e.g. {missing[0]})")
    found = pc.is_valid(index)
    rows, index = rows.filter(found), index.filter(found).to_numpy()
    column = images["image"]
    starts = np.cumsum([0, *(len(c) for c in column.chunks)])
    chunk = np.searchsorted(starts, index, side="right") - 1
    sizes = pc.binary_length(column).to_numpy()[index]
    rest = [c for c in rows.column_names if c not in ("image_id", "image")]
    first, size = 0, 0
    for i in range(len(index) + 1):
        if i < len(index) and (i == first or size + sizes[i] <= MAX_BLOCK_BYTES):
            size += sizes[i]
            continue
        if i > first:
            picked = [column.chunk(chunk[j]).slice(index[j] - starts[chunk[j]], 1) for j in range(first, i)]
            piece = rows.slice(first, i - first)
            yield pa.table(
                [piece["image_id"], pa.concat_arrays(picked), *(piece[c] for c in rest)],
                names=["image_id", "image", *rest],
            )
        if i < len(index):
            first, size = i, sizes[i]


@contextmanager
def in_order() -> Iterator[None]:
    """Ray Data execution in this block keeps the input's order (blocks are emitted and written in order)."""
    options = ray.data.DataContext.get_current().execution_options
    was, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = was


def with_images(images_path: str, rows: pa.Table) -> ray.data.Dataset:
    """Rows keyed by image_id -> a Dataset of the same rows with their image bytes (one row per input row)."""
    # refs in a list: Ray Data passes them through unresolved
    refs = [ray.put(rows.combine_chunks()), ray.put(pc.unique(rows["image_id"]))]

    def attach(batch: pa.Table, refs: list) -> Iterator[pa.Table]:
        rows, ids = ray.get(refs)
        yield from _attach(batch.filter(pc.is_in(batch["image_id"], value_set=ids)), rows)

    return (
        ray.data.read_parquet(images_path)
        .select_columns(["image_id", "image"])
        .map_batches(attach, batch_format="pyarrow", fn_kwargs={"refs": refs}, num_cpus=0.25)
    )


def labeled_rows(images_path: str, rows: pa.Table, rows_per_block: int = 64) -> ray.data.Dataset:
    """Small (labeled) text rows, in their order and in blocks of `rows_per_block` (as `ray_dataset`), each with its
    image's bytes attached inside a Ray Data task; every row must have its image.

    Neither the images nor the joined rows pass through the driver: Ray Data reads the rows' images once into the
    object store and each task looks its rows' images up there. Cycled labeled pairs repeat each image up to
    thousands of times (a few GB of rows on the driver, and Arrow's join crashed past 2 GiB)."""
    ids = pc.unique(rows["image_id"])
    images = (
        ray.data.read_parquet(images_path)
        .select_columns(["image_id", "image"])
        .map_batches(lambda b: b.filter(pc.is_in(b["image_id"], value_set=ids)), batch_format="pyarrow", num_cpus=0.25)
        .materialize()
    )
    refs = images.to_arrow_refs()  # in a list: Ray Data passes them through unresolved

    def attach(batch: pa.Table, refs: list) -> Iterator[pa.Table]:
        yield from _attach(pa.concat_tables(ray.get(refs)), batch, every_row=True)

    return ray_dataset(rows, rows_per_block).map_batches(
        attach, batch_format="pyarrow", batch_size=None, fn_kwargs={"refs": refs}, num_cpus=0.25
    )


def stable_int(key: str, seed: int) -> int:
    """A deterministic pseudo-random 64-bit integer for a key (the same on every machine and run)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")


def cycled(table: pa.Table, rows: int) -> pa.Table:
    """The table repeated in order and cut to exactly `rows` rows."""
    return pa.concat_tables([table] * -(-rows // table.num_rows)).slice(0, rows)


def ray_dataset(table: pa.Table, rows_per_block: int = 64) -> ray.data.Dataset:
    """A driver-side table as a Dataset of several blocks (so every training worker gets a share)."""
    return ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)])


def images_of(images_path: str, splits: list[str]) -> ray.data.Dataset:
    """Rows {image_id, image} of the images in the given splits."""
    value_set = pa.array(splits)
    return (
        ray.data.read_parquet(images_path)
        .select_columns(["image_id", "image", "split"])
        .map_batches(
            lambda b: b.filter(pc.is_in(b["split"], value_set=value_set)).select(["image_id", "image"]),
            batch_format="pyarrow",
            num_cpus=0.25,
        )
    )
