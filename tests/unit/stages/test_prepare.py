"""The prepare stage through Ray Data on every adapter, the label split on disk, and bad-input handling."""

import io
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data
from PIL import Image

from leaml_ray.config import load_config
from leaml_ray.data import world3
from leaml_ray.data.sources import SourceError
from leaml_ray.pipeline import StageError, run_pipeline
from leaml_ray.stages.prepare import PREPARE
from tests import datasets
from tests.conftest import make_config

pytestmark = pytest.mark.usefixtures("ray_local")


def prepare(tmp_path, *overrides):
    cfg = make_config(tmp_path, *overrides)
    result = run_pipeline(cfg, [PREPARE])[0]
    return Path(cfg.run.dir) / "prepared", result


def table(prepared: Path, name: str) -> list[dict]:
    return pq.read_table(prepared / name).to_pylist()


def rejects(prepared: Path) -> list[dict]:
    return [json.loads(line) for line in (prepared / "rejects.jsonl").read_text().splitlines()]


def test_synthetic_split_is_by_image_and_hides_unlabeled_answers(tmp_path):
    prepared, result = prepare(tmp_path, "data.num_images=80", "data.label_ratio=0.1", "data.test_ratio=0.25")
    qa, imgs = table(prepared, "qa.parquet"), table(prepared, "images.parquet")
    split_of = {r["image_id"]: r["split"] for r in imgs}
    assert len(imgs) == 80 and Counter(split_of.values()) == {"test": 20, "labeled": 6, "unlabeled": 54}
    assert all(r["split"] == split_of[r["image_id"]] for r in qa)  # one split per image
    assert len(qa) == 80 * 4 and result.counts["qa_by_split"] == dict(Counter(r["split"] for r in qa))
    for r in qa:
        if r["split"] == "unlabeled":
            assert r["question"] is None and r["answer"] is None
        else:
            assert r["question"] and r["answer"]
    hidden = table(prepared, "hidden/unlabeled_qa.parquet")
    assert len(hidden) == 54 * 4 and all(r["answer"] and r["split"] == "unlabeled" for r in hidden)
    assert {r["qa_id"] for r in hidden} == {r["qa_id"] for r in qa if r["split"] == "unlabeled"}
    labeled_categories = {r["category"] for r in qa if r["split"] == "labeled"}
    assert labeled_categories == {"shape", "color", "size", "background"}
    assert Image.open(io.BytesIO(imgs[0]["image"])).size == (56, 56)

    # validation images: extra scenes with labels, none of them among the 80, and the 80 split exactly as before
    # (which also says a second prepare of the same source reproduces the split)
    with_val, _ = prepare(
        tmp_path / "val", "data.num_images=80", "data.val_images=12", "data.label_ratio=0.1", "data.test_ratio=0.25"
    )
    val_split = {r["image_id"]: r["split"] for r in table(with_val, "images.parquet")}
    val_ids = {i for i, s in val_split.items() if s == "val"}
    assert len(val_ids) == 12 and not val_ids & set(split_of)
    assert {i: s for i, s in val_split.items() if i not in val_ids} == split_of
    val_qa = [r for r in table(with_val, "qa.parquet") if r["split"] == "val"]
    assert len(val_qa) == 12 * 4 and all(r["question"] and r["answer"] for r in val_qa)


def test_world_3_has_test_images_of_its_own_and_nine_questions_an_image(tmp_path):
    args = ["data.world=3", "data.domain=scope", "data.num_images=30", "data.test_images=6", "data.image_size=84"]
    prepared, _ = prepare(tmp_path, *args, "data.label_ratio=0.2", "data.val_images=3")
    imgs, qa = table(prepared, "images.parquet"), table(prepared, "qa.parquet")
    split_of = {r["image_id"]: r["split"] for r in imgs}
    test = sorted(i for i, s in split_of.items() if s == "test")
    val = sorted(i for i, s in split_of.items() if s == "val")
    # the 6 test images are indices 1,000,000 on, the 3 validation images 2,000,000 on; test_ratio plays no part
    assert test == [world3.image_id("scope", 0, 1_000_000 + k) for k in range(6)]
    assert val == [world3.image_id("scope", 0, 2_000_000 + k) for k in range(3)]
    assert Counter(split_of.values()) == {"labeled": 6, "unlabeled": 24, "test": 6, "val": 3}
    assert len(qa) == 9 * (6 + 6 + 24 + 3) and Image.open(io.BytesIO(imgs[0]["image"])).size == (84, 84)
    assert {r["category"] for r in qa if r["split"] == "labeled"} == set(world3.DOMAINS["scope"].categories)


def test_an_image_folder_with_its_metadata_uses_every_label(tmp_path):
    """Hugging Face's imagefolder layout, labels not hidden (data.label_ratio unset on your own data)."""
    folder = tmp_path / "scans"
    lines = ["file_name,question,answer,category,split"]
    for k in range(10):
        (folder / f"case{k % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"case{k % 3}" / f"s{k}.jpg").write_bytes(datasets.image_bytes(f"s{k}"))
        if k < 6:  # two labeled pairs each
            lines += [f"case{k % 3}/s{k}.jpg,is there a polyp?,{'yes' if k % 2 else 'no'},finding,"]
            lines += [f"case{k % 3}/s{k}.jpg,which organ is it?,colon,organ,"]
        elif k < 8:  # held out for evaluation
            lines += [f"case{k % 3}/s{k}.jpg,is there a polyp?,no,finding,test"]
        # s8 and s9: no row, unlabeled
    lines += ["case0/gone.jpg,is there a polyp?,no,finding,"]  # no such file: a recorded reject
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    prepared, result = prepare(tmp_path, "data.source=imagefolder", f"data.path={folder}")
    split_of = {r["image_id"]: r["split"] for r in table(prepared, "images.parquet")}
    assert Counter(split_of.values()) == {"labeled": 6, "test": 2, "unlabeled": 2}
    assert {i for i, s in split_of.items() if s == "unlabeled"} == {"case2/s8.jpg", "case0/s9.jpg"}
    labeled = [r for r in table(prepared, "qa.parquet") if r["split"] == "labeled"]
    assert len(labeled) == 12 and not table(prepared, "hidden/unlabeled_qa.parquet")  # every label used
    assert [r["reason"] for r in rejects(prepared)] == ["missing_image"]
    assert load_config(None, ["data.source=imagefolder"]).data.label_ratio == 1.0
    assert load_config(None, []).data.label_ratio == 0.05  # the synthetic world hides labels: the experiment

    (folder / "metadata.csv").write_text("image,question,answer\ncase0/s0.jpg,q?,a\n")
    with pytest.raises(SourceError, match=r"metadata.csv: no `file_name` column \(columns: image, question, answer\)"):
        prepare(tmp_path / "bad", "data.source=imagefolder", f"data.path={folder}")
    (folder / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + "file_name,question,answer\ncase0/s0.jpg,é?,a\n".encode())
    (folder / "metadata.jsonl").write_text("{}\n")
    with pytest.raises(SourceError, match="has both metadata.csv and metadata.jsonl: keep one"):
        prepare(tmp_path / "both", "data.source=imagefolder", f"data.path={folder}")
    (folder / "metadata.jsonl").unlink()  # a spreadsheet's BOM is not part of the first column's name
    prepared, _ = prepare(tmp_path / "bom", "data.source=imagefolder", f"data.path={folder}", "data.test_ratio=0")
    assert [r["question"] for r in table(prepared, "qa.parquet") if r["question"]] == ["é?"]
    (folder / "metadata.csv").unlink()
    (folder / "metadata.jsonl").write_text('{"file_name": "case0/s0.jpg", "question": "q?", "answer": "a"}\n{oops\n')
    prepared, _ = prepare(tmp_path / "jsonl", "data.source=imagefolder", f"data.path={folder}", "data.test_ratio=0")
    assert [r["reason"] for r in rejects(prepared)] == ["bad_json"]
    assert Counter(r["split"] for r in table(prepared, "images.parquet")) == {"labeled": 1, "unlabeled": 9}


def test_csv_with_labeled_and_image_only_rows_in_separate_files(tmp_path):
    folder = tmp_path / "csv"
    (folder / "img").mkdir(parents=True)
    for k in range(8):
        (folder / "img" / f"{k}.png").write_bytes(datasets.image_bytes(str(k), fmt="PNG"))
    labeled = ["image,question,answer,choices,category"]
    labeled += [f"img/{k}.png,what is the grade?,{'mild' if k % 2 else 'severe'},mild|severe,grade" for k in range(4)]
    (folder / "labeled.csv").write_text("\n".join(labeled) + "\n")
    (folder / "unlabeled.csv").write_text("image\n" + "".join(f"img/{k}.png\n" for k in range(4, 8)))
    prepared, _ = prepare(tmp_path, "data.source=csv", f"data.path={folder}", "data.test_ratio=0.25")
    split_of = {r["image_id"]: r["split"] for r in table(prepared, "images.parquet")}
    assert Counter(split_of.values()) == {"labeled": 3, "test": 1, "unlabeled": 4}
    assert all(split_of[f"img/{k}.png"] == "unlabeled" for k in range(4, 8))
    qa = [r for r in table(prepared, "qa.parquet") if r["question"]]
    assert {r["answer"] for r in qa} <= {"A", "B"} and all(r["choices"] == ["mild", "severe"] for r in qa)


def test_images_of_one_group_share_their_split(tmp_path):
    """Frames of one video, images of one patient: never some in train and some in test (nor half labeled)."""
    folder = tmp_path / "groups"
    folder.mkdir()
    lines = ["image,question,answer,category,group"]
    for k in range(24):
        (folder / f"{k}.png").write_bytes(datasets.image_bytes(f"g{k}", fmt="PNG"))
        lines.append(f"{k}.png,is it inflamed?,{'yes' if k % 3 else 'no'},finding,patient{k // 3}")
    (folder / "qa.csv").write_text("\n".join(lines) + "\n")
    overrides = ["data.source=csv", f"data.path={folder}", "data.test_ratio=0.25", "data.label_ratio=0.5"]
    prepared, _ = prepare(tmp_path, *overrides)
    split_of = {r["image_id"]: r["split"] for r in table(prepared, "images.parquet")}
    by_patient = {p: {split_of[f"{k}.png"] for k in range(3 * p, 3 * p + 3)} for p in range(8)}
    assert all(len(splits) == 1 for splits in by_patient.values()), by_patient
    assert Counter(s for (s,) in by_patient.values()) == {"test": 2, "labeled": 3, "unlabeled": 3}


def test_kvasir_vqa_layout(tmp_path):
    folder = datasets.write_kvasir(tmp_path / "kvasir", test_images=8)
    prepared, result = prepare(tmp_path, "data.source=kvasir_vqa", f"data.path={folder}", "data.label_ratio=0.1")
    rows = datasets.kvasir_rows()
    expected_qa = {(r["img_id"], r["question"]) for r in rows}
    test_ids = list(dict.fromkeys(r["img_id"] for r in rows))[::5][:8]
    imgs = table(prepared, "images.parquet")
    assert {r["image_id"] for r in imgs if r["split"] == "test"} == set(test_ids)
    qa = table(prepared, "qa.parquet") + table(prepared, "hidden/unlabeled_qa.parquet")
    visible = [r for r in qa if r["question"] is not None]
    assert len(visible) == len(expected_qa)
    assert {(r["image_id"], r["question"]) for r in visible} == expected_qa
    assert {r["category"] for r in visible} == {r["source"] for r in rows}
    labeled = [r for r in visible if r["split"] == "labeled"]
    assert {r["category"] for r in labeled} == {r["source"] for r in rows}  # every category labeled
    multi = next(r for r in visible if r["question"] == "Where in the image is the abnormality?" and ";" in r["answer"])
    assert "; " in multi["answer"]
    assert result.counts["rejected"] == len(rows) - len(expected_qa)


def test_sportu_clips_frames_and_letters(tmp_path):
    path = datasets.write_sportu(tmp_path / "sportu", frames=3, skip_clips=("soccer_66_0",))
    prepared, result = prepare(
        tmp_path, "data.source=sportu", f"data.path={path}", "data.frames_per_clip=2", "data.label_ratio=0.2"
    )
    records = datasets.sportu_records()
    visible = [
        r
        for r in table(prepared, "qa.parquet") + table(prepared, "hidden/unlabeled_qa.parquet")
        if r["question"] is not None
    ]
    assert len(visible) == len(records) - 1
    assert result.counts["rejects_by_reason"] == {"missing_image": 1}
    assert {r["image_id"] for r in visible if r["image_id"] == "Basketball_126"} == {"Basketball_126"}
    assert sum(r["image_id"] == "Basketball_126" for r in visible) == 2  # two questions on one clip
    by_question = {(r["image_id"], r["question"]): r for r in visible}
    for rec in records:
        if rec["id"] == "soccer_66_0":
            continue
        row = by_question[(rec["id"], rec["question"])]
        assert row["answer"] == rec["answer"] and len(row["choices"]) == len(rec["options"])
        assert row["category"] == rec["difficulty level"]
    img = next(r for r in table(prepared, "images.parquet"))
    assert Image.open(io.BytesIO(img["image"])).size == (80, 30)  # two 40x30 frames side by side


def write_generic(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("a", "b", "c", "d", "e", "f"):
        (folder / f"{name}.png").write_bytes(datasets.image_bytes(name, fmt="PNG"))
    (folder / "big.png").write_bytes(datasets.image_bytes("big", (200, 200), "PNG"))
    (folder / "broken.jpg").write_bytes(b"not really a jpeg")
    good = [
        {"image": "a.png", "question": "what is it?", "answer": "cat", "category": "animal"},
        {"image": "a.png", "question": "what colour?", "answer": "red", "category": "color"},
        {"image": "b.png", "question": "what is it?", "answer": "dog", "category": "animal"},
        {"image": "c.png", "question": "what colour?", "answer": "blue", "category": "color", "split": "test"},
        {
            "image": "d.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat is it?"},
                {"from": "gpt", "value": "bird"},
                {"from": "human", "value": "what colour?"},
                {"from": "gpt", "value": "green"},
            ],
            "category": "animal",
        },
        {
            "images": ["e.png"],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
                {"role": "assistant", "content": "fish"},
            ],
            "category": "animal",
        },
        {"image": "f.png"},  # an unlabeled image
        {"image": "b.png", "question": "which?", "choices": ["cat", "dog"], "answer": "dog", "category": "mc"},
        {"image": "big.png", "question": "what is it?", "answer": "big", "category": "animal"},
    ]
    bad = [
        {"image": "b.png", "question": "which one?", "choices": ["cat", "dog"], "answer": "cow", "category": "mc"},
        {"image": "missing.png", "question": "what is it?", "answer": "x"},
        {"image": "broken.jpg", "question": "what is it?", "answer": "x"},
        {"image": "c.png", "question": "  ", "answer": "x"},
        {"image": "c.png", "question": "what shape?", "answer": ""},
        {"image": "a.png", "question": "What is  it?", "answer": "cat", "category": "animal"},  # duplicate question
        {"image": "e.png", "image_id": "a.png", "question": "what else?", "answer": "y"},  # id of another image
        {"question": "no image here", "answer": "x"},
        {"image": "c.png", "question": "q", "answer": "a", "split": "validation"},
    ]
    lines = [json.dumps(r).encode() for r in good + bad]
    lines += [b'{"image": "c.png", "question": "caf\xff?", "answer": "x"}', b'{"image": "c.png", "question": ']
    lines += [b'{"image": "c.png", "question": "\\ud800", "answer": "x"}']
    path = folder / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_generic_jsonl_forms_and_every_kind_of_bad_input(tmp_path):
    path = write_generic(tmp_path / "generic")
    prepared, result = prepare(
        tmp_path,
        "data.source=jsonl",
        f"data.path={path}",
        "data.label_ratio=0.5",
        "data.max_pixels=10000",
    )
    counts = result.counts
    assert counts["rejects_by_reason"] == {
        "answer_not_in_choices": 1,
        "missing_image": 2,
        "undecodable_image": 1,
        "empty_question": 1,
        "empty_answer": 1,
        "duplicate_qa": 1,
        "duplicate_image_id": 1,
        "bad_split": 1,
        "invalid_utf8": 2,
        "bad_json": 1,
    }
    assert counts["resized"] == 1
    recorded = rejects(prepared)
    assert all(r["source_ref"].startswith(str(path)) and r["reason"] for r in recorded)
    resized = next(r for r in recorded if r["action"] == "resized")
    assert resized["detail"] == "resized 200x200 -> 100x100"

    qa = table(prepared, "qa.parquet")
    hidden = table(prepared, "hidden/unlabeled_qa.parquet")
    imgs = {r["image_id"]: r for r in table(prepared, "images.parquet")}
    # nothing lost silently: 9 QA rows + 1 image-only row kept + 12 rejected = 22 raw rows read
    assert len(qa) == 9 and counts["rejected"] == 12 and counts["rows_read"] == 22
    assert imgs["f.png"]["split"] == "unlabeled"
    assert imgs["c.png"]["split"] == "test" and {r["split"] for r in qa if r["image_id"] == "c.png"} == {"test"}
    assert imgs["big.png"]["width"] * imgs["big.png"]["height"] <= 10000
    mc = next(r for r in qa + hidden if r["category"] == "mc" and r["answer"])
    assert mc["answer"] == "B" and mc["choices"] == ["cat", "dog"]
    questions = {r["question"] for r in qa + hidden if r["question"]}
    assert {"what is it?", "what colour?"} <= questions and "<image>" not in " ".join(questions)

    # a rerun is skipped until the source file changes
    cfg = make_config(
        tmp_path, "data.source=jsonl", f"data.path={path}", "data.label_ratio=0.5", "data.max_pixels=10000"
    )
    assert run_pipeline(cfg, [PREPARE])[0].action == "skipped"
    path.write_bytes(path.read_bytes() + json.dumps({"image": "f.png", "question": "new?", "answer": "y"}).encode())
    assert run_pipeline(cfg, [PREPARE])[0].action == "ran"


def test_generic_parquet_with_inline_images(tmp_path):
    rows = [
        {
            "image": {"bytes": datasets.image_bytes(f"p{k}"), "path": None},
            "question": f"q{k}?",
            "answer": "yes",
            "category": "c" + str(k % 2),
        }
        for k in range(12)
    ]
    rows.append({"image": {"bytes": b"garbage", "path": None}, "question": "q?", "answer": "no", "category": "c0"})
    (tmp_path / "src").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "src" / "train.parquet")
    prepared, result = prepare(
        tmp_path,
        "data.source=parquet",
        f"data.path={tmp_path / 'src'}",
        "data.label_ratio=0.25",
        "data.test_ratio=0.25",
    )
    assert result.counts["rejects_by_reason"] == {"undecodable_image": 1}
    assert result.counts["images_by_split"] == {"test": 3, "labeled": 2, "unlabeled": 7, "val": 0}


def test_unusable_sources_fail_with_one_clear_line(tmp_path):
    with pytest.raises(StageError, match="stage prepare: input .*nowhere.jsonl does not exist"):
        prepare(tmp_path, "data.source=jsonl", f"data.path={tmp_path / 'nowhere.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "gone.png", "question": "q", "answer": "a"}\nnot json\n')
    with pytest.raises(SourceError, match=r"no usable rows; rejects: \{'missing_image': 1, 'bad_json': 1\}"):
        prepare(tmp_path / "b", "data.source=jsonl", f"data.path={bad}")
    (tmp_path / "notkvasir").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "notkvasir" / "a.parquet")
    with pytest.raises(SourceError, match="not the Kvasir-VQA parquet layout"):
        prepare(tmp_path / "c", "data.source=kvasir_vqa", f"data.path={tmp_path / 'notkvasir'}")


def test_a_parquet_read_on_a_small_machine_starts_one_footer_reader(tmp_path):
    # every stage reads parquet; Ray Data's default pool of 32 footer-reading actors (a process each) per read cost
    # seconds per read on 2 cores: the local Ray instance (runtime.local_ray_env, conftest) starts cpus // 4 of them
    def footer_readers() -> int:
        actors = ray._private.state.state.actor_table(None).values()
        return sum(a.get("ActorClassName") == "FooterReader" for a in actors)

    pq.write_table(pa.table({"x": list(range(10))}), tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"x": list(range(10, 20))}), tmp_path / "part-1.parquet")
    before = footer_readers()
    assert len(ray.data.read_parquet(str(tmp_path)).take_all()) == 20
    assert footer_readers() - before == max(1, (os.cpu_count() or 1) // 4)
