"""Engine end to end on the embedded SmolLM2 verifier, a held-out book prompt at 2K context.

Case 4 of docs/cases/spec-decoding.md on a real pretrained verifier: for every sparse
policy, budgets {64, 256, full} and γ {1, 4, 8}, greedy speculative output equals plain greedy
decoding token for token (fp32). The drafter is the verifier's first 4 layers (untrained).
"""

from __future__ import annotations

import pytest
import torch

from bd_ray import kvcache
from bd_ray.config import SamplingConfig, SparsePolicyConfig, SpecConfig
from bd_ray.speculative.engine import ARGenerator, Prefilled, SpeculativeGenerator

pytestmark = pytest.mark.slow

CONTEXT = 2048
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def smollm2(verifier_dir):
    from bd_ray import models

    verifier, tok = models.load_verifier(str(verifier_dir))
    drafter = models.init_drafter_from_verifier(verifier, 4)
    return verifier, drafter, tok


@pytest.fixture(scope="module")
def held_out_prompt(corpus_dir, smollm2):
    from bd_ray import assets

    _, _, tok = smollm2
    table = assets.load_corpus_table(corpus_dir).to_pylist()
    test_docs = sorted((r for r in table if r["split"] == "test"), key=lambda r: -len(r["text"]))
    assert test_docs, "corpus has no held-out works"
    text = test_docs[0]["text"]
    ids = tok(text[len(text) // 3: len(text) // 3 + 6 * CONTEXT], add_special_tokens=False)["input_ids"]
    assert len(ids) >= CONTEXT
    return ids[:CONTEXT]


def test_greedy_lossless_every_policy_budget_gamma(smollm2, held_out_prompt):
    verifier, drafter, tok = smollm2
    prompt = held_out_prompt
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=NEW_TOKENS)
    ar = ARGenerator(verifier, tok)
    with torch.inference_mode():
        vpre = kvcache.prefill(verifier, torch.tensor([prompt]))
    want = ar.generate(prompt, sampling, prefilled=vpre)
    assert len(want.token_ids) == NEW_TOKENS
    assert tok.decode(want.token_ids).strip(), "verifier produced empty text"

    alphas = {}
    for policy in (SparsePolicyConfig(name="chunk_topk"), SparsePolicyConfig(name="streaming"),
                   SparsePolicyConfig(name="snapkv", window=16)):
        sd = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(policy=policy, adaptive=False))
        window = policy.window if policy.name == "snapkv" else 0
        with torch.inference_mode():
            dpre = kvcache.prefill(drafter, torch.tensor([prompt]), capture_queries_window=window)
        pre = Prefilled(prompt, vpre, dpre)
        for budget in (64, 256, None):
            for gamma in (1, 4, 8):
                res = sd.generate(prompt, sampling, gamma=gamma, budget=budget, prefilled=pre)
                assert res.token_ids == want.token_ids, (policy.name, budget, gamma)
                assert res.speculative
                assert res.peak_drafter_cache <= (budget or CONTEXT) + NEW_TOKENS
                alphas[(policy.name, budget, gamma)] = res.metrics.acceptance_rate
    # the untrained 4-layer drafter is a real drafter: it gets some drafts accepted at full cache
    assert max(a for (p, b, g), a in alphas.items() if b is None) > 0.0


def test_batched_rows_equal_solo_greedy(smollm2, held_out_prompt):
    """Three requests of different context lengths and budgets decoded as one batch on the real
    verifier: each equals its own plain greedy decoding (the ragged forward on a pretrained model)."""
    from bd_ray.speculative.engine import RowRequest

    verifier, drafter, tok = smollm2
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=8)
    prompts = [held_out_prompt[:512], held_out_prompt[-1024:], held_out_prompt[100:400]]
    sd = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(budget=64, gamma=4, prefill_chunk=256, adaptive=False))
    reqs = [RowRequest(prompts[0], sampling), RowRequest(prompts[1], sampling, gamma=2, budget=256),
            RowRequest(prompts[2], sampling, speculative=False)]
    results = sd.generate_many(reqs)
    ar = ARGenerator(verifier, tok)
    for req, res in zip(reqs, results):
        assert res.token_ids == ar.generate(req.prompt, sampling).token_ids
    assert sd.engine.stats()["max_rows"] >= 2           # rows decoded together (prefill is chunked)
