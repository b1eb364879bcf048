"""Writing files so that nothing is left half-written: temp path, then rename."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
from pathlib import Path

from pipeline.errors import DataError


def writable_dir(path: Path, what: str) -> Path:
    """Create `path` (and parents) and prove it is writable, or fail with the fix."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(
            f"{what} {path} is not writable ({exc.strerror or exc}): pass --set output_dir=<a writable folder>"
        ) from None
    return path


def check_writable(path: Path, what: str) -> None:
    """Prove that `path` can be written without creating it: probe it, or the nearest folder above
    it that exists (where it would be created), or fail with the fix."""
    path = Path(path)
    folder = path
    try:
        while not folder.exists() and folder.parent != folder:
            folder = folder.parent
        if not folder.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        probe = folder / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(
            f"{what} {path} is not writable ({exc.strerror or exc}): pass --set output_dir=<a writable folder>"
        ) from None


def write_json(path: Path, obj, indent: int = 2) -> None:
    """JSON written to a temp file beside `path`, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=str))
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish_dir(work: Path, final: Path) -> None:
    """Replace `final` by the finished folder `work`: the old one is moved aside first and removed
    only once the new one is in place, so `final` is always either the old or the new whole folder."""
    import shutil

    work, final = Path(work), Path(final)
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.rename(final, old)
    os.rename(work, final)
    shutil.rmtree(old, ignore_errors=True)


def content_stamp(path: Path | str) -> str:
    """sha256 (16 hex digits) of a file's bytes: the same on every node and after a copy, unlike
    its path or mtime. Cached per (path, size, mtime) within a process."""
    st = os.stat(path)
    return _content_stamp(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _content_stamp(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:16]
