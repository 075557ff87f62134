"""Checkpoint integrity for training: atomic directories, per-rank manifests, verified restore.

What a training run may lose when a worker or the driver dies is bounded by the last *intact*
checkpoint; this module makes "intact" checkable (Ray Train's and DeepSpeed's conventions:
tools such as ``torch.distributed.checkpoint`` also write their metadata file last).

Protocol (``bd_ray.train.train_loop`` writes, the drivers read):

1. Every rank writes its checkpoint files into its own fresh temporary directory (DeepSpeed engine
   files; rank 0 also ``state.json`` and ``hf/``), then :func:`write_manifest` fsyncs every file
   and writes ``manifest.rank{r:05d}.json`` **last** (temp file, fsync, rename): the size and
   SHA-256 of each file that rank wrote, and the world size and step.
2. The directory is handed on: to Ray Train (``ray.train.report``, which merges the ranks'
   directories in storage and registers the checkpoint only after every rank's upload finished),
   or, in a single-process run, published by :func:`publish_dir` (copy to a temporary sibling,
   fsync, ``rename``): a directory under the final name is never half-written.
3. Before restoring, :func:`checkpoint_problem` checks ``state.json`` and the manifests of ranks
   ``0..world-1`` against the files (sizes and hashes). A damaged or incomplete latest checkpoint
   is reported with a :class:`CheckpointIntegrityWarning` and the newest older intact one is used
   (:func:`select_local_checkpoint`, :func:`restorable_checkpoint_dir`).

A checkpoint directory without any manifest (written by bd-ray before manifests existed) is used
as the newest checkpoint with a warning ("unverified"), never as a fallback candidate.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
import warnings
from typing import Any, Callable, Iterator

__all__ = [
    "CheckpointIntegrityWarning",
    "CheckpointCorruptError",
    "NO_MANIFEST",
    "manifest_name",
    "fsync_tree",
    "atomic_write_json",
    "write_manifest",
    "checkpoint_problem",
    "publish_dir",
    "replace_dir",
    "select_local_checkpoint",
    "restorable_checkpoint_dir",
]

STATE_FILE = "state.json"
NO_MANIFEST = "no manifest"
_MANIFEST_RE = re.compile(r"^manifest\.rank(\d{5})\.json$")
_TMP_MARK = ".tmp-"


class CheckpointIntegrityWarning(UserWarning):
    """A checkpoint was found damaged, incomplete or unverified; another one (or none) is used."""


class CheckpointCorruptError(RuntimeError):
    """The checkpoint to restore is damaged and no earlier intact checkpoint exists."""


def manifest_name(rank: int) -> str:
    """File name of rank ``rank``'s manifest inside a checkpoint directory."""
    return f"manifest.rank{int(rank):05d}.json"


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root`` (``root`` included), so that a later rename
    publishes data that is on disk. No-op for entries that cannot be opened."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            _fsync_path(os.path.join(dirpath, f))
        _fsync_path(dirpath, directory=True)


def atomic_write_json(path: str, obj: Any, indent: int | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: temp file in the same directory, fsync, rename,
    fsync of the directory. A reader sees the old file or the new one, never a partial one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + _TMP_MARK, dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_path(d, directory=True)


def _sha256(path: str, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _list_files(root: str) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
            if _MANIFEST_RE.match(rel) or _TMP_MARK in f:
                continue
            out.append(rel)
    return sorted(out)


def write_manifest(ckpt_dir: str, rank: int, world: int, step: int) -> str:
    """Seal one rank's part of a checkpoint: fsync its files, then write its manifest last.

    Args:
        ckpt_dir: the rank's checkpoint directory (only files this rank wrote).
        rank, world: this rank and the world size (every rank must write its own manifest).
        step: the optimizer step the checkpoint holds.

    Returns the manifest path. The manifest maps each file (path relative to ``ckpt_dir``) to its
    ``size`` (bytes) and ``sha256``.
    """
    fsync_tree(ckpt_dir)
    files = {}
    for rel in _list_files(ckpt_dir):
        p = os.path.join(ckpt_dir, rel)
        files[rel] = {"size": os.path.getsize(p), "sha256": _sha256(p)}
    path = os.path.join(ckpt_dir, manifest_name(rank))
    atomic_write_json(path, {"format": 1, "rank": int(rank), "world": int(world), "step": int(step),
                             "written_at": time.time(), "files": files})
    return path


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def checkpoint_problem(ckpt_dir: str) -> str | None:
    """Why ``ckpt_dir`` is not an intact bd-ray checkpoint, or ``None`` when it is.

    Intact means: ``state.json`` parses and names the world size (``world``, default 1) and
    ``step``; a manifest exists for every rank ``0..world-1`` with that step; every file a manifest
    lists exists with the recorded size and SHA-256. Returns :data:`NO_MANIFEST` (exactly) for a
    directory with a readable ``state.json`` but no manifest at all (older bd-ray or an upload
    still in progress); any other string describes the damage.
    """
    if not os.path.isdir(ckpt_dir):
        return "not a directory"
    try:
        state = _read_json(os.path.join(ckpt_dir, STATE_FILE))
        step = int(state["step"])
        world = int(state.get("world", 1))
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (ValueError, KeyError, TypeError) as exc:
        return f"{STATE_FILE} is unreadable ({type(exc).__name__}: {exc})"
    names = [n for n in os.listdir(ckpt_dir) if _MANIFEST_RE.match(n)]
    if not names:
        return NO_MANIFEST
    for r in range(world):
        mpath = os.path.join(ckpt_dir, manifest_name(r))
        try:
            man = _read_json(mpath)
            files = man["files"]
        except FileNotFoundError:
            return f"manifest of rank {r} of {world} is missing"
        except (ValueError, KeyError, TypeError) as exc:
            return f"manifest of rank {r} is unreadable ({type(exc).__name__}: {exc})"
        if int(man.get("step", -1)) != step:
            return f"manifest of rank {r} is for step {man.get('step')}, {STATE_FILE} says step {step}"
        for rel, meta in files.items():
            p = os.path.join(ckpt_dir, rel)
            if not os.path.isfile(p):
                return f"{rel} (rank {r}) is missing"
            size = os.path.getsize(p)
            if size != int(meta["size"]):
                return f"{rel} (rank {r}) has {size} bytes, the manifest says {meta['size']}"
            if _sha256(p) != meta["sha256"]:
                return f"{rel} (rank {r}) does not match its SHA-256 in the manifest"
    return None


def _step_of(ckpt_dir: str) -> int | None:
    try:
        return int(_read_json(os.path.join(ckpt_dir, STATE_FILE))["step"])
    except Exception:  # noqa: BLE001 -- any unreadable state counts as "unknown step"
        return None


def _warn(msg: str, log: Callable[[str], None] | None) -> None:
    warnings.warn(msg, CheckpointIntegrityWarning, stacklevel=3)
    if log is not None:
        log(f"[bd-ray] WARNING: {msg}")


def publish_dir(src: str, dest: str) -> str:
    """Copy the directory ``src`` to ``dest`` atomically (copy to a temporary sibling, fsync,
    rename; an existing ``dest`` is replaced). A crash leaves either the old ``dest``, the new one,
    or none, plus at most a ``.*.tmp-*`` sibling that readers ignore. Returns ``dest``."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dest)}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(src, tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _swap_in(tmp, dest)


def replace_dir(dest: str, build: Callable[[str], None]) -> str:
    """Build a directory with ``build(tmp_path)`` next to ``dest``, fsync it and rename it to
    ``dest`` (replacing an old one). Used for the final HF export: never half-written."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dest)}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp)
        build(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _swap_in(tmp, dest)


def _swap_in(tmp: str, dest: str) -> str:
    old = None
    if os.path.lexists(dest):
        old = f"{tmp}.old"
        os.replace(dest, old)
    os.replace(tmp, dest)
    _fsync_path(os.path.dirname(os.path.abspath(dest)), directory=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def select_local_checkpoint(root: str, log: Callable[[str], None] | None = None,
                            prefix: str = "step_") -> str | None:
    """The newest intact checkpoint directory ``root/{prefix}*`` (by name), or ``None``.

    Damaged ones are skipped with a :class:`CheckpointIntegrityWarning` naming the problem and the
    checkpoint used instead; leftover temporary directories (``.*.tmp-*``) are ignored. The newest
    directory may lack manifests (older bd-ray): then it is used with an "unverified" warning.
    """
    if not os.path.isdir(root):
        return None
    cands = sorted((d for d in os.listdir(root) if d.startswith(prefix) and _TMP_MARK not in d), reverse=True)
    bad: list[str] = []
    for i, name in enumerate(cands):
        d = os.path.join(root, name)
        problem = checkpoint_problem(d)
        if problem is None or (problem == NO_MANIFEST and i == 0):
            if problem == NO_MANIFEST:
                _warn(f"checkpoint {d} has no manifest (written by an older bd-ray); restoring it unverified", log)
            if bad:
                _warn(f"skipped damaged checkpoint(s) {'; '.join(bad)}; restoring the previous intact one, {d}", log)
            return d
        bad.append(f"{d}: {problem}")
    if bad:
        _warn(f"no intact checkpoint under {root} ({'; '.join(bad)}); starting from scratch", log)
    return None


def _fs_read_step(fs, path: str) -> int | None:
    try:
        with fs.open_input_stream(posixpath.join(path, STATE_FILE)) as f:
            return int(json.loads(f.read().decode("utf-8"))["step"])
    except Exception:  # noqa: BLE001 -- unreadable = not a candidate
        return None


@contextlib.contextmanager
def restorable_checkpoint_dir(checkpoint, log: Callable[[str], None] | None = None) -> Iterator[str]:
    """Context manager: a local directory holding an intact version of a Ray Train checkpoint.

    ``checkpoint`` is what ``ray.train.get_checkpoint()`` returned (the latest registered one). If it
    is intact (:func:`checkpoint_problem`), its directory is yielded. Otherwise a
    :class:`CheckpointIntegrityWarning` names the damage and the sibling checkpoint directories in
    the same storage folder (same run) are tried, newest ``state.json`` step first, below the
    damaged one's step; the first intact one is yielded.

    Raises:
        CheckpointCorruptError: the latest checkpoint is damaged and no older intact one exists.
    """
    from ray.train import Checkpoint
    import pyarrow.fs as pafs

    with checkpoint.as_directory() as d:
        problem = checkpoint_problem(d)
        if problem is None or problem == NO_MANIFEST:
            if problem == NO_MANIFEST:
                _warn(f"checkpoint {checkpoint.path} has no manifest (written by an older bd-ray); "
                      "restoring it unverified", log)
            yield d
            return
        bad_step = _step_of(d)
    fs = checkpoint.filesystem
    path = checkpoint.path.rstrip("/")
    parent = posixpath.dirname(path)
    siblings = []
    for info in fs.get_file_info(pafs.FileSelector(parent)):
        if info.type != pafs.FileType.Directory or info.path.rstrip("/") == path:
            continue
        step = _fs_read_step(fs, info.path)
        if step is not None and (bad_step is None or step < bad_step):
            siblings.append((step, info.path))
    for step, p in sorted(siblings, reverse=True):
        with Checkpoint(p, filesystem=fs).as_directory() as d2:
            if checkpoint_problem(d2) is None:
                _warn(f"checkpoint {path} is damaged ({problem}); restoring the previous intact checkpoint "
                      f"{p} (step {step}) instead", log)
                yield d2
                return
    raise CheckpointCorruptError(
        f"checkpoint {path} is damaged ({problem}) and no earlier intact checkpoint exists in {parent}; "
        "delete the run's checkpoints or start a new run name (run.resume=false)")
