"""Run-directory I/O over pyarrow filesystems: local paths and s3:// / gs:// URIs alike."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any

import pyarrow.fs as pafs

from leaml_ray.errors import UserError


class StorageError(UserError, OSError):
    """An object store or remote folder that cannot be used."""


def is_uri(path: str) -> bool:
    """An object-store (or other URI) path rather than a local one."""
    return "://" in path


def on_object_store(path: str) -> bool:
    """The path is on an object store (s3://, gs://): no rename, and an upload appears whole or not at all."""
    return is_uri(path) and not isinstance(filesystem(path)[0], pafs.LocalFileSystem)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    # from_uri reads AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, at each call (measured with pyarrow 26), so
    # S3-compatible stores need nothing here; S3FileSystem() built directly would ignore both.
    if not is_uri(path):
        path = os.path.abspath(os.path.expanduser(path))
    return pafs.FileSystem.from_uri(path)


def _short(error: BaseException) -> str:
    """The useful part of a pyarrow / AWS SDK error on one line, without request ids."""
    text = " ".join(str(error).split())
    text = re.sub(r"\s*\(Request ID: [^)]*\)", "", text)
    match = re.search(r"AWS Error (.*?)(?:; Details:|$)", text)
    return (match.group(1) if match else text)[:200]


def _fail_fast(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The same S3 filesystem with short timeouts and one attempt (the defaults wait ~100 s on a silent endpoint)."""
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    options = fs.__reduce__()[1][0]  # everything from_uri resolved: endpoint, region, credentials, URI options
    options.update(connect_timeout=3, request_timeout=5, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    return pafs.S3FileSystem(**options)


def check_reachable(path: str) -> None:
    """Raise StorageError (one line, within seconds) unless the bucket behind a URI answers; local paths pass."""
    if not is_uri(path):
        return
    hint = "check AWS_ENDPOINT_URL / credentials / the bucket name"
    try:
        fs, p = filesystem(path)
        if isinstance(fs, pafs.LocalFileSystem):  # file:// URIs
            return
        bucket = p.split("/", 1)[0]
        found = _fail_fast(fs).get_file_info(bucket).type != pafs.FileType.NotFound
    except (OSError, ValueError) as e:
        raise StorageError(f"run dir {path}: cannot reach the object store ({_short(e)}); {hint}") from None
    if not found:
        reason = f"bucket {bucket!r} does not exist"
        raise StorageError(f"run dir {path}: cannot reach the object store ({reason}); {hint}")


def join(base: str, *parts: str) -> str:
    """Join path parts under a local path or a URI."""
    if not is_uri(base):
        base = os.path.abspath(os.path.expanduser(base))
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write to a temporary sibling, then rename: a crash never leaves a half-written file. An object store's upload
    is atomic by itself (and its rename a copy, refused above 5 GiB by AWS): written in place there."""
    fs, p = filesystem(path)
    parent = p.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if on_object_store(path):
        with fs.open_output_stream(p) as f:
            f.write(data)
        return
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, p)


def create_exclusive(path: str, data: bytes) -> bool:
    """Create a file only if it does not exist; False if it does. Atomic on local disks; on object stores
    (no exclusive create) a check-then-write, which two runs starting in the same instant can both pass."""
    fs, p = filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    if not is_uri(path):
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if exists(path):
        return False
    write_bytes_atomic(path, data)
    return True


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


SECRET_NAMES = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the value of every secret-looking environment variable (HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...)
    replaced by ***: secrets come from the environment and must never reach a manifest or report."""
    for name, value in os.environ.items():
        if SECRET_NAMES.search(name) and len(value) >= 8:
            text = text.replace(value, "***")
    return text


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON atomically, secrets redacted (manifests, reports and recipes all go through here)."""
    write_bytes_atomic(path, redact(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def delete(path: str) -> None:
    """Remove a file or a folder if it is there."""
    fs, p = filesystem(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind == pafs.FileType.File:
        fs.delete_file(p)


def replace(src: str, dst: str) -> None:
    """Move a local file or folder over dst (a rename: atomic). Object stores have no rename, only copies, and AWS
    refuses to copy an object above 5 GiB in one request: their writers write in place instead (upload_dir, the
    pipeline's commit)."""
    if on_object_store(src) or on_object_store(dst):
        raise ValueError(f"replace {src} -> {dst}: object stores have no rename; write in place")
    (_, s), (_, d) = filesystem(src), filesystem(dst)
    delete(dst)
    os.makedirs(os.path.dirname(d), exist_ok=True)
    os.replace(s, d)


def fingerprint(path: str) -> str | None:
    """Cheap identity of a file or folder tree (names, sizes, mtimes); None when it does not exist."""
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(p, recursive=True)) if i.type == pafs.FileType.File]
    h = hashlib.sha256()
    for i in sorted(infos, key=lambda i: i.path):
        h.update(f"{i.path[len(p) :]}|{i.size}|{i.mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def upload_dir(local_dir: str, dst: str) -> None:
    """Copy a local folder to dst (path or URI), replacing what was there: locally via a temporary sibling renamed
    over it; on an object store file by file in place (each upload multipart, never a copy inside the bucket, which
    AWS refuses above 5 GiB), so a crash leaves a partial folder that only a finished stage's manifest entry would
    vouch for."""
    fs, d = filesystem(dst)
    in_place = on_object_store(dst)
    if in_place:
        delete(dst)
    target = d if in_place else f"{d}.tmp-{uuid.uuid4().hex[:8]}"
    fs.create_dir(target, recursive=True)
    pafs.copy_files(local_dir, target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    if not in_place:
        replace(target, dst)


def _model_cache_root(cache_root: str | None) -> str:
    """Where remote model folders are copied: cache_root, $LEAML_CACHE/models or ~/.cache/leaml-ray/models."""
    if cache_root is None:
        base = os.environ.get("LEAML_CACHE") or os.path.join("~", ".cache", "leaml-ray")
        cache_root = os.path.join(base, "models")
    return os.path.abspath(os.path.expanduser(cache_root))


def _download(fs: pafs.FileSystem, root: str, listing: list[tuple[str, int, int | None]], dest: str) -> None:
    """Copy the listed files under root to the local folder dest, checking each size."""
    local = pafs.LocalFileSystem()
    for rel, size, _ in listing:
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        pafs.copy_files(f"{root}/{rel}", target, source_filesystem=fs, destination_filesystem=local)
        if os.path.getsize(target) != size:  # the remote folder changed under us: a mixed copy must not be kept
            raise StorageError(f"{root}/{rel} changed while it was copied; try again")


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def local_model_dir(path: str, cache_root: str | None = None, weights: bool = True) -> str:
    """A local folder with the model at path: a URI is copied once per node, anything else is returned as is.
    `weights=False` copies only the small files (configs, tokenizer, processor): what a driver needs for prompts."""
    if not is_uri(path):
        return path  # a local folder or a hub id
    try:
        fs, root = filesystem(path)
        root = root.rstrip("/")
        selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        files = [i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
    except (OSError, ValueError) as e:
        raise StorageError(f"model {path}: cannot list it ({_short(e)})") from None
    if not weights:
        files = [i for i in files if not i.path.endswith(WEIGHT_FILES)]
    if not files:
        raise StorageError(f"model {path}: no files there; check the URI")
    # object stores give size and last-modified (no ETag through pyarrow): enough to notice a replaced folder
    listing = sorted((i.path[len(root) + 1 :], i.size, i.mtime_ns) for i in files)
    key = hashlib.sha256(json.dumps([path.rstrip("/"), listing]).encode()).hexdigest()[:16]
    cache = _model_cache_root(cache_root)
    final = os.path.join(cache, f"{root.rsplit('/', 1)[-1]}-{key}{'' if weights else '-noweights'}")
    if os.path.isdir(final):
        return final
    os.makedirs(cache, exist_ok=True)
    # a hidden temp sibling renamed at the end: a crash never leaves a half copy under the final name
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=cache)
    try:
        _download(fs, root, listing, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):
                raise
            # another process on this node finished first: its copy is as good as ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
