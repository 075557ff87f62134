"""Unit tests of the engine's pure parts: metrics, stopping rules, rejection sampler, filters.

Cases 2, 3 and 9 of docs/cases/spec-decoding.md are checked here at the unit level, with
the exact expected values; the engine-level versions are in test_spec_engine.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from bd_ray.testing.tiny import tiny_tokenizer
from bd_ray.config import SamplingConfig
from bd_ray.speculative.metrics import SpecMetrics
from bd_ray.speculative.rejection import verify_greedy, verify_sampling
from bd_ray.speculative.sampling import filtered_probs
from bd_ray.speculative.stopping import StopChecker


# ---- case 9: honest metrics -------------------------------------------------------------------
def test_case9_metrics_exact_values():
    m = SpecMetrics()
    for accepted in (4, 0, 2):
        m.record_cycle(4, accepted)
    assert m.acceptance_rate == pytest.approx(6 / 12)
    assert m.mean_accepted_length == pytest.approx((5 + 1 + 3) / 3)
    assert m.per_position_acceptance == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1 / 3])
    d = m.as_dict()
    assert set(d) >= {"acceptance_rate", "mean_accepted_length", "per_position_acceptance"}


def test_metrics_merge_and_short_cycles():
    a, b = SpecMetrics(), SpecMetrics()
    a.record_cycle(4, 4)
    b.record_cycle(2, 1)  # a short final cycle drafts fewer positions
    m = a.merge(b)
    assert m.drafted == 6 and m.accepted == 5 and m.cycles == 2
    assert m.per_position_acceptance == pytest.approx([1.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="num_accepted"):
        a.record_cycle(2, 3)


# ---- stopping: cases 1-3 at the unit level -----------------------------------------------------
def _piece_ids(tok, pieces):
    by_text = {tok.decode([i]): i for i in range(len(tok))}
    missing = [p for p in pieces if p not in by_text]
    assert not missing, f"test tokenizer has no single token for {missing}"
    return [by_text[p] for p in pieces]


def test_case1_eos_inside_block_unit():
    tok = tiny_tokenizer()
    a, b, c = _piece_ids(tok, [" the", " that", " for"])
    eos = tok.eos_token_id
    chk = StopChecker(tok, max_new_tokens=50, eos_token_ids=[7, eos])
    used = chk.extend([a, eos, b, c])
    assert used == 2 and chk.finish_reason == "stop"
    assert chk.token_ids == [a, eos] and chk.text == " the"
    with pytest.raises(RuntimeError):
        chk.add(b)


def test_case2a_stop_string_inside_block_before_cap():
    tok = tiny_tokenizer()
    t1, t2, t3, t4, t5, t6, t7 = _piece_ids(tok, [" in", " is", " of", " the", " for", " be", " and"])
    chk = StopChecker(tok, max_new_tokens=5, stop=[" for"])
    chk.extend([t1, t2, t3])
    chk.extend([t4, t5, t6, t7])
    assert chk.finish_reason == "stop"
    assert chk.token_ids == [t1, t2, t3, t4]
    assert chk.text == " in is of the"


def test_case2b_cap_inside_block_before_stop_string():
    tok = tiny_tokenizer()
    t1, t2, t3, t4, t5, t6, t7 = _piece_ids(tok, [" in", " is", " of", " the", " for", " be", " and"])
    chk = StopChecker(tok, max_new_tokens=5, stop=[" and"])
    chk.extend([t1, t2, t3])
    chk.extend([t4, t5, t6, t7])
    assert chk.finish_reason == "length"
    assert chk.token_ids == [t1, t2, t3, t4, t5]
    assert len(chk.token_ids) <= 5


def test_case3_stop_string_across_blocks_and_streaming_holds_back():
    tok = tiny_tokenizer()
    t1, t2, a, b = _piece_ids(tok, [" in", " is", " tru", "th"])
    chk = StopChecker(tok, max_new_tokens=50, stop=[" truth"])
    chk.extend([t1, t2, a])                 # block 1 ends with the first half of the stop string
    streamed = chk.text_delta()
    assert streamed == " in is"             # " tru" held back: it may start the stop string
    chk.extend([b])                          # block 2 starts with the second half
    assert chk.finish_reason == "stop"
    streamed += chk.text_delta()
    assert "tru" not in streamed and chk.text == " in is"
    assert chk.token_ids == [t1, t2]


def test_stop_and_cap_on_same_token_is_stop():
    tok = tiny_tokenizer()
    t1, t2 = _piece_ids(tok, [" in", " for"])
    chk = StopChecker(tok, max_new_tokens=2, stop=[" for"])
    chk.extend([t1, t2])
    assert chk.finish_reason == "stop" and chk.token_ids == [t1]


# ---- rejection sampler --------------------------------------------------------------------------
def test_verify_greedy_hand_built():
    logits = torch.full((4, 10), -1.0)
    for row, tok in enumerate([3, 5, 7, 9]):
        logits[row, tok] = 1.0
    v = verify_greedy([3, 5, 1], logits)
    assert (v.num_accepted, v.next_token) == (2, 7) and v.emitted([3, 5, 1]) == [3, 5, 7]
    v = verify_greedy([3, 5, 7], logits)
    assert (v.num_accepted, v.next_token) == (3, 9)          # bonus token
    v = verify_greedy([4, 5, 7], logits)
    assert (v.num_accepted, v.next_token) == (0, 3)          # recovered token


def test_verify_sampling_zero_p_rejects_and_equal_pq_accepts():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    q = torch.tensor([[1.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    v = verify_sampling([0], q, p, g)
    assert v.num_accepted == 0 and v.next_token == 1          # residual max(p-q,0) is all on token 1
    v = verify_sampling([1], p[:1], p, g)
    assert v.num_accepted == 1 and v.next_token in (0, 1)     # p == q: always accepted, bonus from p[1]


def test_verify_sampling_is_lossless_on_a_small_vocab():
    """Empirical distribution of the first emitted token equals p (TV bound from the sample size)."""
    torch.manual_seed(0)
    vocab, trials = 6, 20_000
    p = torch.softmax(torch.randn(2, vocab) * 2, -1)
    q = torch.softmax(torch.randn(1, vocab) * 2, -1)  # a deliberately different drafter
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(vocab)
    drafts = torch.multinomial(q[0], trials, replacement=True, generator=g).tolist()
    for d in drafts:
        v = verify_sampling([d], q, p, g)
        counts[v.emitted([d])[0]] += 1
    tv = 0.5 * (counts / trials - p[0]).abs().sum().item()
    bound = 0.5 * math.sqrt(vocab / trials) * 3   # ~3 sigma on the expected TV of an exact sampler
    assert tv < bound, (tv, bound)


# ---- filters ------------------------------------------------------------------------------------
def test_filtered_probs_top_p_and_top_k():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = filtered_probs(logits, SamplingConfig(temperature=1.0, top_p=0.8))
    assert torch.allclose(p, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)
    p = filtered_probs(logits, SamplingConfig(temperature=1.0, top_k=1))
    assert p.tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="temperature"):
        filtered_probs(logits, SamplingConfig(temperature=0.0))


# ---- incremental detokenization ------------------------------------------------------------------
def test_incremental_text_equals_a_full_decode_and_the_stream_adds_up(verifier_dir):
    """The real SmolLM2 tokenizer on real text with multi-byte characters (split across byte-level
    tokens) and on random ids, fed in random block sizes: the checker's text equals
    ``tokenizer.decode`` of its ids, the streamed deltas add up to it, and a stop string is cut at
    the same token as a full decode would cut it."""
    import random

    from bd_ray.models import load_tokenizer

    tok = load_tokenizer(str(verifier_dir))
    text = ("Naïve façades — “quoted” ünïcödé, 東京 and emoji 🎉🎉 in 1850; the end.\n" * 3)
    rng = random.Random(0)
    sequences = [tok.encode(text, add_special_tokens=False)]
    sequences += [[rng.randrange(len(tok)) for _ in range(200)] for _ in range(3)]
    for ids in sequences:
        chk = StopChecker(tok, max_new_tokens=len(ids))
        streamed, i = "", 0
        while i < len(ids):
            n = rng.randint(1, 6)
            chk.extend(ids[i: i + n])
            i += n
            streamed += chk.text_delta()
            assert tok.decode(ids[:i], skip_special_tokens=True).startswith(streamed)
        assert chk.finish_reason == "length"
        assert chk.text == tok.decode(ids, skip_special_tokens=True)
        assert streamed == chk.text
    ids = sequences[0]
    chk = StopChecker(tok, max_new_tokens=len(ids), stop=["emoji"])
    chk.extend(ids)
    cut = text.index("emoji")
    assert chk.finish_reason == "stop" and chk.text == text[:cut]
    kept = max(k for k in range(len(ids) + 1) if len(tok.decode(ids[:k])) <= cut)
    assert chk.token_ids == ids[:kept]
