"""The ``bd_ray_sparse`` transformers attention implementation gives the same logits as sdpa/eager.

Tiny random fp32 LlamaForCausalLM (2 layers, hidden 64, 4 heads, 2 KV heads, vocab 128):
prefill, incremental decode / multi-token verify with a DynamicCache, and a *compact* cache
holding only kept prefix positions (per layer and KV head) with true ``position_ids`` for the new
tokens -- the drafter's sparse cache. The Triton path runs under the interpreter
(``TRITON_INTERPRET=1`` + ``BD_RAY_FORCE_TRITON=1``): in-process when Triton was imported in
interpreter mode, otherwise in a child process (see tests/test_kernels.py for why).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import bd_ray.attention as bda
from bd_ray_kernels import triton_available

ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _logits(model, impl, ids, cache=None, position_ids=None, attention_mask=None):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=ids, cache=cache, position_ids=position_ids, attention_mask=attention_mask,
                     use_cache=cache is not None).logits


def _ids(b, n, seed):
    return torch.randint(0, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def _decode_run(model, impl, ids, steps):
    """Prefill ids[:, :p], then feed the blocks in ``steps`` (sizes) through one DynamicCache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    p = ids.shape[1] - sum(steps)
    outs = [_logits(model, impl, ids[:, :p], cache)]
    pos = p
    for n in steps:
        outs.append(_logits(model, impl, ids[:, pos:pos + n], cache))
        pos += n
    return torch.cat(outs, dim=1)


def _compact_cache(full, keep):
    """DynamicCache holding, per layer l and KV head h, the prefix positions ``keep[l][:, h]``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(full):
        idx = keep[layer][..., None].expand(-1, -1, -1, k.shape[-1])  # [b, kvh, kept, d]
        cache.update(k.gather(2, idx).clone(), v.gather(2, idx).clone(), layer)
    return cache


def _prefix_kv(model, ids):
    from transformers import DynamicCache

    cache = DynamicCache()
    _logits(model, "sdpa", ids, cache)
    return [(lay.keys.clone(), lay.values.clone()) for lay in cache.layers]


def _check_prefill_and_decode(model):
    ids = _ids(2, 16, 0)
    ref = _logits(model, "sdpa", ids)
    torch.testing.assert_close(_logits(model, "eager", ids), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(model, bda.ATTN_IMPLEMENTATION, ids), ref, atol=ATOL, rtol=0)
    steps = [1, 1, 4]  # two decode steps, then a gamma+1 = 4 token verify block
    got = _decode_run(model, bda.ATTN_IMPLEMENTATION, ids, steps)
    torch.testing.assert_close(got, _decode_run(model, "sdpa", ids, steps), atol=ATOL, rtol=0)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def _check_compact_cache(model):
    b, p, n, kept = 2, 24, 3, 10
    ids = _ids(b, p + n, 1)
    full = _prefix_kv(model, ids[:, :p])
    new, pos = ids[:, p:], torch.arange(p, p + n).expand(b, n)
    g = torch.Generator().manual_seed(2)
    # (a) kept positions differ per layer, batch row and KV head: HF's causal mask in compact index
    #     space (sdpa on the same compact cache) must equal the kernel's convention
    keep = [torch.stack([torch.stack([torch.randperm(p, generator=g)[:kept].sort().values for _ in range(2)])
                         for _ in range(b)]) for _ in full]
    got = _logits(model, bda.ATTN_IMPLEMENTATION, new, _compact_cache(full, keep), pos)
    ref = _logits(model, "sdpa", new, _compact_cache(full, keep), pos)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # (b) one kept set for all: equals sdpa over the *full* cache with the dropped positions masked
    shared = torch.tensor([0, 1, 2, 3, 9, 10, 11, 17, 22, 23])
    keep = [shared.expand(b, 2, -1) for _ in full]
    mask = torch.zeros(b, 1, n, p + n, dtype=torch.bool)
    mask[..., shared] = True
    mask[..., p:] = torch.ones(n, n, dtype=torch.bool).tril()
    from transformers import DynamicCache

    full_cache = DynamicCache()
    for layer, (k, v) in enumerate(full):
        full_cache.update(k.clone(), v.clone(), layer)
    ref_full = _logits(model, "sdpa", new, full_cache, pos, attention_mask=mask)
    got = _logits(model, bda.ATTN_IMPLEMENTATION, new, _compact_cache(full, keep), pos)
    torch.testing.assert_close(got, ref_full, atol=ATOL, rtol=0)


def test_registered():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert bda.register() == "bd_ray_sparse"
    assert AttentionInterface()["bd_ray_sparse"] is bda.bd_ray_sparse_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["bd_ray_sparse"] is bda.bd_ray_sparse_mask


def test_prefill_and_decode_match_sdpa(model, monkeypatch):
    monkeypatch.delenv("BD_RAY_FORCE_TRITON", raising=False)
    assert bda.attention_backend("cpu") == "torch"
    _check_prefill_and_decode(model)


def test_compact_cache_matches_sdpa(model, monkeypatch):
    monkeypatch.delenv("BD_RAY_FORCE_TRITON", raising=False)
    _check_compact_cache(model)


def test_from_pretrained_with_bd_ray_sparse(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="bd_ray_sparse").eval()
    assert loaded.config._attn_implementation == "bd_ray_sparse"
    ids = _ids(1, 9, 3)
    with torch.no_grad():
        got = loaded(ids).logits
    torch.testing.assert_close(got, _logits(model, "sdpa", ids), atol=ATOL, rtol=0)


def test_padding_mask_rejected(model):
    ids = _ids(2, 8, 4)
    ones = torch.ones(2, 8, dtype=torch.long)
    torch.testing.assert_close(_logits(model, "bd_ray_sparse", ids, attention_mask=ones),
                               _logits(model, "sdpa", ids), atol=ATOL, rtol=0)
    ones[1, :3] = 0
    with pytest.raises(NotImplementedError, match="padding"):
        _logits(model, "bd_ray_sparse", ids, attention_mask=ones)
    with pytest.raises(NotImplementedError, match="explicit attention mask"):
        _logits(model, "bd_ray_sparse", ids, attention_mask=torch.ones(2, 1, 8, 8, dtype=torch.bool))


def _interpreter_ready() -> bool:
    if not triton_available():
        return False
    from bd_ray_kernels.sparse_attention import interpreter_active

    return interpreter_active()


def test_triton_interpreter_backend(model, monkeypatch):
    if not _interpreter_ready():
        pytest.skip("Triton interpreter not active in this process; covered by test_interpreter_in_subprocess")
    monkeypatch.setenv("BD_RAY_FORCE_TRITON", "1")
    assert bda.attention_backend("cpu") == "triton-interpret"
    _check_prefill_and_decode(model)
    _check_compact_cache(model)


def test_interpreter_in_subprocess():
    if not triton_available():
        pytest.skip("triton not importable")
    if _interpreter_ready():
        pytest.skip("interpreter active here: test_triton_interpreter_backend ran in-process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-k", "triton", "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=300, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "1 passed" in r.stdout, r.stdout[-2000:]
