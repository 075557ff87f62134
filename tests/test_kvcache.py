"""KV caches on a real (tiny, random-weight) transformers Llama: prefill, compact views, rollback.

Covers the central assumption of bd_ray.kvcache (compact cache + true position_ids == full
attention restricted to the kept positions, eager and sdpa), spec-decoding case 8 (training view
== inference cache) and case 10 (no stale draft state after rollback).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface
from transformers.models.llama import modeling_llama

from bd_ray.config import SparsePolicyConfig
from bd_ray.kvcache import (cache_len, clone_cache, compact_cache, crop_cache, forward_with_cache,
                            next_position, prefill)

torch.set_num_threads(1)

VOCAB = 256
PREFIX = 70  # not a multiple of the chunk size
POLICIES = {
    "chunk_topk": SparsePolicyConfig(name="chunk_topk", chunk_size=8, recent=6),
    "chunk_topk_paper": SparsePolicyConfig(name="chunk_topk", chunk_size=8, recent=0),
    "chunk_topk_lastq": SparsePolicyConfig(name="chunk_topk", chunk_size=4, recent=4, query_proxy="last_query"),
    "streaming": SparsePolicyConfig(name="streaming", sink=4),
    "snapkv": SparsePolicyConfig(name="snapkv", sink=2, window=8, pool_kernel=3),
}
BUDGET = 32
W = 8


def tiny_llama(attn="eager", heads=4, kv_heads=2, seed=0):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      initializer_range=0.2, tie_word_embeddings=False, attn_implementation=attn,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama("eager")


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (1, PREFIX + 12), generator=g)


@pytest.fixture(scope="module")
def pre(model, ids):
    return prefill(model, ids[:, :PREFIX], chunk_size=16, capture_queries_window=W)


def _snapshot(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


# ------------------------------------------------------------------------------------------
# prefill and query capture
# ------------------------------------------------------------------------------------------


def test_prefill_matches_full_forward(model, ids, pre):
    with torch.no_grad():
        out = model(ids[:, :PREFIX], use_cache=True)
    assert torch.allclose(pre.last_logits, out.logits[:, -1], atol=1e-5)
    assert cache_len(pre.cache) == PREFIX and pre.cache.kept_len == PREFIX
    assert pre.cache.prefix_len.tolist() == [PREFIX]
    for layer, (k, v, _) in zip(pre.cache.layers, out.cache):
        assert torch.allclose(layer.keys, k, atol=1e-5) and torch.allclose(layer.values, v, atol=1e-5)
    assert model.config._attn_implementation == "eager"  # capture restored the implementation


def test_captured_queries_are_post_rope(model, ids, pre):
    x = ids[:, :PREFIX]
    pos = torch.arange(PREFIX).view(1, -1)
    with torch.no_grad():
        h = model.model.embed_tokens(x)
        attn = model.model.layers[0].self_attn
        hn = model.model.layers[0].input_layernorm(h)
        q = attn.q_proj(hn).view(1, PREFIX, -1, attn.head_dim).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, pos)
        q, _ = modeling_llama.apply_rotary_pos_emb(q, q, cos, sin)
    assert pre.queries[0].shape == (1, 4, W, 16)
    assert torch.allclose(pre.queries[0], q[:, :, -W:], atol=1e-5)
    # chunk boundaries do not matter, nor does the attention implementation
    sdpa = tiny_llama("sdpa")
    other = prefill(sdpa, x, chunk_size=PREFIX, capture_queries_window=W)
    assert torch.allclose(other.queries[1], pre.queries[1], atol=1e-5)


def test_capture_works_for_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(cfg).eval()
    x = torch.randint(0, VOCAB, (1, 40))
    r = prefill(m, x, chunk_size=16, capture_queries_window=6)
    assert len(r.queries) == 2 and r.queries[1].shape == (1, 4, 6, 16)
    view = compact_cache(r.cache, 20, POLICIES["snapkv"].model_copy(update={"window": 6}), queries=r.queries)
    assert cache_len(view) == 20


# ------------------------------------------------------------------------------------------
# central assumption: compact cache == full attention restricted to the kept positions
# ------------------------------------------------------------------------------------------


def _masked_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with a per-layer additive mask stored on the module (reference only)."""
    return modeling_llama.eager_attention_forward(module, query, key, value, module._test_mask, scaling)


AttentionInterface.register("test_masked_eager", _masked_eager)
AttentionMaskInterface.register("test_masked_eager", ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def _reference_logits(model, ids, view, cont):
    """Full prefix cache, new tokens attend to kept prefix positions (per layer, per KV head) + causal."""
    full = prefill(model, ids[:, :PREFIX]).cache
    n, S = cont.shape[1], PREFIX + cont.shape[1]
    g = model.config.num_attention_heads // model.config.num_key_value_heads
    attn_mods = [layer.self_attn for layer in model.model.layers]
    for li, mod in enumerate(attn_mods):
        allowed = torch.zeros(1, model.config.num_attention_heads, n, S, dtype=torch.bool)
        kept = view.kept_positions[li]  # [1, kvh, K]
        for qh in range(allowed.shape[1]):
            allowed[0, qh, :, kept[0, qh // g]] = True
        allowed[..., PREFIX:] = torch.ones(n, n, dtype=torch.bool).tril()
        mod._test_mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    model.config._attn_implementation = "test_masked_eager"
    try:
        with torch.no_grad():
            return forward_with_cache(model, full, cont, PREFIX)
    finally:
        model.config._attn_implementation = "eager"
        for mod in attn_mods:
            del mod._test_mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_compact_equals_masked_full_attention(model, ids, pre, name, attn):
    view = compact_cache(pre.cache, BUDGET, POLICIES[name], queries=pre.queries)
    assert cache_len(view) == BUDGET and view.kept_positions[0].shape == (1, 2, BUDGET)
    cont = ids[:, PREFIX:PREFIX + 6]
    ref = _reference_logits(model, ids, view, cont)
    m = model if attn == "eager" else tiny_llama("sdpa")
    with torch.no_grad():
        got = forward_with_cache(m, view, cont, next_position(view))
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    # the sparse view really differs from the full cache (the test would be vacuous otherwise)
    with torch.no_grad():
        dense = forward_with_cache(model, clone_cache(pre.cache), cont, PREFIX)
    assert (dense - got).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------
# case 8: training view == inference cache; case 10: no stale draft state
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(POLICIES) + ["full"])
def test_case8_training_view_equals_inference(model, ids, pre, name):
    policy = POLICIES.get(name, POLICIES["chunk_topk"])
    budget = None if name == "full" else BUDGET
    cont = ids[:, PREFIX:PREFIX + 12]
    with torch.no_grad():
        view = compact_cache(pre.cache, budget, policy, queries=pre.queries)
        train = forward_with_cache(model, view, cont, PREFIX)  # whole continuation in one forward
        for block in (1, 4):  # drafter: one token at a time, or blocks of gamma
            cache = compact_cache(pre.cache, budget, policy, queries=pre.queries)
            steps = []
            for i in range(0, cont.shape[1], block):
                steps.append(forward_with_cache(model, cache, cont[:, i:i + block], next_position(cache)))
            infer = torch.cat(steps, dim=1)
            assert torch.allclose(train, infer, atol=1e-5), (name, block, (train - infer).abs().max())
    # hidden_only gives the pre-head states the training loss uses
    with torch.no_grad():
        hid = forward_with_cache(model, compact_cache(pre.cache, budget, policy, queries=pre.queries), cont,
                                 PREFIX, hidden_only=True)
    assert torch.allclose(model.lm_head(hid), train, atol=1e-5)


def _draft_then_rollback(model, pre, policy, t0, corrected):
    """Chain-draft 4 tokens on a compact cache, accept 1, roll back, feed the corrected token."""
    draft = compact_cache(pre.cache, BUDGET, policy, queries=pre.queries)
    tok, proposed = t0, []
    for _ in range(4):  # feed t0, then each proposal
        logits = forward_with_cache(model, draft, tok, next_position(draft))
        tok = logits[:, -1:].argmax(-1)
        proposed.append(tok)
    assert cache_len(draft) == BUDGET + 4
    crop_cache(draft, BUDGET + 2)  # keep t0 + the accepted first draft
    forward_with_cache(model, draft, corrected, next_position(draft))
    return draft, torch.cat([t0, proposed[0], corrected], 1)


def _assert_same_cache(a, b, atol):
    assert cache_len(a) == cache_len(b) == BUDGET + 3
    assert torch.equal(next_position(a), next_position(b))
    for pa, pb in zip(a.kept_positions, b.kept_positions):
        assert torch.equal(pa, pb)
    for la, lb in zip(a.layers, b.layers):
        if atol == 0:
            assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
        else:
            assert torch.allclose(la.keys, lb.keys, atol=atol) and torch.allclose(la.values, lb.values, atol=atol)


@pytest.mark.parametrize("name", ["chunk_topk", "snapkv"])
def test_case10_rollback_leaves_no_stale_state(model, ids, pre, name):
    policy = POLICIES[name]
    t0, corrected = ids[:, PREFIX:PREFIX + 1], torch.tensor([[7]])
    with torch.no_grad():
        draft, accepted = _draft_then_rollback(model, pre, policy, t0, corrected)
        # fresh pass fed token by token: identical ops, so bit-identical
        fresh = compact_cache(pre.cache, BUDGET, policy, queries=pre.queries)
        for i in range(accepted.shape[1]):
            forward_with_cache(model, fresh, accepted[:, i:i + 1], next_position(fresh))
        _assert_same_cache(draft, fresh, atol=0)
        # fresh pass fed as one block; in float64 so that 1e-6 is far above rounding noise
        m64 = tiny_llama("eager").double()
        pre64 = prefill(m64, ids[:, :PREFIX], chunk_size=16, capture_queries_window=W)
        draft64, accepted64 = _draft_then_rollback(m64, pre64, policy, t0, corrected)
        fresh64 = compact_cache(pre64.cache, BUDGET, policy, queries=pre64.queries)
        forward_with_cache(m64, fresh64, accepted64, PREFIX)
        _assert_same_cache(draft64, fresh64, atol=1e-6)
    with pytest.raises(ValueError, match="below the kept prefix length 32"):
        crop_cache(draft, BUDGET - 1)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        crop_cache(draft, BUDGET + 10)


def test_views_reuse_one_prefill_without_mutating_it(model, ids, pre):
    before = _snapshot(pre.cache)
    cont = ids[:, PREFIX:PREFIX + 5]
    with torch.no_grad():
        full = clone_cache(pre.cache)
        forward_with_cache(model, full, cont, PREFIX)
        crop_cache(full, PREFIX + 2)
        forward_with_cache(model, full, cont[:, :3], PREFIX + 2)
        for name, policy in POLICIES.items():
            for budget in (16 if name != "snapkv" else 12, BUDGET, 64, None):
                view = compact_cache(pre.cache, budget, policy, queries=pre.queries)
                forward_with_cache(model, view, cont, PREFIX)
    assert cache_len(pre.cache) == PREFIX
    for layer, (k, v) in zip(pre.cache.layers, before):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    with pytest.raises(ValueError, match="already compact"):
        compact_cache(view, 16, POLICIES["streaming"])


def test_budget_below_minimum_raises(pre):
    with pytest.raises(ValueError, match="kv budget 10 is below the minimum 14 for chunk_topk"):
        compact_cache(pre.cache, 10, POLICIES["chunk_topk"])


# ------------------------------------------------------------------------------------------
# ragged batch: each row behaves exactly like that row alone
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,budget,attn", [("chunk_topk", BUDGET, "eager"), ("snapkv", BUDGET, "sdpa"),
                                              ("streaming", None, "sdpa")])
def test_ragged_batch_rows_equal_single_rows(model, name, budget, attn):
    policy = POLICIES[name]
    model = model if attn == "eager" else tiny_llama(attn)
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([PREFIX, 41, 20])  # the last row is shorter than the budget
    ids = torch.randint(0, VOCAB, (3, PREFIX), generator=g)
    cont = torch.randint(0, VOCAB, (3, 4), generator=g)
    with torch.no_grad():
        r = prefill(model, ids, chunk_size=16, capture_queries_window=W, lengths=lengths)
        view = compact_cache(r.cache, budget, policy, queries=r.queries)
        assert next_position(view).tolist() == lengths.tolist()
        batched = forward_with_cache(model, view, cont[:, :1], next_position(view))
        batched = torch.cat([batched, forward_with_cache(model, view, cont[:, 1:], next_position(view))], 1)
        for row, L in enumerate(lengths.tolist()):
            one = prefill(model, ids[row:row + 1, :L], chunk_size=64, capture_queries_window=W)
            assert torch.allclose(one.last_logits[0], r.last_logits[row], atol=1e-5)
            v1 = compact_cache(one.cache, budget, policy, queries=one.queries)
            K1 = v1.kept_positions[0].shape[-1]
            assert torch.equal(view.kept_positions[1][row, :, :K1], v1.kept_positions[1][0])
            single = forward_with_cache(model, v1, cont[row:row + 1], L)
            assert torch.allclose(batched[row], single[0], atol=1e-5), (row, (batched[row] - single[0]).abs().max())


def test_buffered_layers_write_in_place_and_copy_shared_storage(model, ids):
    """Static-buffer growth (gpt-fast style) with copy-on-write: clones never corrupt each other.

    Two clones of one prefill grow with different tokens, one is rolled back and overwritten;
    each ends equal to a cache built fresh from its own tokens, and the source is untouched.
    """
    from bd_ray.kvcache import BufferedLayer

    with torch.no_grad():
        src = prefill(model, ids[:, :PREFIX]).cache
        before = _snapshot(src)
        a, b = clone_cache(src), clone_cache(src)
        forward_with_cache(model, a, ids[:, PREFIX:PREFIX + 4], PREFIX)
        storage = a.layers[0]._k.data_ptr()
        crop_cache(a, PREFIX + 1)                           # rollback: only the length moves
        other = torch.tensor([[5, 6, 7]])
        forward_with_cache(model, a, other, PREFIX + 1)     # overwrites the rejected entries
        assert a.layers[0]._k.data_ptr() == storage         # no reallocation, no per-step copy
        forward_with_cache(model, b, ids[:, PREFIX:PREFIX + 2], PREFIX)
        fresh_a = prefill(model, torch.cat([ids[:, :PREFIX + 1], other], 1)).cache
        fresh_b = prefill(model, ids[:, :PREFIX + 2]).cache
    assert isinstance(a.layers[0], BufferedLayer)
    for got, want in ((a, fresh_a), (b, fresh_b)):
        assert cache_len(got) == cache_len(want)
        for x, y in zip(got.layers, want.layers):
            torch.testing.assert_close(x.keys, y.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(x.values, y.values, atol=1e-5, rtol=1e-5)
    for layer, (k, v) in zip(src.layers, before):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
