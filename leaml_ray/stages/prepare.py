"""prepare: any source -> prepared/{qa,images}.parquet split by image into labeled / unlabeled / test.

Data flow (images never pass through the driver):
  1. read_source -> check_rows (Ray Data, parallel): decode/resize images, reject bad rows -> staging parquet
  2. decide_splits (one Ray task over the key columns; the driver holds none of them): duplicates, conflicting ids,
     the seeded stratified label split, rejects.jsonl
  3. finalize (Ray Data, three streaming passes over staging): qa.parquet, images.parquet and the hidden
     answers of unlabeled images, which training code never reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from leaml_ray import storage
from leaml_ray.config import Config, DataSection
from leaml_ray.data import examples, images, sources
from leaml_ray.data.split import ImageInfo, assign_splits
from leaml_ray.pipeline import Stage, StageContext

log = logging.getLogger("leaml_ray")


@dataclass(frozen=True)
class PreparePlan:
    """What prepare needs: the data section (every field of it shapes the prepared data) and the split's seed."""

    data: DataSection
    seed: int


def plan(cfg: Config) -> PreparePlan:
    """The prepare stage's plan."""
    return PreparePlan(cfg.data, cfg.run.seed)


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
    "category",
    "split_hint",
    "group",
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


def key_hash(text: str) -> int:
    """A 63-bit hash of a key string: the driver and the workers match rows by it."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _norm_question(q: str) -> str:
    return " ".join(q.lower().split())


HINTS = {None: 0, "train": 0, "unlabeled": 1, "test": 2, "val": 3}
HINT_NAMES = (None, "unlabeled", "test", "val")
SPLITS = ("labeled", "unlabeled", "test", "val")


def _staging_rows(staging: str, columns: list[str]):
    """Rows (as dicts) of the staging parquet files, a batch at a time, only the given columns."""
    fs, root = storage.filesystem(staging)
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root)) if i.path.endswith(".parquet"))
    for f in files:
        for batch in pq.ParquetFile(f, filesystem=fs).iter_batches(batch_size=4096, columns=columns):
            yield from batch.to_pylist()


def read_index(staging: str) -> tuple[dict[str, np.ndarray], list[dict], dict[int, dict], list[str]]:
    """Stream the staging key columns into compact int64 arrays (about 60 bytes per good row).

    Returns the arrays of good rows, the records of rows rejected by the check step, one record per image
    loaded otherwise than stored (resized, turned upright), and the category names (the arrays hold their codes).
    """
    cols = {k: array("q") for k in ("ref", "img", "question", "qa_id", "category", "hint", "sha", "group")}
    rejects, changed, categories = [], {}, {}
    for row in _staging_rows(staging, INDEX_COLUMNS):
        if row["reject"]:
            rejects.append(_reject_record(row, row["reject"], row["detail"]))
            continue
        img = key_hash(row["image_id"])
        if row["note"] and img not in changed:  # loaded, but not as stored: resized, turned upright, or both
            reason, action = (
                ("over_max_pixels", "resized") if "resized" in row["note"] else ("exif_orientation", "turned")
            )
            changed[img] = {**_reject_record(row, reason, row["note"]), "action": action}
        cols["ref"].append(key_hash(row["source_ref"]))
        cols["img"].append(img)
        cols["question"].append(key_hash(_norm_question(row["question"])) if row["question"] else 0)
        cols["qa_id"].append(key_hash(row["qa_id"]) if row["qa_id"] else 0)
        cols["category"].append(categories.setdefault(row["category"], len(categories)))
        cols["hint"].append(HINTS[row["split_hint"]])
        cols["sha"].append(key_hash(row["image_sha"]))
        cols["group"].append(key_hash(row["group"]) if row["group"] else 0)
    return {k: np.frombuffer(v, dtype=np.int64) for k, v in cols.items()}, rejects, changed, list(categories)


def _reject_record(row: dict, reason: str, detail: str | None) -> dict:
    return {
        "source_ref": row["source_ref"],
        "image_id": row["image_id"],
        "reason": reason,
        "action": "skipped",
        "detail": detail,
    }


def _repeats(keys: list[np.ndarray], candidates: np.ndarray) -> np.ndarray:
    """Positions (among candidates, ordered by the last key) whose leading keys repeat an earlier row's."""
    if len(candidates) == 0:
        return candidates
    order = candidates[np.lexsort([k[candidates] for k in reversed(keys)])]
    same = np.ones(len(order) - 1, bool)
    for k in keys[:-1]:
        same &= k[order][1:] == k[order][:-1]
    return order[1:][same]


def decide(rows: dict[str, np.ndarray], categories: list[str], plan: PreparePlan) -> tuple[dict, dict[int, str]]:
    """Decisions on the good rows: which survive, the qa numbering, and the split of every image.

    Ties are broken by the hash of source_ref, never by Ray's scheduling, so reruns decide the same.
    Returns (decisions for the finalize workers, {row position: reject reason}).
    """
    ref, img, q, qid = rows["ref"], rows["img"], rows["question"], rows["qa_id"]
    everything = np.arange(len(ref))
    dropped: dict[int, str] = {}
    # an image id whose rows carry different pictures: the picture with most rows keeps the id
    pairs, counts = np.unique(np.stack([img, rows["sha"]], axis=1), axis=0, return_counts=True)
    best = pairs[np.lexsort([pairs[:, 1], -counts, pairs[:, 0]])]
    winner = best[np.r_[True, best[1:, 0] != best[:-1, 0]]]  # one (img, sha) per image
    owner = winner[np.searchsorted(winner[:, 0], img), 1]
    dropped.update(dict.fromkeys(np.nonzero(owner != rows["sha"])[0].tolist(), "duplicate_image_id"))
    alive = np.setdiff1d(everything, list(dropped))
    is_qa = q != 0
    dropped.update(dict.fromkeys(_repeats([img, q, ref], alive[is_qa[alive]]).tolist(), "duplicate_qa"))
    alive = np.setdiff1d(everything, list(dropped))
    dropped.update(
        dict.fromkeys(_repeats([qid, ref], alive[(qid[alive] != 0) & is_qa[alive]]).tolist(), "duplicate_id")
    )
    alive = np.setdiff1d(everything, list(dropped))

    # per image: categories, source hint, whether it has QA, its group
    info: dict[int, ImageInfo] = {}
    for i, c, h, has_q, g in zip(
        img[alive].tolist(),
        rows["category"][alive].tolist(),
        rows["hint"][alive].tolist(),
        is_qa[alive].tolist(),
        rows["group"][alive].tolist(),
        strict=True,
    ):
        image = info.setdefault(i, ImageInfo())
        if g and (image.group is None or str(g) < image.group):  # rows naming two groups: the same one every run
            image.group = str(g)
        image.hint = max(image.hint, HINT_NAMES[h], key=HINT_NAMES.index)  # val > test > unlabeled > none
        if has_q:
            image.has_qa = True
            image.categories.add(categories[c])
    splits = assign_splits({str(i): v for i, v in info.items()}, plan.data.label_ratio, plan.data.test_ratio, plan.seed)

    # kept rows sorted by (image, ref): the qa number is the rank within its image, the first row is primary
    kept = alive[np.lexsort([ref[alive], img[alive]])]
    k_img, k_ref, k_qa = img[kept], ref[kept], is_qa[kept]
    starts = np.r_[True, k_img[1:] != k_img[:-1]]
    group = np.cumsum(starts) - 1
    seen = np.cumsum(k_qa)
    qa_rank = seen - seen[starts][group] + k_qa[starts][group]  # QA rows so far within the image, inclusive
    images_sorted = k_img[starts]
    split_code = np.array([SPLITS.index(splits[str(i)]) for i in images_sorted.tolist()], dtype=np.int8)
    by_ref = np.argsort(k_ref)
    decisions = {
        "ref": k_ref[by_ref],
        "qa_number": np.where(k_qa, qa_rank - 1, -1)[by_ref],  # -1: an image-only row
        "img": images_sorted,
        "split": split_code,
        "primary": k_ref[starts],
        "qa_by_split": dict(Counter(SPLITS[split_code[g]] for g in group[k_qa].tolist())),
    }
    return decisions, {int(ref[p]): reason for p, reason in dropped.items()}


_DECISIONS: dict[str, dict] = {}  # per worker process: decisions fetched once, reused by later tasks


def finalize(batch: pa.Table, decisions: list, kind: str) -> pa.Table:
    """Rows of one output kind (qa, hidden answers, or images) from a staging batch and the decisions."""
    key = decisions[0].hex()
    if key not in _DECISIONS:
        _DECISIONS.clear()
        _DECISIONS[key] = ray.get(decisions[0])
    d = _DECISIONS[key]
    out = []
    for row in batch.to_pylist():
        ref = key_hash(row["source_ref"])
        pos = np.searchsorted(d["ref"], ref)
        if pos == len(d["ref"]) or d["ref"][pos] != ref:
            continue  # rejected
        g = np.searchsorted(d["img"], key_hash(row["image_id"]))
        split = SPLITS[d["split"][g]]
        if kind == "images":
            if d["primary"][g] == ref:
                out.append({**row, "split": split})
            continue
        number = int(d["qa_number"][pos])
        if number < 0 or (kind == "hidden" and split != "unlabeled"):
            continue
        qa = {**row, "qa_id": row["qa_id"] or f"{row['image_id']}#{number}", "split": split}
        if kind == "qa" and split == "unlabeled":
            qa.update(question=None, answer=None, choices=None)  # answers of unlabeled images stay hidden
        out.append(qa)
    schema = IMAGES_SCHEMA if kind == "images" else QA_SCHEMA
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in out], schema=schema)


def _dropped_records(staging: str, dropped: dict[int, str]) -> list[dict]:
    """Reject records (with the row's own text) for rows that decide() dropped: a second pass over keys."""
    if not dropped:
        return []
    rows = _staging_rows(staging, ["source_ref", "image_id"])
    return [_reject_record(r, dropped[h], None) for r in rows if (h := key_hash(r["source_ref"])) in dropped]


def _write_jsonl(path: str, records: list[dict]) -> None:
    storage.write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())


@ray.remote(num_cpus=0.5)
def decide_splits(staging: str, plan: PreparePlan, rejects_path: str) -> tuple[dict | None, dict]:
    """The reduce step: read the staging keys, decide, write rejects.jsonl; returns (decisions, counts)."""
    rows, rejects, changed, categories = read_index(staging)
    rows_read = len(rows["ref"]) + len(rejects)
    decisions = None
    if len(rows["ref"]):
        decisions, dropped = decide(rows, categories, plan)
        rejects += _dropped_records(staging, dropped)
    _write_jsonl(rejects_path, sorted(rejects, key=lambda r: r["source_ref"]) + list(changed.values()))
    split_images = np.bincount(decisions["split"], minlength=len(SPLITS)) if decisions else np.zeros(len(SPLITS), int)
    counts = {
        "rows_read": rows_read,
        "images": int(split_images.sum()),
        "images_by_split": {SPLITS[c]: int(n) for c, n in enumerate(split_images)},
        "qa_by_split": decisions["qa_by_split"] if decisions else {},
        "rejected": len(rejects),
        "rejects_by_reason": dict(Counter(r["reason"] for r in rejects)),
        "resized": sum("resized" in r["detail"] for r in changed.values()),
        "turned_upright": sum("turned upright" in r["detail"] for r in changed.values()),
    }
    return decisions, counts


def run(plan: PreparePlan, ctx: StageContext) -> dict[str, Any]:
    """Run the prepare stage (see the module docstring)."""
    with examples.in_order():  # files hold rows in source order, so every later stage reads the same order
        return _prepare(plan, ctx)


def _prepare(plan: PreparePlan, ctx: StageContext) -> dict[str, Any]:
    data = plan.data
    staging = storage.join(ctx.work_dir, "staging")
    raw = sources.read_source(data, plan.seed)
    checked = raw.map_batches(
        check_rows,
        batch_format="pyarrow",
        batch_size=128,  # rows; fewer, larger blocks keep the driver's bookkeeping small
        fn_kwargs={"max_pixels": data.max_pixels, "frames_per_clip": data.frames_per_clip},
    )
    checked.write_parquet(staging)

    if not storage.exists(staging):
        raise sources.SourceError(f"data source {data.source} ({data.path or 'synthetic'}) has no rows")
    out = ctx.output("prepared")
    # the reduce step runs in a task, so the driver's memory stays flat in the number of rows
    ref, counts_ref = decide_splits.options(num_returns=2).remote(staging, plan, storage.join(out, "rejects.jsonl"))
    counts = ray.get(counts_ref)
    if counts["images"] == 0:
        reasons = counts["rejects_by_reason"]
        raise sources.SourceError(f"data source {data.source} ({data.path}) has no usable rows; rejects: {reasons}")

    text_columns = [c for c in CHECKED_SCHEMA.names if c != "image"]
    for kind, target, schema in (
        ("qa", "qa.parquet", QA_SCHEMA),
        ("hidden", "hidden/unlabeled_qa.parquet", QA_SCHEMA),
        ("images", "images.parquet", IMAGES_SCHEMA),
    ):
        path = storage.join(out, target)
        ds = ray.data.read_parquet(staging)
        if kind != "images":
            ds = ds.select_columns(text_columns)
        ds = ds.map_batches(
            finalize, fn_kwargs={"decisions": [ref], "kind": kind}, batch_format="pyarrow", batch_size=256
        )
        ds.write_parquet(path, min_rows_per_file=None if kind == "images" else 20_000)
        if not storage.exists(path):  # no rows of this kind: still leave a readable, empty table
            fs, p = storage.filesystem(storage.join(path, "empty.parquet"))
            fs.create_dir(p.rsplit("/", 1)[0])
            pq.write_table(schema.empty_table(), p, filesystem=fs)
    storage.write_json_atomic(storage.join(out, "summary.json"), counts)
    if counts["rejected"]:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(counts["rejects_by_reason"].items()))
        log.warning("prepare: %d rows rejected (%s); see prepared/rejects.jsonl", counts["rejected"], reasons)
    storage.delete(staging)
    return counts


PREPARE = Stage(
    name="prepare",
    plan=plan,
    run=run,
    outputs=("prepared",),
    external_inputs=lambda plan: sources.source_paths(plan.data),
)
