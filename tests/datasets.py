"""Builders of small source datasets in the real layouts, with generated images (no downloads)."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"


def image_bytes(key: str, size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> bytes:
    """A small deterministic image whose colour depends on `key`."""
    rnd = random.Random(key)
    img = Image.new("RGB", size, tuple(rnd.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def kvasir_rows() -> list[dict]:
    with open(FIXTURES / "kvasir_vqa_sample.csv", newline="") as f:
        return list(csv.DictReader(f))


def write_kvasir(folder: Path, test_images: int = 0) -> Path:
    """The HF parquet layout of Kvasir-VQA; the first `test_images` images go to a test-* shard."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = kvasir_rows()
    ids = list(dict.fromkeys(r["img_id"] for r in rows))
    test_ids = set(ids[::5][:test_images])  # spread over the sources
    shards: dict[str, list[dict]] = {}
    for r in rows:
        name = "test-00000-of-00001.parquet" if r["img_id"] in test_ids else "raw-00000-of-00001.parquet"
        img = {"bytes": image_bytes(r["img_id"]), "path": f"{r['img_id']}.jpg"}
        shards.setdefault(name, []).append({"image": img, **r})
    for name, shard in shards.items():
        pq.write_table(pa.Table.from_pylist(shard), folder / name)
    return folder


def sportu_records() -> list[dict]:
    return json.loads((FIXTURES / "sportu_mc_sample.json").read_text())


def write_sportu(folder: Path, frames: int = 3, skip_clips: tuple[str, ...] = ()) -> Path:
    """SportU_Video_mc.json plus frames/<clip id>/frame_k.jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    records = sportu_records()
    (folder / "SportU_Video_mc.json").write_text(json.dumps(records))
    for clip in {r["id"] for r in records} - set(skip_clips):
        (folder / "frames" / clip).mkdir(parents=True, exist_ok=True)
        for k in range(frames):
            (folder / "frames" / clip / f"frame_{k:03d}.jpg").write_bytes(image_bytes(f"{clip}-{k}", (40, 30)))
    return folder / "SportU_Video_mc.json"
