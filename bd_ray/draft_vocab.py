"""A draft vocabulary: the drafter's LM head over the most frequent tokens only (FR-Spec, EAGLE-3).

On CPU the LM head is the single largest matmul of a small drafter (SmolLM2: 49,152 x 576 = 28 M
multiply-adds per token against ~3.5 M per decoder layer), so a drafter that scores only the K most
frequent tokens of the training corpus is several times cheaper per step while it loses little
acceptance: the verifier's argmax is almost always a frequent token (FR-Spec, Zhao et al. 2025;
EAGLE-3's ``d2t`` draft vocabulary).

Losslessness is kept: the verifier still scores the full vocabulary, and the drafter's logits
outside the subset are ``-inf``, so its proposal distribution q is exactly zero there; rejection
sampling (:mod:`bd_ray.speculative.rejection`) stays exact for any q, and greedy verification compares
against the verifier's full-vocabulary argmax.

On disk a draft vocabulary is ``draft_vocab.json`` next to the drafter checkpoint::

    {"format": "bd-ray-draft-vocab/1", "vocab_size": 49152, "ids": [...], "coverage": 0.97, "source": "..."}

:func:`bd_ray.models.load_drafter` applies it when the file is present.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = ["DRAFT_VOCAB_FILE", "DraftVocab", "SubsetLMHead", "count_tokens", "build_draft_vocab",
           "apply_draft_vocab", "load_draft_vocab", "save_draft_vocab"]

DRAFT_VOCAB_FILE = "draft_vocab.json"
_FORMAT = "bd-ray-draft-vocab/1"


class DraftVocab:
    """Sorted token ids ``[K]`` (int64) of a draft vocabulary over a ``vocab_size`` vocabulary.

    Raises:
        ValueError: no ids, ids out of ``[0, vocab_size)`` or repeated.
    """

    def __init__(self, ids: Sequence[int] | np.ndarray, vocab_size: int, coverage: float | None = None,
                 source: str = "") -> None:
        arr = np.unique(np.asarray(ids, dtype=np.int64))
        if arr.size == 0:
            raise ValueError("draft vocabulary: no token ids")
        if arr.size != len(ids):
            raise ValueError("draft vocabulary: repeated token ids")
        if arr[0] < 0 or arr[-1] >= vocab_size:
            raise ValueError(f"draft vocabulary: ids must be in [0, {vocab_size}), got {arr[0]}..{arr[-1]}")
        self.ids = arr
        self.vocab_size = int(vocab_size)
        self.coverage = coverage
        self.source = source

    def __len__(self) -> int:
        return int(self.ids.size)

    def index_of(self) -> torch.Tensor:
        """``[vocab_size]`` int64: the subset index of each token id, -100 outside the subset."""
        t = torch.full((self.vocab_size,), -100, dtype=torch.long)
        t[torch.from_numpy(self.ids)] = torch.arange(len(self), dtype=torch.long)
        return t


def count_tokens(token_arrays: Iterable[np.ndarray | Sequence[int]], vocab_size: int) -> np.ndarray:
    """``[vocab_size]`` int64 occurrence counts over token id arrays (ids >= vocab_size raise ValueError)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for arr in token_arrays:
        a = np.asarray(arr, dtype=np.int64)
        if a.size == 0:
            continue
        if a.min() < 0 or a.max() >= vocab_size:
            raise ValueError(f"token id out of range [0, {vocab_size}): {a.min()}..{a.max()}")
        counts += np.bincount(a, minlength=vocab_size)
    return counts


def build_draft_vocab(counts: np.ndarray, size: int, always: Iterable[int] = (), source: str = "") -> DraftVocab:
    """The ``size`` most frequent ids of ``counts`` (ties: lower id first) plus every id in ``always``.

    Args:
        counts: ``[vocab_size]`` token counts (:func:`count_tokens`).
        size: K, the number of ids kept from the counts (``always`` ids are added on top).
        always: ids that must be draftable whatever their count (EOS and other special tokens).

    Raises:
        ValueError: ``size`` < 1 or larger than the vocabulary.
    """
    vocab_size = int(counts.shape[0])
    if not 1 <= size <= vocab_size:
        raise ValueError(f"draft vocabulary size must be in [1, {vocab_size}], got {size}")
    order = np.lexsort((np.arange(vocab_size), -counts))     # by count desc, then id asc
    ids = set(order[:size].tolist()) | {int(i) for i in always}
    total = counts.sum()
    kept = np.asarray(sorted(ids), dtype=np.int64)
    coverage = float(counts[kept].sum() / total) if total else None
    return DraftVocab(kept, vocab_size, coverage=coverage, source=source)


def save_draft_vocab(vocab: DraftVocab, directory: str | Path) -> Path:
    """Write ``draft_vocab.json`` into ``directory`` atomically (temp file + rename); returns its path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    body = {"format": _FORMAT, "vocab_size": vocab.vocab_size, "size": len(vocab), "coverage": vocab.coverage,
            "source": vocab.source, "ids": vocab.ids.tolist()}
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".draft_vocab.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())
    path = d / DRAFT_VOCAB_FILE
    os.replace(tmp, path)
    return path


def load_draft_vocab(path: str | Path) -> DraftVocab:
    """Read a ``draft_vocab.json`` (a file, or a directory holding one).

    Raises:
        FileNotFoundError: no such file; ValueError: not a bd-ray draft vocabulary, or bad ids.
    """
    p = Path(path)
    if p.is_dir():
        p = p / DRAFT_VOCAB_FILE
    body = json.loads(p.read_text())
    if body.get("format") != _FORMAT:
        raise ValueError(f"{p}: format {body.get('format')!r} is not {_FORMAT!r}")
    return DraftVocab(body["ids"], body["vocab_size"], coverage=body.get("coverage"), source=body.get("source", ""))


class SubsetLMHead(torch.nn.Module):
    """LM head over a draft vocabulary that returns full-width logits, ``-inf`` outside the subset.

    ``forward(hidden [..., d]) -> logits [..., vocab_size]``; only ``K`` rows are multiplied. The
    rows are copied from the full head at construction (``weight`` ``[K, d]``); ``vocab_size`` is
    the full width, so callers that size tensors by the vocabulary keep working.
    """

    def __init__(self, full_head: torch.nn.Module, vocab: DraftVocab) -> None:
        super().__init__()
        w = full_head.weight
        if w.shape[0] != vocab.vocab_size:
            raise ValueError(f"draft vocabulary is over {vocab.vocab_size} tokens, the head has {w.shape[0]} rows")
        ids = torch.from_numpy(vocab.ids).to(w.device)
        self.weight = torch.nn.Parameter(w.detach()[ids].clone(), requires_grad=w.requires_grad)
        b = getattr(full_head, "bias", None)
        self.bias = None if b is None else torch.nn.Parameter(b.detach()[ids].clone())
        self.register_buffer("ids", ids, persistent=False)
        self.vocab_size = vocab.vocab_size
        self.in_features = w.shape[1]
        self.out_features = vocab.vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        sub = torch.nn.functional.linear(hidden, self.weight, self.bias)
        out = hidden.new_full((*hidden.shape[:-1], self.vocab_size), float("-inf"), dtype=sub.dtype)
        return out.index_copy_(-1, self.ids, sub)


def apply_draft_vocab(model: torch.nn.Module, vocab: DraftVocab) -> torch.nn.Module:
    """Replace ``model``'s LM head with a :class:`SubsetLMHead` (in place; unties a tied head).

    Raises:
        ValueError: the vocabulary width differs from the model's head.
    """
    head = model.get_output_embeddings()
    sub = SubsetLMHead(head, vocab)
    model.set_output_embeddings(sub)
    model.config.tie_word_embeddings = False
    model.bd_ray_draft_vocab = vocab
    return model
