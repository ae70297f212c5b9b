"""Training examples from a run directory: text tables joined with their images, as Ray Datasets.

Text (QA pairs, captions) is small and read on the driver; images stay in prepared/images.parquet and are
attached inside Ray Data tasks, so the driver never holds the unlabeled images. Only the labeled images (a few
percent of the data by construction) are read on the driver, for the generator's labeled pairs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from leaml_ray import storage
from leaml_ray.formats import CAPTION_PROMPT, QA_GEN_PROMPT, qa_target, question_text

EXAMPLE_COLUMNS = ["image", "instruction", "response"]


def read_table(path: str, columns: list[str] | None = None, split: str | None = None) -> pa.Table:
    """A parquet file or folder of the run dir, optionally only one split, in key order (qa_id, else image_id):
    Ray Data writes rows in the order its blocks finish, and training and sampling order follow these tables."""
    fs, p = storage.resolve(path)
    table = pq.read_table(p, columns=columns, filesystem=fs, filters=[("split", "=", split)] if split else None)
    key = next((k for k in ("qa_id", "image_id") if k in table.column_names), None)
    return table.sort_by(key) if key else table


def answer_examples(qa: pa.Table) -> pa.Table:
    """QA rows -> (instruction, response) for answering: the question (with options) -> the answer."""
    choices = qa["choices"].to_pylist() if "choices" in qa.column_names else [None] * qa.num_rows
    instructions = [question_text(q, c) for q, c in zip(qa["question"].to_pylist(), choices, strict=True)]
    return pa.table({"image_id": qa["image_id"], "instruction": instructions, "response": qa["answer"]})


def generator_examples(qa: pa.Table) -> pa.Table:
    """QA rows -> (instruction, response) for the QA generator: ask-and-answer -> "Question: ...\\nAnswer: ..."."""
    answers = answer_examples(qa)
    responses = [
        qa_target(q, a)
        for q, a in zip(answers["instruction"].to_pylist(), answers["response"].to_pylist(), strict=True)
    ]
    return pa.table({"image_id": qa["image_id"], "instruction": [QA_GEN_PROMPT] * qa.num_rows, "response": responses})


def caption_examples(captions: pa.Table) -> pa.Table:
    """Caption rows -> (instruction, response) for caption distillation."""
    return pa.table(
        {
            "image_id": captions["image_id"],
            "instruction": [CAPTION_PROMPT] * captions.num_rows,
            "response": captions["caption"],
        }
    )


def _join_images(images: pa.Table, rows: pa.Table) -> pa.Table:
    """Each row with its image's bytes, in the order of `rows` (rows whose image is missing are dropped)."""
    # Acero's hash join emits chunked inputs in an order that varies from call to call; training order (and so
    # the trained model) follows this order, hence the explicit sort
    indexed = rows.append_column("__row", pa.array(range(rows.num_rows), pa.int64()))
    joined = indexed.join(images.select(["image_id", "image"]), "image_id", join_type="inner").sort_by("__row")
    rest = [c for c in rows.column_names if c not in ("image_id", "image")]
    return joined.select(["image_id", "image", *rest])


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

    def attach(batch: pa.Table, refs: list) -> pa.Table:
        rows, ids = ray.get(refs)
        return _join_images(batch.filter(pc.is_in(batch["image_id"], value_set=ids)), rows)

    return (
        ray.data.read_parquet(images_path)
        .select_columns(["image_id", "image"])
        .map_batches(attach, batch_format="pyarrow", fn_kwargs={"refs": refs}, num_cpus=0.25)
    )


def labeled_with_images(images_path: str, rows: pa.Table) -> pa.Table:
    """Small (labeled) rows with their image bytes, on the driver."""
    return _join_images(read_table(images_path, ["image_id", "image"], split="labeled"), rows)


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
