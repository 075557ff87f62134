"""Data pipeline tests (bd_ray.data): split by work, too-short and malformed documents skipped and
counted (never fatal), windows of the configured length, every reader (parquet / jsonl / txt / a
local Hugging Face dataset)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

from bd_ray.data import (DataStats, TokenizeWindows, _normalize, build_window_dataset, cut_windows, doc_split,
                         iter_rows, resolve_source)
from bd_ray.config.train import TrainDataConfig
from bd_ray.testing.tiny import TINY_TEXT, tiny_tokenizer

W_P, W_T = 48, 16


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tiny_tokenizer().save_pretrained(d)
    return str(d)


def cfg(source, **kw) -> TrainDataConfig:
    return TrainDataConfig(source=str(source), prefix_len=W_P, continuation_len=W_T, tokenizer_num_cpus=0.25, **kw)


def test_cut_windows_and_split_hash():
    toks = np.arange(100)
    w = cut_windows(toks, 30)
    assert [s for s, _ in w] == [0, 30, 60] and all(x.shape == (30,) and x.dtype == np.int32 for _, x in w)
    assert [s for s, _ in cut_windows(toks, 30, stride=20, max_windows=2)] == [0, 20]
    assert cut_windows(toks[:29], 30) == []
    assert doc_split("a", 0.0) == "train" and doc_split("a", 0.99999) == "test"
    assert doc_split("book-7", 0.3) == doc_split("book-7", 0.3)  # stable


def test_normalize_and_tokenize_count_malformed(tok_dir):
    c = cfg("x.jsonl").model_dump()
    lines = [json.dumps({"doc_id": "a", "split": "train", "text": TINY_TEXT}).encode(),
             b"{not json", json.dumps({"doc_id": "e", "split": "train", "text": ""}).encode(),
             b'{"doc_id": "u", "split": "train", "text": "caf\xe9"}', json.dumps({"doc_id": "s", "split": "train", "text": "hi"}).encode()]
    batch = {"path": np.array(["/d/x.jsonl"], dtype=object), "bytes": np.array([b"\n".join(lines)], dtype=object)}
    docs = _normalize(batch, fmt="jsonl", cfg=c)
    assert list(docs["malformed"]) == ["", "bad_json", "empty", "undecodable", ""]
    stats = DataStats()
    tw = TokenizeWindows(tok_dir, W_P + W_T, stats=stats)
    out = tw(docs)
    assert out["input_ids"].shape[1] == W_P + W_T and set(out["doc_id"]) == {"a"}
    s = stats.summary()
    assert s["train"]["ok"] == 1 and s["train"]["too_short"] == 1 and s["train"]["empty"] == 1
    assert s["?"]["bad_json"] == 1 and s["?"]["undecodable"] == 1
    tw(docs)  # a second epoch does not double-count
    assert stats.summary()["train"]["documents"] == 3
    with pytest.raises(ValueError, match="data.format"):
        resolve_source(TrainDataConfig(source="/nonexistent/thing"))


def test_truncated_parquet_shard_is_found_by_its_footer(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bd_ray.data import check_parquet_shards

    d = tmp_path / "c"
    d.mkdir()
    t = pa.Table.from_pylist([{"doc_id": "a", "text": TINY_TEXT}])
    for name in ("a.parquet", "b.parquet", "c.parquet"):
        pq.write_table(t, d / name)
    (d / "b.parquet").write_bytes((d / "b.parquet").read_bytes()[:100])  # truncated upload
    (d / "c.parquet").write_bytes(b"")  # empty file
    (d / "notes.txt").write_text("not a shard")
    good, _fs, bad = check_parquet_shards(str(d))
    assert [os.path.basename(p) for p in good] == ["a.parquet"]
    assert [os.path.basename(p) for p, _ in bad] == ["b.parquet", "c.parquet"]
    assert all(why for _, why in bad)
    with pytest.raises(FileNotFoundError, match="data.source"):
        check_parquet_shards(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


def _rows(ds):
    return list(iter_rows(ds, epochs=1))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_parquet_split_by_work_and_counts(tmp_path, tok_dir, ray_local):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [dict(doc_id=f"train{i}", title="t", author="a", source="s", license="pd", split="train",
                 text=TINY_TEXT) for i in range(3)]
    docs += [dict(doc_id="test0", title="t", author="a", source="s", license="pd", split="test", text=TINY_TEXT),
             dict(doc_id="tiny", title="t", author="a", source="s", license="pd", split="train", text="Stop here."),
             dict(doc_id="blank", title="t", author="a", source="s", license="pd", split="train", text="   ")]
    (tmp_path / "c").mkdir()
    pq.write_table(pa.Table.from_pylist(docs[:3]), tmp_path / "c" / "train-0.parquet")
    pq.write_table(pa.Table.from_pylist(docs[3:]), tmp_path / "c" / "test-0.parquet")
    (tmp_path / "c" / "_manifest.json").write_text("{}")  # non-parquet files are ignored
    c = cfg(tmp_path / "c")
    ds, stats = build_window_dataset(c, tok_dir)
    rows = _rows(ds)
    assert rows and {str(r["doc_id"]) for r in rows} == {"train0", "train1", "train2"}
    assert all(r["input_ids"].shape == (W_P + W_T,) for r in rows)
    s = ray_local.get(stats.summary.remote())
    assert s["train"]["ok"] == 3 and s["train"]["too_short"] == 1 and s["train"]["empty"] == 1
    assert s["train"]["windows"] == len(rows) and "test" not in s  # held-out books never enter


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_txt_shard_with_bad_encoding_and_hf(tmp_path, tok_dir, ray_local):
    d = tmp_path / "txt"
    d.mkdir()
    (d / "good.txt").write_text(TINY_TEXT)
    (d / "bad.txt").write_bytes(b"ok text then \xff\xfe\xfa invalid utf-8 " * 50)
    (d / "empty.txt").write_text("")
    c = cfg(d, split_column=None, eval_fraction=0.0)
    ds, stats = build_window_dataset(c, tok_dir)
    rows = _rows(ds)
    assert {str(r["doc_id"]) for r in rows} == {"good.txt"}
    s = ray_local.get(stats.summary.remote())["train"]
    assert s["undecodable"] == 1 and s["empty"] == 1 and s["ok"] == 1
    # A local Hugging Face dataset (as PG-19 would be) through ray.data.from_huggingface.
    import datasets

    hf = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [TINY_TEXT, "x"]}),
                               "test": datasets.Dataset.from_dict({"text": [TINY_TEXT]})})
    hf.save_to_disk(str(tmp_path / "hf"))
    c = cfg(f"hf:{tmp_path / 'hf'}", doc_id_column=None)
    ds, stats = build_window_dataset(c, tok_dir, shuffle=False)
    rows = _rows(ds)
    assert len(rows) > 0
    s = ray_local.get(stats.summary.remote())
    assert s["train"]["ok"] == 1 and s["train"]["too_short"] == 1 and "test" not in s
