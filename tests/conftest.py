"""Shared pytest fixtures for bd-ray.

Real components only: the embedded verifier/corpus are the real cached assets (built on first use by
``bd_ray.assets``, ~1-2 min once; ``make test`` runs ``jobs/prepare_data.py`` before pytest), tiny
models are real ``transformers`` models with random weights (see ``_tiny.py``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-core CI: more torch threads make tiny ops 100x slower
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- embedded assets (real; cached under BD_RAY_HOME, default ~/.cache/bd-ray) ----

@pytest.fixture(scope="session")
def verifier_dir() -> Path:
    """Directory of the cached fp32 HF checkpoint of the embedded ``smollm2-135m`` verifier."""
    from bd_ray import assets

    return assets.ensure_verifier("smollm2-135m")


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """Directory of the ``pg-mini`` corpus parquet shards (``train-*.parquet``, ``test-*.parquet``)."""
    from bd_ray import assets

    return assets.ensure_corpus("pg-mini")


# ---- tiny random-weight models ----

@pytest.fixture
def tiny_llama_pair() -> Callable:
    """Factory ``make(vocab_size=320, verifier_layers=4, drafter_layers=1, seed=0, tie=False, hidden=64)``.

    Returns ``(verifier, drafter, tokenizer)``: two random-weight ``LlamaForCausalLM`` (fp32, eval)
    sharing one vocabulary and the byte-level BPE ``tokenizer`` from ``_tiny.tiny_tokenizer``
    (``len(tokenizer) == vocab_size``, EOS id 0). Seeds differ so the drafter is not the verifier.
    """
    from _tiny import tiny_llama, tiny_tokenizer

    def make(vocab_size: int = 320, verifier_layers: int = 4, drafter_layers: int = 1, seed: int = 0,
             tie: bool = False, hidden: int = 64):
        tok = tiny_tokenizer(vocab_size)
        verifier = tiny_llama(vocab_size=vocab_size, layers=verifier_layers, seed=seed, hidden=hidden)
        drafter = tiny_llama(vocab_size=vocab_size, layers=drafter_layers, seed=seed + 1, hidden=hidden)
        if tie:
            for m in (verifier, drafter):
                m.config.tie_word_embeddings = True
                m.lm_head.weight = m.model.embed_tokens.weight
        return verifier, drafter, tok

    return make
