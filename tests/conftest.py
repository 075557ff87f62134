"""Shared pytest fixtures for bd-ray.

Real components only: the embedded verifier/corpus are the real cached assets (built on first use by
``bd_ray.assets`` once; ``make test`` runs ``jobs/prepare_data.py`` before pytest), tiny
models are real ``transformers`` models with random weights (see ``bd_ray/testing/tiny.py``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # few-core CI: more torch threads than cores make tiny ops far slower
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Data 2.60 starts 32 parquet-footer reader actors even for one small test file; on 2 CI cores
# that alone cost minutes per Ray Data test.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")

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
    sharing one vocabulary and the byte-level BPE ``tokenizer`` from ``bd_ray.testing.tiny.tiny_tokenizer``
    (``len(tokenizer) == vocab_size``, EOS id 0). Seeds differ so the drafter is not the verifier.
    """
    from bd_ray.testing.tiny import tiny_llama, tiny_tokenizer

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


# ---- a private local Ray cluster (never joins or stops anyone else's) ----

@pytest.fixture
def ray_cluster():
    """A new local Ray instance with 4 logical CPUs (Ray Train + Ray Data need more than the 2 cores,
    docs/DESIGN.md sec 5); shut down after the test."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


# ---- the tiny Serve application's models (bd_ray/testing/tiny.py) ----

@pytest.fixture(scope="session")
def serve_model_dirs(tmp_path_factory):
    """``(verifier_dir, drafter_dir)`` of the tiny serving models (``bd_ray.testing.tiny.write_serve_models``)."""
    from bd_ray.testing.tiny import write_serve_models

    return write_serve_models(tmp_path_factory.mktemp("serve_models"))


@pytest.fixture(scope="session")
def serve_reference(serve_model_dirs):
    """``(ar, tokenizer)``: ``ar(prompt_ids, max_tokens, ignore_eos=False) -> text`` is the
    verifier's own greedy decoding (the engine's ARGenerator), the text a lossless server must return."""
    from bd_ray.config import SamplingConfig
    from bd_ray.models import load_verifier
    from bd_ray.speculative.engine import ARGenerator

    verifier, tok = load_verifier(str(serve_model_dirs[0]))
    gen = ARGenerator(verifier, tok)

    def ar(prompt_ids, max_tokens, ignore_eos=False):
        extra = {"eos_token_ids": []} if ignore_eos else {}
        return gen.generate(prompt_ids, SamplingConfig(temperature=0.0, max_new_tokens=max_tokens, **extra)).text

    return ar, tok


# ---- tiny engine models shared by the engine tests (test_spec_engine.py, test_adaptive.py) ----

@pytest.fixture(scope="module")
def tok():
    """The tiny byte-level BPE tokenizer (320 ids, EOS = 0)."""
    from bd_ray.testing.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def verifier():
    """A 2-layer random-weight tiny Llama (seed 0), the engine tests' verifier."""
    from bd_ray.testing.tiny import tiny_llama

    return tiny_llama(layers=2, seed=0)
