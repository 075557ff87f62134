"""Checkpoint integrity for training: atomic directories, per-rank manifests, verified restore.

What a training run may lose when a worker or the driver dies is bounded by the last *intact*
checkpoint; this module makes "intact" checkable (Ray Train's and DeepSpeed's conventions:
tools such as ``torch.distributed.checkpoint`` also write their metadata file last).

Protocol (``bd_ray.train.loop.train_loop`` writes, the drivers read):

1. Every rank writes its checkpoint files into its own fresh temporary directory (DeepSpeed engine
   files; rank 0 also ``state.json`` and ``hf/``), then :func:`write_manifest` fsyncs every file
   and writes ``manifest.rank{r:05d}.json`` **last** (temp file, fsync, rename): the size and
   SHA-256 of each file that rank wrote, and the world size and step.
2. The directory is handed on: to Ray Train (``ray.train.report``, which merges the ranks'
   directories in storage and registers the checkpoint only after every rank's upload finished),
   or, in a single-process run, published by :func:`bd_ray.store.publish_dir` (copy to a
   temporary sibling, fsync, ``rename``): a directory under the final name is never half-written.
3. Before restoring, :func:`checkpoint_problem` checks ``state.json`` and the manifests of ranks
   ``0..world-1`` against the files (sizes and hashes). A damaged or incomplete latest checkpoint
   is reported with a :class:`CheckpointIntegrityWarning` and the newest older intact one is used
   (:func:`select_local_checkpoint`, :func:`restorable_checkpoint_dir`).

The write-then-rename and hashing primitives are :mod:`bd_ray.store`'s; this module adds what is
specific to checkpoints: rank manifests, ``state.json``, and picking the newest restorable one.

A checkpoint directory without any manifest (written by bd-ray before manifests existed) is used
as the newest checkpoint with a warning ("unverified"), never as a fallback candidate.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import time
import warnings
from typing import Any, Callable, Iterator

from bd_ray.store import TMP_MARK, atomic_write_json, file_table, fsync_tree, verify_files

__all__ = [
    "CheckpointIntegrityWarning",
    "CheckpointCorruptError",
    "NO_MANIFEST",
    "manifest_name",
    "write_manifest",
    "checkpoint_problem",
    "select_local_checkpoint",
    "restorable_checkpoint_dir",
]

STATE_FILE = "state.json"
NO_MANIFEST = "no manifest"
_MANIFEST_RE = re.compile(r"^manifest\.rank(\d{5})\.json$")


class CheckpointIntegrityWarning(UserWarning):
    """A checkpoint was found damaged, incomplete or unverified; another one (or none) is used."""


class CheckpointCorruptError(RuntimeError):
    """The checkpoint to restore is damaged and no earlier intact checkpoint exists."""


def manifest_name(rank: int) -> str:
    """File name of rank ``rank``'s manifest inside a checkpoint directory."""
    return f"manifest.rank{int(rank):05d}.json"


def _is_manifest(rel: str) -> bool:
    return bool(_MANIFEST_RE.match(rel))


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
    files = file_table(ckpt_dir, skip=_is_manifest)
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
        if (problem := verify_files(ckpt_dir, files, label=f" (rank {r})")) is not None:
            return problem
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


def select_local_checkpoint(root: str, log: Callable[[str], None] | None = None,
                            prefix: str = "step_") -> str | None:
    """The newest intact checkpoint directory ``root/{prefix}*`` (by name), or ``None``.

    Damaged ones are skipped with a :class:`CheckpointIntegrityWarning` naming the problem and the
    checkpoint used instead; leftover temporary directories (``.*.tmp-*``) are ignored. The newest
    directory may lack manifests (older bd-ray): then it is used with an "unverified" warning.
    """
    if not os.path.isdir(root):
        return None
    cands = sorted((d for d in os.listdir(root) if d.startswith(prefix) and TMP_MARK not in d), reverse=True)
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
