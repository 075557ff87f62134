"""The batched engine (bd_ray/speculative/batch.py) on tiny random-weight Llamas, fp32.

Every request of a batch must decode exactly as it would alone (cases 4 and 12), whatever its
batch mates: prompt lengths, γ, budgets, policies, speculation on/off, rows joining and leaving,
cancellations; cases 1-3, 9, 13, 14 and 15 per row; admission by rows and bytes; chunked prefill
interleaved with decoding; the batch speculation policy and the reported decoding mode.
"""

from __future__ import annotations

import pytest
import torch

import bd_ray.attention  # noqa: F401  (registers bd_ray_sparse)
from bd_ray.testing.tiny import greedy, random_prompt, tiny_llama
from bd_ray import kvcache
from bd_ray.config import SamplingConfig, SparsePolicyConfig, SpecConfig
from bd_ray.config.decoding import ElasticBudgetConfig
from bd_ray.speculative.batch import BatchEngine, BatchOptions, new_row
from bd_ray.speculative.engine import ARGenerator, RowRequest, SpeculativeGenerator
from bd_ray.speculative.ragged_cache import RaggedKVCache, ragged_forward

STREAMING = SparsePolicyConfig(name="streaming", sink=4)
SNAPKV = SparsePolicyConfig(name="snapkv", sink=4, window=8, pool_kernel=3)


@pytest.fixture(scope="module")
def drafter():
    return tiny_llama(layers=1, seed=1)


def _solo(verifier, tok, prompt, sampling):
    return ARGenerator(verifier, tok).generate(prompt, sampling)


# ---- the ragged forward ----------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["bd_ray_sparse", "sdpa", "eager"])
def test_ragged_forward_equals_each_row_alone(attn):
    model = tiny_llama(layers=2, seed=0)
    model.set_attn_implementation(attn)
    prompts = [random_prompt(s, n) for s, n in ((0, 30), (1, 17), (2, 45))]
    cache = RaggedKVCache(2)
    with torch.inference_mode():
        for s, p in enumerate(prompts):
            pre = kvcache.prefill(model, torch.tensor([p]))
            cache.install(s, [(layer.keys, layer.values) for layer in pre.cache.layers])
        feeds = {0: [5, 6, 7], 1: [9], 2: [11, 12]}
        out = ragged_forward(model, cache, feeds, {s: len(prompts[s]) for s in feeds}, {0: 3, 1: 1, 2: 2})
        for s, f in feeds.items():
            want = model(torch.tensor([prompts[s] + f])).logits[0, -len(out[s]):]
            torch.testing.assert_close(out[s], want, atol=2e-5, rtol=0)
        # a subset of the slots (slot 1 takes no part; its entries beyond its length are never read)
        out = ragged_forward(model, cache, {0: [1], 2: [2, 3]}, {0: 33, 2: 47}, {0: 1, 2: 1})
        torch.testing.assert_close(out[0][0], model(torch.tensor([prompts[0] + [5, 6, 7, 1]])).logits[0, -1],
                                   atol=2e-5, rtol=0)
    assert cache.lens == [34, 18, 49]


# ---- cases 4 and 12: every row equals its solo greedy decoding -------------------------------
def test_mixed_batch_greedy_equals_solo(verifier, drafter, tok):
    sd = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(budget=48, gamma=4, adaptive=False),
                              options=BatchOptions(max_num_seqs=4))
    specs = [dict(prompt=random_prompt(0, 150), gamma=1), dict(prompt=random_prompt(1, 30), gamma=6, budget=None),
             dict(prompt=random_prompt(2, 90), gamma=3, policy=STREAMING),
             dict(prompt=random_prompt(3, 120), gamma=8, budget=64, policy=SNAPKV),
             dict(prompt=random_prompt(4, 60), speculative=False),
             dict(prompt=random_prompt(5, 20), gamma=2, budget=None),
             dict(prompt=random_prompt(6, 200), gamma=5, budget=40, adaptive=True),
             dict(prompt=random_prompt(7, 75), gamma=4)]
    lengths = [24, 9, 31, 17, 12, 28, 20, 5]
    reqs = [RowRequest(sampling=greedy(n), **s) for s, n in zip(specs, lengths)]
    results = sd.generate_many(reqs)
    for req, res in zip(reqs, results):
        assert res.token_ids == _solo(verifier, tok, req.prompt, req.sampling).token_ids
        assert len(res.token_ids) == req.sampling.max_new_tokens and res.finish_reason == "length"
    assert results[4].mode == "plain" and "speculative=False" in results[4].mode_reason
    assert not results[4].speculative and results[0].speculative
    assert results[0].mode == "mixed" and results[0].metrics.cycles > 0   # the last token is a plain step
    stats = sd.engine.stats()
    assert stats["max_rows"] == 4 and stats["rows_per_step"] > 1           # rows joined and left
    assert stats["live_rows"] == 0 and stats["waiting"] == 0 and stats["cache_bytes"] == 0


def test_case12_repetitive_and_prose_batch_isolation(verifier, tok):
    # the verifier's own first layer drafts: long accepted runs on repetition, short on prose
    from bd_ray.models import init_drafter_from_verifier

    drafter = init_drafter_from_verifier(verifier, 1)
    rep = tok("1 2 3 " * 40)["input_ids"]
    prose = tok("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                "must be in want of a wife.")["input_ids"]
    prompts = [rep[: 60 + 7 * i] for i in range(8)] + [prose[: 20 + 2 * i] for i in range(8)]
    sd = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(budget=None, gamma=8, adaptive=False),
                              options=BatchOptions(max_num_seqs=16))
    results = sd.generate_many([RowRequest(p, greedy(64), gamma=8 if i < 8 else 2) for i, p in enumerate(prompts)])
    for p, res in zip(prompts, results):
        assert res.token_ids == _solo(verifier, tok, p, greedy(64)).token_ids
    assert sd.engine.stats()["max_rows"] == 16


# ---- sampling ----------------------------------------------------------------------------------
def test_seeded_sampling_same_alone_and_batched_unseeded_rows_differ(verifier, drafter, tok):
    sd = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(budget=64, gamma=4, adaptive=False))
    seeded = SamplingConfig(temperature=0.9, top_p=0.95, max_new_tokens=25, seed=7, eos_token_ids=[])
    prompt = random_prompt(9, 80)
    alone = sd.generate(prompt, seeded)
    free = SamplingConfig(temperature=1.0, max_new_tokens=30, eos_token_ids=[])
    batch = sd.generate_many([RowRequest(random_prompt(10, 50), greedy(20), gamma=2),
                              RowRequest(prompt, seeded),
                              RowRequest(random_prompt(11, 40), free), RowRequest(random_prompt(11, 40), free)])
    assert batch[1].token_ids == alone.token_ids and batch[1].text == alone.text
    assert batch[2].token_ids != batch[3].token_ids        # no shared random stream


# ---- cases 1-3 and 9 per row in a batch --------------------------------------------------------
def test_cases_1_2_3_9_per_row_in_a_batch(verifier, tok):
    sd = SpeculativeGenerator(verifier, verifier, tok, SpecConfig(budget=None, gamma=4, adaptive=False))
    p_eos, p_stop, p_len = random_prompt(11, 30), random_prompt(5, 60), random_prompt(3, 20)
    free = _solo(verifier, tok, p_eos, greedy(12)).token_ids
    eos_cfg = SamplingConfig(temperature=0.0, max_new_tokens=12, eos_token_ids=[5_000, free[2]])
    text = _solo(verifier, tok, p_stop, greedy(30)).text
    stop_cfgs = [greedy(30, stop=[text[5:8]]), greedy(30, stop=[text[10:14]])]
    reqs = [RowRequest(p_eos, eos_cfg), *(RowRequest(p_stop, c, gamma=g) for c in stop_cfgs for g in (3, 6)),
            *(RowRequest(p_len, greedy(n), gamma=8) for n in (1, 2, 5, 9, 10))]
    results = sd.generate_many(reqs)
    assert results[0].token_ids == free[: free.index(free[2]) + 1] and results[0].finish_reason == "stop"
    for req, res in zip(reqs[1:5], results[1:5]):
        want = _solo(verifier, tok, req.prompt, req.sampling)
        assert res.token_ids == want.token_ids and res.text == want.text and res.finish_reason == "stop"
    for n, res in zip((1, 2, 5, 9, 10), results[5:]):
        assert len(res.token_ids) == n and res.finish_reason == "length"
        if n == 10:   # case 9 with a perfect drafter: every draft accepted, τ = γ + 1
            assert res.metrics.acceptance_rate == 1.0 and res.metrics.cycles >= 1
    stats = sd.engine.stats()
    assert stats["tokens_per_step"] > 1 and {"4", "8"} & set(stats["gamma_chosen"])


# ---- cases 13 and 14: token accounting and logprobs ----------------------------------------------
def test_case13_token_accounting_and_case14_logprobs(verifier, tok):
    rep = tok("1 2 3 " * 30)["input_ids"]
    sd = SpeculativeGenerator(verifier, verifier, tok, SpecConfig(budget=None, gamma=8, adaptive=False))
    ns = (1, 3, 7, 8, 9, 64)
    results = sd.generate_many([RowRequest(rep, greedy(n), logprobs=3) for n in ns])
    for n, res in zip(ns, results):
        assert res.finish_reason == "length" and len(res.token_ids) == n == len(res.logprobs)
        assert [e["token"] for e in res.logprobs] == res.token_ids
    # logprobs equal with speculation on and off; never 0.0 for a random model
    plain = ARGenerator(verifier, tok).generate(rep, greedy(64), logprobs=3)
    for a, b in zip(results[-1].logprobs, plain.logprobs):
        assert a["token"] == b["token"] and abs(a["logprob"] - b["logprob"]) < 1e-4 and a["logprob"] != 0.0
        assert [t for t, _ in a["top"]] == [t for t, _ in b["top"]] and len(a["top"]) == 3
    # a stop string completing inside an accepted block: no entries for the trimmed text
    text = plain.text
    res = sd.generate(rep, greedy(64, stop=[text[9:12]]), logprobs=2)
    assert res.finish_reason == "stop" and len(res.logprobs) == len(res.token_ids)
    assert tok.decode(res.token_ids) == res.text


# ---- admission, joining/leaving, cancellation, slot reuse (case 15) ------------------------------
def test_admission_by_rows_and_bytes_all_complete(verifier, drafter, tok):
    spec = SpecConfig(budget=48, gamma=3, adaptive=False)
    probe = BatchEngine(verifier, drafter, tok, spec)
    row = new_row(probe, RowRequest(random_prompt(0, 100), greedy(16)))
    two_rows = probe.memory.projected_bytes([row, row])
    engine = BatchEngine(verifier, drafter, tok, spec, BatchOptions(max_num_seqs=3, kv_cache_bytes=two_rows))
    rows = [engine.submit(new_row(engine, RowRequest(random_prompt(i, 100), greedy(16)))) for i in range(6)]
    peak_rows = peak_bytes = 0
    order = []
    while engine.has_work:
        engine.step()
        peak_rows = max(peak_rows, len(engine.rows))
        peak_bytes = max(peak_bytes, engine.vcache.nbytes + engine.dcache.nbytes)
        order += [r for r in engine.rows.values() if r not in order]
    assert peak_rows == 2 and peak_bytes <= two_rows
    assert 0 < engine.stats()["peak_cache_bytes"] <= two_rows     # prefill caches included
    assert order == rows                                           # the queue is FIFO
    for i, r in enumerate(rows):
        assert r.phase == "done"
        assert r.checker.token_ids == _solo(verifier, tok, random_prompt(i, 100), greedy(16)).token_ids
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        engine.submit(new_row(engine, RowRequest(random_prompt(0, 3000), greedy(16))))


def _run_admission(engine, prompts, sampling):
    rows = [engine.submit(new_row(engine, RowRequest(p, sampling))) for p in prompts]
    peak_rows = 0
    while engine.has_work:
        engine.step()
        peak_rows = max(peak_rows, len(engine.rows))
    return rows, peak_rows


def test_elastic_budget_admits_more_rows_and_stays_lossless(verifier, tok):
    # a drafter heavier than the verifier: its full-budget cache is most of a row's memory
    heavy = tiny_llama(layers=4, seed=2)
    spec = SpecConfig(budget="full", gamma=3, adaptive=False)
    prompts = [random_prompt(20 + i, 240) for i in range(6)]
    probe = BatchEngine(verifier, heavy, tok, spec)
    row = new_row(probe, RowRequest(prompts[0], greedy(8)))
    v, d, transient = probe.memory.row_entries(row)
    limit = 2 * (v * probe.v_bpt + d * probe.d_bpt) + transient     # 2 decoding rows + 1 prefill
    peaks, budgets = {}, {}
    for on in (False, True):
        opts = BatchOptions(max_num_seqs=8, kv_cache_bytes=limit,
                            elastic_budget=ElasticBudgetConfig(enabled=on, floor=48))
        engine = BatchEngine(verifier, heavy, tok, spec, opts)
        rows, peaks[on] = _run_admission(engine, prompts, greedy(8))
        for p, r in zip(prompts, rows):
            assert r.phase == "done" and r.checker.token_ids == _solo(verifier, tok, p, greedy(8)).token_ids
        results = [r.outbox[-1].result for r in rows]
        budgets[on] = [res.budget for res in results]
        assert engine.stats()["elastic_lowered"] == sum(b is not None for b in budgets[on])
        assert engine.stats()["peak_cache_bytes"] <= limit
    assert peaks[False] == 2 and budgets[False] == [None] * 6             # off: unchanged behaviour
    lowered = [b for b in budgets[True] if b is not None]
    assert peaks[True] > peaks[False] and lowered and min(lowered) >= 48  # on: more rows at once, >= floor


def test_peak_cache_bytes_within_budget_as_rows_of_any_size_come_and_go(verifier, drafter, tok):
    # a long row leaving must shrink the padded caches, or short rows admitted later would be
    # padded to its length beyond the budget; slots freed out of order likewise
    spec = SpecConfig(budget=48, gamma=3, adaptive=False, prefill_chunk=64)
    probe = BatchEngine(verifier, drafter, tok, spec)
    long = new_row(probe, RowRequest(random_prompt(0, 400), greedy(4)))
    limit = probe.memory.projected_bytes([long]) + probe.memory.projected_bytes([long]) // 3
    engine = BatchEngine(verifier, drafter, tok, spec, BatchOptions(max_num_seqs=6, kv_cache_bytes=limit))
    specs = [(400, 4), (60, 30), (80, 6), (50, 24), (300, 3), (40, 12), (70, 20), (90, 5)]
    prompts = [random_prompt(30 + i, n) for i, (n, _) in enumerate(specs)]
    rows = [engine.submit(new_row(engine, RowRequest(p, greedy(m)))) for p, (_, m) in zip(prompts, specs)]
    while engine.has_work:
        engine.step()
        assert engine.cache_bytes() <= limit
    for p, (_, m), r in zip(prompts, specs, rows):
        assert r.checker.token_ids == _solo(verifier, tok, p, greedy(m)).token_ids
    assert engine.stats()["peak_cache_bytes"] <= limit and engine.stats()["cache_bytes"] == 0


def test_cancel_then_same_prompt_equals_fresh_case15(verifier, drafter, tok):
    sd = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(budget=48, gamma=4, adaptive=False))
    prompt = random_prompt(12, 300)
    other = sd.stream(random_prompt(13, 50), greedy(40))
    next(other)                                       # a batch mate that stays
    stream = sd.stream(prompt, greedy(30))
    for _ in range(3):
        next(stream)
    stream.close()                                    # client gone: the row and its entries are freed
    assert len(sd.engine.rows) == 1
    again = sd.generate(prompt, greedy(30))
    fresh = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(budget=48, gamma=4, adaptive=False)).generate(prompt, greedy(30))
    assert again.token_ids == fresh.token_ids
    rest = list(other)
    assert rest[-1].result.token_ids == _solo(verifier, tok, random_prompt(13, 50), greedy(40)).token_ids
    assert sd.engine.stats()["live_rows"] == 0 and sd.engine.stats()["cache_bytes"] == 0


def test_chunked_prefill_interleaves_with_decoding(verifier, drafter, tok):
    spec = SpecConfig(budget=48, gamma=3, prefill_chunk=64, adaptive=False)
    engine = BatchEngine(verifier, drafter, tok, spec)
    short = engine.submit(new_row(engine, RowRequest(random_prompt(0, 40), greedy(60))))
    engine.step()
    engine.step()
    long = engine.submit(new_row(engine, RowRequest(random_prompt(1, 700), greedy(8))))
    emitted_during_prefill = 0
    while long.phase in ("waiting", "prefill"):
        before = short.checker.num_tokens
        engine.step()
        emitted_during_prefill += short.checker.num_tokens > before
    assert emitted_during_prefill >= 8                 # 700 tokens / 64 per step: the stream kept going
    while engine.has_work:
        engine.step()
    assert long.checker.token_ids == _solo(verifier, tok, random_prompt(1, 700), greedy(8)).token_ids
    assert short.checker.token_ids == _solo(verifier, tok, random_prompt(0, 40), greedy(60)).token_ids


# ---- the batch speculation policy ----------------------------------------------------------------
def test_batch_policy_turns_speculation_off_and_says_why(verifier, drafter, tok):
    sd = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(budget=48, gamma=4, adaptive=True),
                              options=BatchOptions(max_num_seqs=4, disable_above=2))
    reqs = [RowRequest(random_prompt(i, 60), greedy(12)) for i in range(4)]
    results = sd.generate_many(reqs)
    for req, res in zip(reqs, results):
        assert res.token_ids == _solo(verifier, tok, req.prompt, req.sampling).token_ids
        assert res.metrics.cycles == 0 and res.mode == "plain" and "disable_above" in res.mode_reason
    assert sd.engine.stats()["gamma_chosen"] == {"0": sd.engine.stats()["steps"]}
    # rows 3 and 4 joined more than disable_above rows: admitted plainly, no drafter prefill
    skipped = [res for res in results if "admitted plainly" in res.mode_reason]
    assert len(skipped) == 2 and all(res.timings.drafter_prefill_s == 0.0 for res in skipped)


# ---- the batch policy's whole-step cost model (synthetic step times) --------------------------------
class _Checker:
    def remaining(self) -> int:
        return 100


class _Controller:
    def __init__(self, p: float, gamma: int = 4) -> None:
        self.acceptance, self._gamma = p, gamma
        self.stats = type("S", (), {"stopped_reason": None})()

    def next_gamma(self, remaining: int) -> int:
        return self._gamma


class _Row:
    """What BatchSpecPolicy.choose reads of an adaptive row."""

    def __init__(self, p: float, gamma: int = 4) -> None:
        self.checker, self.controller, self.gamma = _Checker(), _Controller(p, gamma), gamma
        self.spec, self.fallback, self.plain_reason = True, None, None
        self.drafter_pending = False


def test_batch_policy_whole_step_costs_off_at_8_rows_on_when_it_pays():
    from bd_ray.speculative.batch_policy import BatchSpecPolicy

    policy = BatchSpecPolicy(max_gamma=4)
    rows8 = [_Row(0.6) for _ in range(8)]
    policy.observe([0] * 8, 0.030, 8)                      # T0(8) = 30 ms
    policy.observe([2] * 8, 0.030 + 2 * 0.020, 16)         # c(8) = 20 ms per unit γ
    gammas = policy.choose(rows8)
    assert set(gammas.values()) == {0}
    reason = rows8[0].plain_reason
    assert "cannot pay at 8 rows" in reason and "measured" in reason
    assert policy.costs(8) == pytest.approx((0.030, 0.020, True))
    # a row joining 5-8 rows is admitted plainly (reason: the batch policy and the row count)
    joined = policy.admit_plainly(6)
    assert joined.startswith("batch policy") and "joining 6 rows" in joined
    assert policy.admit_plainly(4) is None and policy.admit_plainly(1) is None
    # at 2 rows, cheap measured steps: speculation pays and stays on
    rows2 = [_Row(0.8), _Row(0.8)]
    policy.observe([0, 0], 0.010, 2)
    policy.observe([4, 4], 0.010 + 4 * 0.001, 10)
    assert set(policy.choose(rows2).values()) == {4} and policy.admit_plainly(2) is None
    # one row alone keeps its own controller (it speculates where that pays), never admitted plainly
    alone = _Row(0.8, gamma=3)
    assert policy.choose([alone]) == {alone: 3}
    table = policy.as_dict()["policy"]
    assert table["5-8"]["judgement"] == "off" and table["5-8"]["drafter_prefills_skipped"] == 1
    assert table["5-8"]["t0_ms"] == pytest.approx(30.0) and table["5-8"]["c_ms"] == pytest.approx(20.0)
    assert table["2"]["judgement"] == "on" and table["2"]["steps"] == {"0": 1, "4": 1}


def test_batch_policy_probes_keep_c_measured_and_skip_catch_up_steps():
    from bd_ray.speculative.batch_policy import BatchSpecPolicy

    policy = BatchSpecPolicy(max_gamma=4, probe_every=3, probe_steps=2)
    rows = [_Row(0.5) for _ in range(8)]
    policy.observe([0] * 8, 0.030, 8)
    policy.observe([1] * 8, 0.050, 12)                     # c = 20 ms
    chosen = []
    for _ in range(11):
        g = policy.choose(rows)[rows[0]]
        chosen.append(g)
        if g == 0:
            policy.observe([0] * 8, 0.030, 8)
        else:
            catch_up = chosen[-2:] != [1, 1]               # the probe's first step catches the drafter up
            policy.observe([1] * 8, 0.5 if catch_up else 0.035, 9, catch_up=catch_up)
    # every probe that leaves the bucket off doubles its interval (3, then 6 plain decisions)
    assert chosen == [0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1]
    assert policy.bucket(8).probe_every == 12
    # catch-up steps (0.5 s) left c alone; the clean probe steps pulled it towards 5 ms
    c = policy.costs(8)[1]
    assert 0.005 < c < 0.020 and c == pytest.approx(0.020 * 0.7 ** 2 + 0.005 * (1 - 0.7 ** 2))
    # a preempted step (10 s) moves T0 by a clipped sample only
    policy.observe([0] * 8, 10.0, 8)
    assert policy.costs(8)[0] == pytest.approx(0.7 * 0.030 + 0.3 * policy.SPIKE * 0.030)
    # with c down to ~12 ms speculation pays (1.1x expected): "on", and the probe interval resets
    assert policy.choose(rows)[rows[0]] > 0 and policy.bucket(8).probe_every == 0


def test_batch_policy_prior_scales_with_the_batch_and_never_admits_plainly():
    from bd_ray.speculative.batch_policy import BatchSpecPolicy

    policy = BatchSpecPolicy(max_gamma=4, prior_draft_ratio=0.1, prior_slope_ratio=0.1, stale_after=2)
    for b, t0 in ((1, 0.010), (2, 0.012), (8, 0.020)):
        policy.observe([0] * b, t0, b)
    assert policy.prior_c(2) == pytest.approx(0.1 * 0.012 + 0.1 * 0.010 * 2)
    assert policy.prior_c(8) == pytest.approx(0.1 * 0.020 + 0.1 * 0.010 * 8)
    assert policy.prior_c(8) / 0.020 > policy.prior_c(2) / 0.012          # the per-γ share grows with b
    rows = [_Row(0.5) for _ in range(8)]
    assert set(policy.choose(rows).values()) == {0} and "(prior)" in rows[0].plain_reason
    assert policy.admit_plainly(8) is None                                 # off from the prior only
    policy.observe([1] * 8, 0.040, 12)                                     # c measured: 20 ms
    policy.choose(rows)
    assert policy.admit_plainly(8) is not None
    for _ in range(3):                                                     # no judgement at 8 rows since
        policy.observe([0, 0], 0.012, 2)
    assert policy.admit_plainly(8) is None                                 # stale: rows get their drafter
    # an unmeasured larger bucket never assumes a c below one measured at fewer rows
    policy.observe([0] * 16, 0.030, 16)
    assert policy.prior_c(16) == pytest.approx(max(0.1 * 0.030 + 0.1 * 0.010 * 16, 0.020))
    policy.observe([1] * 8, 0.090, 12)                                     # c(8) rises above that prior
    c8 = policy.costs(8)[1]
    assert c8 > 0.1 * 0.030 + 0.1 * 0.010 * 16 and policy.prior_c(16) == pytest.approx(c8)


def test_engine_admits_a_row_plainly_when_the_policy_is_off_measured(verifier, drafter, tok):
    # min_gain 10 > γ + 1: speculation can never pay, whatever the step times; the policy measures
    # T0 and (by its probes) c at 3 rows, then the row joining them skips its drafter prefill. The
    # early rows bring both prefills (installed with the first token): deferred drafter prefills
    # would wait for an "on" judgement that never comes, and rows without a drafter cannot probe.
    spec = SpecConfig(budget=48, gamma=4, adaptive=True, adaptive_min_gain=10.0)
    engine = BatchEngine(verifier, drafter, tok, spec, BatchOptions(max_num_seqs=8))
    both = SpeculativeGenerator(verifier, drafter, tok, spec)
    early = [engine.submit(new_row(engine, RowRequest(p, greedy(60), prefilled=both.prefill(p))))
             for p in (random_prompt(40 + i, 40) for i in range(3))]
    for _ in range(40):
        engine.step()
        bk = engine.policy.stats.buckets.get(4)
        if bk is not None and bk.on is False and bk.measured:
            break
    assert bk.on is False and bk.measured and all(r.phase == "decode" for r in early)
    late = engine.submit(new_row(engine, RowRequest(random_prompt(50, 50), greedy(12))))
    fixed = engine.submit(new_row(engine, RowRequest(random_prompt(51, 30), greedy(12), gamma=3, adaptive=False)))
    engine.step()
    assert not late.spec and late.controller is None and not late.d_pieces
    assert fixed.spec and fixed.controller is None                         # an explicit γ keeps its drafter
    while engine.has_work:
        if late.slot is not None and late.phase != "done":
            assert engine.dcache.lens[late.slot] == 0                      # its drafter cache slot is unused
        engine.step()
    res = late.outbox[-1].result
    assert res.token_ids == _solo(verifier, tok, late.prompt, greedy(12)).token_ids
    assert res.mode == "plain" and res.mode_reason.startswith("batch policy") and "4 rows" in res.mode_reason
    assert not res.speculative and res.metrics.drafted == 0 and res.timings.drafter_prefill_s == 0.0
    assert fixed.outbox[-1].result.metrics.cycles > 0
    for r in early + [fixed]:
        assert r.checker.token_ids == _solo(verifier, tok, r.prompt, r.req.sampling).token_ids
    stats = engine.stats()
    assert stats["policy"]["3-4"]["drafter_prefills_skipped"] == 1 and stats["policy"]["3-4"]["c_source"] == "measured"
    assert stats["decode_s"] > 0 and stats["prefill_s"] > 0
    assert stats["decode_tokens_per_s"] == pytest.approx(stats["decode_tokens"] / stats["decode_s"])
    # every emitted token but each request's first (from its prefill) came from a decode step
    assert stats["decode_tokens"] == sum(len(r.checker.token_ids) - 1 for r in early + [late, fixed])
    assert sum(stats["gamma_chosen"].values()) == stats["steps"] == sum(
        sum(b["steps"].values()) for b in stats["policy"].values())


# ---- the deferred drafter prefill of adaptive rows ------------------------------------------------
def _step_all(engine, rows, each=None):
    while engine.has_work:
        engine.step()
        if each is not None:
            each()
    return [r.outbox[-1].result for r in rows]


def test_burst_into_a_batch_judged_off_spends_no_drafter_prefill(verifier, drafter, tok):
    spec = SpecConfig(budget=48, gamma=4, adaptive=True)
    engine = BatchEngine(verifier, drafter, tok, spec, BatchOptions(max_num_seqs=4, disable_above=2))
    rows = [engine.submit(new_row(engine, RowRequest(random_prompt(60 + i, 50 + 10 * i), greedy(10))))
            for i in range(4)]

    def no_drafter():
        assert not any(engine.dcache.lens) and engine.dcache.nbytes == 0
        assert all(r.d_tmp is None for r in rows)

    results = _step_all(engine, rows, no_drafter)
    for r, res in zip(rows, results):
        assert res.token_ids == _solo(verifier, tok, r.prompt, greedy(10)).token_ids
        assert res.timings.drafter_prefill_s == 0.0 and res.metrics.drafted == 0 and not res.speculative
        assert res.mode == "plain" and res.mode_reason.startswith("batch policy") and "disable_above" in res.mode_reason
    # rows 1-2 were deferred (held back at 4 rows until they finished), rows 3-4 admitted plainly
    assert sum("deferred at 4 rows" in res.mode_reason for res in results) == 2
    assert engine.stats()["policy"]["3-4"]["drafter_prefills_skipped"] == 4
    assert engine.stats()["live_rows"] == 0 and engine.stats()["cache_bytes"] == 0


def test_adaptive_row_alone_gets_its_drafter_after_its_first_token_then_speculates(verifier, tok):
    # the verifier drafts for itself: its prompt check agrees everywhere, so the row speculates
    spec = SpecConfig(budget=None, gamma=4, adaptive=True, adaptive_cost_prior="constant", prefill_chunk=64)
    probe = BatchEngine(verifier, verifier, tok, spec)
    prompt = random_prompt(70, 150)
    limit = probe.memory.projected_bytes([new_row(probe, RowRequest(prompt, greedy(30)))])
    engine = BatchEngine(verifier, verifier, tok, spec, BatchOptions(kv_cache_bytes=limit))
    row = engine.submit(new_row(engine, RowRequest(prompt, greedy(30))))
    while not row.checker.num_tokens:
        engine.step()
    assert row.drafter_pending and row.d_pieces and engine.dcache.lens[row.slot] == 0   # first token first
    plain_tokens = 0
    while row.drafter_pending:
        plain_tokens = row.checker.num_tokens
        engine.step()
        assert engine.cache_bytes() <= limit                 # the pending drafter cache is budgeted
    assert plain_tokens >= 2 and row.d_ready and row.d_tmp is None and row.v_tail is None
    res = _step_all(engine, [row], lambda: None)[0]
    assert res.token_ids == _solo(verifier, tok, prompt, greedy(30)).token_ids
    assert res.metrics.drafted > 0 and res.speculative and res.mode == "mixed"
    assert res.adaptive["prompt_agreement"] == 1.0 and res.timings.drafter_prefill_s > 0
    assert engine.stats()["peak_cache_bytes"] <= limit


def test_deferred_drafter_prefill_completes_when_the_batch_shrinks(verifier, tok):
    spec = SpecConfig(budget=None, gamma=4, adaptive=True, adaptive_cost_prior="constant")
    engine = BatchEngine(verifier, verifier, tok, spec, BatchOptions(max_num_seqs=4, disable_above=2))
    long, *short = [engine.submit(new_row(engine, RowRequest(random_prompt(80 + i, 40 + 5 * i), greedy(n))))
                    for i, n in enumerate((40, 6, 6))]
    while any(r.phase != "done" for r in short):
        engine.step()
        assert long.drafter_pending                      # 3 rows > disable_above: held back
    assert long.plain_reason.startswith("batch policy: drafter prefill deferred at 3 rows")
    caught_up = long.checker.num_tokens
    res = _step_all(engine, [long], lambda: None)[0]
    assert long.d_ready and caught_up >= 6
    assert res.token_ids == _solo(verifier, tok, long.prompt, greedy(40)).token_ids
    assert res.metrics.drafted > 0 and res.mode == "mixed" and res.speculative
    for r in short:
        out = r.outbox[-1].result
        assert out.token_ids == _solo(verifier, tok, r.prompt, greedy(6)).token_ids and out.mode == "plain"
    assert engine.stats()["cache_bytes"] == 0


def test_cancel_during_a_pending_drafter_prefill_frees_the_row(verifier, drafter, tok):
    spec = SpecConfig(budget=48, gamma=4, adaptive=True, prefill_chunk=64)
    engine = BatchEngine(verifier, drafter, tok, spec)
    row = engine.submit(new_row(engine, RowRequest(random_prompt(90, 300), greedy(40))))
    while row.d_tmp is None or not row.drafter_pending:   # decoding, drafter prefill part-way
        engine.step()
    assert row.d_pieces and engine.cache_bytes() > engine.cache_bytes(transient=False)
    engine.cancel(row)
    assert not engine.rows and engine.cache_bytes() == 0 and row.d_tmp is None and not row.d_pieces
    assert engine.stats()["live_rows"] == 0 and engine.stats()["cache_bytes"] == 0
    again = engine.submit(new_row(engine, RowRequest(random_prompt(90, 300), greedy(40))))
    assert _step_all(engine, [again])[0].token_ids == _solo(verifier, tok, random_prompt(90, 300), greedy(40)).token_ids
