"""OpenAI ``logprobs`` objects from the engine's per-token entries.

The engine (:func:`bd_ray.speculative.results.logprob_entries`) gives one entry per emitted token,
``{"token": id, "logprob": float, "top": [[id, logprob], ...]}``: the verifier's log-softmax of its
*raw* logits (before temperature / top-k / top-p, vLLM's default), at the position that emitted
the token, whether the token was a verified draft or a plain step, so the values are the same with
speculation on and off. Tokens cut by a stop string have no entry. Token strings are each id
decoded alone (``tokenizer.decode([id])``), as vLLM returns them.

Two shapes (OpenAI API):

* completions: ``{"tokens": [str], "token_logprobs": [float], "top_logprobs": [{str: float}],
  "text_offset": [int]}`` (``top_logprobs`` holds the k alternatives and the chosen token, as vLLM);
* chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LogprobFormatter"]


class LogprobFormatter:
    """Formats one choice's entries, chunk by chunk (keeps the running text offset).

    Args:
        tokenizer: the verifier's tokenizer. chat: the chat shape (else completions).
        offset: text offset of the first completion token (the echoed prompt's length, or 0).
    """

    def __init__(self, tokenizer: Any, chat: bool, offset: int = 0) -> None:
        self.tokenizer, self.chat, self.offset = tokenizer, chat, offset

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([int(token)])

    def format(self, entries: list[dict]) -> dict:
        """The logprobs object of ``entries`` (one chunk's, or a whole choice's)."""
        if self.chat:
            def item(t: int, lp: float) -> dict:
                s = self._text(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
            return {"content": [{**item(e["token"], e["logprob"]),
                                 "top_logprobs": [item(t, lp) for t, lp in e["top"]]} for e in entries]}
        tokens, offsets, tops = [], [], []
        for e in entries:
            s = self._text(e["token"])
            tokens.append(s)
            offsets.append(self.offset)
            self.offset += len(s)
            top = {self._text(t): lp for t, lp in e["top"]}
            top.setdefault(s, e["logprob"])
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries], "top_logprobs": tops,
                "text_offset": offsets}
