"""The speculative engine on tiny random-weight Llamas with a real BPE tokenizer.

Covers docs/cases/spec-decoding.md cases 1, 4, 5, 6, 7, 10 and 11 at the engine level
(cases 2, 3, 9 at the unit level in test_spec_units.py; case 8 in test_kvcache.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from bd_ray.testing.tiny import greedy, random_prompt, tiny_llama
from bd_ray import kvcache
from bd_ray.config import SamplingConfig, SparsePolicyConfig, SpecConfig
from bd_ray.speculative.engine import ARGenerator, ContextLengthError, SpeculativeGenerator

POLICIES = [
    SparsePolicyConfig(name="chunk_topk", chunk_size=8, recent=16),
    SparsePolicyConfig(name="streaming", sink=4),
    SparsePolicyConfig(name="snapkv", sink=4, window=8, pool_kernel=3),
]


@pytest.fixture(scope="module")
def drafter():
    return tiny_llama(layers=1, seed=1)


# ---- case 4: greedy is lossless -----------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_case4_greedy_equals_ar_every_budget_and_gamma(verifier, drafter, tok, policy):
    ar = ARGenerator(verifier, tok)
    sd = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(policy=policy, adaptive=False))
    for seed in range(3):
        prompt = random_prompt(seed, 150)
        pre = sd.prefill(prompt)
        want = ar.generate(prompt, greedy(24), prefilled=pre.verifier).token_ids
        for budget in (40, 64, None):
            for gamma in (1, 4, 8):
                res = sd.generate(prompt, greedy(24), gamma=gamma, budget=budget, prefilled=pre)
                assert res.token_ids == want, (seed, budget, gamma)
                assert res.speculative and res.finish_reason == "length"
                assert res.metrics.cycles > 0
                # the drafter cache stays within budget + generated tokens
                assert res.peak_drafter_cache <= (budget or len(prompt)) + len(res.token_ids)


def test_perfect_drafter_accepts_everything(verifier, tok):
    sd = SpeculativeGenerator(verifier, verifier, tok, SpecConfig(budget=None, gamma=4, adaptive=False))
    res = sd.generate(random_prompt(7, 40), greedy(21))
    assert res.metrics.acceptance_rate == 1.0
    assert res.metrics.mean_accepted_length == pytest.approx(5.0)
    sampled = sd.generate(random_prompt(7, 40), SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=21,
                                                         seed=3, eos_token_ids=[]))
    assert sampled.metrics.acceptance_rate == 1.0


# ---- case 1: EOS accepted inside a block --------------------------------------------------------
def test_case1_eos_inside_block_engine(verifier, tok):
    prompt = random_prompt(11, 30)
    ar_free = ARGenerator(verifier, tok).generate(prompt, greedy(12)).token_ids
    eos = ar_free[2]                                   # 3rd token: inside the first drafted block
    sd = SpeculativeGenerator(verifier, verifier, tok, SpecConfig(budget=None, gamma=4, adaptive=False))
    for eos_ids in ([eos], [5_000, eos]):              # a single id and a list of ids
        sampling = SamplingConfig(temperature=0.0, max_new_tokens=12, eos_token_ids=eos_ids)
        res = sd.generate(prompt, sampling)
        want = ARGenerator(verifier, tok).generate(prompt, sampling).token_ids
        cut = ar_free.index(eos) + 1
        assert res.token_ids == ar_free[:cut] == want
        assert res.finish_reason == "stop" and res.token_ids[-1] == eos
        assert res.metrics.accepted >= 2                 # EOS really was accepted inside a block


# ---- cases 2/3 at the engine level: stop strings inside and across blocks ----------------------
def test_stop_strings_engine_equals_ar(verifier, drafter, tok):
    prompt = random_prompt(5, 60)
    free = ARGenerator(verifier, tok).generate(prompt, greedy(30))
    text = free.text
    assert len(text) > 12
    for stop in (text[5:8], text[10:14]):
        sampling = greedy(30, stop=[stop])
        ar = ARGenerator(verifier, tok).generate(prompt, sampling)
        for gamma in (3, 6):
            res = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(budget=None, gamma=gamma, adaptive=False)).generate(
                prompt, sampling)
            assert res.text == ar.text and res.token_ids == ar.token_ids
            assert stop not in res.text and res.finish_reason == "stop"


def test_length_cap_inside_block(verifier, tok):
    sd = SpeculativeGenerator(verifier, verifier, tok, SpecConfig(budget=None, gamma=8, adaptive=False))
    for n in (1, 2, 5, 9, 10):
        res = sd.generate(random_prompt(3, 20), greedy(n))
        assert len(res.token_ids) == n and res.finish_reason == "length"


# ---- case 5: sampling is lossless ---------------------------------------------------------------
@pytest.mark.slow
def test_case5_sampling_distribution_matches_verifier(tok):
    """Marginal of the first *drafted-and-verified* token over 10,000 seeded runs equals p.

    The first output token comes from the verifier prefill; the second goes through rejection
    sampling against a deliberately poor drafter, so its marginal tests the sampler end to end.
    """
    vocab, trials = 12, 10_000
    v = tiny_llama(vocab_size=vocab, layers=1, hidden=32, heads=2, kv_heads=1, seed=0, init_std=0.5)
    d = tiny_llama(vocab_size=vocab, layers=1, hidden=32, heads=2, kv_heads=1, seed=5, init_std=0.5)
    # 3 tokens: the first from the prefill, then one cycle drafting 1 token (γ capped by the length)
    sampling = dict(temperature=0.7, top_p=0.9, max_new_tokens=3, eos_token_ids=[])
    prompt = [3, 7, 1, 4, 9, 2]
    sd = SpeculativeGenerator(v, d, tok, SpecConfig(budget=None, gamma=3, adaptive=False))
    pre = sd.prefill(prompt)

    # expected marginal: sum_t1 p(t1) p(t2 | t1), both filtered exactly as the engine filters
    from bd_ray.speculative.sampling import filtered_probs
    cfg = SamplingConfig(**sampling)
    with torch.no_grad():
        p1 = filtered_probs(v(torch.tensor([prompt])).logits[0, -1], cfg)
        p2 = torch.stack([filtered_probs(v(torch.tensor([prompt + [t]])).logits[0, -1], cfg)
                          for t in range(vocab)])
    expected = (p1[:, None] * p2).sum(0)

    counts = torch.zeros(vocab)
    accepted = 0
    for seed in range(trials):
        res = sd.generate(prompt, SamplingConfig(seed=seed, **sampling), prefilled=pre)
        counts[res.token_ids[1]] += 1
        accepted += res.metrics.accepted
    tv = 0.5 * (counts / trials - expected).abs().sum().item()
    # E[TV] of an exact sampler is about 0.5 * sum sqrt(p(1-p)/N) * sqrt(2/pi); allow 3x that.
    bound = 3 * 0.5 * math.sqrt(2 / math.pi) * sum(math.sqrt(float(p) * (1 - float(p)) / trials) for p in expected)
    assert tv < bound, (tv, bound)
    assert 0 < accepted < trials                           # the drafter is poor but not useless


def test_sampling_is_repeatable_with_a_seed(verifier, drafter, tok):
    sd = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(budget=64, gamma=4, adaptive=False))
    cfg = SamplingConfig(temperature=0.9, top_k=50, max_new_tokens=20, seed=123, eos_token_ids=[])
    a = sd.generate(random_prompt(2, 120), cfg)
    b = sd.generate(random_prompt(2, 120), cfg)
    assert a.token_ids == b.token_ids


# ---- case 6: drafter with fewer positions than the context --------------------------------------
def test_case6_short_position_drafter(verifier, tok):
    small = tiny_llama(layers=1, seed=1, max_positions=2048)
    big_verifier = verifier
    assert big_verifier.config.max_position_embeddings == 4096
    sd = SpeculativeGenerator(big_verifier, small, tok, SpecConfig(budget=64, gamma=4, adaptive=False))
    ar = ARGenerator(big_verifier, tok)
    for n in (2047, 2048, 2049, 4000):
        prompt = random_prompt(n, n)
        max_new = 1 if n == 2047 else 4
        res = sd.generate(prompt, greedy(max_new))
        assert res.token_ids == ar.generate(prompt, greedy(max_new)).token_ids
        if n + max_new <= 2048:
            assert res.speculative and res.fallback_reason is None
        else:
            assert not res.speculative and "drafter position limit 2048" in res.fallback_reason


# ---- case 7: vocabulary mismatch ----------------------------------------------------------------
def test_case7_vocab_size_mismatch_refused(verifier, tok):
    other = tiny_llama(vocab_size=300, layers=1)
    with pytest.raises(ValueError, match="300.*320"):
        SpeculativeGenerator(verifier, other, tok)


# ---- case 10: no stale draft state --------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_case10_caches_equal_fresh_rebuild_after_rejections(verifier, drafter, tok, policy):
    sd = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(budget=48, gamma=4, policy=policy, adaptive=False))
    prompt = random_prompt(21, 100)
    checked = []

    def inspect(state):
        fresh_v = kvcache.prefill(verifier, torch.tensor([state.committed[:state.verifier_len]])).cache
        for a, b in zip(state.verifier_cache.layers, fresh_v.layers):
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)
        dpre = kvcache.prefill(drafter, torch.tensor([prompt]), capture_queries_window=policy.window
                               if policy.name == "snapkv" else 0)
        fresh_d = kvcache.compact_cache(dpre.cache, 48, policy, queries=dpre.queries)
        grown = state.committed[len(prompt):state.drafter_len]
        if grown:
            kvcache.forward_with_cache(drafter, fresh_d, torch.tensor([grown]), start_position=len(prompt))
        for li, (a, b) in enumerate(zip(state.drafter_cache.layers, fresh_d.layers)):
            assert a.keys.shape == b.keys.shape
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)
            assert torch.equal(state.drafter_cache.kept_positions[li], fresh_d.kept_positions[li])
        checked.append(state.drafter_len - len(state.committed))

    with torch.no_grad():
        for _ in sd.stream(prompt, greedy(16), inspect=inspect):
            pass
    assert checked, "no cycle was inspected"


# ---- case 11: prompt beyond the verifier's limit -----------------------------------------------
def test_case11_context_limit_refused_before_work(verifier, drafter, tok):
    sd = SpeculativeGenerator(verifier, drafter, tok)
    with pytest.raises(ContextLengthError, match="4096"):
        sd.generate(random_prompt(0, 4090), greedy(10))
    with pytest.raises(ContextLengthError, match="4096"):
        ARGenerator(verifier, tok).generate(random_prompt(0, 4096), greedy(1))


def test_budget_below_minimum_names_it(verifier, drafter, tok):
    sd = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(budget=10, adaptive=False))
    with pytest.raises(ValueError, match="minimum"):
        sd.generate(random_prompt(0, 200), greedy(4))
