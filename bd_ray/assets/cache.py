"""The asset cache: where it lives, its locks, its manifests, and the build-once-publish-atomically rule.

Every cache entry (a model directory, a corpus directory) is built by :func:`ensure_entry`: under
an exclusive lock, in a temporary sibling directory, its manifest (size and SHA-256 of every
file) written last, then renamed into place (:mod:`bd_ray.store`). An entry without a valid
manifest, or whose files do not match it, is never used: it is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from bd_ray.store import atomic_write_json, file_table, remove_stale_tmp, replace_dir, verify_files

__all__ = ["AssetError", "MANIFEST_NAME", "CORPUS_MANIFEST_NAME", "MANIFEST_FORMAT", "log", "bd_ray_home",
           "check_manifest", "write_manifest", "ensure_entry"]

MANIFEST_NAME = "bd_ray_manifest.json"  # inside a model dir (HF ignores unknown files)
CORPUS_MANIFEST_NAME = "_bd_ray_manifest.json"  # leading "_": pyarrow/Ray parquet readers skip it
MANIFEST_FORMAT = 1


class AssetError(RuntimeError):
    """An embedded asset could not be fetched, verified or converted; the message says which and why."""


def log(msg: str) -> None:
    """Print one progress line to stderr, prefixed ``[bd-ray assets]`` and flushed at once."""
    print(f"[bd-ray assets] {msg}", file=sys.stderr, flush=True)


def bd_ray_home() -> Path:
    """Root of bd-ray's cache: env ``BD_RAY_HOME`` if set, else ``~/.cache/bd-ray``. Not created here."""
    env = os.environ.get("BD_RAY_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bd-ray"


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Exclusive advisory lock ``bd_ray_home()/locks/<name>.lock`` (two builders never race)."""
    d = bd_ray_home() / "locks"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_manifest(root: Path, manifest_name: str, expect: dict) -> str | None:
    """Why ``root`` is not a valid cache entry, or ``None`` if it is.

    Valid means: the manifest parses, its ``format`` and each key in ``expect`` match, and every file
    it lists exists with the recorded size and SHA-256 (one hashing pass over the files).
    """
    mpath = root / manifest_name
    if not root.is_dir():
        return "missing"
    if not mpath.is_file():
        return f"no manifest {mpath.name} (half-written or foreign directory)"
    try:
        man = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable manifest ({e})"
    if man.get("format") != MANIFEST_FORMAT:
        return f"manifest format {man.get('format')!r} != {MANIFEST_FORMAT}"
    for k, v in expect.items():
        if man.get(k) != v:
            return f"manifest {k}={man.get(k)!r}, expected {v!r}"
    files = man.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    return verify_files(root, files)


def write_manifest(root: Path, manifest_name: str, fields: dict) -> None:
    """Seal a built entry: write ``manifest_name`` (``fields`` plus ``format``, ``created`` and the
    :func:`bd_ray.store.file_table` of every other file under ``root``) atomically, last."""
    files = file_table(root, skip=lambda rel: rel == manifest_name)
    atomic_write_json(root / manifest_name, {
        "format": MANIFEST_FORMAT, **fields, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files,
    }, indent=2, sort_keys=True)


def ensure_entry(final: Path, manifest_name: str, expect: dict, build: Callable[[Path], None], *,
                 what: str, rebuild: bool = False) -> Path:
    """Return ``final`` once it is a valid cache entry, building it with ``build(tmp_dir)`` if needed.

    Fast path: :func:`check_manifest` passes and nothing is built. Otherwise, under the lock named
    after ``final`` (checked again: another process may have built it meanwhile), stale temporary
    siblings are removed, ``build`` fills a fresh temporary directory (it must end with
    :func:`write_manifest`) and the directory is renamed to ``final`` (:func:`bd_ray.store.replace_dir`).
    ``what`` names the entry in the one progress line. Whatever ``build`` raises propagates.
    """
    if not rebuild and check_manifest(final, manifest_name, expect) is None:
        return final
    with _lock(f"{final.parent.name}-{final.name}"):
        why = "rebuild requested" if rebuild else check_manifest(final, manifest_name, expect)
        if why is None:  # another process built it while we waited
            return final
        log(f"{what}: building at {final} ({why})")
        remove_stale_tmp(final)
        replace_dir(final, lambda tmp: build(Path(tmp)))
    return final
