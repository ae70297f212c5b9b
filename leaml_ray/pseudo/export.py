"""The kept pairs as trainers read them: pseudo_qa.parquet, pseudo_qa.jsonl (ShareGPT messages with an <image>
token, registered for LLaMA-Factory in dataset_info.json; ms-swift reads it too), pseudo_qa_trl.jsonl (structured
image/text content, as TRL and HF datasets take it), the images of the kept pairs as files under pseudo_qa_images/,
and pseudo_qa_rejects.parquet with the reason of every rejected reply.
"""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from leaml_ray import storage
from leaml_ray.data import examples


def image_file(image_id: str, data: bytes) -> str:
    """The export path of an image: its id made file-safe, its extension from its bytes."""
    ext = "jpg" if data[:2] == b"\xff\xd8" else "png"
    return f"pseudo_qa_images/{re.sub(r'[^A-Za-z0-9._-]', '_', image_id)}.{ext}"


# LLaMA-Factory's dataset registry entry for pseudo_qa.jsonl (dataset_dir: the run dir; its docs: data/README.md)
DATASET_INFO = {
    "leaml_pseudo_qa": {
        "file_name": "pseudo_qa.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }
}


def write_exports(out_dir: str, kept: pa.Table, rejects: pa.Table, images_path: str) -> None:
    """Every output above into `out_dir` (image paths in the JSONL files are relative to it)."""
    for name, table in (("pseudo_qa.parquet", kept), ("pseudo_qa_rejects.parquet", rejects)):
        fs, p = storage.filesystem(storage.join(out_dir, name))
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, p, filesystem=fs)
    # images of the kept pairs as files, so the JSONL is usable by other trainers as is
    ids = pa.table({"image_id": pc.unique(kept["image_id"])}) if kept.num_rows else None
    files: dict[str, str] = {}
    if ids is not None:

        def write_images(batch: pa.Table) -> pa.Table:
            names = []
            for image_id, data in zip(batch["image_id"].to_pylist(), batch["image"].to_pylist(), strict=True):
                rel = image_file(image_id, data)
                storage.write_bytes_atomic(storage.join(out_dir, rel), data)
                names.append(rel)
            return pa.table({"image_id": batch["image_id"], "file": names})

        written = examples.with_images(images_path, ids).map_batches(
            write_images, batch_format="pyarrow", num_cpus=0.25
        )
        files = {r["image_id"]: r["file"] for r in written.iter_rows()}
    else:
        fs, p = storage.filesystem(storage.join(out_dir, "pseudo_qa_images"))
        fs.create_dir(p, recursive=True)
    # the same pairs in the two layouts trainers read (image paths relative to the run dir):
    # ShareGPT with an <image> token (LLaMA-Factory, ms-swift) and structured content (TRL, HF datasets)
    sharegpt, structured = [], []
    for r in kept.to_pylist():
        images, question, answer = [files[r["image_id"]]], r["question"], r["answer"]
        sharegpt.append(
            {
                "messages": [
                    {"role": "user", "content": "<image>" + question},
                    {"role": "assistant", "content": answer},
                ],
                "images": images,
                "id": r["pseudo_id"],
            }
        )
        structured.append(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ],
                "images": images,
                "id": r["pseudo_id"],
            }
        )
    for name, records in (("pseudo_qa.jsonl", sharegpt), ("pseudo_qa_trl.jsonl", structured)):
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        storage.write_bytes_atomic(storage.join(out_dir, name), text.encode())
    storage.write_json_atomic(storage.join(out_dir, "dataset_info.json"), DATASET_INFO)
