"""bd_ray.models: tokenizer compatibility at load, drafter initialisation from the verifier, and the
`kernels` name clash with Hugging Face's `kernels` library (docs/DESIGN.md section 3).

Fast tests use tiny real tokenizers (the `tokenizers` library) and random-weight transformers models;
the one test on the real SmolLM2 tokenizer is marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bd_ray.models import (
    TokenizerMismatchError,
    check_tokenizer_compat,
    init_drafter_from_verifier,
    load_drafter,
    load_tokenizer,
    load_verifier,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _word_tokenizer(words: list[str], eos: str = "</s>", unk: str = "<unk>"):
    """A tiny real WordLevel tokenizer: ids follow the order of ``[unk, eos] + words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([unk, eos] + words)}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token=eos, unk_token=unk)


WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", ".", ","]


def _save_drafter_checkpoint(path: Path, tokenizer, vocab_size: int) -> Path:
    from bd_ray.testing.tiny import tiny_llama

    model = tiny_llama(vocab_size=vocab_size, layers=1, hidden=32, heads=2, kv_heads=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_compatible_tokenizers_pass():
    check_tokenizer_compat(_word_tokenizer(WORDS), _word_tokenizer(WORDS), 11, 11)


def test_vocab_size_mismatch_raises_at_load(tmp_path):
    verifier_tok = _word_tokenizer(WORDS)
    drafter_tok = _word_tokenizer(WORDS + ["extra"])
    ckpt = _save_drafter_checkpoint(tmp_path / "drafter", drafter_tok, vocab_size=len(drafter_tok))
    with pytest.raises(TokenizerMismatchError) as e:
        load_drafter(ckpt, verifier_tok)
    msg = str(e.value)
    assert "11" in msg and "12" in msg and "verifier" in msg and "drafter" in msg
    assert isinstance(e.value, ValueError)


def test_swapped_ids_raise_at_load_naming_id_and_strings(tmp_path):
    verifier_tok = _word_tokenizer(WORDS)
    swapped = list(WORDS)
    swapped[1], swapped[2] = swapped[2], swapped[1]  # "cat" <-> "sat": same size, different map
    drafter_tok = _word_tokenizer(swapped)
    ckpt = _save_drafter_checkpoint(tmp_path / "drafter", drafter_tok, vocab_size=len(drafter_tok))
    with pytest.raises(TokenizerMismatchError) as e:
        load_drafter(ckpt, verifier_tok)
    msg = str(e.value)
    assert "token id 3" in msg and "'cat'" in msg and "'sat'" in msg, msg


def test_special_token_mismatch_raises():
    a = _word_tokenizer(WORDS, eos="</s>")
    b = _word_tokenizer(WORDS, eos="</s>")
    b.eos_token = "."  # same vocabulary, different EOS
    with pytest.raises(TokenizerMismatchError, match="eos_token"):
        check_tokenizer_compat(a, b)


def test_model_vocab_width_mismatch_raises(tmp_path):
    tok = _word_tokenizer(WORDS)
    ckpt = _save_drafter_checkpoint(tmp_path / "drafter", tok, vocab_size=64)  # padded logits
    with pytest.raises(TokenizerMismatchError, match="11.*64|64.*11"):
        load_drafter(ckpt, tok, verifier_vocab_size=11)
    model, dtok = load_drafter(ckpt, tok, verifier_vocab_size=64)  # same width: fine
    assert model.config.vocab_size == 64 and len(dtok) == len(tok)


def test_local_checkpoint_and_unknown_name(tmp_path):
    tok = _word_tokenizer(WORDS)
    ckpt = _save_drafter_checkpoint(tmp_path / "v", tok, vocab_size=len(tok))
    model, vtok = load_verifier(ckpt)
    assert not any(p.requires_grad for p in model.parameters())
    assert len(load_tokenizer(ckpt)) == len(vtok) == 11
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        load_verifier(tmp_path / "does-not-exist")


@pytest.mark.parametrize("tie", [False, True])
def test_init_drafter_from_verifier_copies_exactly(tiny_llama_pair, tie):
    verifier, _, tok = tiny_llama_pair(verifier_layers=4, tie=tie)
    drafter = init_drafter_from_verifier(verifier, 2)
    assert type(drafter) is type(verifier)
    assert drafter.config.num_hidden_layers == 2 and len(drafter.model.layers) == 2
    assert verifier.config.num_hidden_layers == 4  # the verifier's config is untouched
    vsd, dsd = verifier.state_dict(), drafter.state_dict()
    for k, v in dsd.items():
        assert k in vsd and torch.equal(v, vsd[k]), k
    assert not any(k.startswith(("model.layers.2.", "model.layers.3.")) for k in dsd)
    if tie:
        assert drafter.lm_head.weight.data_ptr() == drafter.model.embed_tokens.weight.data_ptr()
    else:
        assert drafter.lm_head.weight.data_ptr() != drafter.model.embed_tokens.weight.data_ptr()
    # fresh tensors: training the drafter never changes the verifier
    assert drafter.model.embed_tokens.weight.data_ptr() != verifier.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        drafter.model.norm.weight.add_(1.0)
    assert not torch.equal(drafter.model.norm.weight, verifier.model.norm.weight)


def test_drafter_with_all_layers_reproduces_verifier_and_trains(tiny_llama_pair):
    verifier, _, tok = tiny_llama_pair(verifier_layers=3)
    ids = tok("It is a truth universally acknowledged", return_tensors="pt").input_ids
    full = init_drafter_from_verifier(verifier, 3)
    with torch.no_grad():
        assert torch.equal(full(ids).logits, verifier(ids).logits)
    small = init_drafter_from_verifier(verifier, 1)
    out = small(ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], 320) and torch.isfinite(out.loss)
    out.loss.backward()
    assert small.model.embed_tokens.weight.grad is not None
    gen = small.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 4)


def test_init_drafter_rejects_bad_layer_counts(tiny_llama_pair):
    verifier, _, _ = tiny_llama_pair(verifier_layers=2)
    for n in (0, 3):
        with pytest.raises(ValueError, match=r"\[1, 2\]"):
            init_drafter_from_verifier(verifier, n)
    with pytest.raises(TypeError):
        init_drafter_from_verifier(torch.nn.Linear(2, 2), 1)


def test_load_drafter_from_verifier_layers(tiny_llama_pair):
    verifier, _, tok = tiny_llama_pair(verifier_layers=4)
    drafter, dtok = load_drafter("from-verifier:2", tok, verifier=verifier)
    assert dtok is tok and drafter.config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="verifier"):
        load_drafter("from-verifier:2", tok)


def test_transformers_does_not_mistake_repo_kernels_dir_for_hf_kernels(tmp_path):
    """With the repo root on sys.path (its `kernels/` dir holds our Triton code as `bd_ray_kernels`),
    transformers must not think the Hugging Face `kernels` library is installed, and loading a model
    must work. Runs in a fresh interpreter: the availability checks are cached per process."""
    from bd_ray.testing.tiny import tiny_llama

    tiny_llama(vocab_size=64, layers=1, hidden=32, heads=2, kv_heads=1).save_pretrained(tmp_path / "m")
    code = f"""
import sys, json, importlib.util
sys.path.insert(0, {str(REPO_ROOT)!r})
import torch, bd_ray, bd_ray.models
from transformers.utils.import_utils import is_kernels_available
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})
out = m(torch.tensor([[1, 2, 3]])).logits
print(json.dumps({{"kernels": is_kernels_available(), "shape": list(out.shape),
                   "bd_ray_kernels": importlib.util.find_spec("bd_ray_kernels") is not None}}))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"kernels": False, "shape": [1, 3, 64], "bd_ray_kernels": True}


@pytest.mark.slow
def test_real_tokenizer_swapped_id_raises(verifier_dir, tmp_path):
    """The real SmolLM2 tokenizer against a copy with two vocabulary entries swapped."""
    vtok = load_tokenizer(verifier_dir)
    check_tokenizer_compat(vtok, load_tokenizer("smollm2-135m"), 49152, 49152)
    tj = json.loads((verifier_dir / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    inv = {i: s for s, i in vocab.items()}
    a, b = inv[1000], inv[1001]
    vocab[a], vocab[b] = 1001, 1000
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("tokenizer_config.json", "chat_template.jinja"):
        if (verifier_dir / f).exists():
            (bad / f).write_bytes((verifier_dir / f).read_bytes())
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(TokenizerMismatchError) as e:
        check_tokenizer_compat(vtok, load_tokenizer(bad))
    assert "token id 1000" in str(e.value) and repr(a) in str(e.value) and repr(b) in str(e.value)
