"""Small real components for fast tests: a byte-level BPE tokenizer trained here, tiny Llamas.

Real tokenizer (the `tokenizers` library wrapped by transformers) and real transformers models,
with random weights so tests run in seconds on 2 cores.
"""

from __future__ import annotations

import functools

import torch

TINY_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. Call me Ishmael. Stop here. In the beginning God created the heaven and the "
    "earth. And the earth was without form, and void; and darkness was upon the face of the deep. "
) * 4


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (``vocab_size`` ids, ``</s>`` = EOS id 0) trained on English."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def tiny_llama(vocab_size: int = 320, layers: int = 2, seed: int = 0, max_positions: int = 4096,
               hidden: int = 64, heads: int = 4, kv_heads: int = 2, init_std: float = 0.2):
    """A random-weight LlamaForCausalLM in fp32, eval mode (GQA: ``heads/kv_heads`` query heads per KV head).

    A larger ``init_std`` than the default makes the next-token distribution peaked enough that
    greedy ties are practically impossible.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, initializer_range=init_std,
                      bos_token_id=None, eos_token_id=0, pad_token_id=None, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def write_tiny_world(root, window: int = 112):
    """A tiny verifier dir (weights + tokenizer) at ``root/verifier`` and a pg-mini-shaped parquet
    corpus at ``root/corpus.parquet``: 4 train books, 1 held-out book, 1 too-short and 1 empty
    train document. Returns ``(tokenizer, held-out windows of `window` tokens)``."""
    from pathlib import Path

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), layers=2, seed=1)
    (root / "verifier").mkdir(parents=True)
    model.save_pretrained(root / "verifier")
    tok.save_pretrained(root / "verifier")
    words = TINY_TEXT.split()
    g = np.random.default_rng(0)
    docs = [dict(doc_id=f"book{i}", title=f"b{i}", author="a", source="s", license="pd", split="train",
                 text=" ".join(words[j % len(words)] for j in range(int(g.integers(0, 50)), 1200)))
            for i in range(4)]
    docs += [dict(doc_id="held", title="h", author="a", source="s", license="pd", split="test", text=TINY_TEXT * 2),
             dict(doc_id="short", title="s", author="a", source="s", license="pd", split="train", text="Call me Ishmael."),
             dict(doc_id="empty", title="e", author="a", source="s", license="pd", split="train", text="")]
    pq.write_table(pa.Table.from_pylist(docs), root / "corpus.parquet")
    held = np.array(tok(TINY_TEXT * 2)["input_ids"])
    return tok, [held[i * window:(i + 1) * window] for i in range(4)]
