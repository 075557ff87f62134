"""Draft vocabulary (bd_ray/draft_vocab.py): subset head, files, losses, and lossless decoding with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bd_ray.testing.tiny import tiny_llama, tiny_tokenizer
from bd_ray import kvcache
from bd_ray.config import SamplingConfig, SpecConfig
from bd_ray.draft_vocab import (DRAFT_VOCAB_FILE, DraftVocab, SubsetLMHead, apply_draft_vocab, build_draft_vocab,
                                count_tokens, load_draft_vocab, save_draft_vocab)
from bd_ray.losses import TeacherTargets, budgetdraft_loss
from bd_ray.models import model_vocab_size
from bd_ray.speculative.engine import ARGenerator, SpeculativeGenerator

V = 320


def test_build_keeps_most_frequent_plus_specials_and_reports_coverage():
    counts = count_tokens([np.array([5, 5, 5, 7, 7, 9]), [5, 1]], vocab_size=12)
    assert counts[5] == 4 and counts[7] == 2 and counts[9] == 1 and counts[1] == 1
    vocab = build_draft_vocab(counts, size=2, always=[0])
    assert vocab.ids.tolist() == [0, 5, 7]
    assert vocab.coverage == pytest.approx(6 / 8)
    idx = vocab.index_of()
    assert idx[5] == 1 and idx[9] == -100 and idx.shape == (12,)


@pytest.mark.parametrize("bad", [dict(ids=[], vocab_size=4), dict(ids=[1, 1], vocab_size=4),
                                 dict(ids=[4], vocab_size=4), dict(ids=[-1], vocab_size=4)])
def test_bad_vocab_raises(bad):
    with pytest.raises(ValueError):
        DraftVocab(**bad)
    with pytest.raises(ValueError, match="size"):
        build_draft_vocab(np.ones(4, dtype=np.int64), size=5)
    with pytest.raises(ValueError, match="out of range"):
        count_tokens([[7]], vocab_size=4)


def test_save_load_roundtrip(tmp_path):
    vocab = build_draft_vocab(np.arange(10, dtype=np.int64), size=3, source="unit")
    path = save_draft_vocab(vocab, tmp_path)
    assert path.name == DRAFT_VOCAB_FILE and not list(tmp_path.glob(".*tmp"))
    back = load_draft_vocab(tmp_path)
    assert back.ids.tolist() == [7, 8, 9] and back.vocab_size == 10 and back.source == "unit"
    (tmp_path / "other.json").write_text(json.dumps({"format": "x", "ids": [1], "vocab_size": 2}))
    with pytest.raises(ValueError, match="format"):
        load_draft_vocab(tmp_path / "other.json")


def test_subset_head_matches_full_head_on_the_subset():
    model = tiny_llama(layers=1, seed=3)
    full = model.get_output_embeddings()
    vocab = DraftVocab(list(range(0, V, 3)), V)
    head = SubsetLMHead(full, vocab)
    h = torch.randn(2, 5, full.weight.shape[1])
    want = full(h)
    got = head(h)
    assert got.shape == want.shape
    ids = torch.from_numpy(vocab.ids)
    torch.testing.assert_close(got[..., ids], want[..., ids])
    outside = torch.ones(V, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(got[..., outside]).all()


def test_lossless_with_a_draft_vocab(tmp_path):
    tok = tiny_tokenizer()
    verifier = tiny_llama(layers=2, seed=0)
    drafter = tiny_llama(layers=1, seed=0)          # the verifier's twin, minus a layer
    vocab = DraftVocab(list(range(0, V, 2)), V)     # half the vocabulary
    apply_draft_vocab(drafter, vocab)
    assert model_vocab_size(drafter) == V
    prompt = torch.randint(1, V, (90,), generator=torch.Generator().manual_seed(2)).tolist()
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=30, eos_token_ids=[])
    want = ARGenerator(verifier, tok).generate(prompt, greedy).token_ids
    sd = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(budget=48, gamma=4, adaptive=False))
    res = sd.generate(prompt, greedy)
    assert res.token_ids == want and res.metrics.drafted > 0
    # under sampling, q is exactly zero outside the subset; the verifier may still emit any token
    res = sd.generate(prompt, SamplingConfig(temperature=1.0, max_new_tokens=30, eos_token_ids=[], seed=0))
    assert len(res.token_ids) == 30 and res.metrics.drafted > 0
    with torch.inference_mode():
        pre = kvcache.prefill(drafter, torch.tensor([prompt]))
    assert torch.isneginf(pre.last_logits[0, 1::2]).all()


def test_load_drafter_applies_a_checkpoints_draft_vocab(tmp_path):
    from bd_ray.testing.tiny import write_tiny_world

    from bd_ray.models import load_drafter, load_verifier

    tok, _ = write_tiny_world(tmp_path)
    ddir = tmp_path / "drafter"
    tiny_llama(vocab_size=len(tok), layers=1, seed=2).save_pretrained(ddir)
    tok.save_pretrained(ddir)
    verifier, tok = load_verifier(str(tmp_path / "verifier"))
    drafter, _ = load_drafter(str(ddir), tok, verifier=verifier)
    assert not isinstance(drafter.get_output_embeddings(), SubsetLMHead)
    save_draft_vocab(DraftVocab([0, 1, 2, 3], model_vocab_size(verifier)), ddir)
    drafter, _ = load_drafter(str(ddir), tok, verifier=verifier)
    assert isinstance(drafter.get_output_embeddings(), SubsetLMHead)
    drafter, _ = load_drafter(str(ddir), tok, verifier=verifier, draft_vocab=None)   # training: full head
    assert not isinstance(drafter.get_output_embeddings(), SubsetLMHead)


def test_loss_over_a_draft_vocab_ignores_targets_outside_it():
    torch.manual_seed(0)
    model = tiny_llama(layers=1, seed=4)
    model.train()
    prefix = torch.randint(1, V, (1, 120))
    cont = torch.randint(1, V, (1, 8))
    with torch.no_grad():
        pre = kvcache.prefill(model, prefix)
    vocab = DraftVocab(list(range(0, V, 2)), V)
    argmax = torch.tensor([2, 4, 6, 8, 3, 5, 7, 9])   # the last four are outside the subset
    out = budgetdraft_loss(model, pre.cache, cont, 120, TeacherTargets(argmax), budgets=[48],
                           draft_vocab=vocab)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grad = model.get_output_embeddings().weight.grad
    assert grad[1::2].abs().sum() == 0 and grad[0::2].abs().sum() > 0
    assert out.agree_full <= 0.5            # targets outside the subset count as disagreements
    with pytest.raises(ValueError, match="hard"):
        budgetdraft_loss(model, pre.cache, cont, 120, TeacherTargets(argmax), budgets=[48],
                         draft_vocab=vocab, kind="topk_kl")
