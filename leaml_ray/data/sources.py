"""Source adapters: every dataset layout becomes Ray Data rows of one raw schema.

Adapters only reshape; they never decode images (that happens in the prepare stage's check step, in parallel).
A record an adapter cannot understand becomes a row with `reject` set, so nothing vanishes silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import ray
import ray.data

from leaml_ray import storage
from leaml_ray.config import DataSection
from leaml_ray.data import synthetic, world3
from leaml_ray.errors import UserError
from leaml_ray.formats import LETTERS

RAW_SCHEMA = pa.schema(
    [
        ("source_ref", pa.string()),  # where the row came from (file:line ...), unique per raw row
        ("image_id", pa.string()),
        ("image", pa.binary()),  # encoded image bytes, or null when image_path is set
        ("image_path", pa.string()),  # an image file, or a folder of frames (sportu)
        ("qa_id", pa.string()),  # the source's own id of the QA, if it has one
        ("question", pa.string()),  # null on image-only rows (unlabeled images)
        ("answer", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("category", pa.string()),
        ("split_hint", pa.string()),  # train | test | unlabeled | null
        ("group", pa.string()),  # images of one group (a patient, a video) share a split; null: the image alone
        ("reject", pa.string()),  # reason, when the adapter already rejects the row
        ("detail", pa.string()),
    ]
)
SPLIT_HINTS = {
    "train": "train",
    "labeled": "train",
    "test": "test",
    "val": "val",
    "unlabeled": "unlabeled",
    None: None,
}


class SourceError(UserError, ValueError):
    """The source as a whole is unusable (missing path, wrong layout)."""


def _encodable(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from JSON escapes
            return False
    if isinstance(value, list):
        return all(_encodable(v) for v in value)
    return True


def raw_row(source_ref: str, **fields: Any) -> dict:
    """A raw-schema row with every missing field null; text that is not valid UTF-8 rejects the row."""
    row = dict.fromkeys(RAW_SCHEMA.names)
    bad = [k for k, v in fields.items() if not _encodable(v)]
    if bad:
        return {
            **row,
            "source_ref": source_ref.encode("utf-8", "replace").decode(),
            "reject": "invalid_utf8",
            "detail": f"field(s) {', '.join(bad)} are not valid UTF-8",
        }
    row.update(source_ref=source_ref, **fields)
    return row


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def _resolve_image_path(base_dir: str, path: str) -> str:
    if "://" in path or path.startswith("/"):
        return path
    return storage.join(base_dir, posixpath.normpath(path))


def letter_answer(answer: str, choices: list[str]) -> str | None:
    """The option letter a multiple-choice answer means (given as the letter or as the option text)."""
    a = answer.strip().rstrip(".").strip()
    if len(a) == 1 and a.upper() in LETTERS[: len(choices)]:
        return a.upper()
    lowered = [c.strip().lower() for c in choices]
    return LETTERS[lowered.index(a.lower())] if a.lower() in lowered else None


def _qa_fields(question: Any, answer: Any, choices: Any) -> dict:
    """Question/answer/choices, with a reject reason when the answer does not fit the choices."""
    fields: dict[str, Any] = {"question": question, "answer": answer}
    if choices is not None:
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or len(choices) < 2:
            return {**fields, "reject": "bad_choices", "detail": "choices must be a list of >= 2 strings"}
        fields["choices"] = choices
        if isinstance(answer, str) and answer.strip():
            letter = letter_answer(answer, choices)
            if letter is None:
                return {**fields, "reject": "answer_not_in_choices", "detail": f"answer {answer[:80]!r}"}
            fields["answer"] = letter
    return fields


# --- generic rows: question/answer, ShareGPT/LLaVA conversations, OpenAI messages, image-only -------------


def _image_field(obj: dict) -> tuple[Any, str | None]:
    """(image value, reject reason) from `image` or an OpenAI-style `images` list."""
    if "images" in obj and "image" not in obj:
        images = obj["images"]
        if not isinstance(images, list) or not images:
            return None, "missing_image"
        if len(images) > 1:
            return None, "multi_image_unsupported"
        return images[0], None
    value = obj.get("image")
    return (value, None) if value is not None else (None, "missing_image")


def _message_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(texts)
    return None


def _turn_pairs(turns: Any, role_key: str, text_key: str, user: str, assistant: str) -> list[tuple] | None:
    """(question, answer) pairs from alternating user/assistant turns; None when malformed."""
    if not isinstance(turns, list):
        return None
    turns = [t for t in turns if isinstance(t, dict) and t.get(role_key) != "system"]
    if not turns or len(turns) % 2:
        return None
    pairs = []
    for q, a in zip(turns[::2], turns[1::2], strict=True):
        if q.get(role_key) != user or a.get(role_key) != assistant:
            return None
        qt, at = _message_text(q.get(text_key)), _message_text(a.get(text_key))
        if qt is None or at is None:
            return None
        pairs.append((qt.replace("<image>", "").strip(), at.strip()))
    return pairs


def parse_record(obj: Any, base_dir: str, ref: str) -> list[dict]:
    """Raw rows for one generic record (jsonl line or parquet row); one rejected row when it is malformed."""
    if not isinstance(obj, dict):
        return [raw_row(ref, reject="bad_record", detail="not a JSON object")]
    image, problem = _image_field(obj)
    if problem:
        return [raw_row(ref, reject=problem)]
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    img: dict[str, Any] = {}
    if isinstance(image, (bytes, bytearray)):
        img = {"image": bytes(image), "image_id": hashlib.sha1(image).hexdigest()[:16]}
    elif isinstance(image, str) and image.strip():
        img = {"image_path": _resolve_image_path(base_dir, image.strip()), "image_id": posixpath.normpath(image)}
    else:
        return [raw_row(ref, reject="missing_image", detail=f"image field {type(image).__name__}")]
    if obj.get("image_id") is not None:
        img["image_id"] = str(obj["image_id"])
    split = obj.get("split")
    if split not in SPLIT_HINTS:
        return [raw_row(ref, **img, reject="bad_split", detail=f"split {split!r}")]
    group = None if obj.get("group") is None else str(obj["group"])
    common = {**img, "category": str(obj.get("category") or "default"), "split_hint": SPLIT_HINTS[split]}
    common["group"] = group
    qa_id = obj.get("id")
    if "conversations" in obj or "messages" in obj:
        if "conversations" in obj:
            pairs = _turn_pairs(obj["conversations"], "from", "value", "human", "gpt")
        else:
            pairs = _turn_pairs(obj["messages"], "role", "content", "user", "assistant")
        if pairs is None:
            return [raw_row(ref, **common, reject="bad_record", detail="turns are not user/assistant pairs")]
        return [
            raw_row(
                f"{ref}#{k}",
                **common,
                qa_id=None if qa_id is None else f"{qa_id}#{k}",
                **_qa_fields(q, a, obj.get("choices")),
            )
            for k, (q, a) in enumerate(pairs)
        ]
    if "question" not in obj and "answer" not in obj:
        return [raw_row(ref, **{**common, "split_hint": "unlabeled"})]  # an unlabeled image
    question, answer = obj.get("question"), obj.get("answer")
    if not isinstance(question, (str, type(None))) or not isinstance(answer, (str, int, float, type(None))):
        return [raw_row(ref, **common, reject="bad_record", detail="question/answer must be text")]
    answer = None if answer is None else str(answer)
    return [
        raw_row(
            ref,
            **common,
            qa_id=None if qa_id is None else str(qa_id),
            **_qa_fields(question, answer, obj.get("choices")),
        )
    ]


def _jsonl_rows(data: bytes, path: str, base: str, image_key: str = "image") -> list[dict]:
    """Raw rows of one JSONL file's bytes: each line parsed, a line that is not UTF-8 or not JSON a recorded reject;
    `image_key` names the image field (metadata.jsonl's `file_name`)."""
    rows = []
    for n, line in enumerate(data.split(b"\n"), start=1):
        ref = f"{path}:{n:08d}"
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append(raw_row(ref, reject="invalid_utf8", detail=str(e)[:200]))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            rows.append(raw_row(ref, reject="bad_json", detail=str(e)[:200]))
            continue
        if image_key != "image" and isinstance(obj, dict) and image_key in obj:
            obj["image"] = obj.pop(image_key)
        rows.extend(parse_record(obj, base, ref))
    return rows


def _jsonl_file_rows(batch: dict) -> pa.Table:
    """Split whole .jsonl files into lines and parse each (in a worker, never on the driver)."""
    rows = []
    for data, path in zip(batch["bytes"], batch["path"], strict=True):
        rows.extend(_jsonl_rows(bytes(data), path, posixpath.dirname(path)))
    return to_table(rows)


def _local_or_uri(path: str) -> str:
    return storage.join(path) if "://" not in path else path


def _require_path(data: DataSection) -> str:
    if not data.path:
        raise SourceError(f"data.path is required for data.source={data.source}")
    path = _local_or_uri(data.path)
    if not storage.exists(path):
        raise SourceError(f"data.path {data.path} does not exist")
    return path


def read_jsonl(data: DataSection) -> ray.data.Dataset:
    path = _require_path(data)
    files = ray.data.read_binary_files(path, include_paths=True, file_extensions=["jsonl", "json"])
    return files.map_batches(_jsonl_file_rows, batch_size=1, batch_format="numpy")


def _parquet_rows(batch: pa.Table) -> pa.Table:
    rows = []
    for n, obj in enumerate(batch.to_pylist()):
        path = obj.pop("path")
        ref = f"{path}:{obj.get('id', n)}:{hashlib.sha1(repr(sorted(obj.items())).encode()).hexdigest()[:10]}"
        rows.extend(parse_record(obj, posixpath.dirname(path), ref))
    return to_table(rows)


def read_parquet(data: DataSection) -> ray.data.Dataset:
    ds = ray.data.read_parquet(_require_path(data), include_paths=True)
    return ds.map_batches(_parquet_rows, batch_format="pyarrow", batch_size=256)


# --- imagefolder and csv: the layouts a user's own data already has ----------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")  # Hugging Face imagefolder's names


def _cell(value: str | None) -> str | None:
    value = None if value is None else value.strip()
    return value or None


def _csv_records(text: str, ref_base: str, image_column: str) -> list[tuple[str, dict]]:
    """(ref, record) per CSV row, in parse_record's shape: empty cells dropped (a row without question and answer is
    an unlabeled image), `choices` as a JSON list or "a|b|c"."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or image_column not in reader.fieldnames:
        raise SourceError(f"{ref_base}: no `{image_column}` column (columns: {', '.join(reader.fieldnames or [])})")
    records = []
    for n, row in enumerate(reader, start=2):  # line 1 is the header
        record = {k: v for k, v in ((k, _cell(v)) for k, v in row.items() if k) if v is not None}
        if "choices" in record:
            text = record["choices"]
            try:
                record["choices"] = json.loads(text) if text.startswith("[") else [c.strip() for c in text.split("|")]
            except json.JSONDecodeError:
                pass  # left a string: parse_record rejects it as bad_choices
        record["image"] = record.pop(image_column, None)
        records.append((f"{ref_base}:{n:08d}", record))
    return records


def _text(path: str) -> str:
    """A metadata or CSV file's text (UTF-8, with or without the BOM spreadsheets write); else one line."""
    data = storage.read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path} is not UTF-8 text (byte {e.start})") from None


def _metadata_rows(meta: str, root: str) -> list[dict]:
    """Raw rows of an imagefolder's metadata.csv / metadata.jsonl (`file_name` relative to `root`)."""
    if meta.endswith(".csv"):
        records = _csv_records(_text(meta), meta, "file_name")
        return [row for ref, record in records for row in parse_record(record, root, ref)]
    return _jsonl_rows(storage.read_bytes(meta), meta, root, image_key="file_name")


def read_imagefolder(data: DataSection) -> ray.data.Dataset:
    """A folder of images (subfolders allowed) with an optional `metadata.csv` or `metadata.jsonl` at its top:
    `file_name` (relative to the folder), `question`, `answer`, and optionally `category`, `split` (test: held out
    for evaluation), `choices`, `group`. Each row is a QA pair of its image; an image no row names is unlabeled."""
    root = _require_path(data)
    fs, path = storage.filesystem(root)
    listed = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    images = sorted(i.path[len(path) :].lstrip("/") for i in listed if i.path.lower().endswith(IMAGE_EXTENSIONS))
    found = [name for name in METADATA_FILES if storage.exists(storage.join(root, name))]
    if len(found) > 1:
        raise SourceError(f"data.path {data.path} has both {' and '.join(found)}: keep one")
    rows = _metadata_rows(storage.join(root, found[0]), root) if found else []
    named = {r["image_path"] for r in rows}
    rows += [
        raw_row(image, image_path=image, image_id=rel, split_hint="unlabeled")
        for rel in images
        if (image := storage.join(root, rel)) not in named
    ]
    if not rows:
        raise SourceError(f"data.path {data.path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ray.data.from_arrow(to_table(rows))


def read_csv(data: DataSection) -> ray.data.Dataset:
    """A CSV file, or a folder of them: `image` (a path relative to the CSV, or a URI), `question`, `answer`, and
    optionally `category`, `split`, `choices`, `group`, `id`, `image_id`; a row with an image and no question is an
    unlabeled image (labeled and image-only rows may sit in separate files of the folder)."""
    root = _require_path(data)
    fs, path = storage.filesystem(root)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        listed = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = sorted(storage.join(root, i.path[len(path) :]) for i in listed if i.path.lower().endswith(".csv"))
    else:
        files = [root]
    if not files:
        raise SourceError(f"data.path {data.path} holds no .csv files")
    rows = []
    for f in files:
        for ref, record in _csv_records(_text(f), f, "image"):
            rows.extend(parse_record(record, posixpath.dirname(f), ref))
    return ray.data.from_arrow(to_table(rows))


# --- kvasir_vqa: the Hugging Face parquet layout of SimulaMet-HOST/Kvasir-VQA -----------------------------

KVASIR_COLUMNS = {"image", "source", "question", "answer", "img_id"}


def _split_from_path(path: str) -> str | None:
    name = posixpath.basename(path).lower()
    return "test" if "test" in name else "train" if "train" in name else None


def _kvasir_rows(batch: pa.Table) -> pa.Table:
    rows = []
    for obj in batch.to_pylist():
        qhash = hashlib.sha1(f"{obj['question']}|{obj['answer']}".encode()).hexdigest()[:10]
        ref = f"{obj['path']}:{obj['img_id']}:{qhash}"
        image = obj["image"] or {}
        img_bytes = image.get("bytes") if isinstance(image, dict) else image
        rows.append(
            raw_row(
                ref,
                image_id=obj["img_id"],
                image=img_bytes,
                question=obj["question"],
                answer=obj["answer"],
                category=obj["source"] or "default",
                split_hint=_split_from_path(obj["path"]),
                reject=None if img_bytes else "missing_image",
            )
        )
    return to_table(rows)


def read_kvasir_vqa(data: DataSection) -> ray.data.Dataset:
    ds = ray.data.read_parquet(_require_path(data), include_paths=True)
    missing = KVASIR_COLUMNS - set(ds.schema().names)
    if missing:
        raise SourceError(f"data.path {data.path} is not the Kvasir-VQA parquet layout: no column(s) {sorted(missing)}")
    return ds.map_batches(_kvasir_rows, batch_format="pyarrow", batch_size=64)


# --- sportu: SportU_Video_mc.json + a folder of frames per clip -----------------------------------------


def sportu_rows(records: Any, frames_dir: str, ref_base: str) -> list[dict]:
    """Raw rows for SPORTU multiple-choice records; category is the difficulty level."""
    if not isinstance(records, list):
        raise SourceError(f"{ref_base}: expected a JSON list of SPORTU records")
    rows = []
    for n, rec in enumerate(records):
        ref = f"{ref_base}:{n:08d}"
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or not isinstance(rec.get("options"), dict):
            rows.append(raw_row(ref, reject="bad_record", detail="needs id, question, options, answer"))
            continue
        options = rec["options"]
        choices = [str(options[k]) for k in sorted(options)]
        rows.append(
            raw_row(
                ref,
                image_id=rec["id"],
                image_path=storage.join(frames_dir, rec["id"]),
                category=str(rec.get("difficulty level") or "default"),
                **_qa_fields(rec.get("question"), rec.get("answer"), choices),
            )
        )
    return rows


def read_sportu(data: DataSection) -> ray.data.Dataset:
    path = _require_path(data)
    frames_dir = _local_or_uri(data.frames_dir) if data.frames_dir else storage.join(posixpath.dirname(path), "frames")
    if not storage.exists(frames_dir):
        raise SourceError(f"data.frames_dir {frames_dir} does not exist")
    try:
        records = json.loads(storage.read_bytes(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"data.path {data.path} is not SPORTU JSON ({e})") from None
    return ray.data.from_arrow(to_table(sportu_rows(records, frames_dir, path)))


# --- synthetic ----------------------------------------------------------------------------------------


TEST_FIRST, VAL_FIRST = 1_000_000, 2_000_000  # world 3's test and validation images: indices of their own


def _synthetic_rows(batch: dict, data: DataSection, seed: int) -> pa.Table:
    """Rows of the synthetic images numbered in `batch["id"]`: train images first, then world 3's test images, then
    validation images. World 2's validation images follow its train images (indices num_images on)."""
    world = world3 if data.world == 3 else synthetic
    first_test, first_val = data.num_images, data.num_images + data.test_images
    rows = []
    for k in batch["id"].tolist():
        if data.world == 3:
            index = k if k < first_test else TEST_FIRST + k - first_test if k < first_val else VAL_FIRST + k - first_val
        else:
            index = k
        hint = None if k < first_test else "test" if k < first_val else "val"
        scene, img = world.sample(data.domain, seed, index, data.image_size)
        iid, png = world.image_id(data.domain, seed, index), synthetic.png_bytes(img)
        for q, (category, question, answer) in enumerate(world.questions(scene, seed, index)):
            rows.append(
                raw_row(
                    f"synthetic:{iid}#{q}",
                    image_id=iid,
                    image=png,
                    question=question,
                    answer=answer,
                    category=category,
                    split_hint=hint,
                )
            )
    return to_table(rows)


def read_synthetic(data: DataSection, seed: int) -> ray.data.Dataset:
    """`num_images` scenes of `data.world`, then (world 3) `test_images` of their own, then `val_images` (their own
    indices: disjoint) marked as the validation split."""
    return ray.data.range(data.num_images + data.test_images + data.val_images).map_batches(
        _synthetic_rows, batch_size=128, batch_format="numpy", fn_kwargs={"data": data, "seed": seed}
    )


def read_source(data: DataSection, seed: int) -> ray.data.Dataset:
    """The source named by `data.source` as raw-schema rows."""
    if data.source == "synthetic":
        return read_synthetic(data, seed)
    readers = {
        "kvasir_vqa": read_kvasir_vqa,
        "sportu": read_sportu,
        "jsonl": read_jsonl,
        "parquet": read_parquet,
        "imagefolder": read_imagefolder,
        "csv": read_csv,
    }
    return readers[data.source](data)


def source_paths(data: DataSection) -> list[str]:
    """The external paths a prepare run depends on (for the manifest's input fingerprints)."""
    if data.source == "synthetic" or not data.path:
        return []
    paths = [_local_or_uri(data.path)]
    if data.source == "sportu":
        paths.append(
            _local_or_uri(data.frames_dir) if data.frames_dir else storage.join(posixpath.dirname(paths[0]), "frames")
        )
    return paths
