"""Training rows meet their images by id inside Ray Data tasks: in the rows' own order, in bounded tables, and at the
scale of a real dataset (MB-sized images whose repeated rows pass 2 GiB) without the bytes reaching the driver."""

import resource

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaml_ray.data import examples


def image_table(ids: list[str], size: int, chunk: int) -> pa.Table:
    """Images with distinct bytes (their id, repeated to `size`), in chunks of `chunk` rows."""
    blobs = [(i.encode() * (size // len(i) + 1))[:size] for i in ids]
    return pa.concat_tables(
        [pa.table({"image_id": ids[k : k + chunk], "image": blobs[k : k + chunk]}) for k in range(0, len(ids), chunk)]
    )


def test_rows_meet_their_own_images_in_their_own_order(monkeypatch):
    # training order follows this order (Acero's hash join returned chunked inputs in a varying order)
    ids = [f"img{i}" for i in range(500)]
    images = image_table(ids, 100, chunk=50)
    picks = [ids[(7 * k) % 500] for k in range(20_000)] + ["missing"]
    rows = pa.table({"image_id": picks, "n": range(len(picks))})
    rows = pa.concat_tables([rows.slice(i, 400) for i in range(0, rows.num_rows, 400)])
    monkeypatch.setattr(examples, "MAX_BLOCK_BYTES", 10_000)  # 100 images of 100 bytes per table
    pieces = list(examples._attach(images, rows))
    assert [p.num_rows for p in pieces] == [100] * 200
    joined = pa.concat_tables(pieces)
    assert joined.column_names == ["image_id", "image", "n"]
    assert joined["n"].to_pylist() == list(range(20_000))  # in order, the row without an image dropped
    assert all(img.startswith(i.encode()) for i, img in zip(picks, joined["image"].to_pylist(), strict=False))
    with pytest.raises(ValueError, match="1 rows have no image in prepared/images.parquet \\(e.g. missing\\)"):
        list(examples._attach(images, rows, every_row=True))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_labeled_rows_past_2_gib_of_images_never_reach_the_driver(tmp_path):
    """Two 8.4 MB images cycled to 260 rows (2.2 GB of joined bytes, the 1% Kvasir-VQA preset has ~15k rows of
    0.3-4 MB images): today's finetune baselines joined them on the driver, where Arrow's hash join segfaults past
    2 GiB. The rows come out in order, each with its own image, in tables of at most MAX_BLOCK_BYTES, while the
    driver's peak memory stays far below the joined size."""
    size = 8_400_000
    path = str(tmp_path / "images.parquet")
    pq.write_table(image_table(["a", "b", "c"], size, chunk=1), path, row_group_size=1)  # "c" is never asked for
    rows = examples.cycled(pa.table({"image_id": ["a", "b"], "n": [0, 1]}), 260)
    rows = rows.set_column(1, "n", pa.array(range(260)))

    def check(batch: pa.Table) -> pa.Table:  # in a task: the bytes stay off the driver
        pairs = zip(batch["image_id"].to_pylist(), batch["image"].to_pylist(), strict=True)
        ok = [img[:1] == i.encode() and len(img) == size for i, img in pairs]
        return pa.table({"n": [batch["n"].to_pylist()], "ok": [all(ok)], "bytes": [batch["image"].nbytes]})

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = examples.labeled_rows(path, rows).map_batches(check, batch_format="pyarrow", batch_size=None, num_cpus=0.25)
    summary = out.take_all()
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert all(r["ok"] for r in summary)
    assert sorted(n for r in summary for n in r["n"]) == list(range(260))
    assert max(r["bytes"] for r in summary) <= examples.MAX_BLOCK_BYTES
    assert sum(r["bytes"] for r in summary) > 2 * 2**30
    assert peak_after - peak_before < 2**30, f"the driver grew by {(peak_after - peak_before) / 2**20:.0f} MiB"
    assert all(list(r["n"]) == list(range(r["n"][0], r["n"][0] + len(r["n"]))) for r in summary)  # rows in order


def test_training_examples_carry_the_configured_prompts():
    qa = pa.table({"image_id": ["a"], "question": ["how many polyps?"], "answer": ["2"], "choices": [None]})
    rows = examples.generator_examples(qa, "Ask about this colonoscopy frame.").to_pylist()
    assert rows == [
        {
            "image_id": "a",
            "instruction": "Ask about this colonoscopy frame.",
            "response": "Question: how many polyps?\nAnswer: 2",
        }
    ]
    captions = pa.table({"image_id": ["b"], "caption": ["a pale mucosa."]})
    rows = examples.caption_examples(captions, "Describe this colonoscopy frame.").to_pylist()
    assert rows == [{"image_id": "b", "instruction": "Describe this colonoscopy frame.", "response": "a pale mucosa."}]
