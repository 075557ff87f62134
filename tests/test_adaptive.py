"""Adaptive γ (bd_ray/speculative/adaptive.py): the controller's decisions and the engine with it on.

The controller is tested on synthetic costs and acceptance (its decisions are a pure function of
what it observed); the engine tests use tiny random-weight Llamas, where a drafter that *is* the
verifier is always accepted and an unrelated one almost never is.
"""

from __future__ import annotations

import pytest
import torch

from bd_ray.testing.tiny import tiny_llama
from bd_ray.config import SamplingConfig, SpecConfig
from bd_ray import kvcache
from bd_ray.speculative.adaptive import PROMPT_PROBE_TOKENS, GammaController, expected_tokens, prompt_agreement
from bd_ray.speculative.engine import ARGenerator, SpeculativeGenerator


def test_expected_tokens_matches_the_geometric_formula():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(0.8, 0) == 1.0


def _run(ctrl: GammaController, accept_p: float, steps: int, v1=0.1, td=0.02, slope=0.02, seed=0):
    """Drive the controller with synthetic costs; per-token acceptance ``accept_p``. Returns γ list."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for _ in range(steps):
        gamma = ctrl.next_gamma(remaining=1000)
        chosen.append(gamma)
        if gamma == 0:
            ctrl.observe_plain(v1)
            continue
        accepted = 0
        while accepted < gamma and float(torch.rand((), generator=g)) < accept_p:
            accepted += 1
        ctrl.observe_cycle(gamma, accepted, draft_s=gamma * td, verify_s=v1 + gamma * slope)
    return chosen


def test_first_step_is_plain_then_warmup():
    ctrl = GammaController(max_gamma=8, warmup_cycles=2, warmup_gamma=2)
    chosen = _run(ctrl, accept_p=0.9, steps=3)
    assert chosen == [0, 2, 2]


def test_good_drafter_keeps_speculating_with_long_drafts():
    ctrl = GammaController(max_gamma=8)
    chosen = _run(ctrl, accept_p=0.95, steps=60)
    assert ctrl.speculating
    assert ctrl.stats.stopped_reason is None
    assert sum(c >= 6 for c in chosen[10:]) > 40       # long drafts once it has seen the drafter
    assert ctrl.acceptance > 0.8


def test_useless_drafter_stops_and_probes_with_backoff():
    ctrl = GammaController(max_gamma=8, probe_every=4, max_probe_every=32)
    chosen = _run(ctrl, accept_p=0.0, steps=200)
    assert not ctrl.speculating
    assert "cannot pay" in ctrl.stats.stopped_reason
    plain = chosen.count(0)
    assert plain > 180                                 # almost everything decoded plainly
    # probes are γ = 1 and get rarer: intervals 4, 8, 16, 32, 32, ...
    probe_at = [i for i, c in enumerate(chosen) if c == 1 and i > 5]
    gaps = [b - a for a, b in zip(probe_at, probe_at[1:])]
    assert gaps == sorted(gaps) and gaps[-1] == 33
    assert ctrl.stats.probes == len(probe_at)


def test_expensive_drafter_stops_even_when_accepted():
    # a drafter as costly as the verifier cannot pay even with p = 0.7
    ctrl = GammaController(max_gamma=8)
    _run(ctrl, accept_p=0.7, steps=40, v1=0.1, td=0.1, slope=0.05)
    assert not ctrl.speculating


def test_probe_resumes_speculation_when_acceptance_returns():
    ctrl = GammaController(max_gamma=4, probe_every=2, max_probe_every=4, decay=0.5)
    _run(ctrl, accept_p=0.0, steps=30)
    assert not ctrl.speculating
    _run(ctrl, accept_p=1.0, steps=30, seed=1)
    assert ctrl.speculating


def test_never_drafts_past_the_remaining_tokens():
    ctrl = GammaController(max_gamma=8, warmup_cycles=0)
    ctrl.observe_plain(0.1)
    assert ctrl.next_gamma(remaining=3) <= 2
    assert ctrl.next_gamma(remaining=1) == 0


def test_hopeless_prompt_agreement_starts_plain_without_warmup():
    ctrl = GammaController(max_gamma=8, probe_every=8, max_probe_every=128)
    ctrl.observe_prompt_agreement(0.0, 32)
    assert not ctrl.speculating and "prompt check" in ctrl.stats.stopped_reason
    chosen = _run(ctrl, accept_p=0.0, steps=128)
    # no warm-up cycles: the first speculative cycle is the first probe, 4 * probe_every tokens in
    assert chosen[:33] == [0] * 32 + [1]
    assert ctrl.stats.probes == sum(c > 0 for c in chosen) <= 3
    assert ctrl.stats.prompt_agreement == 0.0


def test_promising_prompt_agreement_warms_up_and_speculates():
    ctrl = GammaController(max_gamma=8)
    ctrl.observe_prompt_agreement(0.9, 32)
    assert ctrl.speculating and ctrl.acceptance > 0.8
    chosen = _run(ctrl, accept_p=0.9, steps=40)
    assert chosen[:3] == [0, 2, 2] and ctrl.speculating and max(chosen) >= 4


def test_measured_cycles_overrule_an_optimistic_estimate():
    # the prompt promised 90 % agreement, but the continuation is unlike it: nothing is accepted
    ctrl = GammaController(max_gamma=8)
    ctrl.observe_prompt_agreement(0.9, 32)
    chosen = _run(ctrl, accept_p=0.0, steps=2 + GammaController.MIN_REALIZED_CYCLES)
    assert not ctrl.speculating and "did not pay" in ctrl.stats.stopped_reason
    assert chosen[-1] == 0 and all(c > 0 for c in chosen[1:-1])
    # stopped by the measurement, not by the estimate, which still promised a gain
    assert ctrl.rate(ctrl.best_gamma()) >= ctrl.min_gain * ctrl.rate(0)


def test_probe_resumes_that_do_not_pay_make_probes_rarer():
    # each probe is accepted (so speculation resumes), then the resumed cycles deliver less than
    # plain decoding (so it stops again): the gap before the next probe must keep growing
    # short memory (decay 0.2), so one accepted probe is enough to resume
    ctrl = GammaController(max_gamma=4, probe_every=8, max_probe_every=128, decay=0.2,
                           prior_draft_ratio=0.05, prior_slope_ratio=0.05)
    ctrl.observe_plain(0.1)
    while (g := ctrl.next_gamma(remaining=10_000)) > 0:                              # warm-up: poor
        ctrl.observe_cycle(g, 0, draft_s=0.001 * g, verify_s=0.12)
    gaps = []
    for _ in range(3):
        gap = 0
        while (g := ctrl.next_gamma(remaining=10_000)) == 0:
            ctrl.observe_plain(0.1)
            gap += 1
        gaps.append(gap)
        ctrl.observe_cycle(g, g, draft_s=0.001, verify_s=0.101, catch_up_s=0.0005)   # probe: accepted
        assert ctrl.speculating
        while (g := ctrl.next_gamma(remaining=10_000)) > 0:
            ctrl.observe_cycle(g, 0, draft_s=0.05 * g, verify_s=0.2)                  # resumed: poor
        assert not ctrl.speculating
    assert gaps == [8, 16, 32]


def test_a_probe_resumed_speculation_that_underdelivers_is_stopped_after_two_cycles():
    # the probe is accepted, the resumed cycles accept 1 token each but verify slowly: 2 tokens in
    # 0.2 s against a 0.1 s plain step is a loss the estimate does not see yet (acceptance ~0.5)
    ctrl = GammaController(max_gamma=4, probe_every=8, decay=0.2, prior_draft_ratio=0.05, prior_slope_ratio=0.05)
    ctrl.observe_plain(0.1)
    while (g := ctrl.next_gamma(remaining=10_000)) > 0:                              # warm-up: poor
        ctrl.observe_cycle(g, 0, draft_s=0.001 * g, verify_s=0.12)
    while (g := ctrl.next_gamma(remaining=10_000)) == 0:
        ctrl.observe_plain(0.1)
    ctrl.observe_cycle(g, g, draft_s=0.001, verify_s=0.101, catch_up_s=0.0005)   # probe: accepted
    resumed = 0
    while (g := ctrl.next_gamma(remaining=10_000)) > 0:
        ctrl.observe_cycle(g, 1, draft_s=0.001 * g, verify_s=0.2)
        resumed += 1
    assert resumed == GammaController.MIN_REALIZED_CYCLES_AFTER_PROBE == 2
    assert "did not pay" in ctrl.stats.stopped_reason and ctrl.acceptance > 0.4


def test_probe_catch_up_gives_no_drafter_step_sample():
    ctrl = GammaController(max_gamma=4)
    ctrl.observe_plain(0.1)
    ctrl.observe_cycle(1, 0, draft_s=0.05, verify_s=0.12, catch_up_s=0.05)
    assert ctrl.stats.draft_step_ratio is None         # the only drafter forward was a catch-up
    ctrl.observe_cycle(3, 1, draft_s=0.05 + 2 * 0.01, verify_s=0.13, catch_up_s=0.05)
    assert ctrl.stats.draft_step_ratio == pytest.approx(0.1)


def test_prompt_agreement_counts_only_valid_positions():
    v = torch.tensor([[-1, -1, 5, 6, 7, 8]])
    d = torch.tensor([[-1, -1, 5, 0, 7, 0]])
    assert prompt_agreement(v, d) == (0.5, 4)
    assert prompt_agreement(v, None) is None
    assert prompt_agreement(torch.tensor([[-1]]), torch.tensor([[-1]])) is None
    with pytest.raises(ValueError):
        GammaController(max_gamma=2).observe_prompt_agreement(1.5, 4)


def test_prefill_tail_argmax_equals_full_forward_argmax(verifier):
    ids = torch.randint(1, 320, (1, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = verifier(ids).logits[0, -20:].argmax(-1)
        # chunks of 16: the 20 tail positions span two chunks
        pre = kvcache.prefill(verifier, ids, chunk_size=16, tail_argmax=20)
        short = kvcache.prefill(verifier, ids[:, :5], chunk_size=16, tail_argmax=8)
    assert torch.equal(pre.tail_argmax[0], want)
    assert short.tail_argmax[0, :3].tolist() == [-1, -1, -1]
    assert torch.equal(short.tail_argmax[0, 3:], verifier(ids[:, :5]).logits[0].argmax(-1))
    assert kvcache.prefill(verifier, ids, chunk_size=16).tail_argmax is None


@pytest.mark.parametrize("kw", [dict(max_gamma=0), dict(max_gamma=4, min_gain=0), dict(max_gamma=4, decay=0),
                                dict(max_gamma=4, probe_every=0)])
def test_bad_arguments_raise(kw):
    with pytest.raises(ValueError):
        GammaController(**kw)


# ---- the engine with adaptive γ ---------------------------------------------------------------
def _greedy(n):
    return SamplingConfig(temperature=0.0, max_new_tokens=n, eos_token_ids=[])


def test_adaptive_engine_is_lossless_and_reports(verifier, tok):
    prompt = torch.randint(1, 320, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    want = ARGenerator(verifier, tok).generate(prompt, _greedy(40)).token_ids
    unrelated = tiny_llama(layers=1, seed=7)
    for drafter in (verifier, unrelated):
        sd = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(budget=64, gamma=6, adaptive=True))
        res = sd.generate(prompt, _greedy(40))
        assert res.token_ids == want
        assert res.adaptive is not None and res.adaptive["plain_steps"] >= 1
        assert res.as_dict()["adaptive"] == res.adaptive
    # the prompt check saw the unrelated drafter disagree and the self-drafter agree everywhere. The
    # constant cost prior: a measured one rightly finds a drafter as large as the verifier too dear
    # (draft step ~0.9 of a verify step), which would make this check depend on the machine's timing.
    res_self = SpeculativeGenerator(verifier, verifier, tok, SpecConfig(budget=None, gamma=4, adaptive=True,
                                                                        adaptive_cost_prior="constant")
                                    ).generate(prompt, _greedy(12))
    assert res_self.adaptive["prompt_agreement"] == 1.0 and res_self.metrics.cycles > 0
    pre = SpeculativeGenerator(verifier, unrelated, tok, SpecConfig(budget=64, gamma=6)).prefill(prompt)
    assert pre.verifier.tail_argmax.shape == (1, PROMPT_PROBE_TOKENS)
    # fixed γ reports no controller
    assert SpeculativeGenerator(verifier, unrelated, tok, SpecConfig(gamma=2, adaptive=False)).generate(
        prompt, _greedy(8)).adaptive is None


def test_adaptive_engine_sampling_keeps_the_output_distribution_shape(verifier, tok):
    # sampled decoding with the controller on still runs exact verification every cycle
    prompt = torch.randint(1, 320, (60,), generator=torch.Generator().manual_seed(5)).tolist()
    sd = SpeculativeGenerator(verifier, verifier, tok, SpecConfig(budget=None, gamma=4, adaptive=True))
    res = sd.generate(prompt, SamplingConfig(temperature=1.0, max_new_tokens=30, eos_token_ids=[], seed=1))
    assert len(res.token_ids) == 30
    # the drafter is the verifier: every verified draft is accepted
    assert res.metrics.accepted == res.metrics.drafted


# ---- the cost prior: measured on the engine's device, the constant only when switched off --------
@pytest.mark.parametrize("how", ["measure", "constant"])
def test_cost_prior_measured_on_the_engine_device_and_used(verifier, tok, how):
    from bd_ray.speculative.adaptive import CONSTANT_PRIOR, OPTIMISTIC_COST_RATIO
    from bd_ray.speculative.batch import new_row
    from bd_ray.speculative.engine import RowRequest

    drafter = tiny_llama(layers=1, seed=1)
    sd = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(budget=None, gamma=4, adaptive_cost_prior=how))
    engine = sd.engine
    assert engine.stats()["cost_prior"] is None                # nothing measured before an adaptive row
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=6, eos_token_ids=[])
    row = engine.submit(new_row(engine, RowRequest(list(range(1, 40)), sampling)))
    engine.step()
    prior = engine.cost_prior()
    assert engine.stats()["cost_prior"] == prior.as_dict()
    assert (row.controller.prior_draft_ratio, row.controller.prior_slope_ratio) == (prior.draft_ratio, prior.slope_ratio)
    assert engine.policy.prior == (prior.draft_ratio, prior.slope_ratio)
    if how == "measure":
        assert prior.source == "measured" and prior is not CONSTANT_PRIOR
        assert 0.01 <= prior.draft_ratio <= 10 and 0.01 <= prior.slope_ratio <= 10
        assert row.controller.optimistic == (prior.draft_ratio, prior.slope_ratio)
    else:
        assert prior == CONSTANT_PRIOR and row.controller.optimistic == (OPTIMISTIC_COST_RATIO,) * 2
    while engine.has_work:
        engine.step()
    assert row.checker.token_ids == ARGenerator(verifier, tok).generate(list(range(1, 40)), sampling).token_ids
    # measured once per engine, inside the first row's lifetime: timed as its setup, not its decode
    assert row.timings.setup_s > 0   # the constant is only looked up: tiny, still the first row's
    again = engine.submit(new_row(engine, RowRequest(list(range(2, 30)), sampling)))
    engine.step()
    assert engine.cost_prior() is prior and again.controller.prior_draft_ratio == prior.draft_ratio
    assert again.timings.setup_s == 0.0


def test_fixed_gamma_engine_measures_nothing(verifier, tok):
    sd = SpeculativeGenerator(verifier, tiny_llama(layers=1, seed=1), tok, SpecConfig(budget=None, adaptive=False))
    sd.generate(list(range(1, 30)), SamplingConfig(temperature=0.0, max_new_tokens=4, eos_token_ids=[]))
    assert sd.engine.stats()["cost_prior"] is None
