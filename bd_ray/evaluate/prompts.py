"""Held-out prompts of the evaluation matrix: windows of exactly ``context`` tokens, and the needle.

Prompts come only from the held-out split (``split == "test"``) and are picked deterministically
from a seed; a work that appears in the train split too is an error (:class:`HeldOutError`), so
no prompt ever comes from a training book.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from bd_ray import assets
from bd_ray.config import ConfigError
from bd_ray.config.evaluate import EvalJobConfig

__all__ = ["HeldOutError", "PromptSpec", "select_prompts", "make_needle_prompt", "corpus_table",
           "check_held_out"]


class HeldOutError(AssertionError):
    """A prompt would come from outside the held-out split (or a test work leaks into train)."""


@dataclass
class PromptSpec:
    """One prompt: ``token_ids`` = exactly ``context`` tokens of document ``doc_id`` from ``start_token``."""

    prompt_id: str
    context: int
    doc_id: str
    work_id: str
    split: str
    start_token: int
    token_ids: list[int]
    needle: dict | None = None   # for needle prompts: passkey, span [start, end), depth

    def meta(self) -> dict:
        return {"prompt_id": self.prompt_id, "context": self.context, "doc_id": self.doc_id,
                "work_id": self.work_id, "split": self.split, "start_token": self.start_token,
                "n_tokens": len(self.token_ids), "needle": self.needle}


def _encode(tokenizer: Any, text: str) -> list[int]:
    import logging

    lg = logging.getLogger("transformers.tokenization_utils_base")
    old = lg.level
    lg.setLevel(logging.ERROR)  # "sequence longer than model max length": we cut windows ourselves
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    finally:
        lg.setLevel(old)


def _held_out_docs(table) -> list[dict]:
    """Rows of the test split, after asserting that no test work also appears in the train split."""
    rows = table.select([c for c in ("doc_id", "work_id", "split", "text") if c in table.column_names]).to_pylist()
    if not rows:
        raise HeldOutError("the corpus has no documents")
    for col in ("doc_id", "split", "text"):
        if col not in rows[0]:
            raise ConfigError(f"data.corpus: column {col!r} is missing (need doc_id, split, text; work_id optional)")
    for r in rows:
        r["work_id"] = str(r.get("work_id") or r["doc_id"])
    train_works = {r["work_id"] for r in rows if r["split"] == "train"}
    test = [r for r in rows if r["split"] == "test"]
    leaked = sorted({r["work_id"] for r in test} & train_works)
    if leaked:
        raise HeldOutError(f"works in both the train and the test split (a prompt could come from a training "
                           f"book): {leaked[:5]}")
    if not test:
        raise HeldOutError("the corpus has no documents with split == 'test'")
    return test


def select_prompts(table, tokenizer: Any, contexts: Sequence[int], n: int, seed: int,
                   token_cache: dict | None = None) -> dict[int, list[PromptSpec]]:
    """Pick ``n`` held-out windows of exactly ``context`` tokens for every context.

    Deterministic for a given corpus, tokenizer and ``seed``: per context, the eligible works
    (test-split works with a document of at least ``context`` tokens) are shuffled with
    ``random.Random(f"{seed}:{context}")`` and visited round robin (prompts spread over works);
    within a work a document and a start offset are drawn from the same generator.

    Args:
        table: a ``pyarrow.Table`` with columns ``doc_id``, ``split``, ``text`` (and ``work_id``).
        tokenizer: the verifier's tokenizer (no special tokens are added).
        token_cache: optional ``{doc_id: token ids}`` memo shared between calls.

    Returns:
        ``{context: [PromptSpec] * n}``.

    Raises:
        HeldOutError: a test work also appears in the train split, there is no test split, or a
            picked prompt is not from the test split (asserted again per prompt).
        ValueError: no held-out document is long enough for a context (names it and the longest).
    """
    test = _held_out_docs(table)
    test.sort(key=lambda r: r["doc_id"])
    tokens = token_cache if token_cache is not None else {}
    for r in test:
        if r["doc_id"] not in tokens:
            tokens[r["doc_id"]] = _encode(tokenizer, r["text"])
    by_id = {r["doc_id"]: r for r in test}
    out: dict[int, list[PromptSpec]] = {}
    for ctx in contexts:
        eligible: dict[str, list[str]] = {}
        for r in test:
            if len(tokens[r["doc_id"]]) >= ctx:
                eligible.setdefault(r["work_id"], []).append(r["doc_id"])
        if not eligible:
            longest = max(len(t) for t in tokens.values())
            raise ValueError(f"no held-out document has {ctx} tokens (matrix.contexts); the longest has {longest}")
        rng = random.Random(f"{seed}:{ctx}")
        works = sorted(eligible)
        rng.shuffle(works)
        prompts = []
        for i in range(n):
            work = works[i % len(works)]
            doc = rng.choice(sorted(eligible[work]))
            toks = tokens[doc]
            start = rng.randrange(0, len(toks) - ctx + 1)
            row = by_id[doc]
            if row["split"] != "test":  # the held-out assertion, per prompt
                raise HeldOutError(f"prompt from document {doc!r} of split {row['split']!r}")
            prompts.append(PromptSpec(f"c{ctx}-p{i}", ctx, doc, row["work_id"], row["split"], start,
                                      toks[start:start + ctx]))
        out[ctx] = prompts
    return out


def make_needle_prompt(table, tokenizer: Any, context: int, depth: float, digits: int, seed: int,
                       token_cache: dict | None = None) -> PromptSpec:
    """A held-out window of exactly ``context`` tokens with a passkey sentence planted at ``depth``.

    Standard passkey-retrieval layout: a one-line instruction header, the book text with the
    sentence inside, then a question. The window ends with the question "What is the pass key? The pass key is", so retrieval means
    the continuation contains the passkey digits. The sentence is inserted at the first sentence or
    line boundary at or after ``depth * body`` (within 256 tokens; else exactly there) of the book text.
    ``needle`` = ``{"passkey", "start", "end", "depth"}`` with the token span ``[start, end)``.

    Raises:
        HeldOutError / ValueError: as :func:`select_prompts`; ValueError when ``context`` is too
            short to hold the sentence and the question.
    """
    rng = random.Random(f"needle:{seed}:{context}")
    key = "".join(rng.choice("123456789") for _ in range(digits))
    header = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    sentence = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\n\nWhat is the pass key? The pass key is"
    h_ids, s_ids, q_ids = _encode(tokenizer, header), _encode(tokenizer, sentence), _encode(tokenizer, question)
    body_len = context - len(h_ids) - len(s_ids) - len(q_ids)
    if body_len < 8:
        raise ValueError(f"context {context} is too short for the needle sentence and question "
                         f"({len(s_ids) + len(q_ids)} tokens)")
    base = select_prompts(table, tokenizer, [body_len], 1, seed, token_cache)[body_len][0]
    body = base.token_ids
    pos = int(depth * body_len)
    for j in range(pos, min(body_len, pos + 256)):
        piece = tokenizer.decode(body[j - 1:j]) if j > 0 else ""
        if piece.endswith((".", "\n", "!", "?")):
            pos = j
            break
    ids = h_ids + body[:pos] + s_ids + body[pos:] + q_ids
    assert len(ids) == context, (len(ids), context)
    start = len(h_ids) + pos
    return PromptSpec(f"c{context}-needle", context, base.doc_id, base.work_id, base.split, base.start_token, ids,
                      needle={"passkey": key, "start": start, "end": start + len(s_ids), "depth": depth})


def corpus_table(cfg: EvalJobConfig):
    """The corpus ``data.corpus`` names (embedded ``pg-mini`` or a parquet path) as a ``pyarrow.Table``.

    Raises:
        ConfigError: neither an embedded corpus nor an existing path (names ``data.corpus``).
    """
    src = cfg.data.corpus
    path = assets.ensure_corpus(src) if src in assets.CORPORA else Path(src).expanduser()
    if not Path(path).exists():
        raise ConfigError(f"data.corpus: {src!r} is neither an embedded corpus {sorted(assets.CORPORA)} nor a path")
    return assets.load_corpus_table(path)


def check_held_out(prompts: Sequence[PromptSpec]) -> None:
    """The held-out assertion once more, over every prompt the matrix will use.

    Raises:
        HeldOutError: a prompt whose split is not ``test`` (names it).
    """
    for p in prompts:
        if p.split != "test":
            raise HeldOutError(f"prompt {p.prompt_id} comes from split {p.split!r}")
