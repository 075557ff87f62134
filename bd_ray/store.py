"""The atomic store: write-then-rename primitives every bd-ray cache and checkpoint is built on.

One rule for anything written to disk that a later process may read (model and corpus caches,
training checkpoints, the HF export, run manifests): it is built under a temporary sibling name
(``.<name>.tmp-<pid>-<random>``, same directory, so the rename is atomic), its data is fsynced,
and only then is it renamed to its final name (the directory is fsynced too). A reader sees the
old entry, the new one or none, never a half-written one; a crash leaves at most a ``.*.tmp-*``
sibling that readers skip (:data:`TMP_MARK`) and :func:`remove_stale_tmp` deletes.

Integrity on top of that: :func:`file_table` records the size and SHA-256 of every file of an
entry (the manifest, written last), :func:`verify_files` checks an entry against it. The same
convention as ``torch.distributed.checkpoint`` and DeepSpeed (metadata written last).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Mapping

__all__ = [
    "TMP_MARK",
    "fsync_path",
    "fsync_tree",
    "atomic_write",
    "atomic_write_json",
    "tmp_sibling",
    "publish_dir",
    "replace_dir",
    "remove_stale_tmp",
    "sha256_file",
    "file_table",
    "verify_files",
]

TMP_MARK = ".tmp-"
"""Part of every temporary name this module makes; a name containing it is never a finished entry."""

PathLike = str | os.PathLike


def fsync_path(path: PathLike, directory: bool = False) -> None:
    """fsync one file (or directory, ``directory=True``); no-op where it cannot be opened
    (some platforms do not open directories)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: PathLike) -> None:
    """fsync every file and directory under ``root`` (``root`` included), so that a later rename
    publishes data that is on disk. No-op for entries that cannot be opened."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fsync_path(os.path.join(dirpath, f))
        fsync_path(dirpath, directory=True)


def tmp_sibling(dest: PathLike) -> str:
    """A fresh (not created) temporary path next to ``dest``: ``.<name>.tmp-<pid>-<8 hex>``."""
    parent = os.path.dirname(os.path.abspath(dest))
    return os.path.join(parent, f".{os.path.basename(dest)}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: PathLike, write: Callable[[IO], None], mode: str = "w") -> None:
    """Write a file atomically: ``write(f)`` into a temporary sibling, fsync, rename over ``path``,
    fsync of the directory. A reader sees the old file or the new one, never a partial one.
    ``mode``: ``"w"`` (text) or ``"wb"`` (bytes)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(d, directory=True)


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = None, sort_keys: bool = False) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`atomic_write`); values JSON cannot encode
    are written as ``str(value)``."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=indent, sort_keys=sort_keys, default=str))


def _swap_in(tmp: str, dest: PathLike) -> str:
    """Rename the finished ``tmp`` to ``dest``; an existing ``dest`` is moved aside first and deleted after."""
    old = None
    if os.path.lexists(dest):
        old = f"{tmp}.old"
        os.replace(dest, old)
    os.replace(tmp, dest)
    fsync_path(os.path.dirname(os.path.abspath(dest)), directory=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return str(dest)


def replace_dir(dest: PathLike, build: Callable[[str], None]) -> str:
    """Build a directory with ``build(tmp_path)`` next to ``dest``, fsync it and rename it to ``dest``
    (replacing an old one). If ``build`` raises, the temporary directory is removed and ``dest`` is
    untouched. Returns ``dest``."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = tmp_sibling(dest)
    try:
        os.makedirs(tmp)
        build(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _swap_in(tmp, dest)


def publish_dir(src: PathLike, dest: PathLike) -> str:
    """Copy the directory ``src`` to ``dest`` atomically (copy to a temporary sibling, fsync, rename;
    an existing ``dest`` is replaced). A crash leaves either the old ``dest``, the new one, or none,
    plus at most a ``.*.tmp-*`` sibling that readers ignore. Returns ``dest``."""
    return replace_dir(dest, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))


def remove_stale_tmp(dest: PathLike) -> None:
    """Delete the temporary siblings (``.<name>.tmp-*``) a crashed writer left next to ``dest``.
    Call only while no other writer of ``dest`` runs (e.g. holding its lock)."""
    parent = Path(dest).parent
    if parent.is_dir():
        for p in parent.glob(f".{Path(dest).name}{TMP_MARK}*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def sha256_file(path: PathLike, bufsize: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def file_table(root: PathLike, skip: Callable[[str], bool] | None = None) -> dict[str, dict]:
    """``{relative posix path: {"size": bytes, "sha256": hex}}`` for every regular file under ``root``,
    sorted by path. Files whose relative path ``skip(rel)`` accepts are left out (e.g. the manifest
    itself); temporary files (:data:`TMP_MARK` in the name) always are."""
    out: dict[str, dict] = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, root).replace(os.sep, "/")
            if TMP_MARK in f or not os.path.isfile(p) or (skip is not None and skip(rel)):
                continue
            out[rel] = {"size": os.path.getsize(p), "sha256": sha256_file(p)}
    return dict(sorted(out.items()))


def verify_files(root: PathLike, files: Mapping[str, Mapping[str, Any]], label: str = "") -> str | None:
    """Why the files under ``root`` do not match a :func:`file_table` ``files``, or ``None`` if they do.

    Each listed file must exist with the recorded ``size`` and ``sha256`` (one SHA-256 pass over the
    files). ``label`` is appended to the file name in the message, e.g. ``" (rank 1)"``.
    """
    for rel, meta in files.items():
        p = os.path.join(root, rel)
        if not os.path.isfile(p):
            return f"{rel}{label} is missing"
        try:
            want_size, want_sha = int(meta["size"]), str(meta["sha256"])
        except (KeyError, TypeError, ValueError):
            return f"{rel}{label}: unreadable manifest entry {meta!r}"
        size = os.path.getsize(p)
        if size != want_size:
            return f"{rel}{label} has {size} bytes, the manifest says {want_size}"
        if sha256_file(p) != want_sha:
            return f"{rel}{label} does not match its SHA-256 in the manifest"
    return None
