"""Stopping rules checked on every emitted token, including tokens inside an accepted block.

A speculative cycle can emit up to γ+1 tokens at once; EOS, stop strings and ``max_new_tokens``
must still be honoured token by token (docs/cases/spec-decoding.md cases 1-3), which the
reference BudgetDraft code and several engines got wrong. Conventions follow the OpenAI API and
vLLM:

* EOS: generation stops at the first EOS id (any id of the list); the EOS id is part of
  ``token_ids`` (so ids equal plain greedy decoding up to and including EOS), its text is not.
* stop strings: generation stops as soon as the decoded text contains a stop string, which may be
  split across tokens and across blocks; neither the stop string nor anything after it is
  returned. ``token_ids`` keeps only the tokens whose text lies entirely before the stop string.
* ``max_new_tokens``: at most that many tokens; ``finish_reason`` is ``length``.
* When EOS/stop and the cap fall on the same token, ``stop`` wins (the stop happened).
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

__all__ = ["StopChecker"]


class StopChecker:
    """Accumulates emitted tokens and decides when generation is over.

    Text is detokenized incrementally, as vLLM and TGI do: each new group of tokens is decoded
    together with the previous group (so context-dependent pieces such as SentencePiece's leading
    spaces render as in a full decode) and a trailing incomplete UTF-8 character waits for its
    next bytes. Emitting a token costs two decodes of a few tokens, not a decode of the whole
    output, whose cost grows with the output's length (figures: results/speed/README.md).

    Args:
        tokenizer: a transformers tokenizer (``decode`` is used for stop strings and text).
        max_new_tokens: cap on emitted tokens (>= 1).
        eos_token_ids: ids that end generation (EOS, end-of-turn...).
        stop: stop strings (OpenAI ``stop``); empty strings are ignored.

    Raises:
        ValueError: ``max_new_tokens < 1``.
    """

    def __init__(self, tokenizer: Any, max_new_tokens: int, eos_token_ids: Sequence[int] = (),
                 stop: Sequence[str] = ()) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.stop = tuple(s for s in stop if s)
        self._ids: list[int] = []          # every token added, including ones cut by a stop string
        self._kept = 0                     # how many of _ids are part of the output
        self._text: str | None = None      # final text once a stop string truncated it
        self._streamed = 0                 # characters already handed out by text_delta()
        # incremental detokenization: _decoded is the text of _ids[:_read]; _ids[_prefix:_read]
        # is the last decoded group, re-decoded with the new tokens for context
        self._decoded = ""
        self._prefix = 0
        self._read = 0
        self._ends: list[int] = []         # _ends[i]: len(_decoded) once token i was decoded
        self.finish_reason: str | None = None

    # ---- state ---------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def token_ids(self) -> list[int]:
        """Output token ids (EOS included when it ended generation; stop-string tokens excluded)."""
        return self._ids[: self._kept]

    @property
    def num_tokens(self) -> int:
        return self._kept

    @property
    def text(self) -> str:
        """Output text: special tokens skipped, truncated before a stop string (a trailing
        incomplete UTF-8 character shows as U+FFFD, as in a full decode)."""
        if self._text is not None:
            return self._text
        pending = self._flush()  # first: it may move text into _decoded
        return self._decoded + pending

    def remaining(self) -> int:
        """Tokens still allowed by ``max_new_tokens``."""
        return self.max_new_tokens - self._kept

    # ---- feeding -------------------------------------------------------------------------------
    def add(self, token: int) -> bool:
        """Record one emitted token; returns ``True`` once generation is finished.

        Raises:
            RuntimeError: a token is added after generation finished (a caller bug that would
                leak a token past a stop).
        """
        if self.finished:
            raise RuntimeError("token added after generation finished")
        self._ids.append(int(token))
        self._kept = len(self._ids)
        if int(token) in self.eos_token_ids:
            self.finish_reason = "stop"
            return True
        if self.stop and self._apply_stop_strings():
            self.finish_reason = "stop"
            return True
        if self._kept >= self.max_new_tokens:
            self.finish_reason = "length"
            return True
        return False

    def extend(self, tokens: Sequence[int]) -> int:
        """Add tokens in order until finished; returns how many were consumed."""
        used = 0
        for t in tokens:
            used += 1
            if self.add(t):
                break
        return used

    def text_delta(self) -> str:
        """New output text that is safe to stream now.

        While generating, text that could be the start of a stop string, and a trailing
        incomplete UTF-8 character, are held back (as vLLM does); once finished everything left
        is released.
        """
        text = self.text
        safe = len(text)
        if not self.finished:
            stripped = text.rstrip("\ufffd")
            hold = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, len(stripped)), 0, -1):
                    if stripped.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            safe = len(stripped) - hold
        delta = text[self._streamed: max(safe, self._streamed)]
        self._streamed = max(safe, self._streamed)
        return delta

    # ---- internals -----------------------------------------------------------------------------
    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _flush(self) -> str:
        """Decode the kept tokens after ``_read`` into ``_decoded`` unless they end mid-character
        (or add no text yet, e.g. a skipped special token). Returns the text still pending (the
        held-back tail, as a full decode would show it; ``""`` once flushed)."""
        if self._kept <= self._read:
            return ""
        group = self._decode(self._ids[self._prefix: self._read])
        both = self._decode(self._ids[self._prefix: self._kept])
        if len(both) > len(group) and not both.endswith("\ufffd"):
            self._decoded += both[len(group):]
            self._prefix, self._read = self._read, self._kept
            self._ends.extend([len(self._decoded)] * (self._kept - len(self._ends)))
            return ""
        return both[len(group):]

    def _apply_stop_strings(self) -> bool:
        prev_len = len(self._decoded)
        self._flush()
        if len(self._decoded) == prev_len:
            return False
        # A stop string can only complete in the newly decoded text, so search from where it could
        # have started: the longest stop string before the previous text end.
        start = max(0, prev_len - max(len(s) for s in self.stop) + 1)
        hits = [i for i in (self._decoded.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        cut = min(hits)
        # keep the tokens whose text ends at or before the stop string's first character
        self._kept = bisect.bisect_right(self._ends, cut)
        self._text = self._decoded[:cut]
        return True
