"""Step scheduling of the batched engine on tiny random-weight Llamas, fp32: the per-step token
budget (``max_num_batched_tokens``: chunked prefill sized so decoding streams keep their pace) and
the padded caches' reshape spread over steps (``RaggedKVCache.settle``). Every output must still
equal its solo greedy decoding.
"""

from __future__ import annotations

import pytest
import torch

import bd_ray.attention  # noqa: F401  (registers bd_ray_sparse)
from bd_ray import kvcache
from bd_ray.config import SpecConfig
from bd_ray.speculative.batch import BatchEngine, BatchOptions, new_row
from bd_ray.speculative.engine import ARGenerator, RowRequest
from bd_ray.speculative.prefill import split_head
from bd_ray.speculative.ragged_cache import RaggedKVCache, ragged_forward
from bd_ray.testing.tiny import greedy, random_prompt, tiny_llama


def _solo(verifier, tok, prompt, sampling):
    return ARGenerator(verifier, tok).generate(prompt, sampling)


def test_split_head_caps_the_piece_and_keeps_the_final_piece_long_enough():
    todo = [(0, 64), (64, 100)]
    split_head(todo, 20, 8)
    assert todo == [(0, 20), (20, 64), (64, 100)]
    todo = [(64, 100)]
    split_head(todo, 30, 8)              # 30 would leave 6 < 8 captured tokens: cut at 92 instead
    assert todo == [(64, 92), (92, 100)]
    todo = [(0, 10)]
    split_head(todo, 4, 8)               # the final piece keeps 8: a shorter first part
    assert todo == [(0, 2), (2, 10)]
    todo = [(0, 6)]
    split_head(todo, 4, 8)               # shorter than the captured tokens: run whole
    assert todo == [(0, 6)]
    todo = [(0, 10)]
    split_head(todo, 0, 0)               # a piece always makes progress
    assert todo == [(0, 1), (1, 10)]


@pytest.mark.parametrize("budget", [24, None])
def test_token_budget_paces_a_long_prefill_beside_decoding_rows(verifier, tok, budget):
    drafter = tiny_llama(layers=1, seed=1)
    spec = SpecConfig(budget=48, gamma=3, prefill_chunk=64, adaptive=False)
    engine = BatchEngine(verifier, drafter, tok, spec, BatchOptions(max_num_seqs=8, max_num_batched_tokens=budget))
    spec_row = engine.submit(new_row(engine, RowRequest(random_prompt(0, 40), greedy(60))))   # 1 + γ = 4 tokens
    plain_row = engine.submit(new_row(engine, RowRequest(random_prompt(1, 30), greedy(60), speculative=False)))
    while spec_row.phase != "decode" or plain_row.phase != "decode":
        engine.step()
    long = engine.submit(new_row(engine, RowRequest(random_prompt(2, 300), greedy(6), speculative=False)))
    pieces, short = [], None
    while long.phase in ("waiting", "prefill"):
        before = engine.stats()["prefill_tokens"]
        engine.step()
        pieces.append(engine.stats()["prefill_tokens"] - before)
        if len(pieces) == 2:           # a short prompt arrives during the long prefill
            short = engine.submit(new_row(engine, RowRequest(random_prompt(3, 10), greedy(5), speculative=False)))
            engine.step()              # shortest remaining prefill first: its first token this step
            assert short.checker.num_tokens >= 1
    if budget is None:
        assert pieces[:2] == [64, 64]                    # a whole prefill_chunk every step
    else:
        assert max(pieces) <= budget - 5 and pieces[0] == budget - 5    # 24 - (4 + 1) decoding tokens
        assert len(pieces) >= 300 // 19
    while engine.has_work:
        engine.step()
    for row, p, n in ((spec_row, random_prompt(0, 40), 60), (plain_row, random_prompt(1, 30), 60),
                      (long, random_prompt(2, 300), 6), (short, random_prompt(3, 10), 5)):
        assert row.checker.token_ids == _solo(verifier, tok, p, greedy(n)).token_ids
    # nothing decoding: the first prefill of an idle engine is a whole chunk whatever the budget
    first = engine.submit(new_row(engine, RowRequest(random_prompt(4, 200), greedy(2), speculative=False)))
    before = engine.stats()["prefill_tokens"]
    engine.step()
    assert engine.stats()["prefill_tokens"] - before == 64 and first.phase == "prefill"


def test_whole_chunks_while_prefilling_rows_are_as_many_as_decoding_ones(verifier, tok):
    spec = SpecConfig(budget=None, prefill_chunk=64)
    engine = BatchEngine(verifier, None, tok, spec, BatchOptions(max_num_seqs=8, max_num_batched_tokens=16))
    first = engine.submit(new_row(engine, RowRequest(random_prompt(20, 30), greedy(40))))
    while first.phase != "decode":
        engine.step()
    burst = [engine.submit(new_row(engine, RowRequest(random_prompt(21 + i, 150), greedy(30)))) for i in range(2)]
    before = engine.stats()["prefill_tokens"]
    engine.step()                      # 2 prefilling >= 1 decoding: the queue is the bottleneck
    assert engine.stats()["prefill_tokens"] - before == 64
    while any(r.phase in ("waiting", "prefill") for r in burst):
        engine.step()
    late = engine.submit(new_row(engine, RowRequest(random_prompt(24, 150), greedy(4))))
    before = engine.stats()["prefill_tokens"]
    engine.step()                      # 1 prefilling < 3 decoding: the streams' pace is protected
    assert engine.stats()["prefill_tokens"] - before == 16 - 3
    while engine.has_work:
        engine.step()
    for r, seed in zip([first] + burst + [late], [20, 21, 22, 24]):
        n = len(r.prompt)
        want = _solo(verifier, tok, random_prompt(seed, n), greedy(r.req.sampling.max_new_tokens))
        assert r.checker.token_ids == want.token_ids


def test_token_budget_floor_never_starves_the_queue(verifier, tok):
    spec = SpecConfig(budget=None, prefill_chunk=64)
    engine = BatchEngine(verifier, None, tok, spec, BatchOptions(max_num_seqs=16, max_num_batched_tokens=8))
    rows = [engine.submit(new_row(engine, RowRequest(random_prompt(10 + i, 6), greedy(40)))) for i in range(12)]
    while any(r.phase in ("waiting", "prefill") for r in rows):
        engine.step()
    late = engine.submit(new_row(engine, RowRequest(random_prompt(30, 20), greedy(3))))
    before = engine.stats()["prefill_tokens"]
    engine.step()                      # 12 decoding tokens > the budget of 8: prefill still gets 8 // 4
    assert engine.stats()["prefill_tokens"] - before == 2
    while engine.has_work:
        engine.step()
    assert late.checker.token_ids == _solo(verifier, tok, random_prompt(30, 20), greedy(3)).token_ids


def test_cache_reshape_spreads_over_steps_and_keeps_every_row():
    model = tiny_llama(layers=2, seed=0)
    prompts = [random_prompt(s, n) for s, n in ((0, 30), (1, 17))]
    cache = RaggedKVCache(2)
    with torch.inference_mode():
        for s, p in enumerate(prompts):
            pre = kvcache.prefill(model, torch.tensor([p]))
            cache.install(s, [(layer.keys, layer.values) for layer in pre.cache.layers])
        shapes = lambda: [tuple(k.shape[i] for i in (0, 2)) for k in cache.k]  # noqa: E731
        old = shapes()
        cache.fit(3, 200)                                   # a long row was admitted into slot 2
        assert shapes() == old and cache.excess_bytes() == 0   # nothing reallocated at admission
        assert cache.settle(1) == 1 and shapes() == [(3, 200), old[1]]   # one layer per step
        # a forward with layers of different shapes: every row still reads its own entries
        out = ragged_forward(model, cache, {0: [5], 1: [9, 10]}, {0: 30, 1: 17}, {0: 1, 1: 2})
        for s, f in ((0, [5]), (1, [9, 10])):
            want = model(torch.tensor([prompts[s] + f])).logits[0, -len(f):]
            torch.testing.assert_close(out[s], want, atol=2e-5, rtol=0)
        assert cache.settle(1) == 1 and shapes() == [(3, 200), (3, 200)] and cache.settle(1 << 30) == 0
        cache.free(1)
        cache.fit(1, 40)                                    # rows left: the storage shrinks lazily
        assert cache.excess_bytes() > 0 and shapes() == [(3, 200), (3, 200)]
        assert cache.settle(1 << 30) == 2 and cache.excess_bytes() == 0 and shapes() == [(1, 40), (1, 40)]
        out = ragged_forward(model, cache, {0: [7]}, {0: 31}, {0: 1})
        torch.testing.assert_close(out[0][0], model(torch.tensor([prompts[0] + [5, 7]])).logits[0, -1],
                                   atol=2e-5, rtol=0)
        with pytest.raises(ValueError, match="would cut live entries"):
            cache.fit(1, 10)
