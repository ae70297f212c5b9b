"""prepare: any source -> prepared/{qa,images}.parquet split by image into labeled / unlabeled / test.

Data flow (images never pass through the driver):
  1. read_source -> check_rows (Ray Data, parallel): decode/resize images, reject bad rows -> staging parquet
  2. decide (driver, small key columns only): duplicates, conflicting ids, the seeded stratified label split
  3. finalize (Ray Data, three streaming passes over staging): qa.parquet, images.parquet and the hidden
     answers of unlabeled images, which training code never reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from leaml_ray import storage
from leaml_ray.config import Config
from leaml_ray.data import images, sources
from leaml_ray.data.split import ImageInfo, assign_splits
from leaml_ray.pipeline import Stage, StageContext

log = logging.getLogger("leaml_ray")

CHECKED_SCHEMA = pa.schema(
    [f for f in sources.RAW_SCHEMA if f.name != "image_path"]
    + [("width", pa.int32()), ("height", pa.int32()), ("image_sha", pa.string()), ("note", pa.string())]
)
QA_SCHEMA = pa.schema(
    [
        ("qa_id", pa.string()),
        ("image_id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("category", pa.string()),
        ("split", pa.string()),
    ]
)
IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("split", pa.string()),
    ]
)
INDEX_COLUMNS = [
    "source_ref",
    "image_id",
    "qa_id",
    "question",
    "answer",
    "category",
    "split_hint",
    "reject",
    "detail",
    "image_sha",
    "note",
]


def _text_problem(row: dict) -> str | None:
    if not row["image_id"]:
        return "missing_image_id"
    if row["split_hint"] == "unlabeled" and row["question"] is None:
        return None  # an image without QA: an unlabeled image
    if not (row["question"] or "").strip():
        return "empty_question"
    if not (row["answer"] or "").strip():
        return "empty_answer"
    return None


def check_rows(batch: pa.Table, max_pixels: int, frames_per_clip: int) -> pa.Table:
    """Load and check each row's image and text; bad rows keep a reject reason instead of an image."""
    out, cache = [], {}
    for row in batch.to_pylist():
        data, path = row.pop("image"), row.pop("image_path")
        row.update(image=None, width=None, height=None, image_sha=None, note=None)
        row["reject"] = row["reject"] or _text_problem(row)
        if not row["reject"]:
            key = path or hashlib.sha1(data or b"").hexdigest()
            if key not in cache:
                try:
                    cache[key] = images.load(data, path, max_pixels, frames_per_clip)
                except images.ImageProblem as e:
                    cache[key] = e
            loaded = cache[key]
            if isinstance(loaded, images.ImageProblem):
                row["reject"], row["detail"] = loaded.args
            else:
                img, w, h, note = loaded
                row.update(image=img, width=w, height=h, note=note, image_sha=hashlib.sha1(img).hexdigest())
        out.append(row)
    return pa.Table.from_pylist(out, schema=CHECKED_SCHEMA)


def _norm_question(q: str) -> str:
    return " ".join(q.lower().split())


def decide(index: pa.Table, cfg: Config) -> tuple[dict, list[dict]]:
    """Per-row and per-image decisions from the key columns, and the reject records.

    Rows are visited in source_ref order, so which duplicate survives does not depend on Ray's scheduling.
    """
    rows = sorted(index.to_pylist(), key=lambda r: r["source_ref"])
    rejects: list[dict] = []
    first_sha: dict[str, str] = {}
    seen_qa: set[tuple[str, str]] = set()
    seen_ids: set[str] = set()
    info: dict[str, ImageInfo] = {}
    primary: dict[str, str] = {}
    kept: dict[str, str] = {}  # source_ref -> qa_id ("" for image-only rows)
    qa_per_image: Counter = Counter()

    def reject(row: dict, reason: str, detail: str | None = None) -> None:
        rejects.append(
            {
                "source_ref": row["source_ref"],
                "image_id": row["image_id"],
                "reason": reason,
                "action": "skipped",
                "detail": detail,
            }
        )

    for row in rows:
        if row["reject"]:
            reject(row, row["reject"], row["detail"])
            continue
        iid = row["image_id"]
        if first_sha.setdefault(iid, row["image_sha"]) != row["image_sha"]:
            reject(row, "duplicate_image_id", "another image already has this id")
            continue
        if row["note"] and iid not in primary:
            rejects.append(
                {
                    "source_ref": row["source_ref"],
                    "image_id": iid,
                    "reason": "over_max_pixels",
                    "action": "resized",
                    "detail": row["note"],
                }
            )
        image = info.setdefault(iid, ImageInfo(hint=row["split_hint"]))
        primary.setdefault(iid, row["source_ref"])
        if row["question"] is None:
            kept[row["source_ref"]] = ""
            continue
        qkey = (iid, _norm_question(row["question"]))
        if qkey in seen_qa:
            reject(row, "duplicate_qa", "same question on the same image")
            continue
        qa_id = row["qa_id"] or f"{iid}#{qa_per_image[iid]}"
        if qa_id in seen_ids:
            reject(row, "duplicate_id", f"qa id {qa_id!r} repeated")
            continue
        seen_qa.add(qkey)
        seen_ids.add(qa_id)
        qa_per_image[iid] += 1
        kept[row["source_ref"]] = qa_id
        image.has_qa = True
        image.categories.add(row["category"])
        if row["split_hint"] == "test":
            image.hint = "test"
    splits = assign_splits(info, cfg.data.label_ratio, cfg.data.test_ratio, cfg.run.seed)
    qa_by_split: Counter = Counter()
    for iid, n in qa_per_image.items():
        qa_by_split[splits[iid]] += n
    return {"splits": splits, "primary": primary, "kept": kept, "qa_by_split": dict(qa_by_split)}, rejects


class Finalize:
    """One streaming pass over staging that writes one output kind (qa, hidden answers, or images)."""

    def __init__(self, decisions: list, kind: str):
        self.d = ray.get(decisions[0])
        self.kind = kind

    def __call__(self, batch: pa.Table) -> pa.Table:
        splits, kept, primary = self.d["splits"], self.d["kept"], self.d["primary"]
        out = []
        for row in batch.to_pylist():
            ref = row["source_ref"]
            if ref not in kept:
                continue
            split = splits[row["image_id"]]
            if self.kind == "images":
                if primary[row["image_id"]] == ref:
                    out.append({**row, "split": split})
                continue
            if not kept[ref] or (self.kind == "hidden" and split != "unlabeled"):
                continue
            qa = {**row, "qa_id": kept[ref], "split": split}
            if self.kind == "qa" and split == "unlabeled":
                qa.update(question=None, answer=None, choices=None)  # answers of unlabeled images stay hidden
            out.append(qa)
        schema = IMAGES_SCHEMA if self.kind == "images" else QA_SCHEMA
        return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in out], schema=schema)


def _write_jsonl(path: str, records: list[dict]) -> None:
    storage.write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())


def prepare_stage(ctx: StageContext) -> dict[str, Any]:
    """Run the prepare stage (see the module docstring)."""
    cfg, data = ctx.cfg, ctx.cfg.data
    staging = storage.join(ctx.work_dir, "staging")
    raw = sources.read_source(data, cfg.run.seed)
    checked = raw.map_batches(
        check_rows,
        batch_format="pyarrow",
        batch_size=32,
        fn_kwargs={"max_pixels": data.max_pixels, "frames_per_clip": data.frames_per_clip},
    )
    checked.write_parquet(staging)

    fs, spath = storage.resolve(staging)
    index = pq.read_table(spath, filesystem=fs, columns=INDEX_COLUMNS) if storage.exists(staging) else None
    if index is None or index.num_rows == 0:
        raise sources.SourceError(f"data source {data.source} ({data.path or 'synthetic'}) has no rows")
    decisions, rejects = decide(index, cfg)
    reasons = Counter(r["reason"] for r in rejects if r["action"] == "skipped")
    if not decisions["kept"]:
        raise sources.SourceError(
            f"data source {data.source} ({data.path}) has no usable rows; rejects: {dict(reasons)}"
        )

    ref = ray.put(decisions)
    out = ctx.output("prepared")
    text_columns = [c for c in CHECKED_SCHEMA.names if c != "image"]
    for kind, target, schema in (
        ("qa", "qa.parquet", QA_SCHEMA),
        ("hidden", "hidden/unlabeled_qa.parquet", QA_SCHEMA),
        ("images", "images.parquet", IMAGES_SCHEMA),
    ):
        path = storage.join(out, target)
        ds = ray.data.read_parquet(staging, columns=None if kind == "images" else text_columns).map_batches(
            Finalize,
            fn_constructor_kwargs={"decisions": [ref], "kind": kind},
            batch_format="pyarrow",
            batch_size=256,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0.25,
        )
        ds.write_parquet(path, min_rows_per_file=None if kind == "images" else 20_000)
        if not storage.exists(path):  # no rows of this kind: still leave a readable, empty table
            fs, p = storage.resolve(storage.join(path, "empty.parquet"))
            fs.create_dir(p.rsplit("/", 1)[0])
            pq.write_table(schema.empty_table(), p, filesystem=fs)
    _write_jsonl(storage.join(out, "rejects.jsonl"), rejects)

    split_images = Counter(decisions["splits"].values())
    counts = {
        "rows_read": index.num_rows,
        "images": sum(split_images.values()),
        "images_by_split": dict(split_images),
        "qa_by_split": decisions["qa_by_split"],
        "rejected": sum(reasons.values()),
        "rejects_by_reason": dict(reasons),
        "resized": sum(1 for r in rejects if r["action"] == "resized"),
    }
    storage.write_json_atomic(storage.join(out, "summary.json"), counts)
    if reasons:
        log.warning(
            "prepare: %d rows rejected (%s); see prepared/rejects.jsonl",
            counts["rejected"],
            ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())),
        )
    storage.delete(staging)
    return counts


PREPARE = Stage(
    name="prepare",
    run=prepare_stage,
    outputs=("prepared",),
    config_keys=("data", "run.seed"),
    external_inputs=lambda cfg: sources.source_paths(cfg.data),
)
