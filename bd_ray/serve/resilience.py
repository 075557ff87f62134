"""Replica-failure handling of the ingress: a streaming engine call that survives the death of
its engine replica (:class:`ResilientCall`).

When the replica running a request dies (killed, crashed, its node gone: :func:`is_replica_failure`),
the request is started again from its prompt on a live replica, at most
:data:`MAX_REPLICA_RESTARTS` times. Output already handed to the client is never spliced: a
stream resumes only when its output is reproducible (greedy or seeded) and the regenerated prefix
equals what was sent, checked token by token; otherwise :class:`ReplicaDiedError`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bd_ray.serve.protocol import EngineRequest

__all__ = ["ResilientCall", "ReplicaDiedError", "is_replica_failure", "cancel_call", "MAX_REPLICA_RESTARTS"]

log = logging.getLogger("ray.serve")

# Replica deaths a request survives by being restarted from its prompt on another replica.
MAX_REPLICA_RESTARTS = 3


def cancel_call(gen: Any) -> None:
    """Best-effort cancel of a handle call (Serve re-raises a stored assignment error, e.g.
    ``BackPressureError``, from ``cancel()``; the call is over either way)."""
    try:
        gen.cancel()
    except Exception:  # noqa: BLE001
        pass


def is_replica_failure(exc: BaseException) -> bool:
    """True when ``exc`` (or its cause) says the engine replica process is gone (killed, crashed,
    its node died, or it is unreachable), as opposed to an error of the request itself."""
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, (RayActorError, WorkerCrashedError, NodeDiedError)):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return False


class ReplicaDiedError(RuntimeError):
    """The replica running a streaming request died after part of the output was sent, and the
    request could not be resumed identically elsewhere."""

    def __init__(self, message: str, tokens_sent: int) -> None:
        super().__init__(message)
        self.tokens_sent = tokens_sent


class ResilientCall:
    """One streaming engine call that survives the death of its engine replica.

    Iterated like the ``DeploymentResponseGenerator`` it wraps (``__anext__``, ``cancel``). When
    the replica dies (:func:`is_replica_failure`), the request is started again from its prompt
    (Serve routes it to a live replica), at most :data:`MAX_REPLICA_RESTARTS` times:

    * nothing handed on yet: restarted silently;
    * ``discard=True`` (a non-streaming response, nothing sent to the client): restarted and a
      ``{"type": "reset"}`` event tells the collector to drop what it gathered;
    * a stream that already sent tokens, when its output is reproducible (greedy, or seeded):
      restarted; the regenerated tokens and text must equal what was sent (checked), are skipped,
      and streaming continues where it stopped. Any difference, or a non-reproducible stream,
      raises :class:`ReplicaDiedError`: the client gets a clear error, never spliced text.
    """

    def __init__(self, engine: Any, request: EngineRequest, reproducible: bool, discard: bool) -> None:
        self._engine, self._request = engine, request
        self._reproducible, self._discard = reproducible, discard
        self.restarts = 0
        self._sent_ids: list[int] = []
        self._sent_text = ""
        self._replay: tuple[list[int], str] | None = None
        self._r_ids: list[int] = []
        self._r_text = ""
        self._r_lps: list[dict] = []
        self._gen = self._start()

    def _start(self):
        # attempt n gets a distinct engine-side id (EngineRequest.engine_id)
        return self._engine.options(stream=True).generate.remote(self._request.restarted(self.restarts))

    def cancel(self) -> None:
        cancel_call(self._gen)

    def __aiter__(self) -> "ResilientCall":
        return self

    async def __anext__(self) -> dict:
        while True:
            try:
                ev = await self._gen.__anext__()
            except (StopAsyncIteration, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001
                if not is_replica_failure(exc):
                    raise
                n_sent = len(self._sent_ids)
                sent = bool(self._sent_ids or self._sent_text)
                if self.restarts >= MAX_REPLICA_RESTARTS:
                    raise ReplicaDiedError(
                        f"the engine replica serving this request died ({type(exc).__name__}) and "
                        f"{self.restarts} restarts from the prompt failed too; retry the request later",
                        n_sent) from exc
                if sent and not self._discard and not self._reproducible:
                    raise ReplicaDiedError(
                        f"the engine replica serving this request died ({type(exc).__name__}) after "
                        f"{n_sent} tokens were streamed; the text streamed so far is correct but "
                        "incomplete, and a sampled request without a seed cannot be resumed "
                        "identically. Retry the request.", n_sent) from exc
                self.restarts += 1
                log.warning("request %s: engine replica died (%s) after %d tokens; restarting it from the "
                            "prompt (restart %d)", self._request.request_id, type(exc).__name__, n_sent,
                            self.restarts)
                cancel_call(self._gen)
                self._gen = self._start()
                if sent and self._discard:
                    self._sent_ids, self._sent_text = [], ""
                    return {"type": "reset"}
                if sent:
                    self._replay = (list(self._sent_ids), self._sent_text)
                    self._r_ids, self._r_text, self._r_lps = [], "", []
                continue
            if ev["type"] in ("chunk", "final"):
                if self._replay is not None:
                    ev = self._skip_replayed(ev)
                    if ev is None:
                        continue
                self._sent_ids += list(ev.get("token_ids") or [])
                self._sent_text += ev.get("text") or ""
            if ev["type"] == "final":
                ev = {**ev, "spec_metrics": {**ev["spec_metrics"], "replica_restarts": self.restarts}}
            return ev

    def _skip_replayed(self, ev: dict) -> dict | None:
        """While re-generating the already-sent prefix: check it matches, hide it, return the rest."""
        want_ids, want_text = self._replay
        self._r_ids += list(ev.get("token_ids") or [])
        self._r_text += ev.get("text") or ""
        self._r_lps += ev.get("logprobs") or []
        k, m = min(len(self._r_ids), len(want_ids)), min(len(self._r_text), len(want_text))
        if self._r_ids[:k] != want_ids[:k] or self._r_text[:m] != want_text[:m]:
            raise ReplicaDiedError(
                f"the engine replica serving this request died after {len(want_ids)} tokens were streamed, "
                "and the restarted request diverged from the streamed text; the text streamed so far is "
                "correct but incomplete. Retry the request.", len(want_ids))
        caught_up = len(self._r_ids) >= len(want_ids) and len(self._r_text) >= len(want_text)
        if not caught_up:
            if ev["type"] == "final":
                raise ReplicaDiedError(
                    "the restarted request ended before reproducing the streamed text; the text "
                    "streamed so far is correct but incomplete. Retry the request.", len(want_ids))
            return None
        self._replay = None
        # logprob entries align with token ids (one per token), so the same cut applies
        lps = self._r_lps[len(want_ids):] if ev.get("logprobs") is not None or self._r_lps else None
        return {**ev, "token_ids": self._r_ids[len(want_ids):], "text": self._r_text[len(want_text):], "logprobs": lps}
