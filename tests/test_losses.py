"""Unit tests of bd_ray.losses (docs/DESIGN.md sec 2): chunked CE, L_C = 0 at B >= prefix, no gradient
into the prefix cache, soft targets, L_B, the seeded budget sampler."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from bd_ray.config import SparsePolicyConfig
from bd_ray.kvcache import forward_with_cache, prefill
from bd_ray.losses import (BudgetSampler, TeacherTargets, budgetdraft_loss, chunked_continuation_loss,
                           full_ce_reference, head_params)
from bd_ray.testing.tiny import tiny_llama

torch.set_num_threads(1)
V = 256
P, T = 96, 16
POLICY = SparsePolicyConfig(name="chunk_topk", chunk_size=8, recent=8)


@pytest.fixture(scope="module")
def models():
    teacher = tiny_llama(vocab_size=V, layers=2, seed=1)
    drafter = tiny_llama(vocab_size=V, layers=1, seed=2).train()
    return teacher, drafter


def _window(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (1, P + T), generator=g)


def _targets(teacher, ids, top_k=8):
    with torch.no_grad():
        pre = prefill(teacher, ids[:, :P], chunk_size=32)
        logits = forward_with_cache(teacher, pre.cache, ids[:, P:], P)[0].float()
    lp = torch.log_softmax(logits, -1)
    tl, ti = lp.topk(top_k, -1)
    return TeacherTargets(argmax=logits.argmax(-1), topk_ids=ti, topk_logprobs=tl)


def test_chunked_ce_equals_full_ce_and_grads():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(V, 16, requires_grad=True)
    y = torch.randint(0, V, (37,))
    t = TeacherTargets(argmax=y)
    loss, _, correct = chunked_continuation_loss(h, w, None, t, "hard", chunk=5)
    ref = full_ce_reference(h, w, None, y)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    g1 = torch.autograd.grad(loss, (h, w))
    g2 = torch.autograd.grad(ref, (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert correct == int(((h @ w.T).argmax(-1) == y).sum())


def test_soft_targets_tv_is_one_minus_acceptance():
    torch.manual_seed(0)
    h = torch.randn(6, 8)
    w = torch.randn(V, 8)
    # teacher = a full-support distribution: top-k = whole vocab, so TV is exact.
    tlogits = torch.randn(6, V)
    lp = torch.log_softmax(tlogits, -1)
    tl, ti = lp.topk(V, -1)
    t = TeacherTargets(argmax=tlogits.argmax(-1), topk_ids=ti, topk_logprobs=tl)
    tv, _, _ = chunked_continuation_loss(h, w, None, t, "tv", chunk=4)
    p, q = lp.exp(), torch.softmax(h @ w.T, -1)
    accept = torch.minimum(p, q).sum(-1).mean()
    torch.testing.assert_close(tv, 1 - accept, rtol=1e-5, atol=1e-5)
    kl, _, _ = chunked_continuation_loss(h, w, None, t, "topk_kl", chunk=4)
    ref = (p * (lp - torch.log_softmax(h @ w.T, -1))).sum(-1).mean()
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="top-k"):
        chunked_continuation_loss(h, w, None, TeacherTargets(argmax=t.argmax), "tv")
    with pytest.raises(ValueError, match="loss.target"):
        chunked_continuation_loss(h, w, None, t, "bogus")


def test_lc_zero_when_budget_covers_prefix(models):
    teacher, drafter = models
    ids = _window()
    tgt = _targets(teacher, ids)
    pre = prefill(drafter, ids[:, :P], chunk_size=32)
    full_only = budgetdraft_loss(drafter, pre.cache, ids[:, P:], P, tgt, [P], lam=0.5, policy=POLICY)
    assert full_only.l_c == 0.0 and full_only.agree_views == [None]
    torch.testing.assert_close(full_only.loss, torch.tensor(full_only.l_a))
    sparse = budgetdraft_loss(drafter, pre.cache, ids[:, P:], P, tgt, [32], lam=0.5, policy=POLICY)
    assert sparse.l_c > 0
    torch.testing.assert_close(sparse.loss.detach(), torch.tensor(sparse.l_a + 0.5 * sparse.l_c))
    # L_A is the same whatever the views (full branch on an untouched clone of the prefix cache)
    assert abs(sparse.l_a - full_only.l_a) < 1e-6
    naive = budgetdraft_loss(drafter, pre.cache, ids[:, P:], P, tgt, [32], lam=0.5, policy=POLICY,
                             full_cache_only=True)
    assert naive.l_c == 0.0 and naive.budgets == []
    # K = 2 views share one prefill; L_C is their mean
    two = budgetdraft_loss(drafter, pre.cache, ids[:, P:], P, tgt, [32, 48], lam=0.5, policy=POLICY)
    one48 = budgetdraft_loss(drafter, pre.cache, ids[:, P:], P, tgt, [48], lam=0.5, policy=POLICY)
    assert abs(two.l_c - (sparse.l_c + one48.l_c) / 2) < 1e-5


def test_no_gradient_into_prefix_cache(models):
    teacher, drafter = models
    ids = _window(1)
    tgt = _targets(teacher, ids)
    pre = prefill(drafter, ids[:, :P], chunk_size=32)
    for layer in pre.cache.layers:
        assert not layer.keys.requires_grad and not layer.values.requires_grad
    drafter.zero_grad(set_to_none=True)
    out = budgetdraft_loss(drafter, pre.cache, ids[:, P:], P, tgt, [32], lam=0.5, policy=POLICY)
    out.loss.backward()
    for layer in pre.cache.layers:  # the source cache is untouched and carries no grad
        assert layer.keys.shape[-2] == P
        assert layer.keys.grad is None and not layer.keys.requires_grad
    assert head_params(drafter)[0].grad is not None
    # L_A gradient = gradient of a fresh continuation forward over a detached cache: same numbers
    drafter.zero_grad(set_to_none=True)
    la = budgetdraft_loss(drafter, pre.cache, ids[:, P:], P, tgt, [], lam=0.0, policy=POLICY)
    la.loss.backward()
    g1 = {n: p.grad.clone() for n, p in drafter.named_parameters() if p.grad is not None}
    drafter.zero_grad(set_to_none=True)
    # manual: prefix recomputed *with* grad enabled but detached -> identical gradient
    with torch.no_grad():
        pre2 = prefill(drafter, ids[:, :P], chunk_size=P)
    h = forward_with_cache(drafter, pre2.cache, ids[:, P:], P, hidden_only=True)
    w, b = head_params(drafter)
    full_ce_reference(h, w, b, tgt.argmax).backward()
    for n, p in drafter.named_parameters():
        if n in g1:
            torch.testing.assert_close(g1[n], p.grad, rtol=1e-4, atol=1e-6)


def test_lb_hinge_nonnegative(models):
    teacher, drafter = models
    ids = _window(2)
    tgt = _targets(teacher, ids)
    from bd_ray.kvcache import compact_cache
    with torch.no_grad():
        tp = prefill(teacher, ids[:, :P], chunk_size=32)
        view = compact_cache(tp.cache, 32, POLICY)
        lp = torch.log_softmax(forward_with_cache(teacher, view, ids[:, P:], P)[0].float(), -1)
    tl, ti = lp.topk(8, -1)
    tgt.sparse[32] = (ti, tl)
    pre = prefill(drafter, ids[:, :P], chunk_size=32)
    out = budgetdraft_loss(drafter, pre.cache, ids[:, P:], P, tgt, [32], lam=0.5, policy=POLICY, lb_weight=1.0)
    assert out.l_b >= 0.0
    torch.testing.assert_close(out.loss.detach(), torch.tensor(out.l_a + 0.5 * out.l_c + out.l_b), rtol=1e-5, atol=1e-6)


def test_budget_sampler_seeded_and_weighted():
    s = BudgetSampler({256: 0.4, 512: 0.3, 1024: 0.2, 2048: 0.1}, seed=42)
    a = [s.sample(i)[0] for i in range(2000)]
    assert a == [BudgetSampler({256: 0.4, 512: 0.3, 1024: 0.2, 2048: 0.1}, seed=42).sample(i)[0] for i in range(2000)]
    assert s.sample(7, k=3) == s.sample(7, k=3)
    frac = a.count(256) / len(a)
    assert 0.35 < frac < 0.45 and a.count(2048) / len(a) < 0.15
    assert BudgetSampler({256: 1.0}, fixed=1024).sample(3, 2) == [1024, 1024]
    with pytest.raises(ValueError):
        BudgetSampler({256: 0.0})


def test_budget_sampler_draws_per_rank_and_rank_0_keeps_the_one_process_stream():
    """Each data-parallel rank draws its own budgets (one draw per window, as the paper's batch 1);
    rank 0 draws what a single process always drew (seed sequence [seed, step, 0x42D])."""
    w = {256: 0.4, 512: 0.3, 1024: 0.2, 2048: 0.1}
    s = BudgetSampler(w, seed=42)
    old = [int(np.random.default_rng([42, i, 0x42D]).choice(s.values, size=2, p=s.probs)[j])
           for i in range(200) for j in range(2)]
    assert [b for i in range(200) for b in s.sample(i, 2)] == old
    assert [b for i in range(200) for b in s.sample(i, 2, rank=0)] == old
    r1 = [b for i in range(200) for b in s.sample(i, 2, rank=1)]
    assert r1 != old and r1 == [b for i in range(200) for b in BudgetSampler(w, seed=42).sample(i, 2, rank=1)]
    assert s.sample_all_ranks(7, 2, 3) == sorted({b for r in range(3) for b in s.sample(7, 2, r)})
    assert BudgetSampler(w, fixed=1024).sample(3, 2, rank=5) == [1024, 1024]
