"""Ray Data pipeline: documents -> tokens -> (prefix, continuation) windows, split by work.

Source: docs/DESIGN.md sections 2 (16,128 + 256 windows from PG-19 books) and 4 (pg-mini,
user corpora as parquet / jsonl / txt, split train/test by work, never inside a book).

Stages (all lazy / streaming; nothing is materialised except the small held-out set)::

    read (parquet | jsonl | txt | hf)        -> rows {text, doc_id, split, malformed}
    filter split == train (by work)          -> rows of training documents only
    map_batches(TokenizeWindows, actor pool) -> rows {input_ids: int32[P+T], doc_id, start}
    random_shuffle(seed)                     -> streamed to Train workers (get_dataset_shard)

Robustness: a document that is empty, undecodable (invalid UTF-8 in a txt/jsonl shard or a binary
parquet column), a jsonl line that is not a JSON object with a text field (e.g. the cut last line
of a truncated shard), a document shorter than one window, or a whole parquet shard whose footer
cannot be read (a truncated or foreign file: status ``unreadable``, recorded under split ``?``
with its path) is skipped, never fatal; each is counted by a :class:`DataStats` actor
(deduplicated per document, so re-running the pipeline for another epoch does not double-count)
and reported by the job. Damage inside an otherwise readable parquet file (a corrupt data page
behind an intact footer) is not detected here and fails the read.

Window layout: ``input_ids[:P]`` is the prefix, ``input_ids[P:P+T]`` the continuation; windows
start at ``0, stride, 2*stride, ...`` of the document's token stream (a BOS is prepended when
``add_bos`` and the tokenizer has one), at most ``max_windows_per_doc`` per document.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterator

import numpy as np

from bd_ray.assets import ensure_corpus
from bd_ray.config.train import TrainDataConfig

__all__ = [
    "DataStats",
    "TokenizeWindows",
    "check_parquet_shards",
    "cut_windows",
    "doc_split",
    "read_documents",
    "build_window_dataset",
    "eval_windows",
    "iter_rows",
    "offline_window_dataset",
    "resolve_source",
]

MALFORMED_EMPTY = "empty"
MALFORMED_UNDECODABLE = "undecodable"
MALFORMED_BAD_JSON = "bad_json"
UNREADABLE_SHARD = "unreadable"


# ------------------------------------------------------------------------------------------
# Pure helpers (no Ray): usable in tests and in single-process runs
# ------------------------------------------------------------------------------------------


def doc_split(doc_id: str, eval_fraction: float, train_split: str = "train", eval_split: str = "test") -> str:
    """Deterministic split of a document with no split column: a stable hash of its id."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8", "replace")).digest()[:4], "big")
    return eval_split if (h % 10000) < int(round(eval_fraction * 10000)) else train_split


def cut_windows(tokens: np.ndarray, window: int, stride: int | None = None,
                max_windows: int | None = None) -> list[tuple[int, np.ndarray]]:
    """Cut ``[n]`` tokens into ``(start, int32[window])`` windows at ``0, stride, ...``.

    Returns an empty list when ``n < window`` (the document is too short).
    """
    stride = stride or window
    out = []
    n = int(tokens.shape[0])
    for start in range(0, n - window + 1, stride):
        out.append((start, tokens[start:start + window].astype(np.int32)))
        if max_windows is not None and len(out) >= max_windows:
            break
    return out


def _decode(text: Any) -> tuple[str | None, str | None]:
    """(text, malformed_reason): bytes are decoded strictly as UTF-8."""
    if text is None:
        return None, MALFORMED_EMPTY
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            return None, MALFORMED_UNDECODABLE
    if not isinstance(text, str):
        text = str(text)
    if not text.strip():
        return None, MALFORMED_EMPTY
    return text, None


# ------------------------------------------------------------------------------------------
# Counters
# ------------------------------------------------------------------------------------------


class DataStats:
    """Per-document outcome counter (a Ray actor in the pipeline; a plain object in tests).

    ``record(split, doc_id, status, n_windows)`` with status ``ok`` | ``too_short`` | ``empty``
    | ``undecodable`` | ``bad_json`` | ``unreadable`` (a whole shard file, doc_id = its path,
    split ``?``); ``summary()`` returns counts per split and status plus windows per split.
    Keyed by (split, doc_id), so several epochs count each document once.
    """

    def __init__(self):
        self._docs: dict[tuple[str, str], tuple[str, int]] = {}

    def record(self, rows: list[tuple[str, str, str, int]]) -> None:
        for split, doc_id, status, n in rows:
            self._docs[(split, doc_id)] = (status, int(n))

    def summary(self) -> dict[str, Any]:
        """Counts per split: the content of ``data_stats.json`` (and of ``metrics.json``'s
        ``data_stats``, and the teacher-targets manifest's).

        Returns:
            ``{split: {...}}`` keyed by the documents' split (the ``data.train_split`` /
            ``data.eval_split`` values, e.g. ``train``, ``test``), or ``?`` for shards that could
            not be read at all; each value holds
            ``documents`` (documents seen, each counted once), ``windows`` (windows cut from
            them), one count per status -- ``ok``, ``too_short`` (fewer tokens than one window),
            ``empty``, ``undecodable`` (not UTF-8), ``bad_json`` (a broken jsonl line),
            ``unreadable`` (a shard whose file could not be read) -- and ``skipped_doc_ids``: the
            first 50 doc ids (shard paths for ``unreadable``) whose status is not ``ok``.
        """
        out: dict[str, Any] = {}
        for (split, doc_id), (status, n) in self._docs.items():
            s = out.setdefault(split, {"documents": 0, "windows": 0, "ok": 0, "too_short": 0,
                                       "empty": 0, "undecodable": 0, "bad_json": 0,
                                       "unreadable": 0, "skipped_doc_ids": []})
            s["documents"] += 1
            s[status] = s.get(status, 0) + 1
            s["windows"] += n
            if status != "ok" and len(s["skipped_doc_ids"]) < 50:
                s["skipped_doc_ids"].append(doc_id)
        return out


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------


def resolve_source(cfg: TrainDataConfig) -> tuple[str, str]:
    """(uri_or_path, format) for ``cfg.source``; ``pg-mini`` is built by ``bd_ray.assets``.

    Raises:
        ValueError: the format cannot be inferred from the source name (set ``data.format``).
    """
    src = cfg.source
    if src == "pg-mini":
        src = str(ensure_corpus())
        fmt = "parquet"
        return src, fmt
    if src.startswith("hf:"):
        return src[3:], "hf"
    fmt = cfg.format
    if fmt == "auto":
        low = src.rstrip("/").lower()
        if low.endswith(".parquet") or low.endswith(".pq"):
            fmt = "parquet"
        elif low.endswith(".jsonl") or low.endswith(".json") or low.endswith(".jsonl.gz"):
            fmt = "jsonl"
        elif low.endswith(".txt"):
            fmt = "txt"
        elif os.path.isdir(src):
            names = os.listdir(src)
            if any(n.endswith(".parquet") for n in names):
                fmt = "parquet"
            elif any(n.endswith((".jsonl", ".json")) for n in names):
                fmt = "jsonl"
            elif any(n.endswith(".txt") for n in names):
                fmt = "txt"
            elif os.path.exists(os.path.join(src, "dataset_info.json")) or os.path.exists(
                    os.path.join(src, "dataset_dict.json")):
                fmt = "hf"
        if fmt == "auto":
            raise ValueError(f"data.format: cannot infer the format of data.source={src!r}; "
                             "set data.format to parquet, jsonl, txt or hf")
    return src, fmt


def _normalize(batch: dict[str, np.ndarray], *, fmt: str, cfg: dict) -> dict[str, np.ndarray]:
    """Any reader's rows -> ``{text, doc_id, split, malformed}`` (text "" when malformed)."""
    texts, ids, splits, bad = [], [], [], []
    text_col, split_col, id_col = cfg["text_column"], cfg["split_column"], cfg["doc_id_column"]

    def emit(raw_text, doc_id, split):
        text, reason = _decode(raw_text)
        if split is None:
            split = doc_split(doc_id, cfg["eval_fraction"], cfg["train_split"], cfg["eval_split"])
        texts.append(text or "")
        ids.append(doc_id)
        splits.append(str(split))
        bad.append(reason or "")

    if fmt == "txt":
        for path, data in zip(batch["path"], batch["bytes"]):
            emit(data, os.path.basename(str(path)), None)
    elif fmt == "jsonl":
        for path, data in zip(batch["path"], batch["bytes"]):
            base = os.path.basename(str(path))
            for ln, line in enumerate(bytes(data).split(b"\n")):
                if not line.strip():
                    continue
                did = f"{base}:{ln + 1}"
                try:
                    obj = json.loads(line.decode("utf-8"))
                    if not isinstance(obj, dict):
                        raise ValueError("not an object")
                except UnicodeDecodeError:
                    texts.append(""), ids.append(did), splits.append("?"), bad.append(MALFORMED_UNDECODABLE)
                    continue
                except ValueError:
                    texts.append(""), ids.append(did), splits.append("?"), bad.append(MALFORMED_BAD_JSON)
                    continue
                if id_col and obj.get(id_col) is not None:
                    did = str(obj[id_col])
                sp = obj.get(split_col) if split_col else None
                emit(obj.get(text_col), did, sp)
    else:  # parquet / hf: columnar rows
        n = len(batch[text_col]) if text_col in batch else 0
        if text_col not in batch:
            raise ValueError(f"data.text_column={text_col!r} is not a column of {cfg['source']!r}; "
                             f"columns: {sorted(batch)}")
        for i in range(n):
            did = str(batch[id_col][i]) if id_col and id_col in batch else f"row{i}:{hash(str(batch[text_col][i])[:200])}"
            sp = batch[split_col][i] if split_col and split_col in batch else None
            emit(batch[text_col][i], did, None if sp is None else str(sp))
    return {"text": np.array(texts, dtype=object), "doc_id": np.array(ids, dtype=object),
            "split": np.array(splits, dtype=object), "malformed": np.array(bad, dtype=object)}


def check_parquet_shards(src: str) -> tuple[list[str], Any, list[tuple[str, str]]]:
    """Split the parquet files of ``src`` (a file or a directory, local or a pyarrow filesystem
    URI) into readable and unreadable ones by reading each file's footer (a few KB per file).

    Returns ``(readable paths, pyarrow filesystem, [(unreadable path, reason)])``; paths are in
    the filesystem's namespace, sorted. A truncated file has no footer and is unreadable.

    Raises:
        FileNotFoundError: ``src`` does not exist.
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    if "://" in src:
        fs, root = pafs.FileSystem.from_uri(src)
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(src)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data.source: {src!r} does not exist")
    if info.type == pafs.FileType.Directory:
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                       if i.type == pafs.FileType.File and i.path.lower().endswith(".parquet"))
    else:
        files = [root]
    good, bad = [], []
    for path in files:
        try:
            pq.read_metadata(path, filesystem=fs)
            good.append(path)
        except Exception as exc:  # noqa: BLE001 -- pyarrow raises ArrowInvalid / OSError variants
            bad.append((path, f"{type(exc).__name__}: {exc}"))
    return good, fs, bad


def read_documents(cfg: TrainDataConfig, stats=None):
    """Lazy Ray Dataset of documents ``{text, doc_id, split, malformed}`` from ``cfg.source``.

    ``stats``: a :class:`DataStats` (actor handle or object) that receives unreadable parquet
    shards (status ``unreadable``; they are skipped).

    Raises:
        ValueError: unknown format; missing text column (at execution); no readable parquet file.
        FileNotFoundError: a local path that does not exist.
    """
    import ray.data

    src, fmt = resolve_source(cfg)
    if "://" not in src and not os.path.exists(src):
        raise FileNotFoundError(f"data.source: {src!r} does not exist")
    ccfg = cfg.model_dump()
    ccfg["source"] = src
    if fmt == "parquet":
        paths, fs, bad = check_parquet_shards(src)
        if bad:
            import warnings

            warnings.warn(f"data.source: skipping {len(bad)} unreadable parquet shard(s): "
                          + "; ".join(f"{p} ({why[:120]})" for p, why in bad[:5]), stacklevel=2)
            if stats is not None:
                _record(stats, [("?", p, UNREADABLE_SHARD, 0) for p, _ in bad])
        if not paths:
            raise ValueError(f"data.source: no readable parquet file in {src!r} "
                             f"({len(bad)} unreadable)")
        # Ray Data 2.60 indexes parquet footers with 32 actors by default, whatever the number of
        # files: on a small machine starting them costs minutes for a handful of files. One actor
        # per 64 files (at least 1, at most Ray's 32) unless the user set the variable.
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(max(1, min(32, len(paths) // 64))))
        ds = ray.data.read_parquet(paths, filesystem=fs)
    elif fmt == "txt":
        ds = ray.data.read_binary_files(src, include_paths=True, file_extensions=["txt"])
    elif fmt == "jsonl":
        ds = ray.data.read_binary_files(src, include_paths=True, file_extensions=["jsonl", "json"])
    elif fmt == "hf":
        import datasets

        hf = datasets.load_from_disk(src)
        if isinstance(hf, datasets.DatasetDict):
            parts = []
            for name, part in hf.items():
                if cfg.split_column and cfg.split_column not in part.column_names:
                    part = part.add_column(cfg.split_column, [name] * len(part))
                parts.append(ray.data.from_huggingface(part))
            ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        else:
            ds = ray.data.from_huggingface(hf)
    else:
        raise ValueError(f"data.format: unknown format {fmt!r}")
    return ds.map_batches(_normalize, fn_kwargs={"fmt": fmt, "cfg": ccfg}, batch_format="numpy",
                          batch_size=16, num_cpus=0.25)


# ------------------------------------------------------------------------------------------
# Tokenize + window (actor pool)
# ------------------------------------------------------------------------------------------


class TokenizeWindows:
    """``map_batches`` callable class: documents -> windows (one actor = one tokenizer).

    Args:
        tokenizer_path: HF tokenizer directory (the verifier's).
        window, stride, max_windows, add_bos: window layout (module docstring).
        stats: a :class:`DataStats` actor handle (or None) that receives each document's outcome.

    Output batch: ``input_ids`` int32 ``[n, window]``, ``doc_id`` object ``[n]``, ``start`` int64
    ``[n]`` (token offset of the window in its document), ``split`` object ``[n]``.
    """

    def __init__(self, tokenizer_path: str, window: int, stride: int | None = None,
                 max_windows: int | None = None, add_bos: bool = True, stats=None):
        from transformers import AutoTokenizer

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tok = AutoTokenizer.from_pretrained(tokenizer_path)
        self.window, self.stride, self.max_windows = window, stride, max_windows
        self.bos = self.tok.bos_token_id if add_bos else None
        self.stats = stats

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids_out, doc_out, start_out, split_out, records = [], [], [], [], []
        for text, doc_id, split, bad in zip(batch["text"], batch["doc_id"], batch["split"], batch["malformed"]):
            doc_id, split = str(doc_id), str(split)
            if bad:
                records.append((split, doc_id, str(bad), 0))
                continue
            toks = self.tok(str(text), add_special_tokens=False)["input_ids"]
            if self.bos is not None:
                toks = [self.bos] + list(toks)
            wins = cut_windows(np.asarray(toks, dtype=np.int64), self.window, self.stride, self.max_windows)
            records.append((split, doc_id, "ok" if wins else "too_short", len(wins)))
            for start, w in wins:
                ids_out.append(w)
                doc_out.append(doc_id)
                start_out.append(start)
                split_out.append(split)
        if self.stats is not None and records:
            _record(self.stats, records)
        return {
            "input_ids": np.stack(ids_out) if ids_out else np.zeros((0, self.window), np.int32),
            "doc_id": np.array(doc_out, dtype=object),
            "start": np.array(start_out, dtype=np.int64),
            "split": np.array(split_out, dtype=object),
        }


def _record(stats, records: list[tuple[str, str, str, int]]) -> None:
    """Send outcome records to a DataStats actor handle or a plain DataStats object."""
    if hasattr(stats, "record") and hasattr(stats.record, "remote"):
        stats.record.remote(records)
    else:
        stats.record(records)


def _stats_actor():
    import ray

    return ray.remote(num_cpus=0)(DataStats).remote()


def build_window_dataset(cfg: TrainDataConfig, tokenizer_path: str, split: str | list[str] | None = None, stats=None,
                         shuffle: bool = True, max_windows_per_doc: int | None = None):
    """Lazy Ray Dataset of windows of one split (default ``cfg.train_split``).

    Args:
        cfg: data config (source, window lengths, actor pool, shuffle seed).
        tokenizer_path: the verifier's tokenizer directory.
        split: which split to keep (documents of other splits never enter); a list keeps several
            (rows carry their ``split``).
        stats: :class:`DataStats` actor handle receiving per-document outcomes (None = a new one;
            read it back with ``ray.get(stats.summary.remote())`` after consuming the dataset).
        shuffle: seeded ``random_shuffle`` of the windows (``cfg.shuffle_seed``).

    Returns:
        ``(dataset, stats_handle)``; rows ``{input_ids: int32[P+T], doc_id, start}``.
    """
    import ray.data

    keep = set([split] if isinstance(split, str) else (split or [cfg.train_split]))
    stats = stats if stats is not None else _stats_actor()
    docs = read_documents(cfg, stats=stats)
    docs = docs.filter(lambda r: r["split"] in keep or (r["malformed"] != "" and r["split"] == "?"),
                       num_cpus=0.25)
    wins = docs.map_batches(
        TokenizeWindows,
        fn_constructor_kwargs={"tokenizer_path": tokenizer_path, "window": cfg.window_len,
                               "stride": cfg.stride,
                               "max_windows": max_windows_per_doc or cfg.max_windows_per_doc,
                               "add_bos": cfg.add_bos, "stats": stats},
        batch_size=cfg.tokenize_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.tokenizer_actors),
        num_cpus=cfg.tokenizer_num_cpus,
    )
    if shuffle:
        wins = wins.random_shuffle(seed=cfg.shuffle_seed)
    return wins, stats


def eval_windows(cfg: TrainDataConfig, tokenizer_path: str, n: int | None = None, stats=None) -> list[np.ndarray]:
    """The first ``n`` (default ``cfg.eval_windows``) held-out windows (``cfg.eval_split``),
    at most 2 per document, in a deterministic order; ``[]`` when there are none."""
    n = cfg.eval_windows if n is None else n
    if n <= 0:
        return []
    ds, _ = build_window_dataset(cfg, tokenizer_path, split=cfg.eval_split, stats=stats,
                                 shuffle=False, max_windows_per_doc=2)
    rows = ds.take(n)
    return [np.asarray(r["input_ids"], dtype=np.int64) for r in rows]


def iter_rows(shard, skip: int = 0, epochs: int | None = None) -> Iterator[dict]:
    """Yield window rows ``{"input_ids": int64[P+T], ...other columns}`` from a Ray Train dataset
    shard (or any Ray Dataset), epoch after epoch (``epochs=None``: forever), after dropping the
    first ``skip`` rows (resume: the rows a checkpointed run already consumed; exact when the
    shard's order is deterministic, see the README's notes on resume).

    Raises:
        RuntimeError: an epoch yielded no window (empty shard: too few/short documents).
    """
    epoch = 0
    seen = 0
    while epochs is None or epoch < epochs:
        n = 0
        for batch in shard.iter_batches(batch_size=1, batch_format="numpy"):
            cols = list(batch)
            for i in range(len(batch["input_ids"])):
                n += 1
                seen += 1
                if seen <= skip:
                    continue
                row = {c: batch[c][i] for c in cols}
                row["input_ids"] = np.asarray(row["input_ids"], dtype=np.int64)
                yield row
        if n == 0:
            raise RuntimeError("the training data shard is empty: no document of the train split is "
                               "at least data.prefix_len + data.continuation_len tokens long "
                               "(see the data stats for skipped documents)")
        epoch += 1


def offline_window_dataset(path: str, shuffle_seed: int | None = 42):
    """Windows with precomputed teacher targets (the ``train/`` shards of a ``jobs/teacher_targets.py``
    output, bd_ray/teacher_targets.py): rows ``{input_ids, argmax, [topk_ids, topk_logprobs,] doc_id,
    start}``, shuffled with ``shuffle_seed`` (None = file order)."""
    import ray.data

    ds = ray.data.read_parquet(path, file_extensions=["parquet"])
    return ds.random_shuffle(seed=shuffle_seed) if shuffle_seed is not None else ds
