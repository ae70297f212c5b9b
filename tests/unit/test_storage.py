"""storage against a real S3 endpoint (moto): run-dir I/O, AWS_ENDPOINT_URL, reachability, model folder caching."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from leaml_ray import storage


@pytest.fixture
def direct(s3_server) -> pafs.S3FileSystem:
    """A client pointed at the server explicitly, independent of what storage.filesystem does."""
    return pafs.S3FileSystem(endpoint_override=s3_server, region="us-east-1", allow_bucket_creation=True)


@pytest.fixture
def bucket(direct) -> str:
    """A fresh bucket, as an s3:// URI."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    direct.create_dir(name)
    return f"s3://{name}"


def files(fs: pafs.FileSystem, uri: str) -> dict[str, bytes]:
    """Every file under uri (relative path -> bytes), read with fs."""
    root = uri.split("://", 1)[1].rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    out = {}
    for i in infos:
        if i.type == pafs.FileType.File:
            with fs.open_input_stream(i.path) as f:
                out[i.path[len(root) + 1 :]] = f.read()
    return out


def put(fs: pafs.FileSystem, uri: str, tree: dict[str, bytes]) -> None:
    """Write tree (relative path -> bytes) under uri."""
    root = uri.split("://", 1)[1].rstrip("/")
    for rel, data in tree.items():
        with fs.open_output_stream(f"{root}/{rel}") as f:
            f.write(data)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and len(text) < 400, text
    return text


# --- endpoint -----------------------------------------------------------------------------------------------------


def test_resolve_honours_aws_endpoint_url(bucket, direct):
    fs, p = storage.filesystem(f"{bucket}/a/b.txt")
    assert isinstance(fs, pafs.S3FileSystem) and p == f"{bucket[5:]}/a/b.txt"
    storage.write_bytes_atomic(f"{bucket}/a/b.txt", b"via env")
    assert files(direct, bucket) == {"a/b.txt": b"via env"}  # it went to the server named by AWS_ENDPOINT_URL


def test_endpoint_url_s3_wins_over_endpoint_url(monkeypatch, s3_server, bucket, direct):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    storage.write_bytes_atomic(f"{bucket}/x.txt", b"s3-specific")
    assert files(direct, bucket) == {"x.txt": b"s3-specific"}


# --- run-dir I/O --------------------------------------------------------------------------------------------------


def test_write_read_exists(bucket, direct):
    path = storage.join(bucket, "run", "stage", "out.txt")
    assert not storage.exists(path)
    storage.write_bytes_atomic(path, b"one")
    storage.write_bytes_atomic(path, b"two!")
    assert storage.exists(path) and storage.exists(storage.join(bucket, "run"))
    assert storage.read_bytes(path) == b"two!"
    assert files(direct, bucket) == {"run/stage/out.txt": b"two!"}  # no temporary siblings left behind


def test_create_exclusive_and_json(monkeypatch, bucket):
    monkeypatch.setenv("LEAML_TEST_TOKEN", "s3cr3t-value-123")
    lock = storage.join(bucket, "run", "lock.json")
    assert storage.create_exclusive(lock, b"first")
    assert not storage.create_exclusive(lock, b"second")
    assert storage.read_bytes(lock) == b"first"
    manifest = storage.join(bucket, "run", "manifest.json")
    storage.write_json_atomic(manifest, {"url": "s3://u:s3cr3t-value-123@host", "n": 1})
    assert storage.read_json(manifest) == {"url": "s3://u:***@host", "n": 1}


def test_delete_file_and_folder(bucket, direct):
    put(direct, bucket, {"d/a": b"a", "d/sub/b": b"b", "keep": b"k"})
    storage.delete(storage.join(bucket, "d", "a"))
    assert files(direct, bucket) == {"d/sub/b": b"b", "keep": b"k"}
    storage.delete(storage.join(bucket, "d"))
    storage.delete(storage.join(bucket, "never-there"))
    assert files(direct, bucket) == {"keep": b"k"}
    assert not storage.exists(storage.join(bucket, "d"))


def test_replace_renames_locally_and_refuses_object_stores(tmp_path, bucket):
    (tmp_path / "new" / "sub").mkdir(parents=True)
    (tmp_path / "new" / "sub" / "b").write_bytes(b"B")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "stale").write_bytes(b"x")
    storage.replace(str(tmp_path / "new"), str(tmp_path / "old"))
    assert [p.name for p in (tmp_path / "old").rglob("*")] == ["sub", "b"] and not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="object stores have no rename"):
        storage.replace(storage.join(bucket, "new"), storage.join(bucket, "old"))


def test_the_test_store_refuses_copies_of_large_objects_as_aws_does_above_5_gib(bucket, direct):
    from tests.conftest import S3_COPY_LIMIT

    put(direct, bucket, {"small": b"s" * 10, "large": b"l" * (S3_COPY_LIMIT + 1)})
    root = bucket.split("://", 1)[1]
    direct.copy_file(f"{root}/small", f"{root}/small-copy")
    with pytest.raises(OSError, match="larger than the maximum allowable size for a copy source"):
        direct.copy_file(f"{root}/large", f"{root}/large-copy")


def test_upload_dir_replaces_what_was_there_without_copies_in_the_store(tmp_path, bucket, direct):
    from tests.conftest import S3_COPY_LIMIT

    weights = os.urandom(3 * S3_COPY_LIMIT)  # a model shard past the store's copy limit (AWS: 5 GiB)
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "config.json").write_bytes(b"{}")
    (tmp_path / "m" / "sub" / "w.bin").write_bytes(weights)
    put(direct, bucket, {"ckpt/stale.bin": b"old"})
    storage.upload_dir(str(tmp_path / "m"), storage.join(bucket, "ckpt"))
    assert files(direct, bucket) == {"ckpt/config.json": b"{}", "ckpt/sub/w.bin": weights}
    storage.upload_dir(str(tmp_path / "m"), str(tmp_path / "local"))
    assert (tmp_path / "local" / "sub" / "w.bin").read_bytes() == weights


def test_fingerprint(bucket, direct):
    folder = storage.join(bucket, "prepared")
    assert storage.fingerprint(folder) is None
    put(direct, folder, {"a.parquet": b"aaaa", "b/c.parquet": b"cc"})
    first = storage.fingerprint(folder)
    assert first is not None and storage.fingerprint(folder) == first
    put(direct, folder, {"b/c.parquet": b"ccc"})
    assert storage.fingerprint(folder) != first
    assert storage.fingerprint(storage.join(folder, "a.parquet")) is not None


# --- reachability -------------------------------------------------------------------------------------------------


def test_check_reachable_passes_for_a_bucket_and_local_paths(bucket, tmp_path):
    storage.check_reachable(storage.join(bucket, "runs", "not-yet-created"))
    storage.check_reachable(str(tmp_path / "nowhere"))
    storage.check_reachable(f"file://{tmp_path}/nowhere")


def test_check_reachable_closed_port_is_one_line(monkeypatch, s3_server):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(storage.StorageError) as e:
        storage.check_reachable("s3://some-bucket/run")
    text = one_line(e)
    assert text.startswith("run dir s3://some-bucket/run: cannot reach the object store (")
    assert "NETWORK_CONNECTION" in text and "check AWS_ENDPOINT_URL" in text


def test_check_reachable_silent_endpoint_gives_up_quickly(monkeypatch, s3_server):
    # a server that accepts connections and never answers: pyarrow's defaults wait ~100 s (measured), ours ~5 s
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(storage.StorageError) as e:
            storage.check_reachable("s3://some-bucket/run")
        elapsed = time.monotonic() - start
    assert "cannot reach the object store" in one_line(e)
    assert elapsed < 60, elapsed  # far above our ~5 s, far below the defaults' ~100 s


def test_check_reachable_missing_bucket_is_one_line(s3_server):
    with pytest.raises(storage.StorageError) as e:
        storage.check_reachable("s3://no-such-bucket-here/run")
    assert "bucket 'no-such-bucket-here' does not exist" in one_line(e)


# --- model folders ------------------------------------------------------------------------------------------------

MODEL = {"config.json": b'{"model_type": "x"}', "model.safetensors": b"w" * 4096, "tok/vocab.txt": b"a\nb\n"}


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """Destinations storage._download copied into, in order."""
    calls: list[str] = []
    real = storage._download

    def counting(fs, root, listing, dest):
        calls.append(dest)
        real(fs, root, listing, dest)

    monkeypatch.setattr(storage, "_download", counting)
    return calls


def local_tree(folder: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            full = os.path.join(dirpath, n)
            out[os.path.relpath(full, folder)] = open(full, "rb").read()
    return out


def test_local_model_dir_leaves_local_paths_and_hub_ids(tmp_path, downloads):
    assert storage.local_model_dir(str(tmp_path)) == str(tmp_path)
    assert storage.local_model_dir("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert downloads == []


def test_local_model_dir_copies_once(tmp_path, bucket, direct, downloads):
    uri = f"{bucket}/models/base"
    put(direct, uri, MODEL)
    cache = str(tmp_path / "cache")
    first = storage.local_model_dir(uri, cache_root=cache)
    assert os.path.dirname(first) == cache and os.path.basename(first).startswith("base-")
    assert local_tree(first) == MODEL
    assert storage.local_model_dir(uri + "/", cache_root=cache) == first
    assert len(downloads) == 1
    assert os.listdir(cache) == [os.path.basename(first)]  # no temporary siblings left


def test_local_model_dir_recopies_a_changed_folder(tmp_path, bucket, direct, downloads):
    uri = f"{bucket}/models/base"
    put(direct, uri, MODEL)
    cache = str(tmp_path / "cache")
    first = storage.local_model_dir(uri, cache_root=cache)
    put(direct, uri, {"model.safetensors": b"v2" * 4096})
    second = storage.local_model_dir(uri, cache_root=cache)
    assert second != first and len(downloads) == 2
    assert local_tree(second) == {**MODEL, "model.safetensors": b"v2" * 4096}
    assert local_tree(first) == MODEL  # a process still reading the old copy keeps it


def test_local_model_dir_default_cache_root(monkeypatch, tmp_path, bucket, direct):
    monkeypatch.setenv("LEAML_CACHE", str(tmp_path / "lc"))
    uri = f"{bucket}/m"
    put(direct, uri, MODEL)
    path = storage.local_model_dir(uri)
    assert os.path.dirname(path) == str(tmp_path / "lc" / "models") and local_tree(path) == MODEL


def test_local_model_dir_two_racing_copies_both_end_complete(tmp_path, bucket, direct, monkeypatch):
    uri = f"{bucket}/models/base"
    put(direct, uri, MODEL)
    both_copied = threading.Barrier(2, timeout=60)
    real = storage._download

    def slow(fs, root, listing, dest):
        real(fs, root, listing, dest)
        both_copied.wait()  # neither renames until both have copied: one rename must find the other's folder

    monkeypatch.setattr(storage, "_download", slow)
    results: list[str] = []
    errors: list[BaseException] = []

    def run():
        try:
            results.append(storage.local_model_dir(uri, cache_root=str(tmp_path / "cache")))
        except BaseException as e:  # surfaced by the assertions below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    assert local_tree(results[0]) == MODEL
    assert os.listdir(tmp_path / "cache") == [os.path.basename(results[0])]


def test_local_model_dir_crash_leaves_no_copy(tmp_path, bucket, direct, monkeypatch):
    uri = f"{bucket}/models/base"
    put(direct, uri, MODEL)
    real = storage._download

    def crash(fs, root, listing, dest):
        real(fs, root, listing[:1], dest)
        raise OSError("disk full")

    monkeypatch.setattr(storage, "_download", crash)
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="disk full"):
        storage.local_model_dir(uri, cache_root=str(cache))
    assert os.listdir(cache) == []
    monkeypatch.setattr(storage, "_download", real)
    assert local_tree(storage.local_model_dir(uri, cache_root=str(cache))) == MODEL


def test_local_model_dir_empty_or_missing_is_one_line(tmp_path, bucket, direct):
    direct.create_dir(f"{bucket[5:]}/models/empty")  # a folder marker with no files in it
    for uri in (f"{bucket}/models/empty", f"{bucket}/models/absent", "s3://no-such-bucket-here/m"):
        with pytest.raises(storage.StorageError) as e:
            storage.local_model_dir(uri, cache_root=str(tmp_path / "cache"))
        assert one_line(e).startswith(f"model {uri}: ")


def test_local_model_dir_does_not_keep_a_folder_changed_mid_copy(tmp_path, bucket, direct, monkeypatch):
    uri = f"{bucket}/models/base"
    put(direct, uri, MODEL)
    real = storage._download

    def changed_meanwhile(fs, root, listing, dest):
        put(direct, uri, {"model.safetensors": b"longer" * 4096})  # after the listing, before the copy
        real(fs, root, listing, dest)

    monkeypatch.setattr(storage, "_download", changed_meanwhile)
    with pytest.raises(storage.StorageError) as e:
        storage.local_model_dir(uri, cache_root=str(tmp_path / "cache"))
    assert "changed while it was copied" in one_line(e)
    assert os.listdir(tmp_path / "cache") == []


def test_local_model_dir_without_weights_copies_only_the_small_files(tmp_path, bucket, direct, downloads):
    uri = f"{bucket}/models/base"
    put(direct, uri, MODEL)
    cache = str(tmp_path / "cache")
    light = storage.local_model_dir(uri, cache_root=cache, weights=False)
    assert local_tree(light) == {k: v for k, v in MODEL.items() if not k.endswith(".safetensors")}
    full = storage.local_model_dir(uri, cache_root=cache)
    assert full != light and local_tree(full) == MODEL  # a weights-less copy never stands in for the model


def test_a_run_dir_on_an_unreachable_store_is_one_line_from_the_cli(tmp_path, s3_server):
    import subprocess
    import sys

    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}"}
    out = subprocess.run(
        [sys.executable, "jobs/adapt.py", "run.dir=s3://nowhere/run"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr, out.stderr
    assert last.startswith("adapt.py: run dir s3://nowhere/run: cannot reach the object store"), out.stderr
