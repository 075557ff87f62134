"""Shipped drafters (bd_ray/reference_drafters.py, jobs/ship_drafter.py) on tiny Llamas.

A tiny verifier is saved as a local checkpoint directory (the manifest's verifier is then that path,
as a registered name like ``smollm2-135m`` is in the real ones); a drafter built from its first
layers is "trained" by perturbing its decoder layers, exported the way jobs/train_drafter.py exports
(save_pretrained + draft_vocab.json + bd_ray_training.json, metrics.json one level up), shipped,
and loaded back by path and by name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from bd_ray import reference_drafters as rd
from bd_ray.config import SamplingConfig, SpecConfig
from bd_ray.draft_vocab import DraftVocab, save_draft_vocab
from bd_ray.models import init_drafter_from_verifier, load_drafter
from bd_ray.speculative.engine import ARGenerator, SpeculativeGenerator
from bd_ray.store import TMP_MARK, sha256_file
from bd_ray.testing.tiny import tiny_llama, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import ship_drafter  # noqa: E402  (jobs/ship_drafter.py)

AGREE = {"full": 0.41, "256": 0.39}


def _tied_llama(vocab: int, layers: int, seed: int):
    """A tiny Llama whose head is tied to its embedding (SmolLM2's layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.2, bos_token_id=None, eos_token_id=0, pad_token_id=None,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _train(drafter, seed: int = 5, embedding: bool = False, head: bool = False):
    """Stand-in for training: perturb the decoder layers (and optionally the embedding / untied head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in drafter.named_parameters():
            if n.startswith("model.layers.") or (embedding and "embed_tokens" in n) or (head and n == "lm_head.weight"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return drafter


def _export(run: Path, drafter, tok, vocab: DraftVocab | None = None, agree: dict | None = None) -> Path:
    """``run/final`` as bd_ray.train.export.export_hf writes it, and ``run/metrics.json``."""
    final = run / "final"
    drafter.save_pretrained(final)
    tok.save_pretrained(final)
    if vocab is not None:
        save_draft_vocab(vocab, final)
    (final / "bd_ray_training.json").write_text(json.dumps({"freeze_embedding": True}))
    hist = [{"step": i + 1, "tokens_per_s": 100.0, "step_s": 1.12} for i in range(3)]
    evals = [{"step": 3, **{f"agree_{k}": v for k, v in (agree or AGREE).items()}}]
    (run / "metrics.json").write_text(json.dumps({"step": 3, "finished": True, "history": hist,
                                                  "eval_history": evals, "config": {"data": {"split": "train"}}}))
    return final


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Verifier dir (untied head), tokenizer, the original drafter and its export with a draft vocab."""
    root = tmp_path_factory.mktemp("ship")
    tok = tiny_tokenizer()
    verifier = tiny_llama(vocab_size=len(tok), layers=3, seed=0, max_positions=512)
    vdir = root / "verifier"
    verifier.save_pretrained(vdir)
    tok.save_pretrained(vdir)
    drafter = _train(init_drafter_from_verifier(verifier, 2))
    vocab = DraftVocab(list(range(0, len(tok), 3)) + [1], len(tok), coverage=0.9)
    final = _export(root / "run", drafter, tok, vocab)
    return {"root": root, "tok": tok, "verifier": verifier, "vdir": vdir, "drafter": drafter, "final": final}


def _ship(world, out_root: Path, *extra: str, src: Path | None = None, name: str = "tiny-ref") -> int:
    return ship_drafter.main(["--from", str(src or world["final"]), "--name", name, "--verifier", str(world["vdir"]),
                              "--out-root", str(out_root), *extra])


def _logits(model, n: int = 40) -> torch.Tensor:
    ids = torch.randint(1, 320, (1, n), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits[0].float()


def test_round_trip_bf16_by_path_and_by_name(world, tmp_path, monkeypatch):
    out = tmp_path / "home" / "drafters"
    assert _ship(world, out) == 0
    d = out / "tiny-ref"
    man = json.loads((d / rd.MANIFEST).read_text())
    assert set(man["files"]) == {rd.WEIGHTS, "config.json", "draft_vocab.json"}
    for rel, f in man["files"].items():
        assert f["size"] == (d / rel).stat().st_size and len(f["sha256"]) == 64
    assert man["format"] == rd.FORMAT and man["version"] == 1 and man["dtype"] == "bf16"
    v = man["verifier"]
    assert v["name"] == str(world["vdir"]) and v["embedding"] == "verifier" and v["head"] == "verifier"
    assert v["embedding_sha256"] == rd.embedding_sha256(world["verifier"].get_input_embeddings().weight)
    assert set(man["parameters"]["from_verifier"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    t = man["training"]
    assert t["steps"] == 3 and t["tokens_seen"] == 336 and t["held_out_agreement"] == AGREE
    assert t["notes"] == {"freeze_embedding": True} and t["config"]["data"]["split"] == "train"
    assert "--name tiny-ref" in t["ship_command"] and man["draft_vocab"]["size"] == 108
    # only the trainable parameters are shipped: no embedding, no head
    from safetensors import safe_open

    with safe_open(str(d / rd.WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(k.startswith("model.layers.") or k == "model.norm.weight" for k in keys), keys

    orig = world["drafter"]
    loaded, tok = load_drafter(d, world["tok"], draft_vocab=None)
    assert len(tok) == len(world["tok"]) and next(loaded.parameters()).dtype == torch.float32
    sd, osd = loaded.state_dict(), orig.state_dict()
    for k in osd:    # exactly the original rounded to bf16; the embedding and head exactly the verifier's
        want = osd[k] if k in ("model.embed_tokens.weight", "lm_head.weight") else osd[k].bfloat16().float()
        assert torch.equal(sd[k], want), k
    a, b = _logits(orig), _logits(loaded)
    assert (a - b).abs().max() <= 0.02 * a.abs().max()

    monkeypatch.setenv("BD_RAY_HOME", str(out.parent))
    assert "tiny-ref" in rd.shipped_names()
    by_name, _ = load_drafter("tiny-ref", world["tok"])   # draft vocab applied ("auto")
    got = _logits(by_name)
    assert torch.isneginf(got[:, 2]).all() and torch.equal(got[:, ::3], b[:, ::3])


def test_int8_round_trip_within_row_scale(world, tmp_path):
    assert _ship(world, tmp_path, "--dtype", "int8") == 0
    d = tmp_path / "tiny-ref"
    man = json.loads((d / rd.MANIFEST).read_text())
    assert man["dtype"] == "int8"
    bf16_bytes = sum(p.numel() * 2 for n, p in world["drafter"].named_parameters() if n.startswith("model.layers."))
    assert man["files"][rd.WEIGHTS]["size"] < 0.6 * bf16_bytes
    loaded, _ = load_drafter(d, world["tok"], draft_vocab=None)
    osd, sd = world["drafter"].state_dict(), loaded.state_dict()
    for k, w in osd.items():
        if w.ndim == 2 and k.startswith("model.layers."):
            half_step = w.abs().amax(dim=1, keepdim=True) / 127 / 2
            assert ((sd[k] - w).abs() <= half_step * 1.001 + 1e-7).all(), k
    a, b = _logits(world["drafter"]), _logits(loaded)
    assert (a - b).abs().max() <= 0.1 * a.abs().max()


def test_tied_drafter_ships_no_head_and_round_trips(tmp_path):
    tok = tiny_tokenizer()
    verifier = _tied_llama(len(tok), 3, seed=2)
    vdir = tmp_path / "verifier"
    verifier.save_pretrained(vdir)
    tok.save_pretrained(vdir)
    drafter = _train(init_drafter_from_verifier(verifier, 1))
    final = _export(tmp_path / "run", drafter, tok)
    w = {"vdir": vdir, "final": final}
    assert _ship(w, tmp_path / "out") == 0
    man = json.loads((tmp_path / "out" / "tiny-ref" / rd.MANIFEST).read_text())
    assert man["verifier"]["head"] == "tied" and "draft_vocab.json" not in man["files"]
    loaded, _ = load_drafter(tmp_path / "out" / "tiny-ref", tok, verifier=verifier)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.embed_tokens.weight, verifier.model.embed_tokens.weight)
    a, b = _logits(drafter), _logits(loaded)
    assert (a - b).abs().max() <= 0.02 * a.abs().max()


def test_too_large_is_a_clear_error_and_publishes_nothing(world, tmp_path, capsys):
    assert _ship(world, tmp_path, "--max-mib", "0.01") == 2
    err = capsys.readouterr().err
    assert "over the 0.0 MiB limit" in err and "model.safetensors" in err and "--dtype int8" in err
    assert list(tmp_path.iterdir()) == []          # neither the drafter nor a temporary sibling
    with pytest.raises(rd.ShipError, match="over the"):
        rd.ship_drafter(world["drafter"], tmp_path / "x", verifier=str(world["vdir"]),
                        verifier_dir=world["vdir"], max_bytes=1000)


def test_damaged_file_names_the_file_and_both_digests(world, tmp_path):
    assert _ship(world, tmp_path) == 0
    d = tmp_path / "tiny-ref"
    want = json.loads((d / rd.MANIFEST).read_text())["files"][rd.WEIGHTS]["sha256"]
    data = bytearray((d / rd.WEIGHTS).read_bytes())
    data[-5] ^= 0x40
    (d / rd.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(rd.DrafterIntegrityError) as e:
        load_drafter(d, world["tok"])
    msg = str(e.value)
    assert rd.WEIGHTS in msg and want in msg and sha256_file(d / rd.WEIGHTS) in msg, msg
    (d / "config.json").write_text("{}")               # another size: still named
    with pytest.raises(rd.DrafterIntegrityError, match="config.json"):
        load_drafter(d, world["tok"])


def test_verifier_embedding_mismatch_is_an_error(world, tmp_path):
    import shutil

    vdir = tmp_path / "verifier"
    shutil.copytree(world["vdir"], vdir)
    w = {"vdir": vdir, "final": world["final"]}
    assert _ship(w, tmp_path / "out") == 0
    d = tmp_path / "out" / "tiny-ref"
    shipped_sha = json.loads((d / rd.MANIFEST).read_text())["verifier"]["embedding_sha256"]
    other = tiny_llama(vocab_size=len(world["tok"]), layers=3, seed=9, max_positions=512)
    # the verifier in use differs from the one the drafter was shipped for
    with pytest.raises(rd.DrafterIntegrityError) as e:
        load_drafter(d, world["tok"], verifier=other)
    assert shipped_sha in str(e.value) and rd.embedding_sha256(other.model.embed_tokens.weight) in str(e.value)
    # a bf16 verifier with the same weights is the same verifier
    same_bf16 = tiny_llama(vocab_size=len(world["tok"]), layers=3, seed=0, max_positions=512).to(torch.bfloat16)
    load_drafter(d, world["tok"], verifier=same_bf16, dtype=torch.bfloat16)
    # the verifier checkpoint the manifest names changed under the drafter
    other.save_pretrained(vdir)
    with pytest.raises(rd.DrafterIntegrityError) as e:
        load_drafter(d, world["tok"])
    assert shipped_sha in str(e.value) and rd.embedding_sha256(other.model.embed_tokens.weight) in str(e.value)


def test_trained_embedding_is_refused_unless_included(world, tmp_path, capsys):
    drafter = _train(init_drafter_from_verifier(world["verifier"], 2), embedding=True)
    final = _export(tmp_path / "run", drafter, world["tok"])
    assert _ship(world, tmp_path / "out", src=final) == 2
    err = capsys.readouterr().err
    assert "embedding" in err and "--include-embedding" in err and "freeze_embedding" in err
    assert not (tmp_path / "out" / "tiny-ref").exists()
    assert _ship(world, tmp_path / "out", "--include-embedding", src=final) == 0
    d = tmp_path / "out" / "tiny-ref"
    assert json.loads((d / rd.MANIFEST).read_text())["verifier"]["embedding"] == "shipped"
    loaded, _ = load_drafter(d, world["tok"], draft_vocab=None)
    want = drafter.model.embed_tokens.weight.bfloat16().float()
    assert torch.equal(loaded.model.embed_tokens.weight, want)


def test_new_version_only_when_better(world, tmp_path, capsys):
    assert _ship(world, tmp_path) == 0
    worse = _export(tmp_path / "run2", world["drafter"], world["tok"], agree={"full": 0.40, "256": 0.39})
    assert _ship(world, tmp_path, src=worse) == 2
    assert "not better" in capsys.readouterr().err
    better = _export(tmp_path / "run3", world["drafter"], world["tok"], agree={"full": 0.45, "256": 0.42})
    assert _ship(world, tmp_path, src=better) == 0
    man = json.loads((tmp_path / "tiny-ref" / rd.MANIFEST).read_text())
    assert man["version"] == 2 and man["training"]["held_out_agreement"]["full"] == 0.45
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"commands": ["python jobs/train_drafter.py --config x"], "data": "pg-mini train"}))
    assert _ship(world, tmp_path, "--force", "--notes-json", str(notes), src=worse) == 0
    man = json.loads((tmp_path / "tiny-ref" / rd.MANIFEST).read_text())
    assert man["version"] == 3 and man["training"]["commands"] == ["python jobs/train_drafter.py --config x"]
    assert not [p for p in tmp_path.iterdir() if TMP_MARK in p.name]


def test_unknown_name_lists_the_shipped_ones(world, tmp_path, monkeypatch):
    assert _ship(world, tmp_path / "drafters") == 0
    monkeypatch.setenv("BD_RAY_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        load_drafter("no-such-drafter", world["tok"])
    assert "tiny-ref" in str(e.value) and "smollm2-135m" in str(e.value)


def test_shipped_drafter_is_lossless_in_the_speculative_engine(world, tmp_path):
    assert _ship(world, tmp_path, "--dtype", "int8") == 0
    drafter, _ = load_drafter(tmp_path / "tiny-ref", world["tok"], verifier=world["verifier"])
    drafter.requires_grad_(False)
    verifier, tok = world["verifier"], world["tok"]
    prompt = torch.randint(1, len(tok), (120,), generator=torch.Generator().manual_seed(4)).tolist()
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=24, eos_token_ids=[])
    want = ARGenerator(verifier, tok).generate(prompt, greedy).token_ids
    res = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(budget=48, gamma=4, adaptive=False)).generate(prompt, greedy)
    assert res.token_ids == want and res.metrics.drafted > 0


def test_drafter_paths_for_checks_without_weights(world, tmp_path):
    from bd_ray.models import drafter_paths

    assert _ship(world, tmp_path) == 0
    assert drafter_paths(tmp_path / "tiny-ref") == (tmp_path / "tiny-ref", world["vdir"])
    assert drafter_paths(world["final"]) == (world["final"], world["final"])
    with pytest.raises(FileNotFoundError):
        drafter_paths(tmp_path / "nothing-here")
