"""Run-directory I/O over pyarrow filesystems: local paths and s3:// / gs:// URIs alike."""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from typing import Any

import pyarrow.fs as pafs


def _is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    if not _is_uri(path):
        path = os.path.abspath(os.path.expanduser(path))
    return pafs.FileSystem.from_uri(path)


def join(base: str, *parts: str) -> str:
    """Join path parts under a local path or a URI."""
    if not _is_uri(base):
        base = os.path.abspath(os.path.expanduser(base))
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write to a temporary sibling, then rename: a crash never leaves a half-written file."""
    fs, p = resolve(path)
    parent = p.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, p)


def create_exclusive(path: str, data: bytes) -> bool:
    """Create a file only if it does not exist; False if it does. Atomic on local disks; on object stores
    (no exclusive create) a check-then-write, which two runs starting in the same instant can both pass."""
    fs, p = resolve(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    if not _is_uri(path):
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
    fs, p = resolve(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind == pafs.FileType.File:
        fs.delete_file(p)


def replace(src: str, dst: str) -> None:
    """Move src over dst (file or folder). Local renames are atomic; object stores copy then delete."""
    fs, s = resolve(src)
    _, d = resolve(dst)
    delete(dst)
    fs.create_dir(d.rsplit("/", 1)[0], recursive=True)
    try:
        fs.move(s, d)
    except (NotImplementedError, OSError):
        # object stores cannot rename folders
        pafs.copy_files(s, d, source_filesystem=fs, destination_filesystem=fs)
        delete(src)


def fingerprint(path: str) -> str | None:
    """Cheap identity of a file or folder tree (names, sizes, mtimes); None when it does not exist."""
    fs, p = resolve(path)
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
    """Copy a local folder to dst (path or URI) via a temporary sibling, replacing what was there."""
    fs, d = resolve(dst)
    tmp = f"{d}.tmp-{uuid.uuid4().hex[:8]}"
    fs.create_dir(tmp, recursive=True)
    pafs.copy_files(local_dir, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    scheme = dst.split("://", 1)[0] + "://" if "://" in dst else ""
    replace(scheme + tmp, dst)


def copy_dir(src: str, dst: str) -> None:
    """Copy a folder within one filesystem (local or object store)."""
    fs, s = resolve(src)
    _, d = resolve(dst)
    fs.create_dir(d, recursive=True)
    pafs.copy_files(s, d, source_filesystem=fs, destination_filesystem=fs)
