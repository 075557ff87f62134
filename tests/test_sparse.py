"""Sparse policies (bd_ray.sparse) against brute-force Python references (loops, float64).

Each reference re-implements the documented rule independently: mandatory positions, then
candidates in score order (ties -> lower chunk index / earlier position), then right-padding of
short rows by repeating the last valid position.
"""

from __future__ import annotations

import math

import pytest
import torch

from bd_ray.config import SparsePolicyConfig
from bd_ray.sparse import gather_kv, kept_valid_mask, min_budget, select_positions

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------
# Brute-force references (one row, one KV head; plain Python)
# ------------------------------------------------------------------------------------------


def _pad(kept: list[int], K: int) -> list[int]:
    kept = sorted(kept)
    return kept + [kept[-1]] * (K - len(kept))


def ref_chunk_topk(keys, L, budget, c, recent, proxy):
    """keys: list[seq][d] floats, proxy: list[d]."""
    if budget >= L:
        return list(range(L))
    mand = set(range(min(c, L))) | set(range((L // c) * c, L)) | set(range(max(0, L - recent), L))
    assert len(mand) <= budget
    score = {}
    for j in range(1, L // c):
        mean = [sum(keys[p][i] for p in range(j * c, j * c + c)) / c for i in range(len(proxy))]
        score[j] = sum(a * b for a, b in zip(mean, proxy))
    kept, free = set(mand), budget - len(mand)
    for j in sorted(score, key=lambda j: (-score[j], j)):
        for p in range(j * c, j * c + c):
            if free and p not in kept:
                kept.add(p)
                free -= 1
    return sorted(kept)


def ref_paper(keys, L, budget, c, proxy):
    """The reference repo's rule: chunk 0 + top (B/c - 1) other full chunks (partial chunk dropped)."""
    score = {}
    for j in range(1, L // c):
        mean = [sum(keys[p][i] for p in range(j * c, j * c + c)) / c for i in range(len(proxy))]
        score[j] = sum(a * b for a, b in zip(mean, proxy))
    top = sorted(score, key=lambda j: -score[j])[: budget // c - 1]
    return sorted(p for j in [0] + top for p in range(j * c, j * c + c))


def ref_streaming(L, budget, sink):
    if budget >= L:
        return list(range(L))
    return sorted(set(range(min(sink, L))) | set(range(L - (budget - sink), L)))


def ref_snapkv(keys, queries_group, L, budget, sink, window, kernel):
    """keys: [seq][d]; queries_group: list over the group's query heads of [W][d] (last W of the row)."""
    if budget >= L:
        return list(range(L))
    d = len(keys[0])
    W = min(window, L)
    score = [0.0] * L
    for qs in queries_group:
        qs = qs[-W:]
        for i, q in enumerate(qs):
            qp = L - W + i
            logits = [sum(a * b for a, b in zip(q, keys[p])) / math.sqrt(d) for p in range(qp + 1)]
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            z = sum(e)
            for p in range(qp + 1):
                score[p] += e[p] / z / len(queries_group)
    n_out = L - W  # positions before the window: pooled and ranked
    pooled = [max(score[max(0, p - kernel // 2): min(n_out, p + kernel // 2 + 1)]) for p in range(n_out)]
    mand = set(range(min(sink, L))) | set(range(n_out, L))
    kept, free = set(mand), budget - len(mand)
    for p in sorted(range(n_out), key=lambda p: (-pooled[p], p)):
        if free and p not in kept:
            kept.add(p)
            free -= 1
    return sorted(kept)


def _tolist(t):
    return t.double().tolist()


def _check(keys, budget, policy, queries=None, lengths=None):
    """Compare select_positions with the references for every row and KV head."""
    b, h, s, d = keys.shape
    got = select_positions(keys, budget, policy, queries=queries, lengths=lengths)
    K = min(budget, s)
    assert got.shape == (b, h, K) and got.dtype == torch.long
    Ls = [s] * b if lengths is None else lengths.tolist()
    g = 1 if queries is None else queries.shape[1] // h
    for r in range(b):
        L = Ls[r]
        for kv in range(h):
            k = _tolist(keys[r, kv, :L])
            if policy.name == "chunk_topk":
                if policy.query_proxy == "last_key":
                    proxy = k[L - 1]
                else:
                    group = queries[r, kv * g:(kv + 1) * g, -1].double()
                    proxy = group.mean(0).tolist()
                want = ref_chunk_topk(k, L, min(budget, L), policy.chunk_size, policy.recent, proxy)
            elif policy.name == "streaming":
                want = ref_streaming(L, min(budget, L), policy.sink)
            else:
                qg = [_tolist(queries[r, kv * g + j]) for j in range(g)]
                want = ref_snapkv(k, qg, L, min(budget, L), policy.sink, policy.window, policy.pool_kernel)
            assert got[r, kv].tolist() == _pad(want, K), (policy.name, r, kv)
    return got


def _keys(b=1, h=2, s=96, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, s, d, generator=g)


# ------------------------------------------------------------------------------------------
# chunk_topk
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s,budget,recent", [(96, 40, 16), (100, 40, 8), (101, 37, 0), (203, 64, 5), (64, 24, 0)])
def test_chunk_topk_matches_reference(s, budget, recent):
    pol = SparsePolicyConfig(name="chunk_topk", chunk_size=8, recent=recent)
    _check(_keys(b=2, s=s, seed=s), budget, pol)


def test_chunk_topk_recent0_reproduces_paper():
    pol = SparsePolicyConfig(name="chunk_topk", chunk_size=8, recent=0)
    for seed, (s, budget) in enumerate([(128, 32), (256, 64), (64, 8), (80, 72)]):
        keys = _keys(b=1, h=3, s=s, seed=seed)
        got = select_positions(keys, budget, pol)
        for kv in range(3):
            k = _tolist(keys[0, kv])
            assert got[0, kv].tolist() == ref_paper(k, s, budget, 8, k[-1])


def test_chunk_topk_last_query_gqa():
    pol = SparsePolicyConfig(name="chunk_topk", chunk_size=4, recent=6, query_proxy="last_query")
    keys = _keys(b=2, h=2, s=70, d=8, seed=3)
    queries = torch.randn(2, 6, 5, 8, generator=torch.Generator().manual_seed(4))  # 3 q heads per kv head
    _check(keys, 30, pol, queries=queries)
    with pytest.raises(ValueError, match="last_query"):
        select_positions(keys, 30, pol)


def test_chunk_topk_min_budget_and_error():
    pol = SparsePolicyConfig(name="chunk_topk", chunk_size=8, recent=64)
    assert min_budget(pol, 200) == 72
    keys = _keys(s=200)
    with pytest.raises(ValueError, match=r"kv budget 16 is below the minimum 72 for chunk_topk \(chunk_size 8 \+ recent 64\)"):
        select_positions(keys, 16, pol)
    got = _check(keys, 72, pol)  # exactly the minimum: only the mandatory positions
    assert got[0, 0].tolist() == list(range(8)) + list(range(136, 200))
    # recent shorter than the trailing partial chunk: the partial chunk is part of the minimum.
    pol2 = SparsePolicyConfig(name="chunk_topk", chunk_size=8, recent=2)
    assert min_budget(pol2, 101) == 8 + 5
    with pytest.raises(ValueError, match="minimum 13 .*trailing partial chunk 5"):
        select_positions(_keys(s=101), 12, pol2)


def test_budget_at_least_prefix_keeps_everything():
    keys = _keys(s=50)
    for name in ("chunk_topk", "streaming", "snapkv"):
        pol = SparsePolicyConfig(name=name)
        for budget in (None, 50, 999):
            got = select_positions(keys, budget, pol)  # no queries needed: nothing is dropped
            assert got.shape == (1, 2, 50) and torch.equal(got[0, 1], torch.arange(50))


# ------------------------------------------------------------------------------------------
# streaming, snapkv
# ------------------------------------------------------------------------------------------


def test_streaming_matches_reference_and_minimum():
    pol = SparsePolicyConfig(name="streaming", sink=4)
    _check(_keys(b=2, s=77), 20, pol)
    _check(_keys(s=77), 4, pol)  # at the minimum: sink only
    with pytest.raises(ValueError, match="minimum 4 for streaming \\(sink 4\\)"):
        select_positions(_keys(s=77), 3, pol)


@pytest.mark.parametrize("s,budget,window,kernel,g", [(80, 30, 8, 7, 1), (61, 25, 5, 3, 3), (40, 17, 12, 1, 2), (33, 20, 16, 5, 3)])
def test_snapkv_matches_reference(s, budget, window, kernel, g):
    pol = SparsePolicyConfig(name="snapkv", sink=2, window=window, pool_kernel=kernel)
    h, d = 2, 8
    keys = _keys(b=2, h=h, s=s, d=d, seed=s)
    queries = torch.randn(2, h * g, window + 3, d, generator=torch.Generator().manual_seed(s + 1))
    _check(keys, budget, pol, queries=queries)


def test_snapkv_errors():
    pol = SparsePolicyConfig(name="snapkv", sink=4, window=32)
    keys = _keys(s=100)
    with pytest.raises(ValueError, match="needs queries"):
        select_positions(keys, 50, pol)
    with pytest.raises(ValueError, match="minimum 36 for snapkv \\(sink 4 \\+ window 32\\)"):
        select_positions(keys, 35, pol, queries=torch.randn(1, 2, 32, 8))
    with pytest.raises(ValueError, match="needs 32 queries"):
        select_positions(keys, 50, pol, queries=torch.randn(1, 2, 8, 8))


# ------------------------------------------------------------------------------------------
# ragged batches, gather
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chunk_topk", "streaming", "snapkv"])
def test_ragged_batch(name):
    pol = SparsePolicyConfig(name=name, chunk_size=4, recent=5, sink=2, window=6, pool_kernel=3)
    s, budget = 60, 24
    keys = _keys(b=3, h=2, s=s, seed=7)
    lengths = torch.tensor([60, 37, 15])  # row 2 is shorter than the budget: padded with repeats
    queries = torch.zeros(3, 4, 6, 8)
    qsrc = torch.randn(3, 4, s, 8, generator=torch.Generator().manual_seed(8))
    for r, L in enumerate(lengths.tolist()):  # each row's window = its own last 6 valid positions
        queries[r] = qsrc[r, :, L - 6:L]
    got = _check(keys, budget, pol, queries=queries, lengths=lengths)
    assert int(got[2].max()) == 14 and int(got[1].max()) <= 36  # never points at padding
    mask = kept_valid_mask(lengths, budget)
    assert mask.sum(1).tolist() == [24, 24, 15]
    # padding values must not influence any row's choice
    keys2 = keys.clone()
    keys2[1, :, 37:] = 1e3
    keys2[2, :, 15:] = -1e3
    assert torch.equal(select_positions(keys2, budget, pol, queries=queries, lengths=lengths), got)


def test_gather_kv():
    keys, values = _keys(b=2, s=30), _keys(b=2, s=30, d=5, seed=9)
    pos = select_positions(keys, 12, SparsePolicyConfig(name="streaming", sink=3))
    k, v = gather_kv(keys, values, pos)
    assert k.shape == (2, 2, 12, 8) and v.shape == (2, 2, 12, 5)
    assert torch.equal(k[1, 0, 3], keys[1, 0, 21]) and torch.equal(v[0, 1, 0], values[0, 1, 0])


@pytest.mark.parametrize("policy", [SparsePolicyConfig(), SparsePolicyConfig(chunk_size=8, recent=0),
                                    SparsePolicyConfig(chunk_size=16, recent=5),
                                    SparsePolicyConfig(name="streaming", sink=4),
                                    SparsePolicyConfig(name="snapkv", sink=4, window=32)])
def test_min_budget_any_length_is_the_smallest_budget_every_long_prefix_accepts(policy):
    from bd_ray.sparse import min_budget_any_length

    need = min_budget_any_length(policy)
    lengths = range(need + 1, need + 200)
    assert all(need >= min_budget(policy, s) for s in lengths)
    assert any(need - 1 < min_budget(policy, s) for s in lengths)    # one less fails some prefix


def test_serve_config_rejects_a_default_budget_long_prompts_cannot_use():
    from bd_ray.config import ConfigError
    from bd_ray.config.serve import load_serve_config

    with pytest.raises(ConfigError, match=r"spec\.budget.*8 is below the minimum 40 .*chunk_topk"):
        load_serve_config({"spec": {"budget": 8}})
    assert load_serve_config({"spec": {"budget": 40}}).spec.budget == 40
    assert load_serve_config({"spec": {"budget": "full"}}).spec.budget == "full"
    assert load_serve_config({"spec": {"budget": None}}).spec.budget == "full"   # YAML null = full
