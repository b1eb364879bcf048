"""Shared storage: a URI (s3://, gs://, hdfs://, file://, or any pyarrow filesystem) that holds
the durable copy of everything a run makes, so any node can resume any stage.

With `storage` set, `output_dir` is the node's working copy:

- Ray Train and Tune write their checkpoints straight to storage (`RunConfig.storage_path` +
  `storage_filesystem`): a driver on another node resumes from them.
- The driver pulls what is missing locally before the stages run (the run folder, the dataset
  folders, the extractors) and pushes what changed after each stage.
- A worker that needs a file the driver wrote (a model to fine-tune from, the test split) and
  does not find it on its node pulls it; a worker's exports (model.pt, final.json) are pushed
  before it returns, and the driver pulls them when they are not on its node.

Files are written under a temporary name and moved into place, so a reader never sees half a
file; a push or pull copies only the files that are missing on the other side, differ in size, or
were modified after the other side's copy was written.
"""
from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError, TaildiffError

log = logging.getLogger("taildiff.storage")
SKIP_NAMES = (".lock", ".write-test-")  # node-local files that never travel
RAY_DIRS = ("ray",)  # Ray Train / Tune storage: already on the shared filesystem


def _fs():
    import pyarrow.fs as pafs

    return pafs


@dataclass
class Storage:
    """A pyarrow filesystem and the root path inside it that mirrors `output_dir`."""

    fs: object
    root: str
    uri: str = ""

    @classmethod
    def from_uri(cls, uri: str) -> "Storage":
        pafs = _fs()
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError by scheme
            raise ConfigError(f"storage={uri!r} is not a filesystem URI pyarrow can open ({exc}); give "
                              "s3://bucket/prefix, gs://bucket/prefix or file:///absolute/path") from None
        return cls(fs, path.rstrip("/"), uri)

    # paths -----------------------------------------------------------------------------------
    def path(self, rel: str | Path = "") -> str:
        rel = str(rel).strip("/")
        return f"{self.root}/{rel}" if rel and self.root else (rel or self.root)

    def exists(self, rel: str | Path) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != _fs().FileType.NotFound

    def _listing(self, rel: str | Path) -> dict[str, tuple[int, float]]:
        """{relative file path: (size, mtime seconds)} under `rel` in storage ({} when absent)."""
        pafs = _fs()
        base = self.path(rel)
        info = self.fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            return {"": (info.size, _mtime(info))}
        if info.type != pafs.FileType.Directory:
            return {}
        out = {}
        for f in self.fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            if f.type == pafs.FileType.File:
                out[f.path[len(base):].lstrip("/")] = (f.size, _mtime(f))
        return out

    # copying ---------------------------------------------------------------------------------
    def push(self, local: Path, rel: str | Path, skip_dirs: tuple = ()) -> int:
        """Copy the files of `local` (a file or a folder) that storage lacks or holds at another
        size to `rel`; returns how many were copied."""
        local = Path(local)
        if not local.exists():
            return 0
        theirs = self._listing(rel)
        files = [local] if local.is_file() else [p for p in local.rglob("*") if p.is_file()]
        copied = 0
        for src in files:
            sub = "" if src == local else src.relative_to(local).as_posix()
            parts = sub.split("/") if sub else []
            if _skipped(parts, skip_dirs):
                continue
            st = src.stat()
            if sub in theirs and theirs[sub][0] == st.st_size and theirs[sub][1] >= st.st_mtime:
                continue
            self._upload(src, self.path(f"{rel}/{sub}" if sub else rel))
            copied += 1
        return copied

    def pull(self, rel: str | Path, local: Path, skip_dirs: tuple = ()) -> int:
        """Copy the files under `rel` that `local` lacks, holds at another size, or holds older
        than storage's copy; returns how many."""
        local = Path(local)
        listing = self._listing(rel)
        copied = 0
        for sub, (size, mtime) in listing.items():
            if _skipped(sub.split("/") if sub else [], skip_dirs):
                continue
            dst = local / sub if sub else local
            if dst.is_file():
                st = dst.stat()
                if st.st_size == size and st.st_mtime >= mtime:
                    continue
            self._download(self.path(f"{rel}/{sub}" if sub else rel), dst)
            copied += 1
        return copied

    def _upload(self, src: Path, dst: str) -> None:
        parent = dst.rsplit("/", 1)[0] if "/" in dst else ""
        if parent:
            self.fs.create_dir(parent, recursive=True)
        tmp = f"{dst}.{uuid.uuid4().hex[:8]}.tmp"
        with open(src, "rb") as f, self.fs.open_output_stream(tmp) as out:
            while chunk := f.read(1 << 22):
                out.write(chunk)
        self.fs.move(tmp, dst)

    def _download(self, src: str, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
        with self.fs.open_input_stream(src) as f, open(tmp, "wb") as out:
            while chunk := f.read(1 << 22):
                out.write(chunk)
        os.replace(tmp, dst)


def _mtime(info) -> float:
    return info.mtime.timestamp() if info.mtime is not None else 0.0


def _skipped(parts: list[str], skip_dirs: tuple) -> bool:
    """Node-local files, half-written temporaries, and folders that live in storage already."""
    if any(part.startswith(SKIP_NAMES) for part in parts) or any(part in skip_dirs for part in parts[:-1]):
        return True
    return any(part.startswith(".tmp") or (part.startswith(".") and part.endswith(".tmp")) for part in parts)


def storage_of(cfg_or_dict) -> Storage | None:
    """The run's Storage (None without `storage`), from a Config or its dict."""
    uri = cfg_or_dict.get("storage") if isinstance(cfg_or_dict, dict) else getattr(cfg_or_dict, "storage", None)
    return Storage.from_uri(uri) if uri else None


def relative_to_output(path: Path | str, output_dir: Path | str) -> str | None:
    """`path` relative to the output folder, or None when it lies outside it."""
    try:
        return Path(path).resolve().relative_to(Path(output_dir).resolve()).as_posix()
    except ValueError:
        return None


def ensure_local(path: Path | str, storage: Storage | None, output_dir: Path | str) -> Path:
    """`path` (a file or folder under output_dir), pulled from storage when this node lacks it."""
    path = Path(path)
    if path.exists() or storage is None:
        return path
    rel = relative_to_output(path, output_dir)
    if rel is None or not storage.exists(rel):
        return path
    storage.pull(rel, path)
    return path


def pull_path(path: Path | str, storage: Storage | None, output_dir: Path | str) -> Path:
    """Bring `path` (under output_dir) up to date from storage, even when it exists locally (a
    folder another node's worker filled); no-op without storage."""
    path = Path(path)
    rel = relative_to_output(path, output_dir) if storage is not None else None
    if rel is not None and storage.exists(rel):
        storage.pull(rel, path)
    return path


def push_path(path: Path | str, storage: Storage | None, output_dir: Path | str) -> None:
    """Push `path` (under output_dir) to its place in storage; no-op without storage."""
    if storage is None:
        return
    rel = relative_to_output(path, output_dir)
    if rel is None:
        raise TaildiffError(f"{path} is outside output_dir={output_dir}: it cannot be mirrored to storage")
    storage.push(Path(path), rel, skip_dirs=RAY_DIRS)


def ray_storage(storage: Storage | None, output_dir: Path | str, local_dir: Path) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for a Ray Train / Tune RunConfig whose local home would
    be `local_dir`: the same place inside storage when it is set."""
    if storage is None:
        return str(Path(local_dir).resolve()), None
    rel = relative_to_output(local_dir, output_dir)
    if rel is None:
        raise TaildiffError(f"{local_dir} is outside output_dir={output_dir}: it cannot be mirrored to storage")
    path = storage.path(rel)
    storage.fs.create_dir(path, recursive=True)
    return path, storage.fs


def sync_run(cfg, direction: str) -> None:
    """Pull (before the stages) or push (after each) the run folder, the datasets and the
    extractors of `cfg.output_dir` to / from `cfg.storage`."""
    storage = storage_of(cfg)
    if storage is None:
        return
    out = Path(cfg.output_dir)
    folders = ["datasets", "extractors", cfg.run_dir.resolve().relative_to(out.resolve()).as_posix()]
    copied = 0
    for rel in folders:
        if direction == "pull":
            copied += storage.pull(rel, out / rel, skip_dirs=RAY_DIRS) if storage.exists(rel) else 0
        else:
            copied += storage.push(out / rel, rel, skip_dirs=RAY_DIRS)
    if copied:
        log.info("storage: %s %d files %s %s", "pulled" if direction == "pull" else "pushed", copied,
                 "from" if direction == "pull" else "to", storage.uri)
